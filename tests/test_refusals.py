"""Posts the smarthost refuses as a whole never vanish silently (issue 14).

In memory: the DSN and owner notice builders (:mod:`mailrelay.listproc.refusals`),
the spools' once-per-post record (``store_outgoing(refusals=)``, both spools),
the runner telling the poster and the owners once however many batches
fail, the LMTP policy's ``552 5.3.4`` at DATA and the limits behind it
(:mod:`mailrelay.runner.limits`), and ``mailrelay queue`` showing the reason.
"""

from __future__ import annotations

import email
import os
import sqlite3

from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.errors import RegistryUnavailable
from mailrelay.listproc.refusals import RefusalNotices
from mailrelay.lmtp import AcceptedRecipient, Transaction
from mailrelay.lmtp.policy import InboundHandler
from mailrelay.model import (
    Destination,
    EntryKind,
    EntryState,
    EntryUpdate,
    Envelope,
    MailingList,
    Outgoing,
    Refusal,
    RefusedPost,
)
from mailrelay.mta.errors import AuthenticationFailed, DataRefused, MessageTooLarge, SenderRefused
from mailrelay.registry import MemoryRegistry
from mailrelay.runner.limits import SizeLimits
from mailrelay.spool import MemorySpool, SQLiteSpool
from tests.support import temp_dir
from tests.test_runner import LIST, POST, RunnerCase

MLIST = MailingList(LIST, "Test List", ("owner@example.org",))
POST_BYTES = (
    b"X-MailFrom: poster@example.org\r\n"
    b"From: Poster <poster@example.org>\r\n"
    b"To: test@example.com\r\n"
    b"Subject: a big one\r\n"
    b"Message-ID: <post@example.org>\r\n"
    b"\r\n"
    b"Body line.\r\n"
)


def refused_post(sender="poster@example.org", message=POST_BYTES, lists=(MLIST,)):
    return RefusedPost(
        1, "<post@example.org>", sender, lists, 554, "554 5.3.4 Message too big", message
    )


def parse_dsn(test, outgoing: Outgoing):
    """The DSN's report fields, checked for RFC 3464's structure."""
    msg = email.message_from_bytes(outgoing.message)
    test.assertEqual(msg.get_content_type(), "multipart/report")
    test.assertEqual(msg.get_param("report-type"), "delivery-status")
    human, status, headers = msg.get_payload()
    test.assertEqual(human.get_content_type(), "text/plain")
    test.assertEqual(status.get_content_type(), "message/delivery-status")
    test.assertEqual(headers.get_content_type(), "text/rfc822-headers")
    per_message, *per_recipient = status.get_payload()
    return msg, human, per_message, per_recipient, headers


