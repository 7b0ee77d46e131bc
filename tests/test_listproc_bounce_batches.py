"""Tests for bounce bursts: mail to ``-bounces`` is claimed, handled and scored in
batches (:meth:`ListProcessor.process_batch`, :meth:`BounceHandler.handle_batch`,
:meth:`BounceScorer.register_many`), and a batch is as safe as one bounce.

In memory, on a ``task.Clock``, with the runner tests' scripted sender.
"""

from __future__ import annotations

from twisted.internet import defer

from mailrelay.errors import RegistryUnavailable
from mailrelay.listproc.bouncing import BounceHandler, BounceScorer, Scored
from mailrelay.listproc.processor import Handled, ListProcessor
from mailrelay.model import Destination, EntryKind, EntryState, Envelope
from mailrelay.runner.service import DELIVERY_QUIET
from tests.test_listproc_processor import RecordingHandler
from tests.test_runner import LIST, MEMBERS, POST, RunnerCase

BOUNCE = b"From: MAILER-DAEMON@mx.example.net\r\nSubject: failure\r\n\r\nNo such user.\r\n"


def verp(address: str) -> Destination:
    local, _, domain = address.partition("@")
    return Destination(LIST, "bounces", f"test-bounces+{local}={domain}@example.com")


class CountingRegistry:
    """Passes everything to ``registry``, counting the member writes."""

    def __init__(self, registry):
        self._registry = registry
        self.writes: list[tuple[str, tuple[str, ...]]] = []
        self.fail_writes: Exception | None = None

    def __getattr__(self, name):
        return getattr(self._registry, name)

    def update_member(self, list_address, address, changes):
        self.writes.append(("update_member", (address,)))
        return self._registry.update_member(list_address, address, changes)

    def update_members(self, list_address, changes):
        self.writes.append(("update_members", tuple(sorted(changes))))
        if self.fail_writes is not None:
            raise self.fail_writes
        return self._registry.update_members(list_address, changes)


class BatchCase(RunnerCase):
    """A runner whose processor has the real -bounces handler (and a recording
    -request one), over a registry that counts member writes."""

    batch_limit = 500

    def make_runner(self, **options):
        self.counting = CountingRegistry(self.registry)
        self.scorer = BounceScorer(self.counting)
        self.request = RecordingHandler()
        self.processor = ListProcessor(
            self.spool,
            self.counting,
            clock=self.clock,
            handlers={
                "bounces": BounceHandler(self.counting, self.scorer),
                "request": self.request,
            },
            batch_limit=self.batch_limit,
        )
        return super().make_runner(processor=self.processor, **options)

    def receive(self, *destinations, wake=True):
        """Store messages as LMTP does (through the runner, or with ``wake=False``
        straight into the spool), one per destination, all before the runner's
        next reactor turn."""
        ids = []
        store = self.runner.enqueue if wake else self.spool.enqueue
        for n, destination in enumerate(destinations):
            envelope = Envelope(
                "", (destination,), self.clock.seconds(), message_id=f"<b{n}@mx.example.net>"
            )
            ids.extend(self.successResultOf(store(envelope, BOUNCE)))
        return ids

    def scores(self):
        return {r.address: r.bounce_score for r in self.registry.member_records(LIST)}

    def inbound_states(self):
        return [e.state for e in self.spool.entries() if e.kind is EntryKind.INBOUND]


