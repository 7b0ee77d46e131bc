"""Tests for :mod:`mailrelay.runner`: routing, fan-out, results, retries, the breaker, the package layout.

Most tests run in memory on a ``task.Clock`` with MemorySpool, MemoryRegistry
and a scripted sender.  The devmode test drives real Connections to an
in-memory FakeMTA; the end-to-end tests use SQLite files, the connection pool
and FakeMTA over loopback.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.errors import RegistryUnavailable, SpoolError
from mailrelay.interfaces import IMessageSender, IMessageStore
from mailrelay.lmtp import AcceptedRecipient, Transaction
from mailrelay.lmtp.policy import InboundHandler
from mailrelay.model import Bounce, Destination, EntryKind, EntryState, Envelope, Member
from mailrelay.mta.connection import Connection
from mailrelay.mta.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DataRefused,
    SenderRefused,
    SmarthostUnreachable,
    TLSFailed,
)
from mailrelay.mta.message import WireMessage
from mailrelay.mta.pool import ConnectionPool
from mailrelay.registry import MemoryRegistry, SQLiteRegistry
from mailrelay.runner import CIRCUIT_STATUS_KEY, DeliveryRunner
from mailrelay.runner.breaker import CircuitBreaker
from mailrelay.spool import MemorySpool, SQLiteSpool
from mailrelay.testing.fakemta import FakeMTA
from tests.test_pool import MemorySmarthost

LIST = "test@example.com"
POST = Destination(LIST, None, LIST)
OWNER = Destination(LIST, "owner", "test-owner@example.com")
MEMBERS = ("anne@example.com", "bart@example.com", "cris@example.com")
MESSAGE = (
    b"X-MailFrom: poster@example.org\r\n"
    b"From: Poster <poster@example.org>\r\n"
    b"To: test@example.com\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <post@example.org>\r\n"
    b"List-Id: Upstream <up.example.net>\r\n"
    b"\r\n"
    b"Body line.\r\n"
)
START = 1_700_000_000.0


@dataclass(frozen=True)
class Sent:
    sender: str
    rcpts: tuple[str, ...]
    message: WireMessage


@implementer(IMessageSender)
class ScriptedSender:
    """Answers transactions from a script, records them, and can hold them.

    ``replies[address]`` lists the replies for that recipient's successive
    attempts (the last one repeats); anything unscripted is accepted.
    ``error`` fails whole transactions; ``hold`` keeps them pending in ``held``.
    """

    def __init__(self, max_connections=4):
        self.max_connections = max_connections
        self.sent: list[Sent] = []
        self.replies: dict[str, list[tuple[int, bytes]]] = {}
        self.error: Exception | None = None
        self.hold = False
        self.held: list[tuple[Sent, defer.Deferred]] = []

    def sendmail(self, sender, recipients, message):
        sent = Sent(sender, tuple(recipients), message)
        self.sent.append(sent)
        if self.hold:
            d = defer.Deferred()
            self.held.append((sent, d))
            return d
        return self.answer(sent)

    def answer(self, sent):
        if self.error is not None:
            return defer.fail(self.error)
        refused = {}
        for rcpt in sent.rcpts:
            script = self.replies.get(rcpt)
            if script:
                reply = script.pop(0) if len(script) > 1 else script[0]
                if reply[0] >= 300:
                    refused[rcpt] = reply
        return defer.succeed(refused)

    def release(self):
        """Answer the oldest held transaction as the script says."""
        sent, d = self.held.pop(0)
        self.answer(sent).chainDeferred(d)

    def quit(self):
        return defer.succeed(None)

    def recipients(self):
        return sorted(r for s in self.sent for r in s.rcpts)


def _post_envelope(clock, *destinations):
    return Envelope(
        "poster@example.org",
        destinations or (POST,),
        clock.seconds(),
        message_id="<post@example.org>",
    )


class RunnerCase(SynchronousTestCase):
    """A started runner over MemorySpool, MemoryRegistry and a ScriptedSender."""

    members = MEMBERS
    runner_options: dict = {}

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.spool = MemorySpool(self.clock)
        self.registry = MemoryRegistry()
        self.registry.create_list(LIST, "Test List", ["owner@example.org", "boss@example.org"])
        self.registry.add_members(LIST, self.members)
        self.sender = ScriptedSender()
        self.runner = self.make_runner()
        self.runner.startService()
        self.addCleanup(self.stop)

    def make_runner(self, **options):
        # Most tests pin the timer schedule exactly; PollTests covers polling.
        options = {
            "random": random.Random(42),
            "poll_interval": None,
            **self.runner_options,
            **options,
        }
        return DeliveryRunner(self.spool, self.registry, self.sender, clock=self.clock, **options)

    def stop(self):
        if self.runner.running:
            self.successResultOf(self.runner.stopService())

    def settle(self):
        """Run every call that is due now (the runner's next reactor turns)."""
        for _ in range(10_000):
            if not any(c.getTime() <= self.clock.seconds() for c in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)
        raise AssertionError("the runner never settled")

    def advance(self, seconds):
        self.clock.advance(seconds)
        self.settle()

    def enqueue(self, *destinations, message=MESSAGE, wake=True):
        envelope = _post_envelope(self.clock, *destinations)
        ids = self.successResultOf(self.spool.enqueue(envelope, message))
        if wake:
            self.runner.wake()
            self.settle()
        return ids

    def entries(self, kind=EntryKind.MEMBER, state=None):
        return {e.destination.address: e for e in self.spool.entries(state) if e.kind is kind}

    def states(self, kind=EntryKind.MEMBER):
        return {address: e.state for address, e in self.entries(kind).items()}


class RoutingTests(RunnerCase):
    members = (*MEMBERS, Member("dora@example.com", delivery_enabled=False))

    def test_post_goes_to_enabled_members(self):
        """A post is replaced by one MEMBER entry per member with delivery enabled,
        sent from the list's -bounces address; the post entry is DONE."""
        (post_id,) = self.enqueue()
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))
        self.assertEqual({s.sender for s in self.sender.sent}, {"test-bounces@example.com"})
        post = [e for e in self.spool.entries() if e.entry_id == post_id][0]
        self.assertEqual((post.state, post.kind), (EntryState.DONE, EntryKind.INBOUND))
        self.assertEqual(self.states(), dict.fromkeys(MEMBERS, EntryState.DONE))
        for entry in self.entries().values():
            self.assertEqual(entry.destination.list_address, LIST)
            self.assertEqual(entry.message_key, post.message_key)
            self.assertEqual(entry.attempts, 1)

    def test_owner_mail_goes_to_owners_without_list_headers(self):
        """Mail to -owner goes to every owner, as received (no list headers)."""
        self.enqueue(OWNER)
        self.assertEqual(self.sender.recipients(), ["boss@example.org", "owner@example.org"])
        self.assertNotIn(b"List-Post:", self.sender.sent[0].message.data)
        self.assertEqual(
            self.states(EntryKind.OWNER),
            dict.fromkeys(["owner@example.org", "boss@example.org"], EntryState.DONE),
        )

    def test_commands_and_bounces_are_held(self):
        """Mail to -join/-subscribe, -leave/-unsubscribe, -request, -confirm and
        -bounces is HELD with its sub-address, never sent and never claimed again."""
        addresses = [
            "test-join@example.com",
            "test-subscribe@example.com",
            "test-leave@example.com",
            "test-unsubscribe@example.com",
            "test-request@example.com",
            "test-confirm+cookie@example.com",
            "test-bounces+anne=example.com@example.com",
        ]
        destinations = [self.registry.resolve(a) for a in addresses]
        self.enqueue(*destinations)
        self.advance(10 * 86400)
        self.assertEqual(self.sender.sent, [])
        held = self.spool.entries(EntryState.HELD)
        self.assertEqual([e.destination for e in held], destinations)
        self.assertEqual(
            [e.destination.subaddress for e in held],
            ["join", "join", "leave", "leave", "request", "confirm", "bounces"],
        )

    def test_deleted_list_is_dead_lettered(self):
        """A post to a list deleted before delivery is FAILED with the reason."""
        self.enqueue(wake=False)
        self.registry.delete_list(LIST)
        self.runner.wake()
        self.settle()
        (entry,) = self.spool.entries()
        self.assertEqual(entry.state, EntryState.FAILED)
        self.assertIn("no longer exists", entry.last_error)
        self.assertEqual(self.sender.sent, [])

    def test_list_without_members(self):
        """A post to a list with no enabled members is DONE and nothing is sent."""
        self.registry.remove_members(LIST, MEMBERS)
        self.enqueue()
        self.assertEqual(self.sender.sent, [])
        self.assertEqual(self.spool.counts()[EntryState.DONE], 1)

    def test_list_without_owners(self):
        """-owner mail for a list without owners is dead-lettered, not lost silently."""
        self.registry.create_list("lonely@example.com")
        self.enqueue(Destination("lonely@example.com", "owner", "lonely-owner@example.com"))
        (entry,) = self.spool.entries()
        self.assertEqual(entry.state, EntryState.FAILED)
        self.assertIn("no owners", entry.last_error)

    def test_duplicate_rcpt_sent_once(self):
        """The posting address given twice in one LMTP transaction is sent once per member."""
        self.enqueue(POST, POST)
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))


