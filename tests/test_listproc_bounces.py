"""Tests for :mod:`mailrelay.listproc.bounces`: reading bounces of list mail.

The fixtures in ``tests/fixtures/bounces/`` follow the structure of the
reports Postfix 3.x and Exim 4.9x send, plus qmail/Yahoo-style text bounces
that only flufl.bounce's detectors understand.
"""

from __future__ import annotations

import email
import os
from unittest.mock import patch

import flufl.bounce
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listproc._mail import parse_prefix
from mailrelay.listproc.bounces import Recognition, parse_bounce, verp_member

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bounces")
LIST = "test@example.com"
BOUNCES = "test-bounces@example.com"


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


DSN_TEMPLATE = (
    b"From: MAILER-DAEMON@mx.example.net\r\n"
    b"To: test-bounces@example.com\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
    b"\r\n"
    b"--B\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Your message could not be delivered.\r\n"
    b"--B\r\n"
    b"Content-Type: message/delivery-status\r\n"
    b"\r\n"
    b"Reporting-MTA: dns; mx.example.net\r\n"
    b"\r\n"
    b"%s\r\n"
    b"--B--\r\n"
)


def dsn(block: bytes) -> bytes:
    return DSN_TEMPLATE % block


class VerpTests(SynchronousTestCase):
    def test_decode(self):
        """LIST-bounces+LOCAL=DOMAIN@host names LOCAL@DOMAIN, as the runner encodes it."""
        self.assertEqual(
            verp_member(LIST, "test-bounces+anne=example.org@example.com"), "anne@example.org"
        )
        self.assertEqual(
            verp_member(LIST, "TEST-Bounces+Anne+lists=Example.ORG@example.com"),
            "anne+lists@example.org",
        )
        self.assertEqual(
            verp_member(LIST, "test-bounces+a=b=c.example@example.com"), "a=b@c.example"
        )

    def test_not_verp(self):
        """Other addresses, other lists and undecodable suffixes are not VERP."""
        for recipient in (
            BOUNCES,
            "test-bounces+nodomain@example.com",
            "test-bounces+=example.org@example.com",
            "test-bounces+anne=@example.com",
            "other-bounces+anne=example.org@example.com",
            "test-bounces+anne=example.org@example.net",
            "test-confirm+anne=example.org@example.com",
            "test-bounces+anne=bad..domain@example.com",
        ):
            self.assertIsNone(verp_member(LIST, recipient), recipient)

    def test_verp_is_permanent(self):
        """A VERP bounce counts for the member, whatever its body (even none)."""
        report = parse_bounce(LIST, "test-bounces+anne=example.org@example.com", b"garbage")
        self.assertEqual(report.how, Recognition.VERP)
        self.assertEqual(report.permanent, {"anne@example.org"})
        self.assertEqual(report.temporary, set())

    def test_verp_delay_warning_is_temporary(self):
        """A VERP'd Postfix delay warning (Action: delayed only) is a temporary failure."""
        report = parse_bounce(
            LIST, "test-bounces+slow=example.org@example.com", fixture("postfix-delayed.eml")
        )
        self.assertEqual(report.how, Recognition.VERP)
        self.assertEqual(report.permanent, set())
        self.assertEqual(report.temporary, {"slow@example.org"})

    def test_verp_without_report_is_not_parsed(self):
        """A VERP bounce whose bytes never mention delivery-status is permanent
        without being parsed at all (the cheap path of a bounce burst); one that
        does (in any case) is parsed, so a delay report stays temporary."""
        recipient = "test-bounces+slow=example.org@example.com"
        with patch("mailrelay.listproc.bounces.parse_prefix", wraps=parse_prefix) as parse:
            report = parse_bounce(LIST, recipient, b"Subject: x\r\n\r\nNo such user.\r\n")
            self.assertEqual(parse.call_count, 0)
            self.assertEqual(report.permanent, {"slow@example.org"})
            delayed = fixture("postfix-delayed.eml").replace(
                b"message/delivery-status", b"Message/Delivery-Status"
            )
            report = parse_bounce(LIST, recipient, delayed)
            self.assertEqual(parse.call_count, 1)
        self.assertEqual((report.permanent, report.temporary), (set(), {"slow@example.org"}))


