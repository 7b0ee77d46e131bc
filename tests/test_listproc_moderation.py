"""Held posts in memory (mailrelay.listproc.moderation): expiry on an explicit clock,
decisions on entries that are no held posts, and the handler's contract."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import TestCase

from mailrelay.listproc.moderation import HeldPostExpiry, Moderation, NotHeld, is_held_post
from mailrelay.listproc.posting import PostAction, PostDecision
from mailrelay.listproc.tokens import PendingAction, new_pending
from mailrelay.model import Destination, EntryKind, EntryState, Envelope, Route
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


class _Crash(BaseException):
    """The process dying: no handler catches it, nothing after it runs."""


class _CrashingOn:
    """``target`` (a store), except that calling ``method`` crashes the process."""

    def __init__(self, target, method):
        self._target, self._method = target, method

    def __getattr__(self, name):
        if name == self._method:
            raise _Crash(name)
        return getattr(self._target, name)


OWNER = "owner@example.com"


class CrashBetweenTokenAndDecisionTests(TestCase):
    """An owner's reply to a held post's notice, with the process dying in the middle;
    list processing wired as the daemon wires it (make_list_processing)."""

    def setUp(self):
        from mailrelay.config import load_settings

        self.settings = load_settings(None, environ={})
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.spool = MemorySpool(self.clock)
        self.registry = MemoryRegistry()
        self.registry.create_list(LIST, owners=[OWNER])
        self.registry.add_members(LIST, ["member@example.org"])
        self.post_id = ModerationTests.hold(self)
        (self.token,) = [p.token for p in self.registry.pending(LIST)]

    def process_reply(self, spool, registry):
        """Process the owner's claimed reply with list processing over these stores."""
        from mailrelay.service import make_list_processing

        processing = make_list_processing(self.settings, spool, registry, self.clock)
        claimed = self.successResultOf(self.spool.claim_due(self.clock.seconds(), 100))
        (entry,) = [e for e in claimed if e.destination.subaddress == "confirm"]
        return defer.Deferred.fromCoroutine(processing.processor.process(entry))

    def reply(self, body="approve\n"):
        confirm = f"test-confirm+{self.token}@example.com"
        envelope = Envelope(
            OWNER,
            (Destination(LIST, "confirm", confirm),),
            self.clock.seconds(),
            message_id="<r@x>",
        )
        message = f"From: {OWNER}\r\nTo: {confirm}\r\nSubject: Re: x\r\n\r\n{body}".encode()
        self.successResultOf(self.spool.store(envelope, message, [Route()]))

    def restart(self):
        self.successResultOf(self.spool.recover())

    def state(self, entry_id):
        return ModerationTests.state(self, entry_id)

    def copies(self):
        return [e.destination.address for e in self.spool.entries() if e.kind is EntryKind.MEMBER]

    def answers(self):
        return [
            self.spool.get_message(e.message_key)
            for e in self.spool.entries()
            if e.kind is EntryKind.NOTICE and e.destination.address == OWNER
        ]

    def test_crash_before_the_decision_keeps_the_token(self):
        """The process dies after the reply's token was checked and before the approval
        reached the spool: the post is still held and the token still valid, and the
        reply, processed again after the restart, approves the post (once)."""
        self.reply()
        crashing = _CrashingOn(self.spool, "expand")
        self.failureResultOf(self.process_reply(crashing, self.registry), _Crash)
        self.assertEqual(self.state(self.post_id).state, EntryState.HELD)
        self.assertEqual([p.token for p in self.registry.pending(LIST)], [self.token])
        self.assertEqual(self.copies(), [])

        self.restart()
        self.assertIsNone(self.successResultOf(self.process_reply(self.spool, self.registry)))
        self.assertEqual(self.state(self.post_id).state, EntryState.DONE)
        self.assertEqual(self.copies(), ["member@example.org"])
        self.assertEqual(self.registry.pending(LIST), ())
        (answer,) = self.answers()
        self.assertIn(b"approved", answer)

    def test_crash_after_the_decision_does_not_repeat_it(self):
        """The process dies after the approval was recorded and before the token was
        dropped: after the restart the reply finds the post decided, changes nothing
        (no second set of copies) and drops the token."""
        self.reply()
        crashing = _CrashingOn(self.registry, "discard_pending")
        self.failureResultOf(self.process_reply(self.spool, crashing), _Crash)
        self.assertEqual(self.state(self.post_id).state, EntryState.DONE)
        self.assertEqual(len(self.registry.pending(LIST)), 1)

        self.restart()
        self.successResultOf(self.process_reply(self.spool, self.registry))
        self.assertEqual(self.copies(), ["member@example.org"])
        self.assertEqual(self.registry.pending(LIST), ())
        (answer,) = self.answers()
        self.assertIn(b"no longer held", answer)

    def test_reply_deciding_nothing_keeps_the_token(self):
        """A reply that decides nothing leaves the token as it was; a later proper
        reply decides the post."""
        self.reply("thanks, I will look at it later\n")
        self.successResultOf(self.process_reply(self.spool, self.registry))
        self.assertEqual(self.state(self.post_id).state, EntryState.HELD)
        self.assertEqual([p.token for p in self.registry.pending(LIST)], [self.token])
        self.reply("discard\n")
        self.successResultOf(self.process_reply(self.spool, self.registry))
        self.assertEqual(self.state(self.post_id).state, EntryState.DONE)
        self.assertIn("discarded by owner@example.com", self.state(self.post_id).last_error)

    def test_two_decisions_at_once_one_wins(self):
        """Two decisions on one post at the same time (a reply and the command line):
        the second waits for the first and then finds the post no longer held."""
        gate = defer.Deferred()
        original = self.spool.expand

        def slow_expand(*args, **kwargs):
            return gate.addCallback(lambda _: original(*args, **kwargs))

        self.spool.expand = slow_expand
        moderation = Moderation(self.spool, self.registry, clock=self.clock)
        first = moderation.approve(self.post_id)
        second = moderation.discard(self.post_id)
        self.assertNoResult(first)
        self.assertNoResult(second)
        gate.callback(None)
        self.assertIn("approved", self.successResultOf(first))
        self.failureResultOf(second, NotHeld)
        self.assertEqual(self.copies(), ["member@example.org"])