class InlineRoutingTests(RoutingTests):
    """RoutingTests again, with messages stored through the runner itself
    (routed in the transaction that stores them) rather than by a batch."""

    def enqueue(self, *destinations, message=MESSAGE, wake=True):
        if not wake:
            return super().enqueue(*destinations, message=message, wake=False)
        envelope = _post_envelope(self.clock, *destinations)
        ids = self.successResultOf(self.runner.enqueue(envelope, message))
        self.settle()
        return ids


class StoreTests(RunnerCase):
    """DeliveryRunner.enqueue: routing while storing, and delivery without a claim."""

    def store(self, *destinations, message=MESSAGE):
        envelope = _post_envelope(self.clock, *destinations)
        return self.successResultOf(self.runner.enqueue(envelope, message))

    def count_calls(self, obj, name):
        calls = []
        original = getattr(obj, name)

        def counted(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        setattr(obj, name, counted)
        return calls

    def test_post_stored_routed_and_delivered_without_a_claim(self):
        """A post is stored with its member copies in one spool write and
        delivered at once: no claim, no expand, one result write."""
        claims = self.count_calls(self.spool, "claim_due")
        expands = self.count_calls(self.spool, "expand")
        updates = self.count_calls(self.spool, "update")
        (post_id,) = self.store()
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))
        self.settle()
        self.assertEqual((claims, expands, len(updates)), ([], [], 1))
        post = [e for e in self.spool.entries() if e.entry_id == post_id][0]
        self.assertEqual((post.state, post.kind), (EntryState.DONE, EntryKind.INBOUND))
        self.assertEqual(self.states(), dict.fromkeys(MEMBERS, EntryState.DONE))

    def test_stored_post_is_delivered_from_what_routing_has_in_hand(self):
        """A post (and -owner mail) delivered without a claim is sent from the bytes
        just stored and the list read at routing: the message is not read back
        from the spool and the list is read once per destination."""
        reads = self.count_calls(self.spool, "get_message")
        lists = self.count_calls(self.registry, "get_list")
        self.store(POST, OWNER)
        self.settle()
        owners = ("boss@example.org", "owner@example.org")
        self.assertEqual(self.sender.recipients(), sorted((*MEMBERS, *owners)))
        self.assertEqual((reads, lists), ([], [(LIST,), (LIST,)]))
        by_first = {sent.rcpts[0]: sent.message.data for sent in self.sender.sent}
        self.assertIn(b"List-Id: Test List <test.example.com>\r\n", by_first[MEMBERS[0]])
        self.assertTrue(by_first["boss@example.org"].startswith(MESSAGE))

    def test_provides_imessagestore(self):
        """The runner is an IMessageStore, which the LMTP policy can store into."""
        self.assertTrue(verifyObject(IMessageStore, self.runner))

    def test_fires_with_entry_ids_once_stored(self):
        """The Deferred fires with one id per destination, in order, like ISpool.enqueue."""
        ids = self.store(POST, OWNER)
        self.assertEqual(len(ids), 2)
        inbound = [e for e in self.spool.entries() if e.kind is EntryKind.INBOUND]
        self.assertEqual([e.entry_id for e in inbound], ids)
        self.assertEqual([e.destination for e in inbound], [POST, OWNER])

    def test_large_list_is_expanded_by_a_batch(self):
        """A post to a list larger than inline_limit is stored alone and expanded
        by a batch: its members are counted, not read, while it is stored."""
        self.runner = self.make_runner(inline_limit=2)
        self.stop()
        self.runner.startService()
        lookups = self.count_calls(self.registry, "members")
        expands = self.count_calls(self.spool, "expand")
        counts = self.count_calls(self.registry, "member_count")
        self.store()
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))
        self.assertEqual((len(counts), len(lookups), len(expands)), (1, 1, 1))
        with capturedLogs() as events:
            self.store()
        self.assertEqual((len(counts), len(lookups), len(expands)), (1, 2, 2))
        self.assertEqual(len(self.sender.recipients()), 2 * len(MEMBERS))
        (stored,) = [e for e in events if e.get("code") == 250 and e.get("event") != "delivered"]
        self.assertIn("to be expanded by a delivery batch", stored["log_format"])

    def test_registry_without_member_count(self):
        """A registry written before member_count existed still works: the
        members are read to learn the list's size."""

        class OldRegistry:
            def __init__(self, registry):
                self._registry = registry

            def __getattr__(self, name):
                if name == "member_count":
                    raise AttributeError(name)
                return getattr(self._registry, name)

        self.stop()
        self.runner = DeliveryRunner(
            self.spool, OldRegistry(self.registry), self.sender, clock=self.clock, inline_limit=2
        )
        self.runner.startService()
        self.store()
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))

    def test_copies_wait_in_the_queue_when_the_runner_is_busy(self):
        """With a batch in flight per connection (four), a fifth post's copies are
        stored QUEUED and claimed once a batch finishes: nothing waits in memory."""
        self.sender.hold = True
        for _ in range(5):
            self.store()
        self.assertEqual(len(self.sender.held), 4)
        counts = self.spool.counts()
        self.assertEqual((counts[EntryState.INFLIGHT], counts[EntryState.QUEUED]), (12, 3))
        self.sender.hold = False
        while self.sender.held:
            self.sender.release()
            self.settle()
        self.assertEqual(self.spool.counts()[EntryState.DONE], 20)
        self.assertEqual(len(self.sender.recipients()), 15)

    def test_stored_while_stopped_is_delivered_after_start(self):
        """A stopped runner still stores (QUEUED, nothing in flight); it delivers after start."""
        self.stop()
        self.store()
        self.assertEqual(self.spool.counts()[EntryState.QUEUED], 3)
        self.assertEqual(self.sender.sent, [])
        self.runner = self.make_runner()
        self.runner.startService()
        self.settle()
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))

    def test_claimed_copies_survive_a_crash(self):
        """Copies stored in flight for delivery are sent again after a crash:
        the next runner's start queues them again."""
        self.sender.hold = True
        self.store()
        self.assertEqual(self.spool.counts()[EntryState.INFLIGHT], 3)
        # The process dies: the held transaction never answers.
        self.sender = ScriptedSender()
        self.runner = self.make_runner()
        self.runner.startService()
        self.settle()
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))
        self.assertEqual(self.states(), dict.fromkeys(MEMBERS, EntryState.DONE))

    def test_registry_trouble_leaves_the_post_to_a_batch(self):
        """If the registry cannot be read while storing, the message is still
        stored (and acknowledged); a batch routes it once the registry is back."""
        get_list = self.registry.get_list
        calls = []

        def broken(address):
            calls.append(address)
            if len(calls) <= 2:
                raise RegistryUnavailable("database is locked")
            return get_list(address)

        self.registry.get_list = broken
        (post_id,) = self.store()
        self.assertEqual(self.sender.sent, [])
        (post,) = self.spool.entries()
        self.assertEqual((post.entry_id, post.state), (post_id, EntryState.RETRY))
        self.advance(60)
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))

    def test_routing_logged_once(self):
        """Storing a post logs how many copies were queued, once."""
        with capturedLogs() as events:
            self.store()
        lines = [e["log_format"] for e in events if "copies queued" in e["log_format"]]
        self.assertEqual(len(lines), 1)
        (event,) = [e for e in events if "copies queued" in e["log_format"]]
        self.assertEqual((event["count"], event["kind"]), (3, "member"))
        self.assertEqual((event["event"], event["list"]), ("queued", LIST))

    def test_spool_failure_fails_the_store(self):
        """When the spool cannot store the message, enqueue fails with its
        SpoolError (the LMTP policy answers 4xx) and nothing is in flight."""
        self.spool.store = lambda *args, **kwargs: defer.fail(
            SpoolError("spool: disk full", disk_full=True)
        )
        failure = self.failureResultOf(self.runner.enqueue(_post_envelope(self.clock), MESSAGE))
        self.assertTrue(failure.value.disk_full)
        self.settle()
        self.assertEqual(self.sender.sent, [])
        self.successResultOf(self.runner.when_idle())

    def test_bad_envelope(self):
        """Something that is not an Envelope fails as the spool says, storing nothing."""
        self.failureResultOf(self.runner.enqueue(("a@example.org", [POST]), b"x"), TypeError)
        self.assertEqual(self.spool.entries(), [])

    def test_bad_inline_limit(self):
        """inline_limit is an int >= 0."""
        for bad in (-1, 1.5, True, None):
            with self.assertRaises(ValueError, msg=bad):
                self.make_runner(inline_limit=bad)


