"""Held posts in memory (mailrelay.listproc.moderation): expiry on an explicit clock,
decisions on entries that are no held posts, and the handler's contract."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import TestCase

from mailrelay.listproc.moderation import HeldPostExpiry, Moderation, NotHeld, is_held_post
from mailrelay.listproc.posting import PostAction, PostDecision
from mailrelay.listproc.tokens import PendingAction, new_pending
from mailrelay.model import Destination, EntryState, Envelope, Route
from mailrelay.registry import MemoryRegistry
from mailrelay.spool import MemorySpool

LIST = "test@example.com"
DAY = 86400.0
POST = b"From: anne@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


class ModerationTests(TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.spool = MemorySpool(self.clock)
        self.registry = MemoryRegistry()
        self.registry.create_list(LIST, owners=["owner@example.com"])
        self.registry.add_members(LIST, ["member@example.org"])
        self.moderation = Moderation(
            self.spool, self.registry, clock=self.clock, held_post_life=2 * DAY
        )

    def hold(self, subaddress=None):
        envelope = Envelope(
            "anne@example.org",
            (Destination(LIST, subaddress, LIST),),
            self.clock.seconds(),
            message_id="<p@x>",
        )
        d = self.spool.store(envelope, POST, [Route(EntryState.HELD, error="held: x")])
        entry_id = self.successResultOf(d).entry_ids[0]
        if subaddress is not None:
            return entry_id
        pending = new_pending(
            LIST,
            "anne@example.org",
            PendingAction.MODERATE,
            self.clock.seconds(),
            2 * DAY,
            reference=str(entry_id),
        )
        self.registry.add_pending(pending)
        return entry_id

    def state(self, entry_id):
        (entry,) = [e for e in self.spool.entries() if e.entry_id == entry_id]
        return entry

    def test_expiry_runs_on_the_clock(self):
        """HeldPostExpiry discards, on its clock, the posts held longer than held_post_life
        (and their tokens), and leaves younger ones and other held mail alone."""
        old = self.hold()
        bounce = self.hold("bounces")
        expiry = HeldPostExpiry(self.moderation, clock=self.clock, interval=3600)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        self.clock.advance(DAY)
        young = self.hold()
        self.assertIs(self.state(old).state, EntryState.HELD)
        self.clock.advance(DAY + 3600)
        self.assertIs(self.state(old).state, EntryState.DONE)
        self.assertIn("held longer than held_post_life (2 days)", self.state(old).last_error)
        self.assertIs(self.state(young).state, EntryState.HELD)
        self.assertIs(self.state(bounce).state, EntryState.HELD)
        self.assertEqual([p.reference for p in self.registry.pending(LIST)], [str(young)])
        self.assertEqual([h.entry_id for h in self.moderation.held_posts()], [young])

    def test_decisions_need_a_held_post(self):
        """approve/reject/discard of an unknown id, of held mail that is no post, or of a
        decided post fail with NotHeld and change nothing."""
        bounce = self.hold("bounces")
        post = self.hold()
        self.failureResultOf(self.moderation.approve(999), NotHeld)
        self.failureResultOf(self.moderation.discard(bounce), NotHeld)
        self.assertEqual(self.successResultOf(self.moderation.discard(post)), "discarded")
        self.failureResultOf(self.moderation.reject(post, "late"), NotHeld)
        self.assertFalse(is_held_post(self.state(post)))
        self.assertIs(self.state(bounce).state, EntryState.HELD)

    def test_approve_expands_and_wakes(self):
        """Approving queues one copy per member with delivery enabled and calls wake."""
        woken = []
        self.moderation.wake = lambda: woken.append(True)
        self.registry.add_members(LIST, ["second@example.org"])
        post = self.hold()
        result = self.successResultOf(self.moderation.approve(post, by="tester"))
        self.assertIn("2 members", result)
        queued = sorted(e.destination.address for e in self.spool.entries(EntryState.QUEUED))
        self.assertEqual(queued, ["member@example.org", "second@example.org"])
        self.assertEqual(woken, [True])

    def test_handler_only_for_hold_and_reject(self):
        """The handler carries out HOLD and REJECT only; a bad held_post_life is refused."""
        self.moderation.handler(PostDecision(PostAction.HOLD, "x"))
        self.assertRaises(ValueError, self.moderation.handler, PostDecision(PostAction.ACCEPT, "x"))
        self.assertRaises(
            ValueError, Moderation, self.spool, self.registry, clock=self.clock, held_post_life=0
        )
