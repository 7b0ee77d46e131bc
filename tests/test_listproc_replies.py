"""Tests for :mod:`mailrelay.listproc.replies`: the messages mailrelay writes."""

from __future__ import annotations

import email
from email import policy

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listproc.commands import CommandResult, Outcome, immediate_outcome, parse_commands
from mailrelay.listproc.replies import (
    build_command_results,
    build_confirmation,
    build_disabled_warning,
    build_goodbye,
    build_held_notice,
    build_reject_notice,
    build_removal_notice,
    build_token_rejected,
    build_welcome,
    confirm_address,
)
from mailrelay.listproc.safety import auto_reply_allowed
from mailrelay.listproc.templating import Templates
from mailrelay.listproc.tokens import PendingAction, new_token
from mailrelay.model import MailingList

LIST = MailingList("test@example.com", "Test List", ("owner1@example.org", "owner2@example.org"))
TEMPLATES = Templates()
NOW = 1_700_000_000.0


def reparse(outgoing):
    """The message as a recipient reads it, with LF line ends."""
    return email.message_from_bytes(
        outgoing.as_bytes().replace(b"\r\n", b"\n"), policy=policy.default
    )


def all_builders(token):
    """One of each message, with the Auto-Submitted value it must carry."""
    return [
        (
            build_confirmation(
                LIST, "a@example.org", "join", token, TEMPLATES, in_reply_to="<m@x>", now=NOW
            ),
            "auto-replied",
        ),
        (
            build_confirmation(LIST, "a@example.org", "leave", token, TEMPLATES, now=NOW),
            "auto-generated",
        ),
        (
            build_token_rejected(LIST, "a@example.org", TEMPLATES, in_reply_to="", now=NOW),
            "auto-replied",
        ),
        (build_welcome(LIST, "a@example.org", TEMPLATES, now=NOW), "auto-generated"),
        (
            build_goodbye(LIST, "a@example.org", TEMPLATES, in_reply_to="<m@x>", now=NOW),
            "auto-replied",
        ),
        (
            build_held_notice(
                LIST,
                token,
                TEMPLATES,
                poster="p@example.net",
                subject="Hi",
                size=1234,
                reason="non-member post",
                now=NOW,
            ),
            "auto-generated",
        ),
        (
            build_reject_notice(
                LIST,
                "p@example.net",
                TEMPLATES,
                subject="Hi",
                reason="off topic",
                in_reply_to="<m@x>",
                now=NOW,
            ),
            "auto-replied",
        ),
        (
            build_disabled_warning(
                LIST, "a@example.org", token, TEMPLATES, warnings_left=2, now=NOW
            ),
            "auto-generated",
        ),
        (
            build_removal_notice(LIST, "a@example.org", TEMPLATES, reason="bounces", now=NOW),
            "auto-generated",
        ),
    ]