class FanOutTests(RunnerCase):
    members = tuple(f"m{i:02d}@example.com" for i in range(25))
    runner_options = {"batch_size": 7}

    def test_chunks_batches_and_one_encoding(self):
        """25 members with max_recipients=10, claimed 7 at a time: every member
        gets exactly one copy in transactions of at most 10, and the message is
        read and encoded once for all of them."""
        reads = []
        get_message = self.spool.get_message
        self.spool.get_message = lambda key: reads.append(key) or get_message(key)
        self.enqueue()
        self.assertEqual(self.sender.recipients(), list(self.members))
        self.assertTrue(all(len(s.rcpts) <= 10 for s in self.sender.sent))
        self.assertEqual(len({id(s.message) for s in self.sender.sent}), 1)
        self.assertEqual(len(reads), 1)
        self.assertEqual(set(self.states().values()), {EntryState.DONE})

    def test_one_transaction_when_max_recipients_zero(self):
        """max_recipients=0 puts every member of a batch in one transaction."""
        self.runner = self.make_runner(max_recipients=0, batch_size=100)
        self.runner.startService()
        self.enqueue()
        self.assertEqual([len(s.rcpts) for s in self.sender.sent], [25])


class HeaderTests(RunnerCase):
    def test_list_headers_on_posts(self):
        """Members get the post with List-* headers and Precedence: list in front;
        the incoming List-Id is replaced; the rest of the message is unchanged."""
        self.enqueue()
        data = self.sender.sent[0].message.data
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"List-Id: Test List <test.example.com>\r\n", head)
        for line in (
            b"List-Post: <mailto:test@example.com>",
            b"List-Help: <mailto:test-request@example.com?subject=help>",
            b"List-Subscribe: <mailto:test-join@example.com>",
            b"List-Unsubscribe: <mailto:test-leave@example.com>",
            b"List-Owner: <mailto:test-owner@example.com>",
            b"Precedence: list",
        ):
            self.assertIn(line + b"\r\n", head)
        self.assertNotIn(b"up.example.net", data)
        self.assertIn(b"X-MailFrom: poster@example.org\r\nFrom: Poster", head)
        self.assertEqual(body, b"Body line.\r\n")