class NoticeTests(SynchronousTestCase):
    def test_dsn_fields(self):
        """The poster gets an RFC 3464 report from the -owner address with an
        empty envelope sender: Reporting-MTA, then Final-Recipient, Action:
        failed, Status from the reply and Diagnostic-Code per list address, and
        the post's headers (not its body)."""
        other = MailingList("other@example.com")
        notices = RefusalNotices(reporting_mta="relay.example.com").notices(
            refused_post(lists=(MLIST, other))
        )
        dsn, owner = notices
        self.assertEqual((dsn.sender, dsn.recipients), ("", ("poster@example.org",)))
        msg, human, per_message, per_recipient, headers = parse_dsn(self, dsn)
        self.assertIn("test-owner@example.com", msg["From"])
        self.assertEqual(msg["To"], "poster@example.org")
        self.assertEqual(msg["In-Reply-To"], "<post@example.org>")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertIn("554 5.3.4 Message too big", human.get_payload(decode=True).decode())
        self.assertEqual(per_message["Reporting-MTA"], "dns; relay.example.com")
        self.assertEqual(
            [
                (b["Final-Recipient"], b["Action"], b["Status"], b["Diagnostic-Code"])
                for b in per_recipient
            ],
            [
                (f"rfc822; {a}", "failed", "5.3.4", "smtp; 554 5.3.4 Message too big")
                for a in (LIST, "other@example.com")
            ],
        )
        text = headers.get_payload(decode=True).decode()
        self.assertIn("Subject: a big one", text)
        self.assertNotIn("Body line", text)
        self.assertEqual(owner.recipients, ("owner@example.org",))
        self.assertEqual(owner.sender, "test-bounces@example.com")

    def test_owner_notice(self):
        """The owners are told the sender, Message-ID, subject and the reply."""
        (_, owner) = RefusalNotices().notices(refused_post())
        msg = email.message_from_bytes(owner.message)
        body = msg.get_payload(decode=True).decode()
        for text in (
            "poster@example.org",
            "<post@example.org>",
            "a big one",
            "554 5.3.4 Message too big",
        ):
            self.assertIn(text, body)
        self.assertEqual(msg["Auto-Submitted"], "auto-generated")

    def test_no_dsn_to_mail_that_must_not_be_answered(self):
        """No DSN for an empty envelope sender, Auto-Submitted, Precedence
        bulk/junk/list, or a list address; the owners are told all the same."""
        cases = [
            refused_post(sender=""),
            refused_post(
                message=POST_BYTES.replace(b"\r\n\r\n", b"\r\nAuto-Submitted: auto-replied\r\n\r\n")
            ),
            refused_post(message=POST_BYTES.replace(b"\r\n\r\n", b"\r\nPrecedence: junk\r\n\r\n")),
        ]
        for post in cases:
            notices = RefusalNotices().notices(post)
            self.assertEqual([n.recipients for n in notices], [("owner@example.org",)])
        listed = RefusalNotices(is_list_address=lambda a: a == "poster@example.org")
        self.assertEqual(len(listed.notices(refused_post())), 1)

    def test_status_without_enhanced_code(self):
        """A reply without an enhanced status code reports Status 5.0.0."""
        post = RefusedPost(1, "", "poster@example.org", (MLIST,), 554, "554 no", POST_BYTES)
        dsn, _ = RefusalNotices().notices(post)
        _, _, _, (block,), _ = parse_dsn(self, dsn)
        self.assertEqual(block["Status"], "5.0.0")


class SpoolRefusalContract:
    """``store_outgoing(refusals=)``: the first refusal of a message is recorded
    with its notices; later ones change nothing but still apply ``finish``."""

    async def test_once_per_message(self):
        """Two refusals of one message store its notices once and keep the
        first reason, shown by posts(); the updates of both apply."""
        envelope = Envelope("poster@example.org", (POST,), 0.0, message_id="<post@example.org>")
        await self.spool.store(envelope, POST_BYTES)
        (entry,) = self.spool.entries()
        notice = Outgoing("", ("poster@example.org",), b"Subject: dsn\r\n\r\nx\r\n", LIST)
        first = Refusal(entry.message_key, "554 first", (notice,))
        update = EntryUpdate(entry.entry_id, EntryState.FAILED)
        ids = await self.spool.store_outgoing((), [update], [first])
        self.assertEqual(len(ids), 1)
        again = Refusal(entry.message_key, "554 second", (notice,))
        self.assertEqual(await self.spool.store_outgoing((), (), [again]), [])
        notices = [e for e in self.spool.entries() if e.kind is EntryKind.NOTICE]
        self.assertEqual([e.destination.address for e in notices], ["poster@example.org"])
        (post,) = [p for p in self.spool.posts() if p.message_key == entry.message_key]
        self.assertEqual(post.refusal, "554 first")
        self.assertEqual(post.counts[EntryState.FAILED], 1)

    async def test_bad_refusals(self):
        """A value that is not a Refusal, or two for one message, fail the Deferred."""
        with self.assertRaises(TypeError):
            await self.spool.store_outgoing((), (), ["x"])
        with self.assertRaises(ValueError):
            await self.spool.store_outgoing((), (), [Refusal(1, "a"), Refusal(1, "b")])
        self.assertRaises(TypeError, Refusal, 1, "")


class MemorySpoolRefusalTests(SpoolRefusalContract, TestCase):
    def setUp(self):
        self.spool = MemorySpool(task.Clock())