class DsnTests(SynchronousTestCase):
    def test_postfix(self):
        """Postfix's report: failed = permanent, delayed = temporary; Original-Recipient
        is used and lower-cased; the returned message's text is not read."""
        report = parse_bounce(LIST, BOUNCES, fixture("postfix-failed.eml"))
        self.assertEqual(report.how, Recognition.DSN)
        self.assertEqual(report.permanent, {"gone@example.org"})
        self.assertEqual(report.temporary, {"full@example.org"})
        self.assertTrue(report.recognised)

    def test_exim(self):
        """Exim's multipart/report (Action before Final-Recipient) is read."""
        report = parse_bounce(LIST, BOUNCES, fixture("exim-failed.eml"))
        self.assertEqual(report.how, Recognition.DSN)
        self.assertEqual(report.permanent, {"nobody@example.net"})

    def test_final_recipient_when_no_original(self):
        """Without a usable Original-Recipient, Final-Recipient names the address."""
        report = parse_bounce(
            LIST,
            BOUNCES,
            dsn(
                b"Original-Recipient: x400; /C=US/\r\n"
                b"Final-Recipient: RFC822; <Bob@Example.NET>\r\n"
                b"Action: failed\r\nStatus: 5.1.1\r\n"
            ),
        )
        self.assertEqual(report.permanent, {"bob@example.net"})

    def test_status_when_action_unknown(self):
        """A missing or odd Action falls back to the Status class."""
        block = (
            b"Final-Recipient: rfc822; a@example.net\r\nStatus: 5.2.1\r\n\r\n"
            b"Final-Recipient: rfc822; b@example.net\r\nAction: weird\r\nStatus: 4.4.7\r\n\r\n"
            b"Final-Recipient: rfc822; c@example.net\r\nAction: failed (bad mailbox)\r\n"
        )
        report = parse_bounce(LIST, BOUNCES, dsn(block))
        self.assertEqual(report.permanent, {"a@example.net", "c@example.net"})
        self.assertEqual(report.temporary, {"b@example.net"})

    def test_success_reports_not_failures(self):
        """delivered/relayed/expanded recipients are no failures; a report with
        nothing else is unrecognised (kept for the owners)."""
        block = (
            b"Final-Recipient: rfc822; a@example.net\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n"
            b"Final-Recipient: rfc822; b@example.net\r\nAction: relayed\r\nStatus: 2.0.0\r\n"
        )
        report = parse_bounce(LIST, BOUNCES, dsn(block))
        self.assertEqual(report.how, Recognition.UNRECOGNISED)
        self.assertIn("without failed", report.detail)

    def test_permanent_wins(self):
        """An address reported both delayed and failed is permanent only."""
        block = (
            b"Final-Recipient: rfc822; a@example.net\r\nAction: delayed\r\nStatus: 4.0.0\r\n\r\n"
            b"Final-Recipient: rfc822; a@example.net\r\nAction: failed\r\nStatus: 5.0.0\r\n"
        )
        report = parse_bounce(LIST, BOUNCES, dsn(block))
        self.assertEqual(report.permanent, {"a@example.net"})
        self.assertEqual(report.temporary, set())

    def test_invalid_addresses_dropped(self):
        """Addresses that are not mailboxes name nobody."""
        block = (
            b"Final-Recipient: rfc822; not an address\r\nAction: failed\r\n\r\n"
            b"Final-Recipient: rfc822; ok@example.net\r\nAction: failed\r\n"
        )
        self.assertEqual(parse_bounce(LIST, BOUNCES, dsn(block)).permanent, {"ok@example.net"})


class DetectorTests(SynchronousTestCase):
    def test_text_bounces(self):
        """Bounces with no RFC 3464 report are read by flufl.bounce's detectors."""
        for name, address in (
            ("qmail.eml", "nosuch@example.net"),
            ("yahoo.eml", "ghost@yahoo.com"),
            ("exim-classic.eml", "olduser@example.net"),
        ):
            report = parse_bounce(LIST, BOUNCES, fixture(name))
            self.assertEqual(report.how, Recognition.DETECTOR, name)
            self.assertEqual(report.permanent, {address}, name)

    def test_unrecognised(self):
        """Mail that is no bounce at all is unrecognised, with a reason."""
        report = parse_bounce(
            LIST, BOUNCES, b"From: anne@example.org\r\nSubject: hi\r\n\r\nJust saying hello.\r\n"
        )
        self.assertFalse(report.recognised)
        self.assertEqual(report.permanent, set())
        self.assertTrue(report.detail)