class VERPTests(RunnerCase):
    members = (*MEMBERS, '"odd one"@example.com')
    runner_options = {"verp": True}

    def test_one_transaction_per_member_with_verp_sender(self):
        """With VERP each member gets a transaction of its own from
        test-bounces+user=domain@example.com; an address that cannot be encoded
        falls back to the plain -bounces address."""
        self.enqueue()
        senders = {s.rcpts: s.sender for s in self.sender.sent}
        self.assertEqual(
            senders,
            {
                ("anne@example.com",): "test-bounces+anne=example.com@example.com",
                ("bart@example.com",): "test-bounces+bart=example.com@example.com",
                ("cris@example.com",): "test-bounces+cris=example.com@example.com",
                ('"odd one"@example.com',): "test-bounces@example.com",
            },
        )


class ResultTests(RunnerCase):
    def test_partial_refusals(self):
        """Three outcomes: accepted is DONE; 451 is RETRY with a backoff of
        300-375 s; 550 is FAILED and recorded as a bounce of that member."""
        self.sender.replies = {
            "bart@example.com": [(550, b"5.1.1 No such user")],
            "cris@example.com": [(451, b"4.2.0 Try later")],
        }
        self.enqueue()
        entries = self.entries()
        self.assertEqual(entries["anne@example.com"].state, EntryState.DONE)
        bart, cris = entries["bart@example.com"], entries["cris@example.com"]
        self.assertEqual(
            (bart.state, bart.last_error), (EntryState.FAILED, "550 5.1.1 No such user")
        )
        self.assertEqual(
            (cris.state, cris.attempts, cris.last_error),
            (EntryState.RETRY, 1, "451 4.2.0 Try later"),
        )
        self.assertTrue(START + 300 <= cris.next_attempt_at <= START + 375)
        self.assertEqual(
            self.registry.bounces(LIST),
            (Bounce(LIST, "bart@example.com", 550, "5.1.1 No such user", START),),
        )

    def test_retry_451_then_250_on_the_clock(self):
        """A 451 is retried when its time comes (not before), then delivered; the
        recipients already accepted are not sent the message again."""
        self.sender.replies = {"cris@example.com": [(451, b"4.2.0 Try later"), (250, b"ok")]}
        self.enqueue()
        due = self.entries()["cris@example.com"].next_attempt_at
        self.advance(due - self.clock.seconds() - 1)
        self.assertEqual(len(self.sender.sent), 1)
        self.advance(1)
        self.assertEqual([s.rcpts for s in self.sender.sent[1:]], [("cris@example.com",)])
        cris = self.entries()["cris@example.com"]
        self.assertEqual((cris.state, cris.attempts), (EntryState.DONE, 2))
        self.assertEqual(cris.first_attempt_at, START)

    def test_only_timer_is_the_next_retry(self):
        """No polling: after a deferral the runner's only pending call is at the retry time."""
        self.sender.replies = {"cris@example.com": [(451, b"4.2.0 Try later")]}
        self.enqueue()
        due = self.entries()["cris@example.com"].next_attempt_at
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [due])

    def test_backoff_doubles_with_jitter(self):
        """Successive delays double within 25% jitter and stop at max_backoff, and
        recipients deferred together get different retry times."""
        self.sender.replies = {a: [(451, b"busy")] for a in MEMBERS}
        self.enqueue()
        gaps = []
        for _ in range(7):
            entry = self.entries()["anne@example.com"]
            gaps.append(entry.next_attempt_at - self.clock.seconds())
            self.advance(self.spool.next_due() - self.clock.seconds())
            while self.entries()["anne@example.com"].attempts == entry.attempts:
                self.advance(self.spool.next_due() - self.clock.seconds())
        for gap, nominal in zip(gaps, (300, 600, 1200, 2400, 4000, 4000, 4000), strict=True):
            self.assertTrue(
                max(300, nominal * 0.75) <= gap <= min(4000, nominal * 1.25), (gap, nominal)
            )
        retry_times = {e.next_attempt_at for e in self.entries().values()}
        self.assertEqual(len(retry_times), 3)

    def test_dead_letter_after_retry_period(self):
        """A recipient that keeps failing temporarily is tried a last time at
        retry_period after its first attempt, then FAILED with a logged reason;
        it is not a bounce."""
        self.runner = self.make_runner(retry_period=3600)
        self.runner.startService()
        self.sender.replies = {"cris@example.com": [(451, b"4.2.0 Try later")]}
        with capturedLogs() as events:
            self.enqueue()
            while self.entries()["cris@example.com"].state is EntryState.RETRY:
                self.advance(self.spool.next_due() - self.clock.seconds())
        cris = self.entries()["cris@example.com"]
        self.assertEqual(cris.state, EntryState.FAILED)
        self.assertEqual(self.clock.seconds(), START + 3600)
        self.assertTrue(
            cris.last_error.startswith(f"gave up after {cris.attempts} attempts in 1h 0m")
        )
        self.assertTrue(cris.last_error.endswith("451 4.2.0 Try later"))
        self.assertEqual(self.registry.bounces(LIST), ())
        (event,) = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertEqual(
            (event["recipients"], event["list"], event["message_id"]),
            (["cris@example.com"], LIST, "<post@example.org>"),
        )
        self.assertEqual(
            (event["event"], event["outcome"], event["count"]), ("failed", "dead-lettered", 1)
        )

    def test_refusal_of_the_whole_message_is_not_a_bounce(self):
        """A 5xx to DATA (say, a content filter) dead-letters the copies but blames
        no member: no bounce is recorded."""
        self.sender.error = DataRefused(554, b"5.7.1 Looks like spam")
        self.enqueue()
        self.assertEqual(set(self.states().values()), {EntryState.FAILED})
        self.assertEqual(self.entries()["anne@example.com"].last_error, "554 5.7.1 Looks like spam")
        self.assertEqual(self.registry.bounces(LIST), ())

    def test_connection_failure_and_552_are_temporary(self):
        """No reply (444) and a 552 other than 5.3.4 (storage exceeded) are
        retried, counted as attempts, and do not pause delivery."""
        for error in (
            ConnectionFailed(444, b"Connection refused"),
            SenderRefused(552, b"4.2.2 Requested mail action aborted: exceeded storage"),
        ):
            self.sender.error = error
            self.enqueue()
            self.assertEqual(set(self.states().values()), {EntryState.RETRY})
            self.assertIsNone(self.runner.paused_until)
            self.successResultOf(self.spool.delete([e.entry_id for e in self.spool.entries()]))

    def test_transaction_log_line(self):
        """Each SMTP transaction is logged with message id, list, recipient count,
        time taken and refused count (Mailman's smtp.log)."""
        self.sender.replies = {"bart@example.com": [(550, b"no")]}
        with capturedLogs() as events:
            self.enqueue()
        logged = [e for e in events if "count" in e and "refused" in e]
        self.assertEqual(len(logged), len(self.sender.sent))
        self.assertEqual(
            {(e["message_id"], e["list"]) for e in logged}, {("<post@example.org>", LIST)}
        )
        self.assertEqual(sum(e["attempted"] for e in logged), 3)
        self.assertEqual(sum(e["refused"] for e in logged), 1)
        # The "delivered" event counts (and lists) the recipients the smarthost took.
        self.assertEqual({e["event"] for e in logged}, {"delivered"})
        self.assertEqual(sum(e["count"] for e in logged), 2)
        self.assertEqual(
            sorted(r for e in logged for r in e["recipients"]),
            ["anne@example.com", "cris@example.com"],
        )
        self.assertTrue(all(isinstance(e["duration"], float) for e in logged))
        self.assertFalse(any(b"Body line" in repr(e).encode() for e in events))