class SQLiteSpoolRefusalTests(SpoolRefusalContract, TestCase):
    def setUp(self):
        self.path = os.path.join(temp_dir(self), "spool.sqlite")
        self.spool = SQLiteSpool(self.path, reactor)
        self.addCleanup(lambda: self.spool.close())

    async def test_migration_adds_the_column(self):
        """A spool of schema version 4 gains messages.refusal, empty for old posts."""
        await self.spool.store(Envelope("poster@example.org", (POST,), 0.0), POST_BYTES)
        await self.spool.close()
        db = sqlite3.connect(self.path)
        db.execute("ALTER TABLE messages DROP COLUMN refusal")
        db.execute("PRAGMA user_version = 4")
        db.commit()
        db.close()
        self.spool = SQLiteSpool(self.path, reactor)
        (post,) = self.spool.posts()
        self.assertEqual(post.refusal, "")
        self.assertEqual(sqlite3.connect(self.path).execute("PRAGMA user_version").fetchone(), (5,))


class RunnerRefusalTests(RunnerCase):
    """The runner over MemorySpool: a post refused as a whole is told once."""

    message = POST_BYTES

    def notices(self):
        return [e for e in self.spool.entries() if e.kind is EntryKind.NOTICE]

    def test_554_at_data_tells_poster_and_owners_once(self):
        """A 554 to DATA fails every copy (no member bounce), stores one DSN to
        the poster and one notice to each owner, and records the reason;
        retrying the copies and failing again tells nobody a second time."""
        self.sender.error = DataRefused(554, b"5.6.0 Message content rejected")
        self.enqueue(message=self.message)
        self.assertEqual(set(self.states().values()), {EntryState.FAILED})
        self.assertEqual(tuple(self.registry.bounces(LIST)), ())
        notices = self.notices()
        self.assertEqual(
            sorted(e.destination.address for e in notices),
            ["boss@example.org", "owner@example.org", "poster@example.org"],
        )
        (dsn,) = [s for s in self.sender.sent if s.sender == ""]
        self.assertEqual(dsn.rcpts, ("poster@example.org",))
        (post,) = [p for p in self.spool.posts(include_done=True) if p.refusal]
        self.assertIn("554 5.6.0 Message content rejected", post.refusal)
        # The DSN was sent (and refused too: a notice about a notice is never
        # written); a second round of failures of the post adds nothing.
        self.successResultOf(self.spool.retry_now([e.entry_id for e in self.entries().values()]))
        self.runner.wake()
        self.settle()
        self.assertEqual(len(self.notices()), 3)

    def test_several_batches_one_notice(self):
        """Copies failing in several batches (batch_size 1) still give one DSN
        and one owner notice."""
        self.stop()
        self.sender.error = SenderRefused(550, b"5.7.1 Sender rejected")
        self.runner = self.make_runner(batch_size=1, max_recipients=1)
        self.runner.startService()
        self.enqueue(message=self.message)
        self.assertEqual(set(self.states().values()), {EntryState.FAILED})
        addresses = sorted(e.destination.address for e in self.notices())
        self.assertEqual(addresses, ["boss@example.org", "owner@example.org", "poster@example.org"])

    def test_too_large_for_size(self):
        """MessageTooLarge (before MAIL) is a permanent refusal of the message too,
        with the reply a server gives (552 5.3.4): every copy FAILED, not retried, and
        the poster and the owners are told once, with that reply."""
        self.sender.error = MessageTooLarge(5000, 1000)
        self.enqueue(message=self.message)
        self.assertEqual(set(self.states().values()), {EntryState.FAILED})
        for entry in self.entries().values():
            self.assertTrue(entry.last_error.startswith("552 5.3.4 "), entry.last_error)
        self.assertEqual(len(self.notices()), 3)
        (post,) = [p for p in self.spool.posts(include_done=True) if p.refusal]
        self.assertIn(": 552 5.3.4 Message too big", post.refusal)

    def test_no_dsn_for_list_mail_and_none_for_auth(self):
        """No DSN for a post that is itself list mail (List-Id), only the owner
        notice; an AUTH failure pauses delivery and tells nobody."""
        from tests.test_runner import MESSAGE

        self.sender.error = DataRefused(554, b"5.6.0 no")
        self.enqueue(message=MESSAGE)
        self.assertEqual(
            sorted(e.destination.address for e in self.notices()),
            ["boss@example.org", "owner@example.org"],
        )
        self.successResultOf(self.spool.delete([e.entry_id for e in self.spool.entries()]))
        self.sender.error = AuthenticationFailed(535, b"5.7.8 bad credentials")
        self.enqueue(message=self.message)
        self.assertEqual(self.notices(), [])
        self.assertIsNotNone(self.runner.paused_until)

    def test_temporary_failure_tells_nobody(self):
        """A 451 to DATA is retried; nobody is told."""
        self.sender.error = DataRefused(451, b"4.3.0 try later")
        self.enqueue(message=self.message)
        self.assertEqual(self.notices(), [])
        self.assertEqual(set(self.states().values()), {EntryState.RETRY})


