"""Tests for :mod:`mailrelay.listheaders`: RFC 2369/2919 headers on posts."""

from __future__ import annotations

import email
import tracemalloc
from email import policy

from hypothesis import given, settings
from hypothesis import strategies as st
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
        of the posting, -request, -join, -leave and -owner addresses; Precedence is list;
        X-BeenThere names the posting address (Mailman's loop marker)."""
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
                ("X-BeenThere", "test@example.com"),
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
        self.assertTrue(out.endswith(b"X-BeenThere: test@example.com\r\nSubject: x\r\n"))

    def test_bad_input(self):
        """Only bytes and a MailingList are accepted, and a text subject prefix."""
        self.assertRaises(TypeError, add_list_headers, "text", LIST)
        self.assertRaises(TypeError, add_list_headers, b"x", "test@example.com")
        self.assertRaises(TypeError, add_list_headers, b"x", LIST, subject_prefix=b"[x]")

    def test_other_lists_x_beenthere_kept(self):
        """X-BeenThere fields of other lists the post went through stay (nested lists);
        this list's is added once."""
        incoming = b"X-BeenThere: outer@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
        parsed = email.message_from_bytes(add_list_headers(incoming, LIST), policy=policy.default)
        self.assertEqual(parsed.get_all("X-BeenThere"), ["test@example.com", "outer@example.net"])


def _subject(message: bytes) -> str:
    return str(email.message_from_bytes(message, policy=policy.default)["Subject"])


class SubjectPrefixTests(SynchronousTestCase):
    def prefixed(self, subject: bytes | None, prefix: str = "[mylist] ") -> bytes:
        head = b"From: anne@example.org\r\n"
        if subject is not None:
            head += b"Subject:" + subject + b"\r\n"
        return add_list_headers(head + b"X-After: 1\r\n\r\nbody\r\n", LIST, subject_prefix=prefix)

    def test_off_by_default(self):
        """Without a prefix the Subject is left byte for byte as it came."""
        raw = b"Subject: =?iso-8859-1?q?K=F6ln?=  [x]\r\n\r\nbody\r\n"
        self.assertTrue(add_list_headers(raw, LIST).endswith(raw))

    def test_prefix_added_once_in_place(self):
        """The prefix goes in front of the Subject with one space, where the Subject was;
        the other fields and the body are untouched."""
        out = self.prefixed(b" hello")
        self.assertIn(
            b"From: anne@example.org\r\nSubject: [mylist] hello\r\nX-After: 1\r\n\r\nbody\r\n",
            out,
        )
        self.assertEqual(out.count(b"Subject:"), 1)

    def test_not_doubled_on_replies(self):
        """A reply keeps one prefix, with its Re: after it, as Mailman does: "Re: [mylist]
        hello" and "RE: AW: [MyList] hello" become "[mylist] Re: hello"; a subject that
        is only the prefix becomes "(no subject)"."""
        self.assertEqual(_subject(self.prefixed(b" Re: [mylist] hello")), "[mylist] Re: hello")
        self.assertEqual(_subject(self.prefixed(b" RE: AW: [MyList] hello")), "[mylist] Re: hello")
        self.assertEqual(_subject(self.prefixed(b" [mylist] hello")), "[mylist] hello")
        self.assertEqual(_subject(self.prefixed(b" [mylist]")), "[mylist] (no subject)")
        again = self.prefixed(self.prefixed(b" hi").split(b"Subject:")[1].split(b"\r\n")[0])
        self.assertEqual(_subject(again), "[mylist] hi")

    def test_encoded_subjects(self):
        """RFC 2047 encoded words (folded, in several charsets) and raw UTF-8 are decoded
        and written again as encoded words: the decoded Subject is the prefix and the
        original text; the output is ASCII and the prefix stays readable."""
        out = self.prefixed(b" =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus\r\n =?iso-8859-1?q?K=F6ln?=")
        self.assertEqual(_subject(out), "[mylist] Grüße aus Köln")
        field = out.split(b"Subject: ")[1].split(b"\r\nX-After")[0]
        self.assertTrue(field.isascii())
        self.assertTrue(field.startswith(b"[mylist] =?utf-8?"))
        reply = self.prefixed(b" Re: =?utf-8?q?=5Bmylist=5D_caf=C3=A9?=")
        self.assertEqual(_subject(reply), "[mylist] Re: café")
        self.assertEqual(_subject(self.prefixed(" Grüße".encode())), "[mylist] Grüße")
        prefix = self.prefixed(b" hi", prefix="[Liste für alle]")
        self.assertEqual(_subject(prefix), "[Liste für alle] hi")
        self.assertTrue(prefix.split(b"\r\n\r\n")[0].isascii())

    def test_undecodable_subject_kept_behind_the_prefix(self):
        """A Subject that cannot be decoded (bytes that are not UTF-8, an unknown
        charset) is kept as it came, behind the prefix; one that has it is left alone."""
        out = self.prefixed(b" \xff\xfe odd")
        self.assertIn(b"\r\nSubject: [mylist] \xff\xfe odd\r\nX-After: 1\r\n", out)
        out = self.prefixed(b" [mylist] =?x-unknown?q?abc?=")
        self.assertIn(b"\r\nSubject: [mylist] =?x-unknown?q?abc?=\r\nX-After", out)

    def test_missing_subject_added(self):
        """A post without a Subject gets "PREFIX (no subject)", as in Mailman."""
        out = self.prefixed(None)
        self.assertEqual(_subject(out), "[mylist] (no subject)")
        self.assertEqual(out.count(b"Subject:"), 1)

    def test_long_subject_folded(self):
        """A long Subject is folded (no line over 78 octets) and reads back the same."""
        words = " ".join(["word"] * 40)
        out = self.prefixed(b" " + words.encode())
        head = out.split(b"\r\n\r\n")[0]
        self.assertLessEqual(max(len(line) for line in head.split(b"\r\n")), 78)
        self.assertEqual(_subject(out), "[mylist] " + words)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    b" ",
                    b"=?",
                    b"?=",
                    b"utf-8",
                    b"?q?",
                    b"?b?",
                    b"=C3",
                    b"\xff",
                    b"\r\n ",
                    b"Re:",
                    b"[mylist]",
                    b"abc",
                    b"\xc3\xa9",
                    b"=?utf-8?q?caf=C3=A9?=",
                    b"=?unknown?b?AAA?=",
                ]
            ),
            max_size=12,
        ),
        st.sampled_from(["[mylist]", "[Liste f\u00fcr alle]"]),
    )
    def test_any_subject_one_field_rest_untouched(self, chunks, prefix):
        """Whatever the Subject holds (broken encoded words, unknown charsets, 8-bit
        bytes, folding), the post gets exactly one Subject and every other field and
        the body stay as they were."""
        value = b"".join(chunks)
        out = add_list_headers(
            b"From: a@example.org\r\nSubject:" + value + b"\r\nX-After: y\r\n\r\nbody\r\n",
            LIST,
            subject_prefix=prefix,
        )
        self.assertTrue(out.endswith(b"\r\nX-After: y\r\n\r\nbody\r\n"), out)
        parsed = email.message_from_bytes(out, policy=policy.compat32)
        self.assertEqual(len(parsed.get_all("Subject")), 1, out)

    def test_body_copied_once(self):
        """Rewriting the Subject costs no extra copy of the body: adding the headers
        and the prefix to a 20 MB post allocates little more than the result itself."""
        body = b"x" * 998 + b"\r\n"
        message = b"Subject: hello\r\nList-Id: <old.example.net>\r\n\r\n" + body * 20_000
        tracemalloc.start()
        try:
            out = add_list_headers(message, LIST, subject_prefix="[mylist]")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertTrue(out.endswith(body * 3))
        self.assertLess(peak, 1.2 * len(message))


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