class SiteProblemTests(RunnerCase):
    def assert_all_queued_nobody_bounced(self):
        for entry in self.entries().values():
            self.assertEqual((entry.state, entry.attempts), (EntryState.RETRY, 0), entry)
            self.assertIn("site problem", entry.last_error)
        self.assertEqual(self.registry.bounces(LIST), ())

    def test_bad_credentials_pause_and_later_resume(self):
        """571 Bad authentication: nothing is bounced or counted, the breaker opens
        (published under "circuit"), probes one transaction after 30 s, doubles to
        60 s when the probe fails, and closes once a transaction gets through;
        then every member gets the post."""
        self.registry.add_members(LIST, [f"x{i}@example.com" for i in range(20)])
        self.sender.error = AuthenticationFailed(571, b"Bad authentication")
        with capturedLogs() as events:
            self.enqueue()
        self.assertEqual(len(self.sender.sent), 1)  # the others were not even tried
        self.assert_all_queued_nobody_bounced()
        self.assertEqual(self.runner.paused_until, START + 30)
        status = self.spool.get_status(CIRCUIT_STATUS_KEY)
        self.assertIn("571 Bad authentication", status)
        self.assertTrue(any(e["log_level"] is LogLevel.error and "reason" in e for e in events))

        self.advance(29)
        self.assertEqual(len(self.sender.sent), 1)
        self.advance(1)  # the probe: one entry, one transaction
        self.assertEqual([len(s.rcpts) for s in self.sender.sent[1:]], [1])
        self.assertEqual(self.runner.paused_until, START + 30 + 60)
        self.assert_all_queued_nobody_bounced()

        self.sender.error = None
        self.advance(60)
        self.assertIsNone(self.runner.paused_until)
        self.assertIsNone(self.spool.get_status(CIRCUIT_STATUS_KEY))
        self.assertEqual(set(self.states().values()), {EntryState.DONE})
        self.assertEqual(sorted(set(self.sender.recipients())), sorted(self.entries()))
        self.assertEqual({e.attempts for e in self.entries().values()}, {1})

    def test_other_site_problems(self):
        """A 530 to MAIL FROM (not flagged), a TLS failure, and an authentication
        code refusing a recipient all pause delivery instead of bouncing."""
        cases = [
            ("error", SenderRefused(530, b"5.7.0 Authentication required")),
            ("error", TLSFailed(444, b"TLS handshake failed")),
            ("replies", {"anne@example.com": [(535, b"5.7.8 nope")]}),
        ]
        for attribute, value in cases:
            self.runner = self.make_runner()
            self.runner.startService()
            setattr(self.sender, attribute, value)
            self.enqueue()
            self.assertIsNotNone(self.runner.paused_until, value)
            self.assertEqual(self.registry.bounces(LIST), ())
            self.assertFalse(any(e.state is EntryState.FAILED for e in self.spool.entries()))
            self.successResultOf(self.runner.stopService())
            self.sender.error, self.sender.replies = None, {}
            self.successResultOf(self.spool.delete([e.entry_id for e in self.spool.entries()]))

    def test_new_mail_waits_while_paused(self):
        """While paused, new posts are queued but nothing is sent before the probe."""
        self.sender.error = AuthenticationFailed(535, b"5.7.8 nope")
        self.enqueue()
        self.sender.error = None
        self.enqueue()
        self.assertEqual(len(self.sender.sent), 1)
        self.advance(30)
        self.assertEqual(set(self.states().values()), {EntryState.DONE})

    def test_success_started_before_the_trip_does_not_close(self):
        """A transaction that was already under way when the breaker opened cannot
        close it by succeeding: only one started afterwards proves the fix."""
        self.sender.hold = True
        self.registry.create_list("other@example.com")
        self.registry.add_members("other@example.com", ["zed@example.com"])
        self.enqueue(POST, Destination("other@example.com", None, "other@example.com"))
        self.assertEqual(len(self.sender.held), 2)
        self.sender.error = AuthenticationFailed(535, b"5.7.8 nope")
        self.sender.release()
        self.sender.error = None
        self.sender.release()
        self.assertIsNotNone(self.runner.paused_until)

    def test_stale_status_cleared_on_start(self):
        """A breaker status left by a previous run is cleared when the runner starts."""
        self.successResultOf(self.spool.set_status(CIRCUIT_STATUS_KEY, "old"))
        self.make_runner().startService()
        self.assertIsNone(self.spool.get_status(CIRCUIT_STATUS_KEY))


class PausedTimeTests(RunnerCase):
    """Time the circuit breaker spends paused is not a recipient's retry time."""

    runner_options = {"retry_period": 3600.0, "min_backoff": 300.0, "max_backoff": 600.0}

    def test_breaker_records_paused_time(self):
        """paused_between counts the ended pauses and the current one, clipped
        to the interval asked about."""
        clock = task.Clock()
        breaker = CircuitBreaker(clock, 30.0, 600.0)
        clock.advance(100)
        breaker.trip("535 nope")
        clock.advance(50)
        self.assertEqual(breaker.paused_between(0, 150), 50)
        self.assertTrue(breaker.succeeded(breaker.generation))
        clock.advance(100)
        breaker.trip("535 nope")
        clock.advance(10)
        self.assertEqual(breaker.paused_between(0, clock.seconds()), 60)
        self.assertEqual(breaker.paused_between(120, 255), 30 + 5)

    def test_pause_does_not_dead_letter(self):
        """A member deferred before two hours of bad credentials (retry period one
        hour) is still retried after the pause, not dead-lettered; nobody bounced."""
        self.sender.replies["bart@example.com"] = [(451, b"4.2.0 greylisted")]
        self.enqueue()
        self.assertEqual(self.states()["bart@example.com"], EntryState.RETRY)
        self.sender.error = AuthenticationFailed(535, b"5.7.8 bad credentials")
        for _ in range(24):  # two hours of failing probes
            self.advance(300)
        self.assertIsNotNone(self.runner.paused_until)
        self.sender.error = None
        for _ in range(4):
            self.advance(300)
        self.assertIsNone(self.runner.paused_until)
        bart = self.entries()["bart@example.com"]
        self.assertEqual(bart.state, EntryState.RETRY, bart.last_error)
        self.assertGreaterEqual(bart.attempts, 2)
        self.assertEqual(self.registry.bounces(LIST), ())
        # Without the pause the hour would be over: it runs out 1h of delivery later.
        for _ in range(16):
            self.advance(300)
        bart = self.entries()["bart@example.com"]
        self.assertEqual(bart.state, EntryState.FAILED)
        self.assertEqual(self.registry.bounces(LIST), ())


