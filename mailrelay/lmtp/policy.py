"""The policy behind the LMTP server: which recipients exist, and what becomes
of an accepted message.

Recipients are checked against an :class:`~mailrelay.interfaces.IListRegistry`
at RCPT time.  An accepted message gets ``X-MailFrom`` (and a ``Message-ID`` if
it has none, or a repaired one) prepended to its bytes, which otherwise stay
exactly as received, and is stored once in an :class:`~mailrelay.interfaces.ISpool`
with one entry per accepted recipient.  Success is answered only once the spool
has the message on stable storage.

Place in the flow: :mod:`mailrelay.lmtp.protocol` (the wire) hands each
transaction here; what is accepted goes to an ``IMessageStore``, normally the
delivery runner's routing (:mod:`mailrelay.runner.routing`).  This module is
the inbound acceptance policy; outbound delivery lives in :mod:`mailrelay.runner`
and :mod:`mailrelay.mta`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy as email_policy
from email.parser import BytesHeaderParser, BytesParser
from email.utils import make_msgid

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.errors import RegistryUnavailable, SpoolError
from mailrelay.interfaces import IInboundHandler
from mailrelay.lmtp import RecipientRejected, Reply, Transaction
from mailrelay.logs import ACCEPTED, listed
from mailrelay.model import Envelope
from mailrelay.observer import NO_OBSERVER

MAILBOX_UNAVAILABLE = Reply(550, "5.1.1", "Requested action not taken: mailbox unavailable")
ERROR_IN_PROCESSING = Reply(451, "4.3.0", "Requested action aborted: error in processing")
MESSAGE_HAS_DEFECTS = Reply(501, "5.6.0", "Message has defects")
INSUFFICIENT_STORAGE = Reply(
    452, "4.3.1", "Requested action not taken: insufficient system storage"
)
TOO_BIG_CODE, TOO_BIG_STATUS = 552, "5.3.4"

# compat32 as in email.message_from_bytes (what Mailman checks): header values
# are not parsed, which keeps this cheap and leaves them as they came.
_HEADER_PARSER = BytesHeaderParser(policy=email_policy.compat32)
_PARSER = BytesParser(policy=email_policy.compat32)
# Only these top-level types get defects from parsing the body (boundaries,
# nested messages); for anything else the header block tells all.
_STRUCTURED = frozenset({"multipart", "message"})
# Some mailers write Message-ID: [id] (Mailman #1065).
_BRACKETED_ID = re.compile(r"<?\[([^\]]+)\]>?\Z")
_LINE_ENDS = re.compile(rb"(?<=\n)")


class MessageDefects(ValueError):
    """The message has defects that the stdlib ``email`` parser reports."""

    def __init__(self, defects):
        self.defects = tuple(defects)
        super().__init__(", ".join(type(d).__name__ for d in self.defects))


@dataclass(frozen=True)
class PreparedMessage:
    """A message ready for the spool, and its (possibly new) Message-ID."""

    data: bytes = field(repr=False)
    message_id: str


def prepare_message(data: bytes, *, sender: str, hostname: str) -> PreparedMessage:
    """Check ``data`` for defects and prepend ``X-MailFrom`` and, when needed, ``Message-ID``.

    A missing or empty Message-ID is created with ``make_msgid(domain=hostname)``;
    ``[id]`` or ``<[id]>`` becomes ``<id>``.  Existing ``X-MailFrom`` fields, and a
    Message-ID that is replaced, are removed; every other byte is kept.  Raises
    :class:`MessageDefects` when the ``email`` package finds defects (at the top
    level, as Mailman checks).
    """
    if "\r" in sender or "\n" in sender:
        raise ValueError(f"sender must be one line: {sender!r}")
    head_end = data.find(b"\r\n\r\n")
    if data.startswith(b"\r\n"):
        head_end, parsed_part = 0, b"\r\n"
    elif head_end < 0:
        head_end, parsed_part = len(data), data
    else:
        head_end, parsed_part = head_end + 2, data[: head_end + 4]
    header_block, rest = data[:head_end], data[head_end:]

    headers = _HEADER_PARSER.parsebytes(parsed_part)
    defects = headers.defects
    if headers.get_content_maintype() in _STRUCTURED:
        defects = _PARSER.parsebytes(data).defects
    if defects:
        raise MessageDefects(defects)

    drop = set()
    if "X-MailFrom" in headers:
        drop.add(b"x-mailfrom")
    original_id = " ".join(str(headers.get("Message-ID", "")).split())
    new_id = None
    if not original_id:
        new_id = make_msgid(domain=hostname)
    elif original_id.isascii() and (bracketed := _BRACKETED_ID.match(original_id)):
        new_id = f"<{bracketed.group(1)}>"
    if new_id is not None and "Message-ID" in headers:
        drop.add(b"message-id")
    if drop:
        header_block = _drop_fields(header_block, drop)

    prefix = b"X-MailFrom: " + (sender or "<>").encode("ascii") + b"\r\n"
    if new_id is not None:
        prefix += b"Message-ID: " + new_id.encode("ascii") + b"\r\n"
    return PreparedMessage(b"".join((prefix, header_block, rest)), new_id or original_id)


def _drop_fields(header_block: bytes, names: set[bytes]) -> bytes:
    """``header_block`` without the fields (and their continuation lines) named
    in ``names``; nothing after its first empty line is touched."""
    lines = _LINE_ENDS.split(header_block)
    kept = []
    dropping = False
    for index, line in enumerate(lines):
        if not line.strip(b"\r\n"):
            kept.extend(lines[index:])
            break
        if line[:1] not in (b" ", b"\t"):
            name, colon, _ = line.partition(b":")
            dropping = bool(colon) and name.lower() in names
        if not dropping:
            kept.append(line)
    return b"".join(kept)


@implementer(IInboundHandler)
class InboundHandler:
    """Accepts mail for the lists of ``registry`` and stores it in ``spool``.

    ``spool`` is any :class:`~mailrelay.interfaces.IMessageStore`: an
    ``ISpool``, or the delivery runner, which routes the message as it stores
    it.  ``hostname`` is the domain of Message-IDs this handler creates; ``clock``
    (an ``IReactorTime``) dates the spooled envelopes.  ``on_stored``, if
    given, is called with no arguments after each message is spooled (the
    delivery runner's ``wake``), before the replies are sent.  Each accepted
    transaction is logged (event ``accepted``, :mod:`mailrelay.logs`) unless
    ``log_accepted`` is false.
    ``observer`` (an :class:`~mailrelay.interfaces.IRelayObserver`) is told of
    each accepted transaction and of each refusal, with its reason.
    ``size_limit(destination)``, if given, is the largest message in octets
    that may be accepted for a :class:`~mailrelay.model.Destination` (``None``:
    no limit beyond the listener's own): a larger message gets ``552 5.3.4``
    for that recipient at DATA, so that the sending MTA bounces it to the
    poster, instead of being acknowledged and then refused by the smarthost.
    """

    _log = Logger()

    def __init__(
        self,
        registry,
        spool,
        *,
        hostname: str,
        clock,
        on_stored: Callable[[], object] | None = None,
        log_accepted: bool = True,
        observer=None,
        size_limit: Callable[[object], int | None] | None = None,
    ):
        if not isinstance(hostname, str) or not hostname:
            raise ValueError(f"hostname must be a non-empty str, not {hostname!r}")
        if on_stored is not None and not callable(on_stored):
            raise TypeError(f"on_stored must be callable, not {on_stored!r}")
        if size_limit is not None and not callable(size_limit):
            raise TypeError(f"size_limit must be callable, not {size_limit!r}")
        self._size_limit = size_limit
        self._registry = registry
        self._spool = spool
        self._hostname = hostname
        self._clock = clock
        self._on_stored = on_stored
        self._log_accepted = bool(log_accepted)
        self._observer = observer if observer is not None else NO_OBSERVER

    def validate_recipient(self, sender: str, recipient: str):
        """The registry's :class:`~mailrelay.model.Destination` for ``recipient``.

        Raises ``RecipientRejected`` with 550 5.1.1 for an unknown address and
        451 4.3.0 while the registry is unavailable (never a 5xx for that).
        """
        try:
            destination = self._registry.resolve(recipient)
        except RegistryUnavailable as e:
            self._log.warn(
                "Registry unavailable, deferring {recipient} from {sender}: {error}",
                sender=sender,
                recipient=recipient,
                error=str(e),
                code=ERROR_IN_PROCESSING.code,
            )
            self._observer.message_refused("registry_unavailable", 1)
            raise RecipientRejected(ERROR_IN_PROCESSING) from None
        if destination is None:
            self._log.info(
                "Rejected unknown recipient {recipient} from {sender}",
                sender=sender,
                recipient=recipient,
                code=MAILBOX_UNAVAILABLE.code,
            )
            self._observer.message_refused("unknown_recipient", 1)
            raise RecipientRejected(MAILBOX_UNAVAILABLE)
        return destination

    def deliver(self, transaction: Transaction) -> defer.Deferred:
        """Prepare and spool ``transaction``; fires with one Reply per recipient."""
        return defer.Deferred.fromCoroutine(self._deliver(transaction))

    async def _deliver(self, transaction: Transaction) -> list[Reply]:
        sender, recipients = transaction.sender, transaction.recipients
        try:
            prepared = prepare_message(transaction.message, sender=sender, hostname=self._hostname)
        except MessageDefects as e:
            self._log.info(
                "Rejected message from {sender} with defects: {defects}",
                sender=sender,
                defects=str(e),
                code=MESSAGE_HAS_DEFECTS.code,
            )
            self._observer.message_refused("defects", len(recipients))
            return [MESSAGE_HAS_DEFECTS] * len(recipients)
        all_recipients = recipients
        too_big = self._too_big(sender, prepared.message_id, len(transaction.message), recipients)
        if too_big:
            recipients = [r for index, r in enumerate(recipients) if index not in too_big]
            if not recipients:
                return [too_big[index] for index in range(len(all_recipients))]
        envelope = Envelope(
            sender=sender,
            destinations=tuple(r.token for r in recipients),
            received_at=self._clock.seconds(),
            peer=transaction.peer,
            message_id=prepared.message_id,
        )
        try:
            entry_ids = await self._spool.enqueue(envelope, prepared.data)
        except SpoolError as e:
            reply = INSUFFICIENT_STORAGE if e.disk_full else ERROR_IN_PROCESSING
            self._log.warn(
                "Could not spool message {message_id} from {sender}: {error}",
                message_id=prepared.message_id,
                sender=sender,
                error=str(e),
                code=reply.code,
            )
            reason = "disk_full" if e.disk_full else "spool_error"
            self._observer.message_refused(reason, len(recipients))
            return [reply] * len(recipients)
        except Exception:
            self._log.failure(
                "Spooling message {message_id} from {sender} raised",
                message_id=prepared.message_id,
                sender=sender,
            )
            self._observer.message_refused("spool_error", len(recipients))
            return [ERROR_IN_PROCESSING] * len(recipients)

        self._observer.message_accepted(len(recipients))
        if self._on_stored is not None:
            try:
                self._on_stored()
            except Exception:
                # The message is safely stored: a broken hook must not turn
                # into a refusal (the client would send it again).
                self._log.failure(
                    "on_stored hook failed after spooling {message_id}",
                    message_id=prepared.message_id,
                )
        ids = list(entry_ids) if isinstance(entry_ids, (list, tuple)) else []
        replies = []
        for index, recipient in enumerate(recipients):
            queued = f": queued as {ids[index]}" if len(ids) == len(recipients) else ""
            replies.append(Reply(250, "2.0.0", f"<{recipient.address}> Ok{queued}"))
        if too_big:
            accepted = iter(replies)
            replies = [
                too_big[index] if index in too_big else next(accepted)
                for index in range(len(all_recipients))
            ]
        # One line per transaction, not per recipient: logging is a good part
        # of the cost of a small message.
        if self._log_accepted:
            addresses = [r.address for r in recipients]
            self._log.info(
                "Accepted message {message_id} from {sender} for {names}",
                event=ACCEPTED,
                message_id=prepared.message_id,
                sender=sender,
                lists=list(dict.fromkeys(_list_of(r) for r in recipients)),
                count=len(recipients),
                recipients=listed(addresses),
                names=", ".join(addresses),
                entry_ids=ids,
                code=250,
            )
        return replies

    def _too_big(self, sender: str, message_id: str, size: int, recipients) -> dict[int, Reply]:
        """The ``552 5.3.4`` reply of each recipient (by position) whose limit
        ``size`` octets exceed; empty when every one may take the message."""
        if self._size_limit is None:
            return {}
        refused = {}
        for index, recipient in enumerate(recipients):
            try:
                limit = self._size_limit(recipient.token)
            except Exception:
                # Not knowing a limit must not refuse mail: the runner still
                # finds a message too big for the smarthost before sending.
                self._log.failure("size_limit failed for {recipient}", recipient=recipient.address)
                continue
            if limit is not None and size > limit:
                refused[index] = Reply(
                    TOO_BIG_CODE,
                    TOO_BIG_STATUS,
                    f"<{recipient.address}> Message too big for this list "
                    f"({size} octets, limit {limit})",
                )
        if refused:
            self._log.info(
                "Refused message {message_id} from {sender} ({size} octets) for {recipients}: "
                "too big",
                message_id=message_id,
                sender=sender,
                size=size,
                recipients=", ".join(recipients[i].address for i in refused),
                code=TOO_BIG_CODE,
            )
            self._observer.message_refused("too_big", len(refused))
        return refused


def _list_of(recipient) -> str:
    """The list address of an accepted recipient (the address itself when the
    registry's answer names no list)."""
    return getattr(recipient.token, "list_address", None) or recipient.address


__all__ = [
    "ERROR_IN_PROCESSING",
    "INSUFFICIENT_STORAGE",
    "InboundHandler",
    "MAILBOX_UNAVAILABLE",
    "MESSAGE_HAS_DEFECTS",
    "MessageDefects",
    "PreparedMessage",
    "prepare_message",
]
