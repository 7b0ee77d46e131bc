"""Sending the copies of one message: one SMTP transaction per chunk of recipients.

Place in the flow: the :mod:`~mailrelay.runner.scheduler` hands each claimed
group of MEMBER, OWNER or NOTICE entries (one message, one list) to
:meth:`CopySender.deliver_group`, which reads the list, builds the DATA bytes
once per message (with the list headers and the list's subject prefix, for
posts), sends them through the
``IMessageSender`` (normally :class:`~mailrelay.mta.pool.ConnectionPool`, the
``mta`` package) in transactions of at most ``max_recipients`` (one per
recipient with VERP or ``personalize``) from the list's ``-bounces`` address
(a NOTICE, which mailrelay wrote itself, as stored and from the envelope
sender stored with it), and returns the
spool updates and bounces that :mod:`~mailrelay.runner.outcomes` derives from
the replies, in a :class:`GroupResult` that also carries the smarthost's
permanent refusal of the message itself (MAIL, DATA, or over its SIZE), which
the runner reports to the poster and the owners once per post.

A copy for one member (VERP or ``personalize``) with unsubscribe URLs
configured gets that member's one-click ``List-Unsubscribe`` fields put in
front of the shared bytes (:func:`~mailrelay.listheaders.member_unsubscribe_fields`,
:meth:`~mailrelay.mta.message.WireMessage.with_header_prefix`): an HMAC and a
concatenation per member, never a re-parse.

Problems of the site itself trip the :class:`~mailrelay.runner.breaker.CircuitBreaker`;
while it is open no transaction is started, and after the smarthost could not
be reached at all, transactions are deferred for a few seconds without dialling.
"""

from __future__ import annotations

import random as _random
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailrelay.addresses import is_valid_mailbox, split_mailbox
from mailrelay.errors import InvalidAddress, RegistryError, RegistryUnavailable, SpoolError
from mailrelay.listheaders import add_list_headers, member_unsubscribe_fields
from mailrelay.logs import DELIVERED, FAILED, listed
from mailrelay.model import Bounce, EntryKind, EntryState, EntryUpdate, MailingList, SpoolEntry
from mailrelay.mta.bulk import INVALID_ADDRESS, chunkify
from mailrelay.mta.errors import (
    NO_REPLY,
    DataRefused,
    DeliveryError,
    MessageTooLarge,
    SenderRefused,
    SmarthostUnreachable,
)
from mailrelay.mta.message import WireMessage, prepare_message
from mailrelay.observer import NO_OBSERVER
from mailrelay.retry import RetryPolicy, Verdict, classify_error
from mailrelay.runner.breaker import CircuitBreaker
from mailrelay.runner.outcomes import (
    LOCAL_RETRY_DELAY,
    NotAttempted,
    RecipientResult,
    entry_updates,
    message_refusal,
    one_line,
    results_for_refusals,
    retry_after_local_trouble,
)

__all__ = ["CopySender", "GroupKey", "GroupResult", "JustStored"]

_log = Logger()

# After the smarthost could not be reached at all, transactions starting within
# this many seconds are deferred without dialling again: with a black-holed
# smarthost every chunk would otherwise wait out the connect timeout in turn.
_UNREACHABLE_HOLD = 5.0
_CACHED_MESSAGES = 8

# Entries delivered together: the same message, list and kind of copy.
GroupKey = tuple[int, str, EntryKind]


@dataclass(frozen=True)
class JustStored:
    """What routing has in hand for a message it stored and hands straight to
    delivery: the bytes exactly as stored and the lists it read, by address.
    Delivery uses them instead of reading the message and the list again."""

    message_key: int
    message: bytes = field(repr=False)
    lists: Mapping[str, MailingList]


@dataclass(frozen=True)
class GroupResult:
    """What delivering one group gave: the spool ``updates``, the member
    ``bounces`` to record, and, when the smarthost refused the message itself
    permanently, that ``refusal`` and the ``mlist`` it was sent for."""

    updates: list[EntryUpdate]
    bounces: list[Bounce] = field(default_factory=list)
    refusal: RecipientResult | None = None
    mlist: MailingList | None = None


# A whole transaction refused at one of these steps is about the message.
_MESSAGE_REFUSALS = (SenderRefused, DataRefused, MessageTooLarge)


def _verp_sender(mlist: MailingList, recipient: str) -> str:
    """``list-bounces+user=domain@listdomain``, or the plain bounces address
    when the recipient cannot be encoded into a valid mailbox (as Mailman)."""
    try:
        local, domain = split_mailbox(recipient)
    except InvalidAddress:
        return mlist.bounces_address
    candidate = f"{mlist.local_part}-bounces+{local}={domain}@{mlist.domain}"
    if is_valid_mailbox(candidate):
        return candidate
    _log.info(
        "Cannot VERP-encode {recipient}; using {sender}",
        recipient=recipient,
        sender=mlist.bounces_address,
        list=mlist.posting_address,
    )
    return mlist.bounces_address