class UnreachableRetryTests(RunnerCase):
    runner_options = {"retry_period": 3600.0, "max_backoff": 600.0}

    def test_unreachable_never_bounces(self):
        """A smarthost unreachable for the whole retry period dead-letters the
        copies (counted, as in Postfix) but records no member bounce."""
        self.sender.error = SmarthostUnreachable(444, b"Cannot connect to smtp.example:25: refused")
        self.enqueue()
        for _ in range(20):
            self.advance(300)
        self.assertEqual(set(self.states().values()), {EntryState.FAILED})
        self.assertEqual(self.registry.bounces(LIST), ())


class LogVolumeTests(RunnerCase):
    """Logging is per transaction and per outcome, never per recipient."""

    members = tuple(f"m{i:03d}@example.com" for i in range(200))

    def test_unreachable_smarthost_logs_a_summary(self):
        """With the smarthost down, a 200-member post logs a handful of lines (one
        failed transaction, one summary of the deferrals with the count, the
        reason and the next attempt), not one per member; so does each retry round."""
        self.sender.error = SmarthostUnreachable(444, b"Cannot connect to smtp.example:25: refused")
        with capturedLogs() as events:
            self.enqueue()
        self.assertEqual(set(self.states().values()), {EntryState.RETRY})
        self.assertLess(len(events), 10, [e["log_format"] for e in events])
        (summary,) = [e for e in events if "deferred" in e["log_format"]]
        self.assertEqual((summary["count"], summary["code"]), (200, 444))
        self.assertIn("Cannot connect", summary["response"])
        self.assertIn("and 197 more", summary["names"])
        self.assertEqual(summary["event"], "deferred")
        self.assertEqual(summary["recipients"], list(self.members[:10]))  # bounded
        self.assertRegex(summary["delay"], r"^\d+s(-\d+s)?$")
        with capturedLogs() as events:
            self.advance(4000)
        self.assertLess(len(events), 20, [e["log_format"] for e in events])

    def test_refusals_summarised_per_reply(self):
        """Permanent refusals with the same reply are one line; another reply is another."""
        for address in self.members[:50]:
            self.sender.replies[address] = [(550, b"5.1.1 no such user")]
        self.sender.replies[self.members[60]] = [(554, b"5.7.1 policy")]
        with capturedLogs() as events:
            self.enqueue()
        refused = sorted(
            (e["count"], e["code"]) for e in events if "refused permanently" in e["log_format"]
        )
        self.assertEqual(refused, [(1, 554), (50, 550)])
        self.assertEqual(len(self.registry.bounces(LIST)), 51)
        failed = [e for e in events if e.get("event") == "failed"]
        self.assertEqual(sorted(e["count"] for e in failed), [1, 50])
        self.assertEqual({e["outcome"] for e in failed}, {"refused"})
        self.assertEqual(max(len(e["recipients"]) for e in failed), 10)  # bounded list


class UnreachableTests(RunnerCase):
    runner_options = {"max_recipients": 1}

    def test_unreachable_smarthost_dialled_once_per_batch(self):
        """When the smarthost cannot be reached at all, the other transactions of the batch are
        deferred at once instead of each waiting out the connect timeout; later it is dialled again."""
        self.sender.error = SmarthostUnreachable(444, b"Cannot connect to smtp.example:25: refused")
        self.enqueue()
        self.assertEqual(len(self.sender.sent), 1)
        self.assertEqual(set(self.states().values()), {EntryState.RETRY})
        self.assertTrue(all("Cannot connect" in e.last_error for e in self.entries().values()))
        self.sender.error = None
        self.advance(4000)
        self.assertEqual(set(self.states().values()), {EntryState.DONE})
        self.assertEqual(len(self.sender.sent), 1 + len(MEMBERS))

    def test_lost_connection_does_not_hold_others(self):
        """A connection lost mid-session (not a failure to connect) does not defer the other chunks."""
        self.sender.error = ConnectionFailed(444, b"Connection lost")
        self.enqueue()
        self.assertEqual(len(self.sender.sent), len(MEMBERS))


class PollTests(RunnerCase):
    runner_options = {"poll_interval": 30.0}

    def test_entries_queued_by_another_process_are_found(self):
        """An entry re-queued without wake() (``mailrelay queue retry`` runs in another
        process) is delivered at the next poll, not left until the next inbound message."""
        self.enqueue(wake=False)
        self.advance(29)
        self.assertEqual(self.sender.sent, [])
        self.advance(1)
        self.assertEqual(set(self.states().values()), {EntryState.DONE})


class ClaimLeaseTests(RunnerCase):
    runner_options = {"poll_interval": 30.0, "claim_lease": 300.0}

    def test_unrecorded_results_are_recovered_without_restart(self):
        """Entries whose results could not be recorded (every write failed) stay in
        flight only until their claim's lease runs out: the next poll after that
        returns them to the queue, and they are delivered (again) and recorded,
        without a restart."""
        update = self.spool.update
        self.spool.update = lambda updates: defer.fail(SpoolError("spool: I/O error"))
        self.enqueue()
        for _ in range(60):  # every result write tried and given up
            self.advance(1)
        self.assertEqual(set(self.states().values()), {EntryState.INFLIGHT})
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))
        self.spool.update = update
        for _ in range(7):  # polls every 30s, still within the lease
            self.advance(30)
        self.assertEqual(set(self.states().values()), {EntryState.INFLIGHT})
        with capturedLogs() as events:
            # Stale claims are looked for every half lease: within 1.5 leases.
            for _ in range(8):
                self.advance(30)
        self.assertEqual(set(self.states().values()), {EntryState.DONE})
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS * 2))
        (event,) = [e for e in events if "outlived" in e["log_format"]]
        self.assertEqual(event["count"], len(MEMBERS))

    def test_claims_of_running_batches_are_kept(self):
        """A batch slower than the lease keeps its entries: they are not queued
        again (and sent twice) while it still delivers them."""
        self.sender.hold = True
        self.enqueue()
        self.advance(1000)
        self.assertEqual(set(self.states().values()), {EntryState.INFLIGHT})
        self.assertEqual(len(self.sender.held), 1)
        self.sender.hold = False
        self.sender.release()
        self.settle()
        self.assertEqual(set(self.states().values()), {EntryState.DONE})
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))


