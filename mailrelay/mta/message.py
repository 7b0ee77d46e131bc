"""Turning a message into the exact bytes sent after DATA.

Twisted's client converts line ends and dot-stuffs per 16 KiB chunk, which
misses a leading "." on the first line and at chunk boundaries (truncating the
message or letting its remainder run as commands) and turns CRLF into CR CR LF.
We therefore encode the whole message once, here, and the client sends these
bytes untouched.

A message the smarthost would refuse as it is (a line over 998 octets, 8-bit
data for a server without 8BITMIME) is rewritten by
:mod:`mailrelay.mta.transmittable` when the client knows the server's
extensions: :meth:`WireMessage.for_server` does it once per message and
8BITMIME answer, however many transactions and connections send it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO

from mailrelay.mta.transmittable import has_long_lines, make_transmittable

_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


@dataclass(frozen=True)
class WireMessage:
    """A message ready for DATA: CRLF line ends, dot-stuffed, ending in CRLF.

    ``data`` does not include the terminating ``.`` line.  ``size`` is the
    message size before dot-stuffing (what SIZE= announces).  ``long_lines``
    says whether a line is longer than SMTP's 998 octets.
    """

    data: bytes
    size: int
    eight_bit: bool
    long_lines: bool
    # Rewritten copies by whether 8BITMIME is offered: see for_server.
    _variants: dict[bool, WireMessage] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def for_server(self, *, eight_bit_mime: bool) -> WireMessage:
        """This message as a server offering these extensions accepts it.

        That is the message itself unless it has over-long lines, or 8-bit
        data and no 8BITMIME (one attribute test: the common case).  Otherwise
        a copy rewritten by :func:`~mailrelay.mta.transmittable.make_transmittable`,
        made on the first call and kept for the next ones.
        """
        if not self.long_lines and (eight_bit_mime or not self.eight_bit):
            return self
        variant = self._variants.get(eight_bit_mime)
        if variant is None:
            rewritten = make_transmittable(_unstuff(self.data), eight_bit_mime=eight_bit_mime)
            variant = prepare_message(rewritten)
            self._variants[eight_bit_mime] = variant
        return variant

    def with_header_prefix(self, prefix: bytes) -> WireMessage:
        """This message with the header lines ``prefix`` in front, without
        re-encoding it: for a copy that differs only in a few header fields.

        ``prefix`` must be ASCII header lines ending in CRLF, none over 998
        octets or starting with "." (``ValueError`` otherwise).  The copy's
        rewritten variants (:meth:`for_server`) are this message's own with the
        prefix in front, so a rewrite happens once per message, not per copy.
        """
        if (
            not prefix.endswith(b"\r\n")
            or not prefix.isascii()
            or prefix.startswith(b".")
            or b"\n." in prefix
            or not prefix.count(b"\r") == prefix.count(b"\n") == prefix.count(b"\r\n")
            or has_long_lines(prefix)
        ):
            raise ValueError(f"not header lines to put in front of a message: {prefix[:80]!r}")
        return _Prefixed(
            data=prefix + self.data,
            size=len(prefix) + self.size,
            eight_bit=self.eight_bit,
            long_lines=self.long_lines,
            base=self,
            prefix=prefix,
        )

    @property
    def message_id(self) -> str:
        """The Message-ID header, or "" (for logs)."""
        match = re.search(
            rb"^message-id:[ \t]*([^\r\n]*)",
            self.data.split(b"\r\n\r\n", 1)[0],
            re.IGNORECASE | re.MULTILINE,
        )
        return match.group(1).decode("ascii", "replace").strip() if match else ""


@dataclass(frozen=True)
class _Prefixed(WireMessage):
    """A :class:`WireMessage` made by :meth:`WireMessage.with_header_prefix`."""

    base: WireMessage = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    prefix: bytes = field(default=b"", repr=False, compare=False)

    def for_server(self, *, eight_bit_mime: bool) -> WireMessage:
        variant = self.base.for_server(eight_bit_mime=eight_bit_mime)
        if variant is self.base:
            return self
        return variant.with_header_prefix(self.prefix)


def _message_bytes(message: Message) -> bytes:
    # Like smtplib.send_message: blind copies must not reach the recipients.
    message = copy.copy(message)
    del message["Bcc"]
    del message["Resent-Bcc"]
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False).flatten(message, linesep="\r\n")
    return out.getvalue()


def prepare_message(message: bytes | str | Message | WireMessage) -> WireMessage:
    """Encode ``message`` for DATA.

    ``bytes`` are sent as they are apart from line ends; ``str`` is encoded as
    UTF-8; an ``email.message.Message`` is serialised without its Bcc headers.
    Bare CR and bare LF become CRLF (RFC 5321 2.3.8), lines starting with "."
    are stuffed, and a final CRLF is added if missing.
    """
    if isinstance(message, WireMessage):
        return message
    if isinstance(message, Message):
        raw = _message_bytes(message)
    elif isinstance(message, str):
        raw = message.encode("utf-8")
    elif isinstance(message, (bytes, bytearray, memoryview)):
        raw = bytes(message)
    else:
        raise TypeError(
            f"message must be bytes, str or email.message.Message, not {type(message).__name__}"
        )
    # The regular expressions rebuild the whole message even when there is
    # nothing to change; spooled messages already have CRLF line ends and
    # rarely a leading dot, which these C-speed counts find out.
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        raw = _LINE_END.sub(b"\r\n", raw)
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    data = raw
    if raw.startswith(b".") or b"\n." in raw:
        data = _LEADING_DOT.sub(b"..", raw)
    return WireMessage(
        data=data, size=len(raw), eight_bit=not raw.isascii(), long_lines=has_long_lines(raw)
    )


def _unstuff(data: bytes) -> bytes:
    """The message before dot-stuffing: every line starting with "." got one more."""
    if data.startswith(b".") or b"\n." in data:
        return _LEADING_DOT.sub(b"", data)
    return data
