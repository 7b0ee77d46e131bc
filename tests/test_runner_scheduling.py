"""The runner's scheduler never forgets due work (found by tests/test_reliability_faults.py).

Retries came due while the runner had its maximum of batches in flight: the
timer that announced them was spent, the batches' own results were final, and
nothing ever claimed the retries again (until a restart).
"""

from __future__ import annotations

from mailrelay.model import EntryState
from tests.test_runner import MESSAGE, RunnerCase


class DueWorkTests(RunnerCase):
    def test_retry_due_while_batches_are_full_is_claimed_when_one_finishes(self):
        """A retry that comes due while two batches wait on the smarthost is sent as soon
        as they finish, without a wake-up from outside."""
        self.sender.replies["anne@example.com"] = [(451, b"4.3.0 try later"), (250, b"ok")]
        self.enqueue()
        self.assertEqual(self.states()["anne@example.com"], EntryState.RETRY)
        self.sender.hold = True
        for n in (2, 3):
            self.enqueue(message=MESSAGE.replace(b"<post@", b"<post%d@" % n))
        self.assertGreaterEqual(len(self.sender.held), 2)
        self.advance(3 * 3600)  # the retry is due: its timer fires while both wait
        self.sender.hold = False
        while self.sender.held:
            self.sender.release()
            self.settle()
        retried = [s for s in self.sender.sent if "anne@example.com" in s.rcpts]
        first_post = [s for s in retried if b"<post@" in s.message.data]
        self.assertEqual(len(first_post), 2, self.sender.sent)
        self.assertEqual(
            {e.state for e in self.spool.entries() if e.destination.address == "anne@example.com"},
            {EntryState.DONE},
        )