class SizeLimitTests(SynchronousTestCase):
    def setUp(self):
        self.registry = MemoryRegistry()
        self.registry.create_list(LIST)
        self.sender = type("Sender", (), {"size_limit": None})()
        self.limits = SizeLimits(self.registry, self.sender)

    def test_smallest_of_smarthost_and_list(self):
        """Posts get the smaller of SIZE and the list's KB limit; -owner mail
        only SIZE; command mail none; nothing known, no limit."""
        self.assertIsNone(self.limits(POST))
        self.sender.size_limit = 10_000
        self.assertEqual(self.limits(POST), 10_000)
        self.registry.update_list_settings(LIST, {"max_message_size": "4"})
        self.assertEqual(self.limits(POST), 4096)
        owner = Destination(LIST, "owner", "test-owner@example.com")
        self.assertEqual(self.limits(owner), 10_000)
        self.assertIsNone(self.limits(Destination(LIST, "request", "test-request@example.com")))

    def test_bad_setting_refused(self):
        """A max_message_size that is not a whole number >= 0 is refused with its key."""
        from mailrelay.errors import RegistryError

        with self.assertRaises((ValueError, RegistryError)) as cm:
            self.registry.update_list_settings(LIST, {"max_message_size": "-1"})
        self.assertIn("max_message_size", str(cm.exception))

    def test_unreadable_registry_is_no_list_limit(self):
        """While the registry cannot be read, only the smarthost's SIZE applies."""

        class Broken:
            def list_settings(self, address):
                raise RegistryUnavailable("locked")

        self.sender.size_limit = 9
        self.assertEqual(SizeLimits(Broken(), self.sender)(POST), 9)


class LMTPSizeTests(SynchronousTestCase):
    def test_552_at_data_per_recipient(self):
        """A message over one recipient's limit gets 552 5.3.4 for that
        recipient; the others are stored and answered 250."""
        registry = MemoryRegistry()
        registry.create_list(LIST)
        registry.create_list("big@example.com")
        spool = MemorySpool(task.Clock())
        limits = {LIST: 10}
        handler = InboundHandler(
            registry,
            spool,
            hostname="mx.example.com",
            clock=task.Clock(),
            size_limit=lambda d: limits.get(d.list_address),
        )
        recipients = [
            AcceptedRecipient(address, registry.resolve(address))
            for address in (LIST, "big@example.com")
        ]
        transaction = Transaction("poster@example.org", recipients, POST_BYTES, "peer")
        replies = self.successResultOf(handler.deliver(transaction))
        self.assertEqual([(r.code, r.status) for r in replies], [(552, "5.3.4"), (250, "2.0.0")])
        self.assertEqual([e.destination.list_address for e in spool.entries()], ["big@example.com"])
        limits["big@example.com"] = 10
        replies = self.successResultOf(handler.deliver(transaction))
        self.assertEqual({r.code for r in replies}, {552})
        self.assertEqual(len(spool.entries()), 1)