class LifecycleTests(RunnerCase):
    def test_wake_delivers_on_the_next_turn(self):
        """wake() starts delivery on the next reactor turn, without waiting for a timer."""
        self.enqueue(wake=False)
        self.runner.wake()
        self.runner.wake()
        self.assertEqual(self.sender.sent, [])
        self.clock.advance(0)
        self.assertEqual(self.sender.recipients(), sorted(MEMBERS))

    def test_recover_after_a_crash(self):
        """Entries left INFLIGHT by a crash (a post and member copies) are queued
        again on start and delivered: at-least-once."""
        self.stop()
        self.enqueue(wake=False)
        self.successResultOf(self.spool.claim_due(self.clock.seconds(), 100))
        owner_id = self.enqueue(OWNER, wake=False)[0]
        self.successResultOf(self.spool.expand(owner_id, ["owner@example.org"], EntryKind.OWNER))
        self.successResultOf(self.spool.claim_due(self.clock.seconds(), 100))
        self.assertEqual(self.spool.counts()[EntryState.INFLIGHT], 2)
        self.runner = self.make_runner()
        self.runner.startService()
        self.settle()
        self.assertEqual(self.sender.recipients(), sorted([*MEMBERS, "owner@example.org"]))
        self.assertEqual(self.spool.counts()[EntryState.INFLIGHT], 0)

    def test_stop_waits_for_transactions_in_flight(self):
        """stopService waits for the transaction being sent and records it; copies
        not yet handed to the sender go back to the queue, unattempted."""
        self.runner = self.make_runner(max_recipients=1, max_parallel=1)
        self.stop()
        self.runner.startService()
        self.sender.hold = True
        self.enqueue()
        self.assertEqual(len(self.sender.held), 1)
        stopped = self.runner.stopService()
        self.assertNoResult(stopped)
        self.sender.release()
        self.successResultOf(stopped)
        states = self.states()
        self.assertEqual(
            sorted(states.values()), [EntryState.DONE, EntryState.QUEUED, EntryState.QUEUED]
        )
        self.assertEqual(len(self.sender.sent), 1)
        self.enqueue()
        self.assertEqual(len(self.sender.sent), 1)

    def test_delivered_entries_purged_after_keep_done(self):
        """Once the queue drains, DONE entries older than keep_done (7 days) are
        deleted with their message; newer ones and dead letters stay."""
        self.sender.replies = {"anne@example.com": [(550, b"gone")]}
        self.enqueue()
        first_key = self.spool.entries()[0].message_key
        self.advance(7 * 86400 + 3600)
        self.sender.replies = {}
        self.enqueue()
        states = sorted(e.state for e in self.spool.entries())
        self.assertEqual(states, [EntryState.DONE] * 4 + [EntryState.FAILED])
        self.assertEqual(self.spool.get_message(first_key)[:12], b"X-MailFrom: ")
        self.assertEqual(len({e.message_key for e in self.spool.entries()}), 2)

    def test_keep_done_none_keeps_everything(self):
        """keep_done=None never purges."""
        self.runner = self.make_runner(keep_done=None)
        self.stop()
        self.runner.startService()
        self.enqueue()
        self.advance(30 * 86400)
        self.enqueue()
        self.assertEqual(self.spool.counts()[EntryState.DONE], 8)

    def test_when_idle(self):
        """when_idle fires once the work due now is done, not before."""
        self.sender.hold = True
        self.enqueue()
        idle = self.runner.when_idle()
        self.assertNoResult(idle)
        self.sender.release()
        self.settle()
        self.successResultOf(idle)

    def test_bad_arguments(self):
        """Bad settings are refused with clear errors."""
        for options, error in (
            ({"batch_size": 0}, ValueError),
            ({"max_recipients": -1}, ValueError),
            ({"min_backoff": 500, "max_backoff": 100}, ValueError),
            ({"verp": "yes"}, TypeError),
            ({"breaker_min_delay": 0}, ValueError),
            ({"devmode_recipient": "not an address"}, ValueError),
        ):
            with self.assertRaises(error, msg=options):
                self.make_runner(**options)
        with self.assertRaises(TypeError):
            DeliveryRunner(self.spool, self.registry, object(), clock=self.clock)


class DevmodeTests(SynchronousTestCase):
    def test_devmode_connection_keeps_results_by_member(self):
        """With Connection(devmode_recipient=...) every RCPT names the devmode
        mailbox, yet a refusal lands on the right member's entry."""
        smarthost = MemorySmarthost()
        smarthost.mta.reject("rcpt", 451, b"4.2.0 Try later", count=1)
        spool = MemorySpool(smarthost.reactor)
        registry = MemoryRegistry()
        registry.create_list(LIST)
        registry.add_members(LIST, MEMBERS)
        pool = ConnectionPool(lambda: smarthost.connection(devmode_recipient="dev@example.org"))
        runner = DeliveryRunner(
            spool, registry, pool, clock=smarthost.reactor, random=random.Random(1)
        )
        runner.startService()
        self.successResultOf(spool.enqueue(Envelope("p@example.org", (POST,), 0.0), MESSAGE))
        runner.wake()
        smarthost.run()
        (transaction,) = smarthost.mta.transactions
        self.assertEqual(transaction.rcpts, ("dev@example.org",) * 2)
        states = {
            e.destination.address: e.state for e in spool.entries() if e.kind is EntryKind.MEMBER
        }
        # chunkify sorts: anne@example.com's RCPT came first and was refused.
        self.assertEqual(
            states,
            {
                "anne@example.com": EntryState.RETRY,
                "bart@example.com": EntryState.DONE,
                "cris@example.com": EntryState.DONE,
            },
        )
        stopped = runner.stopService()
        closed = pool.quit()
        smarthost.run()
        self.successResultOf(stopped)
        self.successResultOf(closed)

    def test_runner_devmode_recipient(self):
        """The runner's own devmode_recipient sends each copy there, one per
        transaction, and keys results by the real member."""
        clock = task.Clock()
        spool, registry, sender = MemorySpool(clock), MemoryRegistry(), ScriptedSender()
        registry.create_list(LIST)
        registry.add_members(LIST, MEMBERS)
        sender.replies = {"dev@example.org": [(250, b"ok"), (550, b"no")]}
        runner = DeliveryRunner(
            spool, registry, sender, clock=clock, devmode_recipient="dev@example.org"
        )
        runner.startService()
        self.successResultOf(spool.enqueue(Envelope("p@example.org", (POST,), 0.0), MESSAGE))
        runner.wake()
        clock.advance(0)
        self.assertEqual([s.rcpts for s in sender.sent], [("dev@example.org",)] * 3)
        states = {
            e.destination.address: e.state for e in spool.entries() if e.kind is EntryKind.MEMBER
        }
        self.assertEqual(
            states,
            {
                "anne@example.com": EntryState.DONE,
                "bart@example.com": EntryState.FAILED,
                "cris@example.com": EntryState.FAILED,
            },
        )
        self.successResultOf(runner.stopService())