class CommonHeaderTests(SynchronousTestCase):
    def test_every_message(self):
        """Every message: -bounces envelope sender, Auto-Submitted, Precedence: bulk,
        Message-ID in the list's domain, Date, and no unfilled placeholder."""
        token = new_token()
        for outgoing, auto_submitted in all_builders(token):
            msg = reparse(outgoing)
            self.assertEqual(outgoing.sender, "test-bounces@example.com")
            self.assertEqual(msg["Auto-Submitted"], auto_submitted, msg["Subject"])
            self.assertEqual(msg["Precedence"], "bulk")
            self.assertEqual(msg["X-Auto-Response-Suppress"], "All")
            self.assertTrue(msg["Message-ID"].endswith("@example.com>"))
            self.assertEqual(msg["Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
            self.assertNotIn("$", msg.get_content(), msg["Subject"])
            self.assertTrue(outgoing.recipients)
            self.assertTrue(outgoing.as_bytes().endswith(b"\r\n"))
            self.assertNotIn(b"\n", outgoing.as_bytes().replace(b"\r\n", b""))

    def test_messages_are_not_answered_by_mailrelay(self):
        """mailrelay's own messages are refused by its own loop rules."""
        for outgoing, _ in all_builders(new_token()):
            self.assertIsNotNone(
                auto_reply_allowed(outgoing.sender, outgoing.as_bytes(), lambda a: False)
            )

    def test_in_reply_to(self):
        """An answer refers to the answered Message-ID; a malformed one is left out."""
        msg = reparse(build_welcome(LIST, "a@example.org", TEMPLATES, in_reply_to="<m@x>"))
        self.assertEqual(msg["In-Reply-To"], "<m@x>")
        self.assertEqual(msg["References"], "<m@x>")
        msg = reparse(build_welcome(LIST, "a@example.org", TEMPLATES, in_reply_to="bad\r\nBcc: x"))
        self.assertIsNone(msg["In-Reply-To"])
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")

    def test_never_to_the_list(self):
        """A message addressed to the list or any of its sub-addresses is refused."""
        for address in (
            "test@example.com",
            "Test-Request@example.com",
            "test-bounces+x=y@example.com",
        ):
            self.assertRaises(ValueError, build_welcome, LIST, address, TEMPLATES)
        build_welcome(LIST, "test-fan@example.com", TEMPLATES)

    def test_owner_notice_without_owners(self):
        """A list without owners gives a notice with no recipients (nothing to send)."""
        outgoing = build_removal_notice(
            MailingList("x@example.com"), "a@example.org", TEMPLATES, reason="r"
        )
        self.assertEqual(outgoing.recipients, ())


class ConfirmationTests(SynchronousTestCase):
    def test_join_request(self):
        """From and Reply-To LIST-confirm+TOKEN, Subject 'confirm TOKEN', to the address itself."""
        token = new_token()
        outgoing = build_confirmation(LIST, "bob@example.net", PendingAction.JOIN, token, TEMPLATES)
        msg = reparse(outgoing)
        self.assertEqual(outgoing.recipients, ("bob@example.net",))
        self.assertEqual(msg["To"], "bob@example.net")
        self.assertEqual(msg["Subject"], f"confirm {token}")
        self.assertEqual(msg["From"].addresses[0].addr_spec, f"test-confirm+{token}@example.com")
        self.assertEqual(msg["Reply-To"], confirm_address(LIST, token))
        body = msg.get_content()
        self.assertIn(f"confirm {token}", body)
        self.assertIn("test-request@example.com", body)
        self.assertIn("subscribe bob@example.net", body)

    def test_leave_request(self):
        """A leave confirmation says what confirming does."""
        body = reparse(
            build_confirmation(LIST, "a@x.example", "leave", "t" * 40, TEMPLATES)
        ).get_content()
        self.assertIn("remove a@x.example", body)

    def test_other_actions_refused(self):
        """Only join and leave have a confirmation request."""
        self.assertRaises(
            ValueError, build_confirmation, LIST, "a@x.example", "moderate", "t", TEMPLATES
        )


class CommandResultsTests(SynchronousTestCase):
    def results_for(self, body: bytes, outcomes):
        parsed = parse_commands(body)
        results = [
            CommandResult(c, immediate_outcome(c) or outcomes[c.kind.value], "a@example.org")
            for c in parsed.commands
        ]
        return reparse(
            build_command_results(
                LIST, "a@example.org", parsed, results, TEMPLATES, in_reply_to="<q@x>", now=NOW
            )
        )

    def test_each_command_and_result_then_help(self):
        """The reply echoes each command with its result, lists unread lines, then help."""
        msg = self.results_for(
            b"Subject: join\r\n\r\nfrobnicate\r\njoin address=x\r\nleave\r\n",
            {"join": Outcome.CONFIRMATION_SENT},
        )
        body = msg.get_content()
        self.assertEqual(msg["To"], "a@example.org")
        self.assertEqual(msg["Subject"], "The results of your email commands")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertIn("> join\n    A confirmation request has been sent to a@example.org.", body)
        self.assertIn("> frobnicate\n    No such command: frobnicate", body)
        self.assertIn("> join address=x\n    join: bad address", body)
        self.assertIn("not read as commands:\n\n    leave", body)
        self.assertLess(body.index("frobnicate"), body.index("Help for the Test List"))

    def test_leave_reads_the_same_for_anyone(self):
        """A leave's result text does not depend on membership: one outcome, one text."""
        msg = self.results_for(b"Subject: leave\r\n\r\n", {"leave": Outcome.CONFIRMATION_SENT})
        self.assertIn("If a@example.org is subscribed, a confirmation request", msg.get_content())

    def test_rejected_token_is_neutral(self):
        """Any bad token gets one short neutral text."""
        msg = self.results_for(b"Subject: confirm abc\r\n\r\n", {"confirm": Outcome.TOKEN_REJECTED})
        self.assertIn("not valid", msg.get_content())

    def test_no_commands(self):
        """A message with no commands still gets the help text."""
        msg = self.results_for(b"\r\n", {})
        self.assertIn("(no commands found)", msg.get_content())
        self.assertIn("Help for", msg.get_content())


class NoticeTests(SynchronousTestCase):
    def test_held_notice(self):
        """The owners get sender, subject, size and reason, with a -confirm+TOKEN reply address
        and the approve / reject REASON / discard instructions; poster text cannot inject headers."""
        token = new_token()
        outgoing = build_held_notice(
            LIST,
            token,
            TEMPLATES,
            poster="evil@example.net\r\nBcc: x@y",
            subject="Buy\r\nBcc: z@y",
            size=4321,
            reason="post from a non-member",
        )
        msg = reparse(outgoing)
        self.assertEqual(outgoing.recipients, LIST.owners)
        self.assertEqual(msg["Reply-To"], f"test-confirm+{token}@example.com")
        self.assertIsNone(msg["Bcc"])
        body = msg.get_content()
        for text in (
            "evil@example.net Bcc: x@y",
            "Buy Bcc: z@y",
            "4321 bytes",
            "approve",
            "reject REASON",
            "discard",
            "non-member",
        ):
            self.assertIn(text, body)

    def test_reject_notice(self):
        """The poster learns the reason; the reply comes from -owner."""
        msg = reparse(
            build_reject_notice(LIST, "p@example.net", TEMPLATES, subject="Hi", reason="off topic")
        )
        self.assertIn("off topic", msg.get_content())
        self.assertEqual(msg["From"].addresses[0].addr_spec, "test-owner@example.com")

    def test_disabled_warning(self):
        """The warning carries the re-enable token and how many warnings are left."""
        token = new_token()
        msg = reparse(
            build_disabled_warning(LIST, "a@example.org", token, TEMPLATES, warnings_left=1)
        )
        self.assertEqual(msg["Reply-To"], f"test-confirm+{token}@example.com")
        self.assertIn(f"confirm {token}", msg.get_content())
        self.assertIn("removed from the list: 1", msg.get_content())

    def test_non_ascii(self):
        """Non-ASCII names and subjects are encoded properly."""
        mlist = MailingList("x@example.com", "Liste für Café", ("o@example.org",))
        outgoing = build_held_notice(
            mlist, "t" * 40, TEMPLATES, poster="p@example.net", subject="Grüße", size=1, reason="r"
        )
        self.assertTrue(outgoing.as_bytes().split(b"\r\n\r\n")[0].isascii())
        msg = reparse(outgoing)
        self.assertIn("Grüße", msg.get_content())
        self.assertIn("Liste für Café", str(msg["From"]))
