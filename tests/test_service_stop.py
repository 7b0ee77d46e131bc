"""Stopping the composed service is bounded: a smarthost holding its replies cannot keep a
SIGTERM waiting (the black-box proof is in tests/test_reliability_kill.py)."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.service import STOP_GRACE, _OrderedStop


class _Child(service.Service):
    def __init__(self, name, stopped, stop_result):
        self.name, self._stopped, self._result = name, stopped, stop_result

    def stopService(self):  # noqa: N802
        super().stopService()
        self._stopped.append(self.name)
        return self._result


class OrderedStopTests(SynchronousTestCase):
    def build(self, *results):
        clock = task.Clock()
        top = _OrderedStop(clock)
        stopped = []
        for n, result in enumerate(results):
            _Child(f"child{n}", stopped, result).setServiceParent(top)
        top.startService()
        return clock, top, stopped

    def test_children_stop_last_first_one_after_the_other(self):
        """The last child added stops first; the next only once the previous has finished."""
        first = defer.Deferred()
        clock, top, stopped = self.build(None, first)
        d = top.stopService()
        self.assertEqual(stopped, ["child1"])
        first.callback(None)
        self.assertEqual(stopped, ["child1", "child0"])
        self.successResultOf(d)

    def test_stop_gives_up_after_the_grace_period(self):
        """A child that never finishes stopping holds the stop for STOP_GRACE seconds, no longer;
        the children after it are left alone (as after a crash) and nothing is cancelled."""
        never = defer.Deferred()
        clock, top, stopped = self.build(None, never)
        d = top.stopService()
        clock.advance(STOP_GRACE - 0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(stopped, ["child1"])
        self.assertFalse(never.called)
        self.flushLoggedErrors()

    def test_failed_child_is_logged_and_the_rest_stop(self):
        """A child whose stop fails is logged; the others still stop."""
        clock, top, stopped = self.build(None, defer.fail(RuntimeError("boom")))
        self.successResultOf(top.stopService())
        self.assertEqual(stopped, ["child1", "child0"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
