"""Reading a bounce sent to a list's ``-bounces`` address: who failed, and how.

The first step of bounce processing: the recipient address and the raw bytes
in, a frozen :class:`BounceReport` out (permanent and temporary failures and
how they were recognised).  Scoring, disabling and keeping unrecognised
bounces belong to the caller.

Recognition, in Mailman 3's order:

1. VERP: ``LIST-bounces+LOCAL=DOMAIN@host`` (as the runner's
   ``_verp_sender`` writes it) names the member ``LOCAL@DOMAIN``.  It counts as
   permanent unless the message is a DSN reporting only delays (Mailman
   ignores temporary failures of VERP bounces too); a VERP bounce whose bytes
   do not even mention ``delivery-status`` is not parsed at all.
2. RFC 3464: a ``message/delivery-status`` part, read with :mod:`email`; per
   recipient, ``Original-Recipient`` (else ``Final-Recipient``), ``Action:
   failed`` = permanent and ``delayed`` = temporary, the ``Status`` class
   (5.x.x / 4.x.x) when the action says neither.
3. ``flufl.bounce``'s detectors (:func:`flufl.bounce.all_failures`), for the
   many MTAs that send plain-text bounces.

Bounces are untrusted and often broken, so only the first ``max_bytes`` are
parsed, at most :data:`MAX_PARTS` parts and :data:`MAX_ADDRESSES` addresses
are looked at, and any failure to read them gives an UNRECOGNISED report
rather than an exception.

A detector that raises is logged by flufl.bounce itself, with a traceback,
through :mod:`logging` (logger ``flufl.bounce``) before the error reaches us.
While this module runs the detectors a filter on that logger drops those
records, and the failure is logged once, as one warning line of ours; the
library's other records, and its use by other code, are left alone.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import re
from dataclasses import dataclass
from email.message import Message

import flufl.bounce
from twisted.logger import Logger

from mailrelay.addresses import is_valid_mailbox
from mailrelay.listproc._mail import parse_prefix, walk_parts

__all__ = ["BounceReport", "Recognition", "parse_bounce", "verp_member"]

_log = Logger()

MAX_BYTES = 128 * 1024  # the report parts come first; the returned message may follow
MAX_PARTS = 50
MAX_ADDRESSES = 1000
# A part the parser takes for message/delivery-status names that type in its
# Content-Type field (the type itself cannot be encoded or folded).
_DELIVERY_STATUS = re.compile(rb"delivery-status", re.IGNORECASE)


class Recognition(str, enum.Enum):
    """How a bounce was understood."""

    VERP = "verp"
    DSN = "dsn"
    DETECTOR = "flufl.bounce"
    UNRECOGNISED = "unrecognised"


@dataclass(frozen=True)
class BounceReport:
    """What a bounce says: lower-cased addresses that failed permanently and
    temporarily (disjoint; permanent wins), how it was recognised, and for an
    UNRECOGNISED report a short reason for the log."""

    permanent: frozenset[str]
    temporary: frozenset[str]
    how: Recognition
    detail: str = ""

    @property
    def recognised(self) -> bool:
        return self.how is not Recognition.UNRECOGNISED


def _unrecognised(detail: str) -> BounceReport:
    return BounceReport(frozenset(), frozenset(), Recognition.UNRECOGNISED, detail)


def _report(permanent: set[str], temporary: set[str], how: Recognition) -> BounceReport:
    return BounceReport(frozenset(permanent), frozenset(temporary - permanent), how)


def verp_member(list_address: str, recipient: str) -> str | None:
    """The member encoded in a VERP bounce address of ``list_address``
    (``test-bounces+anne=example.org@example.com`` -> ``anne@example.org``),
    or ``None`` if ``recipient`` is not one.  Case-insensitive."""
    list_local, _, list_domain = list_address.lower().rpartition("@")
    local, at, domain = recipient.lower().rpartition("@")
    if not at or domain != list_domain:
        return None
    base, plus, encoded = local.partition("+")
    if not plus or base != f"{list_local}-bounces":
        return None
    member_local, equals, member_domain = encoded.rpartition("=")
    if not equals or not member_local or not member_domain:
        return None
    member = f"{member_local}@{member_domain}"
    return member if _usable(member) else None


def parse_bounce(
    list_address: str, recipient: str, message: bytes, max_bytes: int = MAX_BYTES
) -> BounceReport:
    """Read a bounce of ``list_address`` received for ``recipient`` (the
    ``-bounces`` address it was sent to, VERP part included).  Never raises."""
    try:
        return _parse(list_address, recipient, message, max_bytes)
    except Exception as e:  # a bug or a parser corner: keep the bounce, do not crash
        _log.warn(
            "Cannot read a bounce for {list}: {error}", list=list_address, error=repr(e)[:200]
        )
        return _unrecognised(f"parse error: {type(e).__name__}")


def _parse(list_address: str, recipient: str, message: bytes, max_bytes: int) -> BounceReport:
    member = verp_member(list_address, recipient)
    if member is not None and _DELIVERY_STATUS.search(message, 0, max_bytes) is None:
        # The address names the member, and without a delivery-status part
        # the bounce cannot say "only delayed": permanent, with no parsing.
        return _report({member}, set(), Recognition.VERP)
    try:
        msg = parse_prefix(message, max_bytes)
    except Exception:
        msg = None
    if member is not None:
        if msg is not None:
            dsn = _read_dsn(msg)
            if dsn is not None and not dsn[0] and dsn[1]:
                return _report(set(), {member}, Recognition.VERP)
        return _report({member}, set(), Recognition.VERP)
    if msg is None:
        return _unrecognised("not a parsable message")
    dsn = _read_dsn(msg)
    if dsn is not None and (dsn[0] or dsn[1]):
        return _report(dsn[0], dsn[1], Recognition.DSN)
    detected = _detect(list_address, msg)
    if detected is not None:
        return _report(detected[0], detected[1], Recognition.DETECTOR)
    if dsn is not None:
        return _unrecognised("delivery report without failed or delayed recipients")
    return _unrecognised("no failed recipient found")


# -- RFC 3464 -----------------------------------------------------------------


def _read_dsn(msg: Message) -> tuple[set[str], set[str]] | None:
    """``(permanent, temporary)`` from the delivery-status parts, or ``None``
    when the message has none."""
    found = False
    permanent: set[str] = set()
    temporary: set[str] = set()
    for part in walk_parts(msg, MAX_PARTS):
        if part.get_content_type() != "message/delivery-status":
            continue
        found = True
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        # The first block holds the per-message fields; the rest, one per recipient.
        for block in blocks[1:]:
            if len(permanent) + len(temporary) >= MAX_ADDRESSES:
                break
            if not isinstance(block, Message):
                continue
            address = _recipient(block)
            kind = _failure_kind(block)
            if address is None or kind is None:
                continue
            (permanent if kind == "permanent" else temporary).add(address)
    return (permanent, temporary) if found else None


def _field(block: Message, name: str) -> str:
    """The first ``name`` field of a report block, with 8-bit UTF-8 decoded
    (RFC 6533 allows UTF-8 addresses); other 8-bit bytes become U+FFFD."""
    for key, value in block.raw_items():
        if key.lower() != name:
            continue
        value = str(value)
        # The bytes parser keeps 8-bit bytes as surrogate escapes.
        try:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeError:  # a surrogate no parser wrote: nothing usable
            return ""
        return " ".join(value.split())
    return ""


def _failure_kind(block: Message) -> str | None:
    action = _field(block, "action").lower()
    # Some MTAs append comments ("failed (bad mailbox)"); OpenSMTPD writes "error".
    if action.startswith(("failed", "error")):
        return "permanent"
    if action.startswith("delayed"):
        return "temporary"
    if action.startswith(("delivered", "relayed", "expanded")):
        return None
    status = _field(block, "status")
    if status.startswith("5."):
        return "permanent"
    if status.startswith("4."):
        return "temporary"
    return None


def _recipient(block: Message) -> str | None:
    """``Original-Recipient`` (the address the list sent to) if usable, else
    ``Final-Recipient``; address types rfc822 and utf-8 (RFC 6533)."""
    for name in ("original-recipient", "final-recipient"):
        value = _field(block, name)
        address_type, semicolon, address = value.partition(";")
        if not semicolon:
            # Seen in the wild: a bare angle address with no type.
            address_type, address = "rfc822", value
        if address_type.strip().lower() not in ("rfc822", "utf-8"):
            continue
        address = address.strip().strip("<>").strip().lower()
        if _usable(address):
            return address
    return None


def _usable(address: str) -> bool:
    """A valid mailbox made of real characters (bytes that were not UTF-8
    became surrogates or U+FFFD, which name nobody)."""
    if "\ufffd" in address:
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return is_valid_mailbox(address)


# -- flufl.bounce ---------------------------------------------------------------


# True while _detect runs flufl.bounce's detectors (per thread and task).
_detecting: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mailrelay_detecting_bounce", default=False
)


class _CaughtDetectorErrors(logging.Filter):
    """Drops flufl.bounce's record of a detector's exception (``log.exception``,
    a traceback) while :func:`_detect` runs the detectors: the exception is
    raised on to it, and it logs the failure itself."""

    name = "mailrelay: detector errors caught by mailrelay"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _detecting.get())


def _install_filter(logger: logging.Logger) -> None:
    # Once per process, however often this module is imported (or reloaded).
    if not any(getattr(f, "name", None) == _CaughtDetectorErrors.name for f in logger.filters):
        logger.addFilter(_CaughtDetectorErrors())


_install_filter(logging.getLogger("flufl.bounce"))


def _detect(list_address: str, msg: Message) -> tuple[set[str], set[str]] | None:
    """``(permanent, temporary)`` found by flufl.bounce's detectors, or ``None``."""
    entered = _detecting.set(True)
    try:
        temporary, permanent = flufl.bounce.all_failures(msg)
    except Exception as e:  # a detector choking on odd input
        _log.warn(
            "flufl.bounce's detectors failed on a bounce for {list}: {error}",
            list=list_address,
            error=" ".join(repr(e).split())[:200],
        )
        return None
    finally:
        _detecting.reset(entered)
    found_permanent = _decoded(permanent)
    found_temporary = _decoded(temporary)
    if not found_permanent and not found_temporary:
        return None
    return found_permanent, found_temporary


def _decoded(addresses) -> set[str]:
    result: set[str] = set()
    for raw in list(addresses)[:MAX_ADDRESSES]:
        try:
            address = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            continue
        address = address.strip().strip("<>").lower()
        if _usable(address):
            result.add(address)
    return result
