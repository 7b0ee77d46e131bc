"""Fail-safe reading of untrusted mail, shared by the command and bounce parsers.

Mail to ``-request`` and ``-bounces`` comes from anyone and is often broken:
truncated MIME, undeclared or bogus charsets, 8-bit headers, encoded words that
do not decode.  These helpers parse a bounded prefix of the bytes with the
standard library's lenient ``compat32`` parser and turn every decoding problem
into replacement characters, so callers never see an exception from the
:mod:`email` package.
"""

from __future__ import annotations

import email
import re
from collections.abc import Iterator
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses

__all__ = [
    "decoded_header",
    "header_addresses",
    "parse_header_block",
    "parse_prefix",
    "part_text",
    "walk_parts",
]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FOLDING = re.compile(r"\s*[\r\n]+\s*")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def parse_prefix(data: bytes, max_bytes: int) -> Message:
    """Parse at most the first ``max_bytes`` of ``data`` as a message.

    Cutting a message short only leaves its last part incomplete, which the
    parser records as a defect; the headers and the leading parts (where the
    commands and delivery reports are) survive.
    """
    return email.message_from_bytes(bytes(data[:max_bytes]))


def parse_header_block(data: bytes, max_bytes: int) -> Message | None:
    """The header fields of ``data`` (only its header block, within the first
    ``max_bytes``, is read: cheap for a large message), or ``None`` if even
    that cannot be parsed."""
    try:
        head = bytes(data[:max_bytes])
        blank = _BLANK_LINE.search(head)
        return BytesHeaderParser().parsebytes(head if blank is None else head[: blank.start()])
    except Exception:
        return None


def decoded_header(message: Message, name: str) -> str:
    """The first ``name`` field decoded from RFC 2047 to one line of text, or "".

    Undecodable encoded words are kept as written; control characters and line
    breaks become spaces, so the value is safe to show and to log.
    """
    try:
        raw = message.get(name)
    except Exception:  # compat32 can fail on some 8-bit headers; treat as absent
        return ""
    if raw is None:
        return ""
    raw = str(raw)
    try:
        text = str(make_header(decode_header(raw)))
    except Exception:  # bad charset or encoded word: show it undecoded
        text = raw
    text = _FOLDING.sub(" ", text)
    return _CONTROL.sub(" ", text).strip()


def header_addresses(message: Message, name: str) -> list[str]:
    """The addresses in every ``name`` field, lower-cased, without display names."""
    try:
        values = [str(v) for v in message.get_all(name, [])]
        pairs = getaddresses(values)
    except Exception:
        return []
    return [address.strip().lower() for _name, address in pairs if "@" in address]


def part_text(part: Message, max_chars: int) -> str:
    """The decoded text of a leaf part (transfer encoding and charset), at most
    ``max_chars`` characters; undecodable bytes become U+FFFD."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(payload, bytes):
        return ""
    try:
        # Undeclared 8-bit text is UTF-8 far more often than anything else;
        # ASCII decodes the same either way.
        charset = part.get_content_charset() or "utf-8"
        text = payload.decode(charset, errors="replace")
    except (LookupError, TypeError, ValueError):
        # An unknown charset name: UTF-8 is the likeliest truth for modern mail.
        text = payload.decode("utf-8", errors="replace")
    return text[:max_chars]


def walk_parts(msg: Message, max_parts: int) -> Iterator[Message]:
    """The message and its parts in order, at most ``max_parts``, descending
    into multiparts but not into attached messages (a returned or forwarded
    message is not the sender's own text or report)."""
    stack = [msg]
    count = 0
    while stack and count < max_parts:
        part = stack.pop(0)
        count += 1
        yield part
        if part.get_content_maintype() == "multipart" and part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack[0:0] = payload