class BurstTests(BatchCase):
    def test_burst_is_scored_in_one_registry_transaction(self):
        """Bounces that arrive together are claimed together and every member's
        score is written in one registry write; each request is DONE with its note."""
        self.receive(*(verp(m) for m in MEMBERS))
        self.assertEqual(self.counting.writes, [])  # not processed while being stored
        self.settle()
        self.assertEqual(self.counting.writes, [("update_members", MEMBERS)])
        self.assertEqual(self.scores(), dict.fromkeys(MEMBERS, 1.0))
        entries = [e for e in self.spool.entries() if e.kind is EntryKind.INBOUND]
        self.assertEqual({e.state for e in entries}, {EntryState.DONE})
        self.assertEqual(
            sorted(e.last_error for e in entries),
            [f"verp bounce: {m}: counted" for m in MEMBERS],
        )

    def test_one_bounce_alone_is_processed_at_once(self):
        """A single bounce is processed on the runner's next turn, no timer needed."""
        self.receive(verp(MEMBERS[0]))
        self.settle()
        self.assertEqual(self.inbound_states(), [EntryState.DONE])
        self.assertEqual(self.scores()[MEMBERS[0]], 1.0)
        self.assertEqual(self.clock.seconds(), self.start_time)

    def test_batches_are_bounded(self):
        """At most batch_limit bounces go to the handler at once."""
        self.processor._batch_limit = 2
        self.receive(*(verp(m) for m in MEMBERS))
        self.settle()
        self.assertEqual(
            self.counting.writes,
            [("update_members", MEMBERS[:2]), ("update_members", MEMBERS[2:])],
        )

    def test_two_bounces_of_one_member_count_once(self):
        """Two bounces of one member in one batch raise the score once (at most
        one increase a day); the second is noted as already counted."""
        self.receive(verp(MEMBERS[0]), verp(MEMBERS[0]))
        self.settle()
        self.assertEqual(self.scores()[MEMBERS[0]], 1.0)
        notes = sorted(e.last_error for e in self.spool.entries() if e.kind is EntryKind.INBOUND)
        self.assertEqual(
            notes,
            [
                f"verp bounce: {MEMBERS[0]}: already counted today",
                f"verp bounce: {MEMBERS[0]}: counted",
            ],
        )

    def test_other_subaddresses_are_processed_one_by_one(self):
        """Mail to a handler without handle_batch still reaches handle(), once each."""
        self.receive(
            Destination(LIST, "request", "test-request@example.com"),
            Destination(LIST, "request", "test-request@example.com"),
        )
        self.settle()
        self.assertEqual(len(self.request.mails), 2)
        self.assertEqual(self.inbound_states(), [EntryState.DONE, EntryState.DONE])

    def test_posts_are_still_delivered_with_bounces_in_the_batch(self):
        """A post and bounces claimed in one batch: the post's copies are sent and
        the bounces scored."""
        self.successResultOf(
            self.spool.enqueue(Envelope("poster@example.org", (POST,), self.clock.seconds()), b"x")
        )
        self.receive(verp(MEMBERS[0]), verp(MEMBERS[1]))
        self.settle()
        self.assertEqual(sorted(r for s in self.sender.sent for r in s.rcpts), sorted(MEMBERS))
        self.assertEqual(self.counting.writes, [("update_members", MEMBERS[:2])])

    def setUp(self):
        super().setUp()
        self.start_time = self.clock.seconds()


class BatchSafetyTests(BatchCase):
    def test_registry_trouble_retries_the_whole_batch(self):
        """When the score write fails, nothing is scored and every bounce of the
        batch is tried again later (kept, not lost); then each counts once."""
        self.counting.fail_writes = RegistryUnavailable("locked")
        self.receive(*(verp(m) for m in MEMBERS))
        self.settle()
        self.assertEqual(self.inbound_states(), [EntryState.RETRY] * 3)
        self.assertEqual(self.scores(), dict.fromkeys(MEMBERS, 0.0))
        self.counting.fail_writes = None
        self.advance(61)
        self.assertEqual(self.inbound_states(), [EntryState.DONE] * 3)
        self.assertEqual(self.scores(), dict.fromkeys(MEMBERS, 1.0))

    def test_replayed_batch_is_not_scored_twice(self):
        """A crash after the scores were written but before the requests were
        DONE processes the batch again after the restart: the scores stay as
        they are (the second pass sees the bounces as counted today)."""
        ids = self.receive(*(verp(m) for m in MEMBERS), wake=False)
        entries = [e for e in self.spool.entries() if e.entry_id in ids]
        first = self.successResultOf(
            defer.Deferred.fromCoroutine(self.processor.process_batch(entries))
        )
        # The "crash": the updates in ``first`` are never written.
        self.assertEqual({u.state for u in first}, {EntryState.DONE})
        self.assertEqual(self.scores(), dict.fromkeys(MEMBERS, 1.0))
        again = self.successResultOf(
            defer.Deferred.fromCoroutine(self.processor.process_batch(entries))
        )
        self.assertEqual(self.scores(), dict.fromkeys(MEMBERS, 1.0))
        self.assertEqual(
            sorted(u.error for u in again),
            [f"verp bounce: {m}: already counted today" for m in MEMBERS],
        )

    def test_batch_failure_falls_back_to_one_by_one(self):
        """A handler whose handle_batch fails (a bug, a message it chokes on) gets
        the mails one by one: the bad one FAILED with the reason, the others DONE."""

        class Choosy(RecordingHandler):
            def handle_batch(self, mails):
                raise ValueError("cannot do them together")

        choosy = Choosy(
            lambda mail: (
                ValueError("bad")
                if mail.entry.message_id == "<b1@mx.example.net>"
                else Handled(note="ok")
            )
        )
        self.processor._handlers["bounces"] = choosy
        self.receive(*(verp(m) for m in MEMBERS))
        self.settle()
        states = {e.message_id: e.state for e in self.spool.entries()}
        self.assertEqual(
            states,
            {
                "<b0@mx.example.net>": EntryState.DONE,
                "<b1@mx.example.net>": EntryState.FAILED,
                "<b2@mx.example.net>": EntryState.DONE,
            },
        )
        self.flushLoggedErrors(ValueError)


