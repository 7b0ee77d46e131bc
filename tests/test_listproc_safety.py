"""Tests for :mod:`mailrelay.listproc.safety`: loop and backscatter rules."""

from __future__ import annotations

import email

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listproc.safety import (
    DEFAULT_MAX_AUTORESPONSES_PER_DAY,
    auto_reply_allowed,
    autoreply_day,
    is_daemon_address,
    may_send_autoreply,
)

LISTS = {"test@example.com", "other@example.com"}


def is_list(address: str) -> bool:
    """A stand-in for the registry: lists and their sub-addresses."""
    local, _, domain = address.partition("@")
    base = local.partition("+")[0]
    return f"{base}@{domain}" in LISTS or f"{base.rpartition('-')[0]}@{domain}" in LISTS


def message(**headers: str) -> bytes:
    lines = ["From: Anne <anne@example.org>", "Subject: join"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\nList-Id: in the body, ignored\r\n").encode()


class AutoReplyAllowedTests(SynchronousTestCase):
    def test_ordinary_mail_answered(self):
        """A person's mail with none of the markers may be answered."""
        self.assertIsNone(auto_reply_allowed("anne@example.org", message(), is_list))

    def test_empty_envelope_sender(self):
        """Mail with the null sender (bounces, DSNs) is never answered."""
        for sender in ("", "<>", " "):
            self.assertEqual(
                auto_reply_allowed(sender, message(), is_list), "empty envelope sender"
            )

    def test_auto_submitted(self):
        """Auto-Submitted other than 'no' (any case, with parameters) is not answered."""
        for value in ("auto-replied", "auto-generated", "Auto-Notified; owner-email=x@y", ""):
            reason = auto_reply_allowed("anne@example.org", message(Auto_Submitted=value), is_list)
            self.assertIsNotNone(reason, value)
        for value in ("no", "No", " no ; comment"):
            self.assertIsNone(
                auto_reply_allowed("anne@example.org", message(Auto_Submitted=value), is_list)
            )

    def test_precedence(self):
        """Precedence bulk, junk and list are not answered; others are."""
        for value in ("bulk", "JUNK", " list "):
            self.assertEqual(
                auto_reply_allowed("anne@example.org", message(Precedence=value), is_list),
                f"Precedence: {value.strip().lower()}",
            )
        self.assertIsNone(
            auto_reply_allowed("anne@example.org", message(Precedence="first-class"), is_list)
        )

    def test_list_id(self):
        """Any List-Id header (a list post) is not answered; one in the body does not count."""
        reason = auto_reply_allowed("anne@example.org", message(List_Id="<x.example.net>"), is_list)
        self.assertEqual(reason, "has a List-Id header")

    def test_sender_is_a_list(self):
        """An envelope sender or From that is one of our lists (or a sub-address) is refused."""
        for sender in (
            "other@example.com",
            "test-bounces+a=b@example.com",
            "TEST-request@example.com",
        ):
            reason = auto_reply_allowed(sender.lower(), message(), is_list)
            self.assertIn("is a list address", reason, sender)
        reason = auto_reply_allowed(
            "anne@example.org",
            message().replace(b"anne@example.org", b"test@example.com"),
            is_list,
        )
        self.assertEqual(reason, "From test@example.com is a list address")

    def test_daemon_senders(self):
        """MAILER-DAEMON, postmaster and other software mailboxes are refused."""
        for sender in (
            "MAILER-DAEMON@mx.example.net",
            "postmaster@example.net",
            "noreply@shop.example",
        ):
            self.assertIn("daemon", auto_reply_allowed(sender, message(), is_list), sender)
        raw = message().replace(b"anne@example.org", b"Mailer-Daemon@mx.example.net")
        self.assertIn("From", auto_reply_allowed("anne@example.org", raw, is_list))

    def test_parsed_message_accepted(self):
        """A parsed message works the same as raw bytes."""
        parsed = email.message_from_bytes(message(Precedence="bulk"))
        self.assertEqual(auto_reply_allowed("a@example.org", parsed, is_list), "Precedence: bulk")

    def test_malformed_headers(self):
        """Garbage headers never raise; the header block alone is read."""
        for raw in (b"", b"\xff\xfe\x00", b"From: \xff@\xfe\r\n\r\n", b"no colon here\r\n\r\n"):
            auto_reply_allowed("anne@example.org", raw, is_list)
        huge = b"X-Filler: " + b"a" * (5 * 1024 * 1024) + b"\r\n\r\n"
        self.assertIsNone(auto_reply_allowed("anne@example.org", huge, is_list))


class DaemonAddressTests(SynchronousTestCase):
    def test_daemon_names(self):
        """Daemon local parts, other managers' service addresses; + suffix and case ignored."""
        for address in (
            "mailer-daemon@x.example",
            "MAILER-DAEMON",
            "postmaster+tag@x.example",
            "owner-foo@x.example",
            "foo-request@x.example",
            "foo-bounces@x.example",
            "do-not-reply@x.example",
        ):
            self.assertTrue(is_daemon_address(address), address)
        for address in ("anne@x.example", "requester@x.example", "postmistress@x.example"):
            self.assertFalse(is_daemon_address(address), address)


class RateLimitTests(SynchronousTestCase):
    def test_default_is_mailmans(self):
        """The default cap is Mailman's max_autoresponses_per_day, 10."""
        self.assertEqual(DEFAULT_MAX_AUTORESPONSES_PER_DAY, 10)

    def test_at_most_n_per_day(self):
        """Replies 1..N are allowed, then silence."""
        allowed = [may_send_autoreply(sent) for sent in range(15)]
        self.assertEqual(allowed, [True] * 10 + [False] * 5)
        self.assertEqual([may_send_autoreply(n, limit=2) for n in range(3)], [True, True, False])

    def test_zero_is_unlimited(self):
        """A limit of 0 means no limit, as in Mailman."""
        self.assertTrue(may_send_autoreply(10**6, limit=0))

    def test_negative_rejected(self):
        """Negative counts or limits are a clear error."""
        self.assertRaises(ValueError, may_send_autoreply, -1)
        self.assertRaises(ValueError, may_send_autoreply, 0, -1)

    def test_day_key(self):
        """Replies are counted per UTC calendar day."""
        self.assertEqual(autoreply_day(0), "1970-01-01")
        self.assertEqual(autoreply_day(86399.9), "1970-01-01")
        self.assertEqual(autoreply_day(86400), "1970-01-02")