class FailSafeTests(SynchronousTestCase):
    def assertUnrecognised(self, data: bytes):
        report = parse_bounce(LIST, BOUNCES, data)
        self.assertEqual(report.how, Recognition.UNRECOGNISED)
        return report

    def test_malformed(self):
        """Broken MIME, bad boundaries, garbage and empty input never raise."""
        for data in (
            b"",
            b"\x00" * 1000,
            bytes(range(256)) * 50,
            b"Content-Type: multipart/report; boundary=\r\n\r\n--\r\n",
            b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary",
            b"Content-Type: message/delivery-status\r\n\r\n",
            b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\n",
            DSN_TEMPLATE.replace(b"message/delivery-status", b"message/delivery-status; x=\xff")
            % b"Final-Recipient: rfc822\r\nAction: failed\r\n",
        ):
            self.assertUnrecognised(data)

    def test_truncated(self):
        """A report cut anywhere never raises; cut after its recipient block it still counts."""
        data = fixture("postfix-failed.eml")
        for end in range(0, len(data), 97):
            parse_bounce(LIST, BOUNCES, data[:end])
        cut = data[: data.index(b"Final-Recipient: rfc822; full@")]
        self.assertEqual(parse_bounce(LIST, BOUNCES, cut).permanent, {"gone@example.org"})

    def test_non_utf8(self):
        """8-bit bytes in headers, the report and addresses: no crash, bad addresses dropped."""
        block = (
            b"Final-Recipient: rfc822; j\xf6rg@example.net\r\nAction: failed\r\n\r\n"
            b"Final-Recipient: rfc822; ok@example.net\r\nAction: failed\r\n"
            b"Diagnostic-Code: smtp; 550 Benutzer unbekannt \xe4\xf6\xfc\r\n"
        )
        data = dsn(block).replace(b"Subject: Undelivered", b"Subject: Unzustellbar \xfc\xff")
        report = parse_bounce(LIST, BOUNCES, data)
        self.assertEqual(report.permanent, {"ok@example.net"})

    def test_utf8_address(self):
        """An RFC 6533 utf-8 address type with a UTF-8 address is read."""
        block = "Final-Recipient: utf-8; j\u00f6rg@example.net\r\nAction: failed\r\n".encode()
        self.assertEqual(
            parse_bounce(LIST, BOUNCES, dsn(block)).permanent, {"j\u00f6rg@example.net"}
        )

    def test_huge(self):
        """A 20 MB bounce is read only in its head: the report still counts, quickly."""
        data = fixture("postfix-failed.eml")
        marker = b"The notes are attached."
        huge = data.replace(marker, marker + b"\r\n" + (b"x" * 998 + b"\r\n") * 20_000)
        self.assertGreater(len(huge), 20_000_000)
        report = parse_bounce(LIST, BOUNCES, huge)
        self.assertEqual(report.permanent, {"gone@example.org"})
        junk = b"Subject: x\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20_000
        self.assertUnrecognised(junk)

    def test_many_recipients_capped(self):
        """A report naming thousands of recipients is cut at the address cap."""
        block = b"\r\n".join(
            b"Final-Recipient: rfc822; u%d@example.net\r\nAction: failed\r\n" % i
            for i in range(3000)
        )
        report = parse_bounce(LIST, BOUNCES, dsn(block), max_bytes=10_000_000)
        self.assertEqual(len(report.permanent), 1000)


# flufl.bounce's Yale detector raises IndexError on a multipart without a boundary.
DETECTOR_CHOKES = b"Subject: Returned mail\r\nContent-Type: multipart/mixed\r\n\r\nhello\r\n"


class DetectorFailureTests(SynchronousTestCase):
    def test_detector_failure_is_one_warning_of_ours(self):
        """A detector raising on odd input: the bounce is unrecognised, mailrelay logs one
        warning line naming the list and the error, and flufl.bounce's own traceback
        record (logging.exception on its logger) is dropped."""
        with self.assertNoLogs("flufl.bounce", level="ERROR"), capturedLogs() as events:
            report = parse_bounce(LIST, BOUNCES, DETECTOR_CHOKES)
        self.assertEqual(report.how, Recognition.UNRECOGNISED)
        warnings = [e for e in events if e["log_level"].name in ("warn", "error", "critical")]
        self.assertEqual(len(warnings), 1, [formatEvent(e) for e in events])
        line = formatEvent(warnings[0])
        self.assertIn("detectors failed on a bounce for test@example.com: IndexError", line)
        self.assertNotIn("\n", line)
        self.assertIsNone(warnings[0].get("log_failure"))

    def test_library_logging_untouched_elsewhere(self):
        """Outside mailrelay's reading of a bounce, flufl.bounce's records reach logging
        as before: the filter is scoped to the calls whose errors mailrelay catches."""
        msg = email.message_from_bytes(DETECTOR_CHOKES)
        with self.assertLogs("flufl.bounce", level="ERROR") as logged:
            self.assertRaises(IndexError, flufl.bounce.all_failures, msg)
        self.assertIsNotNone(logged.records[0].exc_info)
