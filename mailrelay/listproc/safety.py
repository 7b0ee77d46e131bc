"""Loop and backscatter safety: may mailrelay answer this mail at all?

Every automatic answer (command results, confirmation requests, reject
notices) is decided here first.  An answer to mail that another program
sent (a bounce, an auto-reply, a list post) can start a mail loop; an
answer to a forged sender is backscatter.  RFC 3834 section 2 says an
automatic responder must not answer such mail, and Mailman 3's replybot and
command runner check the same headers.  The per-day cap is Mailman's
``max_autoresponses_per_day``; counting the replies sent is left to the
storage layer, which hands the count to :func:`may_send_autoreply`.

Pure functions: no storage, no clock (the caller passes times).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email.message import Message
from email.parser import BytesHeaderParser

from mailrelay.listproc._mail import header_addresses

__all__ = [
    "DEFAULT_MAX_AUTORESPONSES_PER_DAY",
    "auto_reply_allowed",
    "autoreply_day",
    "is_daemon_address",
    "may_send_autoreply",
]

DEFAULT_MAX_AUTORESPONSES_PER_DAY = 10  # Mailman's [mta] max_autoresponses_per_day

# Local parts of mailboxes run by software rather than people (procmail's
# FROM_DAEMON and RFC 3834's advice, plus the usual no-reply names).
_DAEMON_LOCALS = frozenset(
    {
        "mailer-daemon",
        "mailerdaemon",
        "mailer",
        "postmaster",
        "listserv",
        "majordomo",
        "mailman",
        "mdaemon",
        "noreply",
        "no-reply",
        "no_reply",
        "donotreply",
        "do-not-reply",
        "do_not_reply",
        "bounce",
        "bounces",
    }
)
# Other list managers' service addresses (Mailman 2, Majordomo, ezmlm).
_DAEMON_SUFFIXES = ("-request", "-owner", "-bounces", "-bounce", "-admin")
_DAEMON_PREFIXES = ("owner-", "bounce-", "bounces-")

_BULK_PRECEDENCE = frozenset({"bulk", "junk", "list"})
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_MAX_HEADER_BYTES = 256 * 1024


def is_daemon_address(address: str) -> bool:
    """True for ``MAILER-DAEMON``, ``postmaster`` and similar software
    mailboxes, including other list managers' ``-request``/``-owner``/
    ``-bounces`` addresses; case-insensitive, ``+`` suffix ignored."""
    local = address.rpartition("@")[0] if "@" in address else address
    local = local.strip().strip('"').lower().partition("+")[0]
    return (
        local in _DAEMON_LOCALS
        or local.endswith(_DAEMON_SUFFIXES)
        or local.startswith(_DAEMON_PREFIXES)
    )


def auto_reply_allowed(
    envelope_sender: str,
    message: bytes | Message,
    is_list_address: Callable[[str], bool],
) -> str | None:
    """Why mailrelay must not answer ``message``, or ``None`` if it may.

    ``envelope_sender`` is the MAIL FROM address ("" for ``<>``);
    ``message`` the raw bytes (only the header block is read) or a parsed
    message.  ``is_list_address(address)`` says whether an address is one of
    this site's lists or their sub-addresses (e.g. a registry ``resolve``).
    The sender is refused when the envelope sender is empty or any of the
    envelope sender and ``From:`` addresses is a list or a
    daemon; the message is refused for ``Auto-Submitted`` other than ``no``,
    ``Precedence: bulk/junk/list`` and any ``List-Id``.  The reason is a
    short phrase for the log.
    """
    sender = envelope_sender.strip().strip("<>").strip()
    if not sender:
        return "empty envelope sender"
    headers = _headers(message)
    if headers is None:
        return "unreadable header"

    auto_submitted = _first(headers, "auto-submitted")
    if auto_submitted is not None:
        # RFC 3834: the keyword may carry parameters ("auto-replied; x=y").
        keyword = auto_submitted.split(";", 1)[0].strip().lower()
        if keyword != "no":
            return f"Auto-Submitted: {keyword or '(empty)'}"
    precedence = (_first(headers, "precedence") or "").strip().lower()
    if precedence in _BULK_PRECEDENCE:
        return f"Precedence: {precedence}"
    if _first(headers, "list-id") is not None:
        return "has a List-Id header"

    candidates = [("envelope sender", sender.lower())]
    candidates += [("From", a) for a in header_addresses(headers, "from")]
    for field, address in candidates:
        if is_list_address(address):
            return f"{field} {address} is a list address"
        if is_daemon_address(address):
            return f"{field} {address} is a daemon address"
    return None


def may_send_autoreply(sent_today: int, limit: int = DEFAULT_MAX_AUTORESPONSES_PER_DAY) -> bool:
    """Whether one more automatic reply may go to an address today, given how
    many went to it (for this list) today already.

    At most ``limit`` a day, then silence until the next day; 0 means no
    limit (as in Mailman).  Mailman sends one extra "no more replies today"
    notice when the limit is reached; mailrelay does not, since the issue
    caps the replies at N and a notice is one more message to a possibly
    forged address.
    """
    if limit < 0 or sent_today < 0:
        raise ValueError(f"negative count or limit: {sent_today!r}, {limit!r}")
    return limit == 0 or sent_today < limit


def autoreply_day(now: float) -> str:
    """The UTC calendar day (``YYYY-MM-DD``) a reply sent at POSIX time
    ``now`` counts against; the key for the per-day counter."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def _headers(message: bytes | Message) -> Message | None:
    if isinstance(message, Message):
        return message
    try:
        head = bytes(message[:_MAX_HEADER_BYTES])
        blank = _BLANK_LINE.search(head)
        return BytesHeaderParser().parsebytes(head if blank is None else head[: blank.start()])
    except Exception:
        return None


def _first(headers: Message, name: str) -> str | None:
    try:
        value = headers.get(name)
    except Exception:
        return None
    return None if value is None else str(value)