def _temp_dir(case) -> str:
    path = tempfile.mkdtemp(prefix="mailrelay-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


class EndToEndTests(TestCase):
    """SQLite spool and registry, the pool, real Connections and FakeMTA over loopback."""

    async def start(self, sender_factory=None, **runner_options):
        directory = _temp_dir(self)
        self.spool = SQLiteSpool(os.path.join(directory, "spool.sqlite3"), reactor)
        self.addCleanup(self.spool.close)
        self.registry = SQLiteRegistry(os.path.join(directory, "registry.sqlite3"))
        self.addCleanup(self.registry.close)
        self.registry.create_list(LIST, "Test List", ["owner@example.org"])
        self.mta = FakeMTA(reactor)
        await self.mta.start()
        self.addCleanup(self.mta.stop)
        if sender_factory is None:
            self.sender = ConnectionPool(
                lambda: Connection(
                    "127.0.0.1",
                    self.mta.port,
                    0,
                    reactor=reactor,
                    helo_name="relay.example",
                    idle_timeout=5,
                ),
                max_connections=2,
            )
            self.addCleanup(self.sender.quit)
        else:
            self.sender = sender_factory()
        self.runner = DeliveryRunner(
            self.spool, self.registry, self.sender, clock=reactor, **runner_options
        )
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        self.handler = InboundHandler(
            self.registry,
            self.spool,
            hostname="relay.example",
            clock=reactor,
            on_stored=self.runner.wake,
        )

    async def lmtp_deliver(self, *addresses, message=MESSAGE):
        transaction = Transaction(
            sender="poster@example.org",
            recipients=tuple(AcceptedRecipient(a, self.registry.resolve(a)) for a in addresses),
            message=message,
            peer="127.0.0.1",
            lhlo="mta.example.org",
        )
        replies = await self.handler.deliver(transaction)
        self.assertEqual({r.code for r in replies}, {250})

    async def test_post_reaches_members(self):
        """A post accepted by the LMTP handler reaches FakeMTA once, from
        test-bounces@, to the three members, with the list headers; -join mail is held."""
        await self.start()
        self.registry.add_members(LIST, MEMBERS)
        await self.lmtp_deliver(LIST, "test-join@example.com")
        await self.runner.when_idle()
        (transaction,) = self.mta.transactions
        self.assertEqual(transaction.mail_from, "test-bounces@example.com")
        self.assertEqual(transaction.rcpts, tuple(sorted(MEMBERS)))
        (message,) = self.mta.messages
        self.assertEqual(message["List-Id"], "Test List <test.example.com>")
        self.assertEqual(message["List-Post"], "<mailto:test@example.com>")
        self.assertEqual(message["Precedence"], "list")
        self.assertEqual(message["Message-ID"], "<post@example.org>")
        counts = self.spool.counts()
        self.assertEqual((counts[EntryState.DONE], counts[EntryState.HELD]), (4, 1))

    async def test_bad_credentials_bounce_nobody(self):
        """A smarthost that refuses our password: every copy stays queued, no
        bounce, the breaker state is in the spool for `mailrelay queue`."""
        password_mta = FakeMTA(reactor, users={"relay": "right"})
        await password_mta.start()
        self.addCleanup(password_mta.stop)

        def factory():
            return ConnectionPool(
                lambda: Connection(
                    "127.0.0.1",
                    password_mta.port,
                    0,
                    user="relay",
                    password="wrong",
                    reactor=reactor,
                    helo_name="relay.example",
                    allow_plaintext_auth=True,
                )
            )

        await self.start(sender_factory=factory)
        self.addCleanup(self.sender.quit)
        self.registry.add_members(LIST, MEMBERS)
        await self.lmtp_deliver(LIST)
        await self.runner.when_idle()
        self.assertEqual(password_mta.transactions, [])
        self.assertEqual(self.registry.bounces(LIST), ())
        counts = self.spool.counts()
        self.assertEqual((counts[EntryState.RETRY], counts[EntryState.FAILED]), (3, 0))
        self.assertIn("Bad authentication", self.spool.get_status(CIRCUIT_STATUS_KEY))

    async def test_ten_thousand_members(self):
        """1 post x 10,000 members through the SQLite spool takes seconds, not
        minutes: fan-out, claims and result updates are batched."""
        sender = ScriptedSender()
        await self.start(sender_factory=lambda: sender)
        self.registry.add_members(LIST, [f"m{i:05d}@example.com" for i in range(10_000)])
        started = time.monotonic()
        await self.lmtp_deliver(LIST)
        await self.runner.when_idle()
        elapsed = time.monotonic() - started
        self.assertEqual(len(sender.recipients()), 10_000)
        self.assertEqual(self.spool.counts()[EntryState.DONE], 10_001)
        self.assertLess(elapsed, 20, f"10,000 members took {elapsed:.1f}s")


class PackageTests(SynchronousTestCase):
    """The runner package's public names and its place in the import graph."""

    def test_public_names_import(self):
        """``mailrelay.runner`` re-exports exactly its public names."""
        import mailrelay.runner

        self.assertEqual(sorted(mailrelay.runner.__all__), ["CIRCUIT_STATUS_KEY", "DeliveryRunner"])
        for name in mailrelay.runner.__all__:
            self.assertIsNotNone(getattr(mailrelay.runner, name))
        self.assertEqual(CIRCUIT_STATUS_KEY, "circuit")

    def test_no_module_imports_a_concrete_spool(self):
        """Runner modules reach storage only through ISpool: none imports mailrelay.spool."""
        import ast
        import pathlib

        import mailrelay.runner

        for path in pathlib.Path(mailrelay.runner.__file__).parent.glob("*.py"):
            tree = ast.parse(path.read_text())
            imported = {
                node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            } | {
                alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.Import)
                for alias in node.names
            }
            concrete = {m for m in imported if m and m.split(".")[:2] == ["mailrelay", "spool"]}
            self.assertEqual(concrete, set(), path.name)
