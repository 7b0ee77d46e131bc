"""Issue 14 end to end: LMTP in, the running service (``makeService`` with its
SQLite stores), and a strict smarthost out: aiosmtpd with its default limits
(1,001 octets a line, SIZE, and no 8BITMIME when it decodes data).

Every member gets a copy that decodes to the post's content; a post over the
smarthost's SIZE is refused at LMTP DATA with 552 5.3.4; a post the
smarthost refuses with 554 at DATA is told about once: one RFC 3464 DSN to
the poster and one notice to the owner, shown by ``mailrelay queue``.
"""

from __future__ import annotations

import email
import io
import os
from email import policy

from twisted.internet import endpoints, reactor, task
from twisted.trial.unittest import TestCase

from mailrelay import cli
from mailrelay.config import load_settings
from mailrelay.model import EntryState
from mailrelay.registry import SQLiteRegistry
from mailrelay.service import makeService
from mailrelay.testing.lmtp import connect_lmtp
from tests.support import as_deferred, free_port, temp_dir
from tests.test_mta_transmittable import LONG_TEXT, MIXED, crlf

try:
    from aiosmtpd.controller import Controller
except ImportError:  # pragma: no cover - test dependencies
    Controller = None

LIST = "test@example.com"
MEMBERS = ["m1@example.com", "m2@example.org", "m3@example.net"]
POSTER = "anne@example.org"