class CopySender:
    """Delivers groups of MEMBER, OWNER and NOTICE entries through ``sender``.

    ``spool`` (an ``ISpool``) supplies the stored message, ``registry`` the
    list.  ``is_running`` says whether the runner still delivers (a chunk
    whose turn comes after a stop is not sent); ``publish_circuit`` is called
    with the breaker's description when it trips and with ``None`` when it
    closes again.  ``observer`` (an :class:`~mailrelay.interfaces.IRelayObserver`)
    is told each group's results and each transaction's duration.
    ``personalize`` sends each member a copy of its own, as ``verp`` does but
    from the plain ``-bounces`` address; ``unsubscribe_urls`` (an
    :class:`~mailrelay.unsubscribe.UnsubscribeURLs`) adds the unsubscribe URLs
    to posts: per member on such copies, the list's page on grouped ones.
    """

    def __init__(
        self,
        spool: Any,
        registry: Any,
        sender: Any,
        *,
        clock: Any,
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        random: _random.Random,
        max_recipients: int,
        max_parallel: int,
        verp: bool,
        devmode_recipient: str | None,
        is_running: Callable[[], bool],
        publish_circuit: Callable[[str | None], None],
        observer: Any = NO_OBSERVER,
        personalize: bool = False,
        unsubscribe_urls: Any = None,
    ):
        self._spool = spool
        self._registry = registry
        self._sender = sender
        self._clock = clock
        self._breaker = breaker
        self._policy = policy
        self._random = random
        self._max_recipients = max_recipients
        self._verp = verp
        self._one_copy_each = verp or personalize
        self._urls = unsubscribe_urls
        # Member URLs only where a copy is one member's: elsewhere a one-click
        # POST could not say who is leaving.
        self._member_urls = unsubscribe_urls is not None and self._one_copy_each
        self._devmode_recipient = devmode_recipient
        self._is_running = is_running
        self._publish_circuit = publish_circuit
        self._observer = observer
        self._slots = defer.DeferredSemaphore(max_parallel)
        self._unreachable: tuple[float, SmarthostUnreachable] | None = None
        self._messages: OrderedDict[GroupKey, WireMessage] = OrderedDict()

    def _wire_message(
        self, message_key: int, mlist: MailingList, kind: EntryKind, raw: bytes | None
    ) -> WireMessage:
        """The DATA bytes for this message and list, built once per message
        (from ``raw``, the stored bytes, when the caller has them)."""
        key = (message_key, mlist.posting_address, kind)
        wire = self._messages.get(key)
        if wire is not None:
            self._messages.move_to_end(key)
            return wire
        if raw is None:
            raw = self._spool.get_message(message_key)
        if kind is EntryKind.MEMBER:
            list_url = None if self._urls is None else self._urls.list_url(mlist.posting_address)
            raw = add_list_headers(
                raw,
                mlist,
                list_url=list_url,
                personal=self._member_urls,
                subject_prefix=self._subject_prefix(mlist.posting_address),
            )
        wire = prepare_message(raw)
        self._messages[key] = wire
        if len(self._messages) > _CACHED_MESSAGES:
            self._messages.popitem(last=False)
        return wire

    def _subject_prefix(self, list_address: str) -> str:
        """The list's ``subject_prefix`` setting ("" for a registry without
        per-list settings: an embedder's own ``IListRegistry``)."""
        read = getattr(self._registry, "list_settings", None)
        if read is None:
            return ""
        return getattr(read(list_address), "subject_prefix", "") or ""

    async def deliver_group(
        self, key: GroupKey, entries: list[SpoolEntry], just_stored: JustStored | None = None
    ) -> GroupResult:
        """Send one message's copies (``entries``, all of ``key``) and return the
        spool update of each entry, the bounces to record, and the smarthost's
        permanent refusal of the message itself, if any.

        With ``just_stored`` for this message, its bytes and the list read at
        routing are used as they are; otherwise both are read again.
        """
        message_key, list_address, kind = key
        first = entries[0]
        fields = dict(message_id=first.message_id, list=list_address)
        raw = mlist = None
        if just_stored is not None and just_stored.message_key == message_key:
            raw = just_stored.message
            mlist = just_stored.lists.get(list_address)
        if kind is EntryKind.NOTICE:
            # Written by mailrelay and sent as stored, from its stored sender:
            # the list is only named (it may be gone, and a notice still goes).
            mlist = MailingList(list_address)
        try:
            if mlist is None:
                mlist = self._registry.get_list(list_address)
        except (RegistryError, RegistryUnavailable) as e:
            _log.warn(
                "{message_id}: cannot read list {list} ({error}); trying again in {delay}s",
                error=str(e),
                delay=LOCAL_RETRY_DELAY,
                **fields,
            )
            return GroupResult(self._retry_all(entries, f"cannot read the list: {e}"))
        if mlist is None:
            _log.warn(
                "{message_id}: list {list} no longer exists; {count} copies dead-lettered",
                event=FAILED,
                outcome="dead-lettered",
                count=len(entries),
                recipients=listed([e.destination.address for e in entries]),
                response="the list no longer exists",
                **fields,
            )
            self._observer.recipients_done(list_address, 0, 0, len(entries), 0)
            return GroupResult(
                [
                    EntryUpdate(
                        e.entry_id,
                        EntryState.FAILED,
                        count_attempt=True,
                        error="the list no longer exists",
                    )
                    for e in entries
                ]
            )
        try:
            wire = self._wire_message(message_key, mlist, kind, raw)
        except KeyError:
            return GroupResult([])  # deleted by an operator meanwhile
        except SpoolError as e:
            _log.error("{message_id}: cannot read the message ({error})", error=str(e), **fields)
            return GroupResult(self._retry_all(entries, f"cannot read the message: {e}"))
        except (RegistryError, RegistryUnavailable) as e:
            _log.warn(
                "{message_id}: cannot read the settings of {list} ({error}); trying again in "
                "{delay}s",
                error=str(e),
                delay=LOCAL_RETRY_DELAY,
                **fields,
            )
            return GroupResult(self._retry_all(entries, f"cannot read the list's settings: {e}"))

        by_address: dict[str, list[SpoolEntry]] = defaultdict(list)
        for entry in entries:
            by_address[entry.destination.address].append(entry)
        results: dict[str, RecipientResult] = {}
        valid = []
        for address in by_address:
            if is_valid_mailbox(address):
                valid.append(address)
            else:
                code, response = INVALID_ADDRESS
                results[address] = RecipientResult(
                    Verdict.PERMANENT, code, one_line(response), bounce=True
                )
        if self._one_copy_each or self._devmode_recipient is not None:
            chunks = [[address] for address in sorted(valid)]
        else:
            chunks = chunkify(valid, self._max_recipients)
        # At most max_parallel transactions in the sender's hands: the others
        # wait their turn here, and look at the breaker when they get it.
        # A NOTICE goes out from the envelope sender stored with it ("" for a DSN).
        stored_sender = first.sender if kind is EntryKind.NOTICE else None
        transactions = [
            self._slots.run(self._send, mlist, kind, first.message_id, chunk, wire, stored_sender)
            for chunk in chunks
        ]
        for chunk_results in await defer.gatherResults(transactions):
            results.update(chunk_results)
        now = self._clock.seconds()
        updates, bounces = entry_updates(
            mlist,
            kind,
            by_address,
            results,
            now=now,
            paused_until=self._breaker.paused_until(now),
            policy=self._policy,
            random=self._random,
            paused_between=self._breaker.paused_between,
        )
        self._report(list_address, updates, len(bounces))
        return GroupResult(updates, bounces, message_refusal(kind, results), mlist)

    def _report(self, list_address: str, updates: list[EntryUpdate], bounced: int) -> None:
        """Tell the observer one group's results, summed (one call per group)."""
        delivered = deferred = failed = 0
        for update in updates:
            state = update.state
            if state is EntryState.DONE:
                delivered += 1
            elif state is EntryState.RETRY:
                # A copy held back by a paused delivery was not attempted.
                deferred += update.count_attempt
            elif state is EntryState.FAILED:
                failed += 1
        # Entries of one bounced address all FAILED; a bounce is recorded once.
        bounced = min(bounced, failed)
        self._observer.recipients_done(list_address, delivered, deferred, failed - bounced, bounced)

    def _retry_all(self, entries: list[SpoolEntry], error: str) -> list[EntryUpdate]:
        now = self._clock.seconds()
        return [retry_after_local_trouble(entry, error, now) for entry in entries]

    async def _send(
        self,
        mlist: MailingList,
        kind: EntryKind,
        message_id: str,
        chunk: list[str],
        wire: WireMessage,
        stored_sender: str | None = None,
    ) -> dict[str, RecipientResult]:
        """Send one SMTP transaction; a result for each recipient of ``chunk``.

        The envelope sender is ``stored_sender`` when given (a NOTICE), else
        the list's -bounces address (VERP-encoded for a member with VERP)."""
        if not self._is_running():
            return dict.fromkeys(chunk, RecipientResult(NotAttempted.STOPPING))
        if self._breaker.state() == CircuitBreaker.OPEN:
            return dict.fromkeys(
                chunk, RecipientResult(NotAttempted.PAUSED, text=self._breaker.reason)
            )
        if self._unreachable is not None:
            failed_at, error = self._unreachable
            if self._clock.seconds() < failed_at + _UNREACHABLE_HOLD:
                return dict.fromkeys(
                    chunk,
                    RecipientResult(classify_error(error), error.code, one_line(error.response)),
                )
            self._unreachable = None
        if stored_sender is not None:
            envelope_sender = stored_sender
        elif self._verp and kind is EntryKind.MEMBER:
            envelope_sender = _verp_sender(mlist, chunk[0])
        else:
            envelope_sender = mlist.bounces_address
        if self._member_urls and kind is EntryKind.MEMBER:
            wire = self._personal_copy(mlist, chunk[0], wire)
        rcpts = chunk if self._devmode_recipient is None else [self._devmode_recipient]
        generation = self._breaker.generation
        fields = dict(
            message_id=message_id,
            list=mlist.posting_address,
            sender=envelope_sender,
            count=len(chunk),
        )
        started = self._clock.seconds()
        try:
            refused = await self._sender.sendmail(envelope_sender, rcpts, wire)
        except DeliveryError as e:
            return self._whole_failure(e, chunk, started, fields)
        except Exception:
            _log.failure("{message_id}: the sender raised unexpectedly", **fields)
            e = DeliveryError(NO_REPLY, b"Internal error in the SMTP client")
            return self._whole_failure(e, chunk, started, fields)
        duration = self._clock.seconds() - started
        self._observer.smtp_transaction(duration, True)
        if self._devmode_recipient is not None and refused:
            # One real recipient per devmode transaction: its result is the only one.
            refused = {chunk[0]: next(iter(refused.values()))}
        # The event is about the recipients the smarthost took; the refused
        # ones are logged as deferred or failed once their entries are updated.
        delivered = [address for address in chunk if address not in refused]
        line = dict(
            fields,
            count=len(delivered),
            recipients=listed(delivered),
            attempted=len(chunk),
            refused=len(refused),
            code=250,
            duration=duration,
        )
        if delivered:
            line["event"] = DELIVERED
        _log.info(
            "{message_id} smtp to {list} for {attempted} recips, completed in {duration:.3f} "
            "seconds, {refused} refused",
            **line,
        )
        results, site_problem = results_for_refusals(chunk, refused)
        if site_problem is not None:
            self._trip(site_problem)
        elif self._breaker.succeeded(generation):
            _log.info("Delivery resumed: the smarthost accepted a transaction again")
            self._publish_circuit(None)
        return results

    def _personal_copy(self, mlist: MailingList, member: str, wire: WireMessage) -> WireMessage:
        """``wire`` with ``member``'s own one-click unsubscribe fields in front."""
        url = self._urls.member_url(mlist.posting_address, member)
        return wire.with_header_prefix(member_unsubscribe_fields(mlist, url))

    def _whole_failure(
        self, error: DeliveryError, chunk: list[str], started: float, fields: dict[str, Any]
    ) -> dict[str, RecipientResult]:
        verdict = classify_error(error)
        text = one_line(error.response)
        duration = self._clock.seconds() - started
        self._observer.smtp_transaction(duration, False)
        _log.warn(
            "{message_id} smtp to {list} for {count} recips failed after {duration:.3f} "
            "seconds: {code} {response}",
            duration=duration,
            code=error.code,
            response=text,
            **fields,
        )
        if verdict is Verdict.SITE_PROBLEM:
            self._trip(f"{error.code} {text}")
        if isinstance(error, SmarthostUnreachable):
            self._unreachable = (self._clock.seconds(), error)
        # A refusal of the whole transaction (MAIL FROM or DATA) is about the
        # message or our envelope, not about these recipients: never a bounce.
        refused_message = isinstance(error, _MESSAGE_REFUSALS)
        return dict.fromkeys(
            chunk, RecipientResult(verdict, error.code, text, refused_message=refused_message)
        )

    def _trip(self, reason: str) -> None:
        if self._breaker.trip(reason):
            _log.error(
                "Delivery paused for {delay:.0f}s by a site problem: {reason}. No member is "
                "bounced and every message stays queued; check the smarthost settings "
                "(credentials, TLS).",
                delay=self._breaker.delay,
                reason=reason,
            )
            self._publish_circuit(self._breaker.describe())
