"""RFC 5321 mailbox syntax, shared by the LMTP server and the SMTP client.

The standard library has no strict envelope-address validator: ``email.utils``
parses header addresses leniently (``parseaddr('a@b@c')`` returns ``('', 'a@b')``)
and Twisted's ``quoteaddr`` maps what it cannot parse to ``<>``.  A mailbox that
slipped through either would be sent to the wrong place, so we check the RFC 5321
grammar (with RFC 6531's UTF-8 extension) ourselves.
"""

from __future__ import annotations

import re

from mailrelay.errors import InvalidAddress

# RFC 5321 4.1.2 / RFC 5322 3.2.3 atext, plus any non-ASCII character (RFC 6531).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# Quoted-string: printable ASCII except \ and ", or a backslash pair.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}"
                    r"[A-Za-z0-9\u0080-\U0010ffff])?)\Z")
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]\Z")

MAX_PATH_LENGTH = 254  # RFC 5321 4.5.3.1.3 (256 with the angle brackets)


def is_ascii(text: str) -> bool:
    return text.isascii()


def needs_smtputf8(address: str) -> bool:
    """True when ``address`` can only be sent to a server offering SMTPUTF8."""
    return not address.isascii()


def split_mailbox(address: str) -> tuple[str, str]:
    """Split ``local@domain`` at the last ``@`` (a quoted local part may hold one)."""
    local, at, domain = address.rpartition("@")
    if not at:
        raise InvalidAddress(address, "no @domain")
    return local, domain


def check_mailbox(address: object) -> str:
    """Return ``address`` if it is a valid RFC 5321/6531 mailbox, else raise.

    Raises :class:`InvalidAddress` naming what is wrong.  The empty string (the
    null reverse-path) is not a mailbox: callers that accept ``<>`` check for it
    first.
    """
    if isinstance(address, bytes):
        try:
            address = address.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidAddress(address, "not UTF-8") from None
    if not isinstance(address, str):
        raise InvalidAddress(address, "not a string")
    if not address:
        raise InvalidAddress(address, "empty")
    if len(address.encode("utf-8")) > MAX_PATH_LENGTH:
        raise InvalidAddress(address, f"longer than {MAX_PATH_LENGTH} octets")
    if any(c in address for c in "\r\n\0<>") or address != address.strip():
        raise InvalidAddress(address, "contains a forbidden character")
    local, domain = split_mailbox(address)
    if not local:
        raise InvalidAddress(address, "empty local part")
    if not (_DOT_STRING.match(local) or _QUOTED_STRING.match(local)):
        raise InvalidAddress(address, "bad local part")
    if not domain:
        raise InvalidAddress(address, "empty domain")
    if not _ADDRESS_LITERAL.match(domain):
        labels = domain.split(".")
        if not all(_LABEL.match(label) for label in labels):
            raise InvalidAddress(address, "bad domain")
    return address


def is_valid_mailbox(address: object) -> bool:
    try:
        check_mailbox(address)
    except InvalidAddress:
        return False
    return True
