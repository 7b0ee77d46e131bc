"""Address syntax, shared by the LMTP server, the SMTP client and the configuration.

Pure functions, no I/O: RFC 5321 mailboxes, list addresses and recipient
resolution, and the host predicates (host name, IP literal, loopback) that the
configuration and the SMTP client must agree on.

The standard library has no strict envelope-address validator: ``email.utils``
parses header addresses leniently (``parseaddr('a@b@c')`` returns ``('', 'a@b')``)
and Twisted's ``quoteaddr`` maps what it cannot parse to ``<>``.  A mailbox that
slipped through either would be sent to the wrong place, so we check the RFC 5321
grammar (with RFC 6531's UTF-8 extension) ourselves.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from mailrelay.errors import InvalidAddress
from mailrelay.model import CANONICAL_SUBADDRESS, SUBADDRESSES, Destination

# RFC 5321 4.1.2 / RFC 5322 3.2.3 atext, plus any non-ASCII character (RFC 6531).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# Quoted-string: printable ASCII except \ and ", or a backslash pair.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(
    r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}"
    r"[A-Za-z0-9\u0080-\U0010ffff])?)\Z"
)
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]\Z")

MAX_PATH_LENGTH = 254  # RFC 5321 4.5.3.1.3 (256 with the angle brackets)

# The everyday case in one match: an ASCII dot-string at a host name.  Every
# address it matches passes the full check below, which it spares the runner
# and the client for each of the thousands of members of a post.
_ASCII_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]"
_ASCII_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_PLAIN_MAILBOX = re.compile(
    rf"{_ASCII_ATEXT}+(?:\.{_ASCII_ATEXT}+)*@{_ASCII_LABEL}(?:\.{_ASCII_LABEL})*\Z"
)


# -- host predicates --------------------------------------------------------

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def is_host_name(text: str) -> bool:
    """True for an ASCII DNS name: dot-separated labels of letters, digits and
    inner hyphens, at most 253 characters, optionally ending in a dot."""
    labels = text.removesuffix(".").split(".")
    return bool(text) and len(text) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def is_ip_address(text: str) -> bool:
    """True when ``text`` is exactly an IPv4 or IPv6 address (no brackets around it)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """True when ``host`` names this machine without a name lookup.

    That is ``localhost`` or a name under it (RFC 6761 reserves both for
    loopback), or a loopback IP literal: ``127.0.0.0/8``, ``::1`` and the
    IPv4-mapped ``::ffff:127.x.y.z``, with or without ``[brackets]`` and an
    IPv6 zone id (``::1%lo``); case and surrounding blanks are ignored.

    The one rule for clear-text SMTP AUTH: the configuration applies it to the
    configured ``smtp_host`` at load time (so ``localhost`` passes there), and
    the SMTP client applies it to the peer's address when it connects, which is
    always a literal, so a name that resolves somewhere else is still refused.
    """
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# -- mailboxes ----------------------------------------------------------------


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
    if type(address) is str and len(address) <= MAX_PATH_LENGTH and _PLAIN_MAILBOX.match(address):
        return address
    return _check_mailbox(address)


def _check_mailbox(address: object) -> str:
    """The whole RFC 5321/6531 grammar (:func:`check_mailbox` without its shortcut)."""
    if isinstance(address, bytes):
        try:
            address = address.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidAddress(address, "not UTF-8") from None
    if not isinstance(address, str):
        raise InvalidAddress(address, "not a string")
    if not address:
        raise InvalidAddress(address, "empty")
    try:
        octets = len(address.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate (e.g. from surrogateescape decoding) has no UTF-8 form.
        raise InvalidAddress(address, "not encodable as UTF-8") from None
    if octets > MAX_PATH_LENGTH:
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


# -- list addresses and recipient resolution ---------------------------------

# Mailman's VERP delimiter: ``test-bounces+bart=example.org@`` and
# ``test-confirm+cookie@`` carry data after it that never names a list.
VERP_DELIMITER = "+"


def _unquote_local(local: str) -> str | None:
    """The dot-string a local part stands for, or ``None`` if it has none.

    ``"test"@example.com`` is the same mailbox as ``test@example.com`` (RFC 5321
    4.1.2); a quoted local part that needs its quotes cannot name a list.
    """
    if not local.startswith('"'):
        return local
    # Drop the quotes, then undo backslash pairs.
    unquoted = re.sub(r"\\(.)", r"\1", local[1:-1])
    return unquoted if _DOT_STRING.match(unquoted) else None


def check_list_address(address: object) -> str:
    """Return ``address`` lower-cased if it can be a list's posting address.

    On top of :func:`check_mailbox`, refuses a ``+`` in the local part (RCPT
    matching strips everything after it, so no mail could reach the list), a
    quoted local part, and non-ASCII (the LMTP server offers no SMTPUTF8, so
    it refuses such a RCPT with 553 5.6.7).  Raises :class:`InvalidAddress`.
    """
    address = check_mailbox(address)
    if not address.isascii():
        raise InvalidAddress(
            address,
            "a list address must be ASCII: mail for it arrives over LMTP, which "
            "mailrelay offers without SMTPUTF8 (write an international domain in "
            "its xn-- form)",
        )
    local, _domain = split_mailbox(address)
    if local.startswith('"'):
        raise InvalidAddress(address, "a list address cannot have a quoted local part")
    if VERP_DELIMITER in local:
        raise InvalidAddress(
            address, f"a list address cannot contain {VERP_DELIMITER!r} (the VERP delimiter)"
        )
    return address.lower()


def resolve_recipient(address: str, is_list: Callable[[str], bool]) -> Destination | None:
    """Map an RCPT address to the list (and sub-address) it names, or ``None``.

    Matching is case-insensitive and ignores everything after the first ``+``
    in the local part.  A list whose full name matches wins over a sub-address
    of a shorter list: ``test-join@`` is the list ``test-join@`` if it exists,
    otherwise the ``join`` command of ``test@``.  ``is_list`` is asked about
    lower-cased ``local@domain`` candidates; its exceptions propagate.
    """
    if not isinstance(address, str) or not is_valid_mailbox(address):
        return None
    address = address.lower()
    local, domain = split_mailbox(address)
    local = _unquote_local(local)
    if local is None:
        return None
    base = local.partition(VERP_DELIMITER)[0]
    if not base:
        return None
    if is_list(f"{base}@{domain}"):
        return Destination(list_address=f"{base}@{domain}", subaddress=None, address=address)
    list_local, dash, suffix = base.rpartition("-")
    if not dash or not list_local or suffix not in SUBADDRESSES:
        return None
    list_address = f"{list_local}@{domain}"
    if not is_list(list_address):
        return None
    return Destination(
        list_address=list_address,
        subaddress=CANONICAL_SUBADDRESS.get(suffix, suffix),
        address=address,
    )
