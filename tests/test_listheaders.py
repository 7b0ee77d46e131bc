"""Tests for :mod:`mailrelay.listheaders`: RFC 2369/2919 headers on posts."""

from __future__ import annotations

import email
from email import policy

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listheaders import add_list_headers, list_headers, member_unsubscribe_fields
from mailrelay.model import MailingList

LIST = MailingList("test@example.com", "Test List", ("owner@example.org",))
MESSAGE = (
    b"X-MailFrom: anne@example.org\r\n"
    b"From: Anne <anne@example.org>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"List-Id: this is the body, not a header\r\n"
)


class ListHeadersTests(SynchronousTestCase):
    def test_headers_point_at_sub_addresses(self):
        """List-Id carries the display name and list id; the others are mailto: URIs
        of the posting, -request, -join, -leave and -owner addresses; Precedence is list."""
        self.assertEqual(
            list_headers(LIST),
            [
                ("List-Id", "Test List <test.example.com>"),
                ("List-Help", "<mailto:test-request@example.com?subject=help>"),
                ("List-Post", "<mailto:test@example.com>"),
                ("List-Subscribe", "<mailto:test-join@example.com>"),
                ("List-Unsubscribe", "<mailto:test-leave@example.com>"),
                ("List-Owner", "<mailto:test-owner@example.com>"),
                ("Precedence", "list"),
            ],
        )

    def test_list_id_without_display_name(self):
        """A list without a display name has a bare <list-id>."""
        self.assertEqual(
            list_headers(MailingList("x@example.com"))[0], ("List-Id", "<x.example.com>")
        )

    def test_display_name_quoting_and_encoding(self):
        """Specials are quoted, non-ASCII is RFC 2047 encoded, and line breaks in the
        name cannot inject a header."""
        value = dict(list_headers(MailingList("x@example.com", "A. Person, list")))["List-Id"]
        self.assertEqual(value, '"A. Person, list" <x.example.com>')
        value = dict(list_headers(MailingList("x@example.com", "Liste für Café")))["List-Id"]
        self.assertTrue(value.isascii())
        self.assertIn("=?utf-8?", value)
        value = dict(list_headers(MailingList("x@example.com", "Evil\r\nBcc: x@y")))["List-Id"]
        self.assertNotIn("\n", value)
        self.assertNotIn("\r", value)

    def test_mailto_escaping(self):
        """Characters with a meaning in mailto: URIs are percent-encoded."""
        value = dict(list_headers(MailingList("a?b&c@example.com")))["List-Post"]
        self.assertEqual(value, "<mailto:a%3Fb%26c@example.com>")


class AddListHeadersTests(SynchronousTestCase):
    def test_prepended_and_rest_untouched(self):
        """The headers come first; every byte of the message follows unchanged."""
        out = add_list_headers(MESSAGE, LIST)
        self.assertTrue(out.startswith(b"List-Id: Test List <test.example.com>\r\n"))
        self.assertTrue(out.endswith(MESSAGE))
        parsed = email.message_from_bytes(out, policy=policy.compat32)
        self.assertEqual(parsed["List-Post"], "<mailto:test@example.com>")
        self.assertEqual(parsed["Precedence"], "list")
        self.assertEqual(parsed["Subject"], "hello")

    def test_existing_list_headers_replaced(self):
        """List-* and Precedence fields of the incoming message (folded ones
        included) are dropped, so each appears once; the body is not touched."""
        incoming = (
            b"List-Id: Other list <other.example.net>\r\n"
            b"Subject: hi\r\n"
            b"list-unsubscribe: <mailto:other-leave@example.net>,\r\n"
            b"\t<https://example.net/leave>\r\n"
            b"List-Archive: <https://example.net/archive>\r\n"
            b"Precedence: bulk\r\n"
            b"X-Other: kept\r\n"
            b"\r\n"
            b"List-Id: body line\r\n"
        )
        out = add_list_headers(incoming, LIST)
        parsed = email.message_from_bytes(out, policy=policy.compat32)
        self.assertEqual(parsed.get_all("List-Id"), ["Test List <test.example.com>"])
        self.assertEqual(parsed.get_all("List-Unsubscribe"), ["<mailto:test-leave@example.com>"])
        self.assertIsNone(parsed.get_all("List-Archive"))
        self.assertEqual(parsed.get_all("Precedence"), ["list"])
        self.assertNotIn(b"example.net/leave", out)
        self.assertIn(b"X-Other: kept\r\n\r\nList-Id: body line\r\n", out)

    def test_message_without_body(self):
        """A message that is all header (no blank line) still gets the headers."""
        out = add_list_headers(b"Subject: x\r\nList-Post: <mailto:a@b>\r\n", LIST)
        self.assertTrue(out.endswith(b"Precedence: list\r\nSubject: x\r\n"))

    def test_bad_input(self):
        """Only bytes and a MailingList are accepted."""
        self.assertRaises(TypeError, add_list_headers, "text", LIST)
        self.assertRaises(TypeError, add_list_headers, b"x", "test@example.com")


class UnsubscribeHeaderTests(SynchronousTestCase):
    URL = "https://lists.example.com/unsubscribe/list/test@example.com"

    def test_grouped_copy_names_leave_then_list_page(self):
        """A grouped copy's List-Unsubscribe has the -leave address first and the
        list page second, folded between them; no List-Unsubscribe-Post."""
        fields = dict(list_headers(LIST, list_url=self.URL))
        self.assertEqual(
            fields["List-Unsubscribe"],
            f"<mailto:test-leave@example.com>,\r\n <{self.URL}>",
        )
        self.assertNotIn("List-Unsubscribe-Post", fields)

    def test_personal_block_leaves_unsubscribe_to_each_copy(self):
        """With personal=True the shared block has no List-Unsubscribe at all."""
        names = [name for name, _ in list_headers(LIST, list_url=self.URL, personal=True)]
        self.assertNotIn("List-Unsubscribe", names)
        self.assertIn("List-Subscribe", names)
        out = add_list_headers(MESSAGE, LIST, personal=True)
        self.assertNotIn(b"List-Unsubscribe", out)

    def test_member_fields(self):
        """A member's fields: List-Unsubscribe with the one-click URL first and
        mailto second, then List-Unsubscribe-Post: List-Unsubscribe=One-Click;
        parsed in front of a message they are one field each."""
        url = "https://lists.example.com/unsubscribe/abc.def"
        fields = member_unsubscribe_fields(LIST, url)
        self.assertEqual(
            fields,
            b"List-Unsubscribe: <https://lists.example.com/unsubscribe/abc.def>,\r\n"
            b" <mailto:test-leave@example.com>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        )
        parsed = email.message_from_bytes(
            fields + add_list_headers(MESSAGE, LIST, personal=True), policy=policy.default
        )
        self.assertEqual(
            parsed["List-Unsubscribe"],
            f"<{url}>, <mailto:test-leave@example.com>",
        )
        self.assertEqual(parsed.get_all("List-Unsubscribe-Post"), ["List-Unsubscribe=One-Click"])

    def test_member_url_cannot_inject(self):
        """A URL with a line break, a '>' or non-ASCII is refused."""
        for url in ("https://x/\r\nBcc: a@b", "https://x/>", "https://x/é"):
            self.assertRaises(ValueError, member_unsubscribe_fields, LIST, url)