class StrictSmarthost:
    """aiosmtpd handler: records each message; refuses DATA for the members
    (only) while ``refuse`` is set."""

    def __init__(self):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.refuse: str | None = None

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.refuse and set(envelope.rcpt_tos) & set(MEMBERS):
            return self.refuse
        sender = "" if envelope.mail_from in ("", "<>") else envelope.mail_from
        self.messages.append((sender, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK"


def leaves(data: bytes) -> list[tuple[str, bytes | None]]:
    """Each part's content type and, for leaves, its decoded content."""
    msg = email.message_from_bytes(data, policy=policy.default)
    return [
        (part.get_content_type(), None if part.is_multipart() else part.get_payload(decode=True))
        for part in msg.walk()
    ]


class StrictSmarthostCase(TestCase):
    smarthost_options: dict = {}

    def setUp(self):
        if Controller is None:
            raise AssertionError("aiosmtpd missing: install the test extras")
        self.smarthost = StrictSmarthost()
        controller = Controller(
            self.smarthost, hostname="127.0.0.1", port=free_port(), **self.smarthost_options
        )
        controller.start()
        self.addCleanup(controller.stop)
        tmp = temp_dir(self)
        self.socket = os.path.join(tmp, "lmtp.sock")
        self.config = os.path.join(tmp, "mailrelay.ini")
        with open(self.config, "w") as f:
            f.write(
                f"[paths]\nvar_dir = {tmp}/var\n"
                f"[mta]\nlmtp_endpoint = unix:{self.socket}\nsmtp_host = 127.0.0.1\n"
                f"smtp_port = {controller.port}\nlmtp_hostname = relay.example.com\n"
            )
        settings = load_settings(self.config)
        os.makedirs(settings.paths.var_dir, exist_ok=True)
        registry = SQLiteRegistry(settings.paths.registry_path)
        registry.create_list(LIST, "Test", ["owner@example.com"])
        registry.add_members(LIST, MEMBERS)
        # Posters are not members: these tests are about delivery, not the posting policy.
        registry.update_list_settings(LIST, {"posting": "open"})
        registry.close()
        self.service = makeService(settings, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.runner = self.service.getServiceNamed("mailrelay-delivery")
        self.spool = self.service.getServiceNamed("mailrelay-stores")._spool

    async def send(self, data: bytes, sender: str = POSTER):
        client = await connect_lmtp(endpoints.UNIXClientEndpoint(reactor, self.socket))
        await client.lhlo("mx.example.com")
        replies = await client.sendmail(sender, [LIST], data)
        await client.quit()
        await self.settle()
        return replies

    async def settle(self):
        for _ in range(1000):
            await self.runner.when_idle()
            counts = self.spool.counts()
            if not (counts[EntryState.QUEUED] or counts[EntryState.INFLIGHT]):
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        self.fail("the relay did not settle")

    def copies(self, sender_prefix="test-bounces"):
        return [m for m in self.smarthost.messages if m[0].startswith(sender_prefix)]


class TransmittableEndToEndTests(StrictSmarthostCase):
    # No 8BITMIME: aiosmtpd offers it only when it does not decode the data.
    smarthost_options = {"decode_data": True, "enable_SMTPUTF8": False}

    def test_every_member_gets_the_same_content(self):
        """Posts with 5,000-character lines, a long header, an 8-bit body and
        an attachment reach every member, 7-bit, decoding to the same parts."""
        long_subject = MIXED.replace(
            b"Subject: test\r\n", b"Subject: " + b"a long subject " * 100 + b"\r\n"
        )
        eight_bit = crlf(
            f"From: {POSTER}\nTo: {LIST}\nSubject: Grüße\nMIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            f"Grüße!\n.dotted\n{LONG_TEXT}\n"
        )

        async def go():
            for post in (long_subject, eight_bit):
                self.smarthost.messages.clear()
                replies = await self.send(post)
                self.assertEqual([r.code for r in replies], [250])
                copies = self.copies()
                self.assertEqual(sorted(r for _, rcpts, _ in copies for r in rcpts), MEMBERS)
                for _, _, content in copies:
                    self.assertTrue(content.isascii())
                    self.assertTrue(all(len(line) <= 998 for line in content.split(b"\r\n")))
                    self.assertEqual(leaves(content), leaves(post))
                    copy = email.message_from_bytes(content, policy=policy.default)
                    original = email.message_from_bytes(post, policy=policy.default)
                    self.assertEqual(str(copy["Subject"]), str(original["Subject"]))

        return as_deferred(go())


class RefusalEndToEndTests(StrictSmarthostCase):
    smarthost_options = {"data_size_limit": 20_000}

    def test_over_size_refused_at_lmtp_data(self):
        """Once the pool has seen the smarthost's SIZE, a larger post gets
        552 5.3.4 at LMTP DATA and nothing is stored or sent."""
        small = crlf(f"From: {POSTER}\nTo: {LIST}\nSubject: hi\n\nhello\n")

        async def go():
            self.assertEqual([r.code for r in await self.send(small)], [250])
            big = small + (b"y" * 70 + b"\r\n") * 400  # 28,800 octets
            replies = await self.send(big)
            self.assertEqual([(r.code, r.text[:5]) for r in replies], [(552, "5.3.4")])
            self.assertEqual(sorted(r for _, rcpts, _ in self.copies() for r in rcpts), MEMBERS)

        return as_deferred(go())

    def test_554_at_data_one_dsn_and_one_notice(self):
        """A post refused with 554 at DATA: one DSN to the poster (multipart/
        report, from -owner, envelope <>), one notice to the owner, the reason
        in ``mailrelay queue``; none to an empty or auto-submitted sender."""

        async def go():
            self.smarthost.refuse = "554 5.6.0 Content refused"
            post = crlf(
                f"From: {POSTER}\nTo: {LIST}\nSubject: refused\nMessage-ID: <r1@example.org>\n\n"
                "body\n"
            )
            self.assertEqual([r.code for r in await self.send(post)], [250])
            dsns = [m for m in self.smarthost.messages if m[0] == ""]
            self.assertEqual([rcpts for _, rcpts, _ in dsns], [[POSTER]])
            dsn = email.message_from_bytes(dsns[0][2])
            self.assertEqual(dsn.get_content_type(), "multipart/report")
            self.assertIn("test-owner@example.com", dsn["From"])
            status = dsn.get_payload()[1].get_payload()
            self.assertEqual(status[0]["Reporting-MTA"], "dns; relay.example.com")
            self.assertEqual(status[1]["Final-Recipient"], f"rfc822; {LIST}")
            self.assertEqual(status[1]["Status"], "5.6.0")
            self.assertEqual(status[1]["Diagnostic-Code"], "smtp; 554 5.6.0 Content refused")
            owner = self.copies()
            self.assertEqual([rcpts for _, rcpts, _ in owner], [["owner@example.com"]])
            out = io.StringIO()
            self.assertEqual(cli.main(["-C", self.config, "queue"], stdout=out), 0)
            self.assertIn("REFUSED post <r1@example.org>", out.getvalue())
            self.assertIn("554 5.6.0 Content refused", out.getvalue())

            # Retrying the copies and failing again tells nobody a second time.
            failed = [e.entry_id for e in self.spool.entries(EntryState.FAILED)]
            await self.spool.retry_now(failed)
            self.runner.wake()
            await self.settle()
            self.assertEqual(len([m for m in self.smarthost.messages if m[0] == ""]), 1)

            for sender, headers in (("", ""), (POSTER, "Auto-Submitted: auto-generated\n")):
                self.smarthost.messages.clear()
                quiet = crlf(f"From: {POSTER}\nTo: {LIST}\nSubject: q\n{headers}\nbody\n")
                await self.send(quiet, sender=sender)
                self.assertEqual([m for m in self.smarthost.messages if m[0] == ""], [])
                self.assertEqual(len(self.copies()), 1)  # the owner notice

        return as_deferred(go())
