"""Making a message's bytes acceptable to the smarthost (RFC 5321, RFC 6152).

The relay accepts what posters' MTAs send, including lines far longer than
SMTP's 998 octets and 8-bit bodies; a strict smarthost refuses such a message
(``500 Line too long``), or may refuse 8-bit data without ``BODY=8BITMIME``.
Just before a copy is sent (:meth:`mailrelay.mta.message.WireMessage.for_server`),
this module rewrites what the server would refuse, as Postfix's client does:

* a body part with a line over 998 octets is re-encoded, text as
  quoted-printable and anything else as base64;
* for a server without 8BITMIME, every 8-bit part is re-encoded the same way
  and 8-bit header values become RFC 2047 encoded words (a server offering
  SMTPUTF8 must offer 8BITMIME too, RFC 6531 3.1, so there is no case for
  keeping raw UTF-8 headers in a 7-bit message);
* a header with a line over 998 octets is folded.

Everything else is left as it was, and the decoded content of every part,
the MIME structure, boundaries, preambles and nested ``message/rfc822`` parts
stay the same.  A message that needs nothing is returned as the very same
object, after a scan at C speed: that is the common case.  The spooled
original is never touched; only the copy sent is rewritten.
"""

from __future__ import annotations

import base64
import binascii
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import EmailPolicy
from io import BytesIO

__all__ = ["MAX_LINE", "has_long_lines", "make_transmittable", "needs_rewriting"]

# RFC 5321 4.5.3.1.6: 1000 octets per line including the CRLF.
MAX_LINE = 998


class _KeepPolicy(EmailPolicy):
    """The default policy, except that a header as parsed is written back as it was.

    EmailPolicy splits a raw value with ``str.splitlines``, which also breaks
    at form feeds and the \\x1c-\\x1e separators: a header holding one would
    come out cut in two, the rest of it read as the start of the body.  (The
    parser still drops white space between the colon and the value; the
    email package's own header handling needs it gone.)
    """

    def fold_binary(self, name, value):
        if hasattr(value, "name"):  # a header object: set by us, fold it
            return super().fold_binary(name, value)
        return f"{name}: {value}{self.linesep}".encode("utf-8", "surrogateescape")


# Parse and write back without refolding anything we did not change
# (max_line_length None) and without the generator's own 8-bit handling
# (cte_type 8bit): this module decides what gets re-encoded.
_KEEP = _KeepPolicy(linesep="\r\n", max_line_length=None)
# How a header that must be folded is folded: RFC 5322's 78 characters,
# non-ASCII as RFC 2047 encoded words.
_FOLD = policy.default.clone(linesep="\r\n", max_line_length=78, utf8=False)

_DECODABLE = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
_IDENTITY = frozenset({"7bit", "8bit", "binary"})


def has_long_lines(text: bytes | str, limit: int = MAX_LINE) -> bool:
    """Whether ``text`` (CRLF line ends) has a line longer than ``limit``.

    Costs about one ``rfind`` per ``limit`` octets, not one step per line:
    the last line end inside each window of ``limit + 2`` octets is the start
    of the next window, so every line is inside some window or too long.
    """
    size = len(text)
    window = limit + 2  # the line, then CR LF
    newline = b"\n" if isinstance(text, bytes) else "\n"
    rfind = text.rfind
    start = 0
    while size - start > limit:
        end = rfind(newline, start, start + window)
        if end < 0:
            return True
        start = end + 1
    return False


def needs_rewriting(raw: bytes, *, eight_bit_mime: bool) -> bool:
    """Whether :func:`make_transmittable` would change ``raw`` (the fast check)."""
    return has_long_lines(raw) or (not eight_bit_mime and not raw.isascii())


def make_transmittable(raw: bytes, *, eight_bit_mime: bool) -> bytes:
    """``raw`` rewritten so that a server with these extensions accepts it.

    ``raw`` is a whole message with CRLF line ends, not dot-stuffed.
    ``eight_bit_mime`` says whether the server offers 8BITMIME.  Returns
    ``raw`` itself when nothing needs changing.  What the email package
    cannot make valid (a part in an unknown transfer encoding,
    a header it cannot fold) is left as it is, for the server to judge.
    """
    seven_bit = not eight_bit_mime and not raw.isascii()
    if not seven_bit and not has_long_lines(raw):
        return raw
    message = BytesParser(policy=_KEEP).parsebytes(raw)
    _rewrite(message, seven_bit=seven_bit, whole=True)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_KEEP).flatten(message)
    return out.getvalue()


