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
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses

__all__ = ["decoded_header", "header_addresses", "parse_prefix", "part_text"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FOLDING = re.compile(r"\s*[\r\n]+\s*")


def parse_prefix(data: bytes, max_bytes: int) -> Message:
    """Parse at most the first ``max_bytes`` of ``data`` as a message.

    Cutting a message short only leaves its last part incomplete, which the
    parser records as a defect; the headers and the leading parts (where the
    commands and delivery reports are) survive.
    """
    return email.message_from_bytes(bytes(data[:max_bytes]))


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
