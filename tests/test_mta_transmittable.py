"""Tests of mailrelay.mta.transmittable and its use by WireMessage and the client.

What a rewritten message must keep is checked by decoding both versions
with the email package and comparing part by part (:func:`assert_same_content`).
"""

from __future__ import annotations

import base64
import email
import os
from email import policy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.mta.errors import MessageTooLarge
from mailrelay.mta.message import prepare_message
from mailrelay.mta.transmittable import (
    MAX_LINE,
    has_long_lines,
    make_transmittable,
    needs_rewriting,
)
from mailrelay.retry import Verdict, classify_error
from tests.test_mta_client import ScriptedServer, txn

# Headers the rewriting may add or change; every other header must decode the same.
_ENCODING_HEADERS = {"content-transfer-encoding", "mime-version"}


def crlf(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def assert_same_content(case, original: bytes, rewritten: bytes) -> None:
    """Same structure, same decoded header values and same decoded part contents."""
    before = list(email.message_from_bytes(original, policy=policy.default).walk())
    after = list(email.message_from_bytes(rewritten, policy=policy.default).walk())
    case.assertEqual(len(before), len(after))
    for old, new in zip(before, after, strict=True):
        case.assertEqual(old.get_content_type(), new.get_content_type())
        if old["Content-Type"] is not None:
            case.assertEqual(old.get_params(), new.get_params())
        # A non-MIME 8-bit body gets a Content-Type saying its charset.
        skip = _ENCODING_HEADERS if old["Content-Type"] else _ENCODING_HEADERS | {"content-type"}
        case.assertEqual(_headers(old, skip), _headers(new, skip))
        # None and "" are written alike.
        case.assertEqual(old.preamble or "", new.preamble or "")
        case.assertEqual(old.epilogue or "", new.epilogue or "")
        if not old.is_multipart():
            case.assertEqual(old.get_payload(decode=True), new.get_payload(decode=True))


def _headers(part, skip) -> list[tuple[str, str]]:
    return [(k.lower(), str(v)) for k, v in part.items() if k.lower() not in skip]


def assert_transmittable(case, data: bytes, *, seven_bit: bool) -> None:
    case.assertFalse(has_long_lines(data), "a line over 998 octets is left")
    if seven_bit:
        case.assertTrue(data.isascii(), "8-bit data is left")


LONG_TEXT = ("Lorem ipsum dolor sit amet, " * 200)[:5000]
HEADERS = (
    "From: anne@example.com\nTo: list@example.com\nSubject: test\nMessage-ID: <1@example.com>\n"
)

MIXED = crlf(
    HEADERS + "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="outer"\n'
    "\n"
    "This is a multi-part message in MIME format.\n"
    "--outer\n"
    'Content-Type: multipart/alternative; boundary="inner"\n'
    "\n"
    "--inner\n"
    'Content-Type: text/plain; charset="utf-8"\n'
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    f"Grüße, {LONG_TEXT}\n"
    ".a line starting with a dot\n"
    "--inner\n"
    'Content-Type: text/html; charset="utf-8"\n'
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    f"<html><body><p>Grüße, {LONG_TEXT}</p></body></html>\n"
    "--inner--\n"
    "--outer\n"
    "Content-Type: application/pdf\n"
    'Content-Disposition: attachment; filename="a.pdf"\n'
    "Content-Transfer-Encoding: base64\n"
    "\n" + base64.encodebytes(os.urandom(3000)).decode() + "--outer--\n"
    "epilogue\n"
)


class ScanTests(SynchronousTestCase):
    def test_long_line_boundaries(self):
        """998 octets is allowed, 999 is not, wherever the line is."""
        for before in (b"", b"short\r\n", (b"y" * 998 + b"\r\n") * 3):
            self.assertFalse(has_long_lines(before + b"x" * 998 + b"\r\n"))
            self.assertTrue(has_long_lines(before + b"x" * 999 + b"\r\n"))
            self.assertTrue(has_long_lines(before + b"x" * 999))
        self.assertTrue(has_long_lines("é" * 999))

    @given(st.lists(st.integers(0, 2100), max_size=12))
    def test_long_line_scan_agrees_with_split(self, lengths):
        """The windowed scan finds exactly the lines a split would find."""
        data = b"".join(b"x" * n + b"\r\n" for n in lengths)
        self.assertEqual(has_long_lines(data), any(n > MAX_LINE for n in lengths))


class FastPathTests(SynchronousTestCase):
    def test_nothing_needed_is_the_same_object(self):
        """A message with short lines, ASCII or 8-bit with 8BITMIME, comes back as the same bytes object."""
        ascii_message = crlf(HEADERS + "\nshort body\n")
        self.assertIs(make_transmittable(ascii_message, eight_bit_mime=False), ascii_message)
        eight_bit = crlf(HEADERS + "\nGrüße\n")
        self.assertIs(make_transmittable(eight_bit, eight_bit_mime=True), eight_bit)
        self.assertFalse(needs_rewriting(eight_bit, eight_bit_mime=True))
        self.assertTrue(needs_rewriting(eight_bit, eight_bit_mime=False))

    def test_wire_message_unchanged(self):
        """WireMessage.for_server returns the message itself when nothing is needed."""
        wire = prepare_message(HEADERS + "\nGrüße\n")
        self.assertIs(wire.for_server(eight_bit_mime=True), wire)
        ascii_wire = prepare_message(HEADERS + "\nhello\n")
        self.assertIs(ascii_wire.for_server(eight_bit_mime=False), ascii_wire)


class RewriteTests(SynchronousTestCase):
    def rewrite(self, raw: bytes, *, eight_bit_mime: bool) -> bytes:
        out = make_transmittable(raw, eight_bit_mime=eight_bit_mime)
        self.assertIsNot(out, raw)
        assert_transmittable(self, out, seven_bit=not eight_bit_mime)
        assert_same_content(self, raw, out)
        return out

    def test_long_plain_text_line(self):
        """A 5,000-character line in a non-MIME text body goes as quoted-printable, with MIME-Version."""
        raw = crlf(HEADERS + "\n" + LONG_TEXT + "\nsecond line\n")
        out = self.rewrite(raw, eight_bit_mime=True)
        message = email.message_from_bytes(out, policy=policy.default)
        self.assertEqual(message["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(message["MIME-Version"], "1.0")
        # Headers that needed nothing are byte for byte as they were.
        self.assertTrue(out.startswith(crlf(HEADERS)))

    def test_multipart_alternative_and_mixed(self):
        """Long text/plain and text/html parts are re-encoded; the attachment and boundaries stay as they were."""
        out = self.rewrite(MIXED, eight_bit_mime=True)
        parts = list(email.message_from_bytes(out, policy=policy.default).walk())
        self.assertEqual(
            [p.get("Content-Transfer-Encoding", "") for p in parts],
            ["", "", "quoted-printable", "quoted-printable", "base64"],
        )
        attachment = MIXED[MIXED.index(b"Content-Type: application/pdf") :]
        self.assertIn(attachment, out)

    def test_eight_bit_without_8bitmime(self):
        """Without 8BITMIME every 8-bit part becomes 7-bit, even one with short lines."""
        raw = crlf(
            HEADERS + "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n\nGrüße aus Köln\n"
        )
        out = self.rewrite(raw, eight_bit_mime=False)
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable\r\n", out)
        self.assertIn(b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n", out)
        self.assertIs(make_transmittable(raw, eight_bit_mime=True), raw)

    def test_eight_bit_multipart_container_declares_7bit(self):
        """A multipart declared 8bit says 7bit once all its parts are 7-bit; with 8BITMIME short 8-bit parts stay."""
        raw = MIXED.replace(
            b'Content-Type: multipart/alternative; boundary="inner"\r\n',
            b'Content-Type: multipart/alternative; boundary="inner"\r\n'
            b"Content-Transfer-Encoding: 8bit\r\n",
        )
        out = self.rewrite(raw, eight_bit_mime=False)
        inner = list(email.message_from_bytes(out, policy=policy.default).walk())[1]
        self.assertEqual(inner["Content-Transfer-Encoding"], "7bit")

    def test_non_mime_eight_bit_gets_charset(self):
        """A non-MIME 8-bit body is declared text/plain in UTF-8 (or unknown-8bit) when encoded."""
        out = self.rewrite(crlf(HEADERS + "\nGrüße\n"), eight_bit_mime=False)
        self.assertIn(b'Content-Type: text/plain; charset="utf-8"\r\n', out)
        latin1 = crlf(HEADERS.encode() + b"\nGr\xfc\xdfe\n")
        out = self.rewrite(latin1, eight_bit_mime=False)
        self.assertIn(b'charset="unknown-8bit"', out)

    def test_text_with_bare_line_feeds_goes_as_base64(self):
        """Text decoded from base64 with bare LFs is re-encoded as base64, so its octets survive."""
        text = ("x" * 1200 + "\nunix line\n").encode()
        raw = crlf(
            HEADERS + "MIME-Version: 1.0\nContent-Type: text/plain\n"
            "Content-Transfer-Encoding: base64\n\n" + base64.b64encode(text).decode() + "\n"
        )
        out = self.rewrite(raw, eight_bit_mime=True)
        message = email.message_from_bytes(out, policy=policy.default)
        self.assertEqual(message["Content-Transfer-Encoding"], "base64")
        self.assertEqual(message.get_payload(decode=True), text)

    def test_long_headers_folded(self):
        """Headers over 998 octets are folded, an unbreakable one as encoded words; short ones are untouched."""
        references = " ".join(f"<{i}.abcdefgh@example.com>" for i in range(60))
        raw = crlf(
            f"{HEADERS}References: {references}\nX-Token: {'t' * 1500}\n"
            f"Subject2: {'many words ' * 150}\n\nbody\n"
        )
        out = self.rewrite(raw, eight_bit_mime=True)
        self.assertTrue(out.startswith(crlf(HEADERS)))
        self.assertIn(b"\r\n <", out)  # References folded between message IDs

    def test_eight_bit_headers_without_8bitmime(self):
        """Without 8BITMIME, 8-bit header values become UTF-8 encoded words."""
        raw = crlf('From: "Jörg M" <j@example.com>\nSubject: Grüße\n\nGrüße\n')
        out = self.rewrite(raw, eight_bit_mime=False)
        self.assertIn(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n", out)

    def test_control_characters_in_untouched_headers_kept(self):
        """A header with a form feed or \\x1e (str.splitlines breaks there) is written back unchanged."""
        headers = crlf(
            "From: anne@example.com\nSubject: a\x0cb\x1ec\nX-Other: folded\n\tcontinued\n"
        )
        raw = headers + crlf("\n" + LONG_TEXT + "\n")
        out = self.rewrite(raw, eight_bit_mime=True)
        self.assertTrue(out.startswith(headers))

    def test_nested_message(self):
        """A long line inside an attached message/rfc822 is re-encoded inside it."""
        inner = f"From: bart@example.com\nSubject: inner\n\n{LONG_TEXT}\n"
        raw = crlf(
            HEADERS + 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
            "--b\nContent-Type: text/plain\n\nsee attached\n"
            "--b\nContent-Type: message/rfc822\n\n" + inner + "--b--\n"
        )
        out = self.rewrite(raw, eight_bit_mime=True)
        nested = list(email.message_from_bytes(out, policy=policy.default).walk())[3]
        self.assertEqual(nested["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(nested["MIME-Version"], "1.0")

    def test_unknown_encoding_left_alone(self):
        """A part in a transfer encoding we cannot decode exactly is left as it is."""
        raw = crlf(
            HEADERS + "MIME-Version: 1.0\nContent-Type: text/plain\n"
            "Content-Transfer-Encoding: x-custom\n\n" + "z" * 1200 + "\n"
        )
        out = make_transmittable(raw, eight_bit_mime=True)
        self.assertIn(b"z" * 1200, out)


# -- property test --------------------------------------------------------------

_text_lines = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=80),
        st.integers(990, 3000).map(lambda n: "w" * n),
        st.sampled_from([".", ".dot", "From me", "trailing space ", "tab\t", "é" * 600]),
    ),
    max_size=8,
)


@st.composite
def _leaf(draw) -> str:
    kind = draw(st.sampled_from(["plain", "html", "binary"]))
    if kind == "binary":
        data = draw(st.binary(max_size=2000))
        wrap = draw(st.booleans())  # some senders write base64 in one line
        encoded = base64.encodebytes(data).decode() if wrap else base64.b64encode(data).decode()
        return f"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n{encoded}\n"
    lines = draw(_text_lines)
    return (
        f'Content-Type: text/{kind}; charset="utf-8"\nContent-Transfer-Encoding: 8bit\n\n'
        + "".join(line + "\n" for line in lines)
    )


def _multipart(children: list[str]) -> str:
    boundary = f"b{abs(hash(tuple(children)))}"
    kind = "alternative" if len(children) == 2 else "mixed"
    body = "".join(f"--{boundary}\n{child}" for child in children)
    return f'Content-Type: multipart/{kind}; boundary="{boundary}"\n\n{body}--{boundary}--\n'


_parts = st.recursive(
    _leaf(), lambda inner: st.lists(inner, min_size=1, max_size=3).map(_multipart), max_leaves=6
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        _parts,
        st.booleans(),
        # RFC 5322 allows no control characters in a header but HTAB.
        st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=1200),
    )
    def test_rewritten_is_transmittable_and_decodes_the_same(self, body, eight_bit_mime, subject):
        """Whatever the structure, the result has no long line, is 7-bit when needed, and decodes the same;
        a message needing nothing is returned unchanged."""
        raw = crlf(f"From: anne@example.com\nSubject: {subject}\nMIME-Version: 1.0\n{body}")
        out = make_transmittable(raw, eight_bit_mime=eight_bit_mime)
        if not needs_rewriting(raw, eight_bit_mime=eight_bit_mime):
            self.assertIs(out, raw)
            return
        assert_transmittable(self, out, seven_bit=not eight_bit_mime)
        assert_same_content(self, raw, out)


# -- WireMessage and the client -------------------------------------------------


class WireMessageTests(SynchronousTestCase):
    def test_rewritten_once_and_dot_stuffing_kept(self):
        """A long-line message is rewritten once per set of extensions; lines starting with '.' stay stuffed."""
        raw = crlf(HEADERS + "\n.first\n" + LONG_TEXT + "\n..two\n")
        wire = prepare_message(raw)
        self.assertTrue(wire.long_lines)
        variant = wire.for_server(eight_bit_mime=True)
        self.assertIs(wire.for_server(eight_bit_mime=True), variant)
        self.assertFalse(variant.long_lines)
        self.assertIn(b"\r\n\r\n..first\r\n", variant.data)
        self.assertIn(b"\r\n...two\r\n", variant.data)
        self.assertEqual(variant.size, len(variant.data) - 2)  # two stuffed dots
        # Un-stuffed, the variant decodes to the original's content.
        unstuffed = variant.data.replace(b"\r\n..", b"\r\n.")
        assert_same_content(self, raw, unstuffed)


class ClientTests(SynchronousTestCase):
    def test_seven_bit_copy_without_8bitmime(self):
        """To a server without 8BITMIME the client sends the 7-bit copy, without BODY=8BITMIME."""
        s = ScriptedServer(self)
        s.handshake("SIZE 100000", "PIPELINING")
        s.client.transact(txn(message=HEADERS + "\nGrüße\n"))
        lines = s.sent()
        self.assertTrue(lines[0].startswith(b"MAIL FROM:<anne@example.com> SIZE="))
        self.assertNotIn(b"BODY", lines[0])
        s.reply("250 ok", "250 ok", "354 go")
        data = s.transport.value()
        self.assertTrue(data.isascii())
        self.assertIn(b"Gr=C3=BC=C3=9Fe\r\n.\r\n", data)

    def test_eight_bit_with_8bitmime_sent_as_is(self):
        """With 8BITMIME the 8-bit message goes unchanged with BODY=8BITMIME."""
        s = ScriptedServer(self)
        s.handshake("8BITMIME", "PIPELINING")
        message = crlf(HEADERS + "\nGrüße\n")
        s.client.transact(txn(message=message))
        self.assertTrue(s.sent()[0].endswith(b" BODY=8BITMIME"))
        s.reply("250 ok", "250 ok", "354 go")
        self.assertEqual(s.transport.value(), message + b".\r\n")

    def test_larger_than_size_refused_before_mail(self):
        """A message over the advertised SIZE fails with MessageTooLarge before MAIL; the session stays usable."""
        s = ScriptedServer(self)
        s.handshake("SIZE 100", "PIPELINING")
        self.assertEqual(s.client.size_limit, 100)
        d = s.client.transact(txn(message=HEADERS + "\n" + "x" * 100 + "\n"))
        error = self.failureResultOf(d, MessageTooLarge).value
        # What a server answers for a message over its fixed maximum (RFC 1870):
        # 552 with 5.3.4, and permanent for the whole message.
        self.assertEqual((error.code, error.limit), (552, 100))
        self.assertTrue(error.response.startswith(b"5.3.4 "))
        self.assertTrue(error.permanent)
        self.assertIs(classify_error(error), Verdict.PERMANENT)
        self.assertGreater(error.size, 100)
        self.assertEqual(s.sent(), [])
        self.assertTrue(s.client.is_usable())
        d = s.client.transact(txn())
        self.assertTrue(s.sent()[0].startswith(b"MAIL FROM:"))

    def test_size_limit_zero_or_absent(self):
        """SIZE 0 (RFC 1870: no fixed limit) and no SIZE both mean no limit."""
        for ehlo in (("SIZE 0",), ("PIPELINING",)):
            s = ScriptedServer(self)
            s.handshake(*ehlo)
            self.assertIsNone(s.client.size_limit)