def _rewrite(part: Message, *, seven_bit: bool, whole: bool) -> bool:
    """Rewrite ``part`` and its subparts in place; whether 8-bit data is left.

    ``seven_bit`` asks for 7-bit data, headers included.  ``whole`` marks a
    message (the top level, or inside ``message/*``) rather than a body part
    of a multipart.
    """
    _fold_headers(part, encode_8bit=seven_bit)
    payload = part.get_payload()
    if isinstance(payload, list):  # multipart/*, message/rfc822
        inner_whole = part.get_content_maintype() == "message"
        eight_bit = False
        for sub in payload:
            eight_bit |= _rewrite(sub, seven_bit=seven_bit, whole=inner_whole)
        if seven_bit and not eight_bit and _transfer_encoding(part) in ("8bit", "binary"):
            _set_header(part, "Content-Transfer-Encoding", "7bit")
        return eight_bit
    return _rewrite_body(part, seven_bit=seven_bit, whole=whole)


def _transfer_encoding(part: Message) -> str:
    value = part.get("Content-Transfer-Encoding")
    return str(value).strip().lower() if value is not None else "7bit"


def _rewrite_body(part: Message, *, seven_bit: bool, whole: bool) -> bool:
    """Re-encode one leaf part if it is too long-lined or too 8-bit; whether it stays 8-bit."""
    cte = _transfer_encoding(part)
    if cte not in _DECODABLE:
        # x-uuencode and inventions: we cannot be sure to decode them exactly.
        return not _payload_is_ascii(part)
    if cte in _IDENTITY:
        data = part.get_payload(decode=True)
        if not (has_long_lines(data) or (seven_bit and not data.isascii())):
            return not data.isascii()
    else:
        encoded = part.get_payload()
        if not (has_long_lines(encoded) or (seven_bit and not encoded.isascii())):
            return not encoded.isascii()
        data = part.get_payload(decode=True)
    # Quoted-printable keeps text readable, but a transport must restore its
    # line breaks as CRLF; text with a bare CR or LF (possible inside base64)
    # would not decode to the same octets, so it goes as base64 too.
    crlf = data.count(b"\r\n")
    if part.get_content_maintype() == "text" and data.count(b"\r") == crlf == data.count(b"\n"):
        body, cte = binascii.b2a_qp(data, istext=True), "quoted-printable"
    else:
        body, cte = base64.encodebytes(data), "base64"
    if part.get("Content-Type") is None and not data.isascii():
        # A non-MIME 8-bit body had no declared charset; say what it is
        # (RFC 1428's unknown-8bit when it is not UTF-8) now that it is encoded.
        _set_header(part, "Content-Type", f'text/plain; charset="{_guess_charset(data)}"')
    part.set_payload(body.decode("ascii"))
    _set_header(part, "Content-Transfer-Encoding", cte)
    if whole and part.get("MIME-Version") is None:
        # A non-MIME message needs the header for its new encoding to count.
        part["MIME-Version"] = "1.0"
    return False


def _payload_is_ascii(part: Message) -> bool:
    data = part.get_payload(decode=False)
    return data.isascii() if isinstance(data, str) else True


def _guess_charset(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown-8bit"
    return "utf-8"


def _set_header(part: Message, name: str, value: str) -> None:
    """Replace the first ``name`` header in place, or add one at the end."""
    if part.get(name) is None:
        part[name] = value
    else:
        part.replace_header(name, value)


def _fold_headers(part: Message, *, encode_8bit: bool) -> None:
    """Fold the headers of ``part`` with a line over 998 octets (and, with
    ``encode_8bit``, turn 8-bit values into encoded words); others untouched."""
    items = list(part.raw_items())
    rewritten = []
    changed = False
    for name, value in items:
        # The value as parsed: continuation lines joined by CRLF, no final CRLF.
        lines = value.split("\r\n")
        too_long = len(name) + 2 + len(lines[0]) > MAX_LINE or any(
            len(line) > MAX_LINE for line in lines
        )
        eight_bit = encode_8bit and not value.isascii()
        if too_long or eight_bit:
            folded = _fold(name, "".join(lines), eight_bit)
            if folded is not None:
                value = folded
                changed = True
        rewritten.append((name, value))
    if changed:
        for name in {name.lower() for name, _ in items}:
            del part[name]
        for name, value in rewritten:
            part.set_raw(name, value)


def _fold(name: str, unfolded: str, eight_bit: bool) -> str | None:
    """The folded value (continuation lines included), or None if it cannot be folded."""
    if eight_bit:
        # The parser keeps undecodable octets as surrogates; most are UTF-8.
        unfolded = unfolded.encode("ascii", "surrogateescape").decode("utf-8", "surrogateescape")
    try:
        header = _FOLD.header_factory(name, unfolded)
        value = header.fold(policy=_FOLD).partition(":")[2].lstrip(" ").removesuffix("\r\n")
        # Folding must not change what the header says (the parser drops
        # some control characters, for one); if it would, leave it be.
        same = str(_FOLD.header_factory(name, value.replace("\r\n", ""))) == str(header)
    except Exception:
        # The email package's header parser has raised on pathological
        # values before; such a header is left as it is.
        return None
    if not same or any(len(line) > MAX_LINE for line in value.split("\r\n")):
        return None
    return value