class ScorerBatchTests(BatchCase):
    def test_register_many_skips_members_removed_meanwhile(self):
        """A member that is gone when the batch is written is reported as not a
        member, and the others are scored."""
        original = self.registry.update_members

        def remove_first(list_address, changes):
            self.registry.remove_members(LIST, [MEMBERS[0]])
            return original(list_address, changes)

        self.counting.update_members = remove_first
        results = self.scorer.register_many(
            LIST, [(m, "verp") for m in MEMBERS], self.clock.seconds()
        )
        self.assertEqual(results, [Scored.NOT_A_MEMBER, Scored.COUNTED, Scored.COUNTED])
        self.assertEqual(self.scores(), dict.fromkeys(MEMBERS[1:], 1.0))


class DeliveryFirstTests(BatchCase):
    """New list-processing mail waits while copies are being delivered."""

    def post_in_flight(self):
        """A post whose copies are handed to the sender and not yet answered."""
        self.sender.hold = True
        envelope = Envelope("poster@example.org", (POST,), self.clock.seconds())
        self.successResultOf(self.runner.enqueue(envelope, b"Subject: post\r\n\r\nHi\r\n"))
        self.settle()
        self.assertTrue(self.sender.held)
        self.addCleanup(self.release_all)

    def release_all(self):
        self.sender.hold = False
        while self.sender.held:
            self.sender.release()
        self.settle()

    def test_bounce_waits_for_delivery_in_progress(self):
        """A bounce arriving while copies go out is neither stored nor acknowledged
        until that delivery is done and DELIVERY_QUIET has passed without
        another; then it is stored and scored."""
        self.post_in_flight()
        envelope = Envelope("", (verp(MEMBERS[0]),), self.clock.seconds())
        stored = self.runner.enqueue(envelope, BOUNCE)
        self.advance(0.5)
        self.assertNoResult(stored)
        self.assertEqual(self.inbound_states(), [EntryState.DONE])  # the post, expanded
        while self.sender.held:
            self.sender.release()
        self.settle()
        self.advance(DELIVERY_QUIET * 0.9)
        self.assertNoResult(stored)
        self.advance(DELIVERY_QUIET * 0.1)
        self.assertEqual(len(self.successResultOf(stored)), 1)
        self.assertEqual(self.scores()[MEMBERS[0]], 1.0)

    def test_posts_one_after_another_keep_bounces_waiting(self):
        """Posts delivered one after another, less than DELIVERY_QUIET apart, keep
        a bounce waiting (up to processing_yield); it is stored once they stop."""
        stored = None
        for n in range(5):
            envelope = Envelope("poster@example.org", (POST,), self.clock.seconds())
            self.successResultOf(self.runner.enqueue(envelope, b"Subject: %d\r\n\r\n" % n))
            self.settle()
            if stored is None:
                stored = self.runner.enqueue(
                    Envelope("", (verp(MEMBERS[0]),), self.clock.seconds()), BOUNCE
                )
            self.advance(DELIVERY_QUIET / 2)
            self.assertNoResult(stored)
        self.assertEqual(len(self.sender.sent), 5)
        self.advance(DELIVERY_QUIET / 2)
        self.assertEqual(len(self.successResultOf(stored)), 1)

    def test_wait_is_bounded(self):
        """However long a delivery takes, a bounce waits at most processing_yield
        seconds (1 by default) before it is stored."""
        self.post_in_flight()
        stored = self.runner.enqueue(
            Envelope("", (verp(MEMBERS[0]),), self.clock.seconds()), BOUNCE
        )
        self.clock.advance(0.9)
        self.assertNoResult(stored)
        self.advance(0.1)
        self.assertEqual(len(self.successResultOf(stored)), 1)
        self.assertEqual(self.scores()[MEMBERS[0]], 1.0)
        self.assertTrue(self.sender.held)  # the delivery is still under way

    def test_posts_do_not_wait(self):
        """Posts (and mail with a post among its recipients) are stored at once."""
        self.post_in_flight()
        both = Envelope("poster@example.org", (POST, verp(MEMBERS[0])), self.clock.seconds())
        self.assertEqual(len(self.successResultOf(self.runner.enqueue(both, b"x"))), 2)

    def test_no_wait_when_turned_off(self):
        """With processing_yield = 0 a bounce is stored at once, delivery or not."""
        self.stop()
        self.runner = self.make_runner(processing_yield=0)
        self.runner.startService()
        self.post_in_flight()
        stored = self.runner.enqueue(
            Envelope("", (verp(MEMBERS[0]),), self.clock.seconds()), BOUNCE
        )
        self.assertEqual(len(self.successResultOf(stored)), 1)

    def test_bad_processing_yield(self):
        """processing_yield must be a number of seconds >= 0."""
        for value in (-1, True, "1", float("inf")):
            with self.subTest(value=value):
                self.assertRaises(ValueError, self.make_runner, processing_yield=value)
