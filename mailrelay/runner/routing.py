"""Routing new posts: what becomes of each destination of an accepted message.

Place in the flow: the LMTP policy (:mod:`mailrelay.lmtp.policy`) stores each
accepted message through :meth:`Router.enqueue` (the runner's
``IMessageStore`` side), which routes it in the spool transaction that stores
it; entries left QUEUED are routed later by :meth:`Router.route` when the
:mod:`~mailrelay.runner.scheduler` claims them.  Either way:

* a post (an INBOUND entry for the posting address) is replaced, in one
  transaction, by one MEMBER entry per member with delivery enabled; mail to
  ``-owner`` likewise by one OWNER entry per owner;
* mail to a sub-address that the list processor handles
  (:mod:`mailrelay.listproc.processor`: the command addresses ``-join``,
  ``-leave``, ``-request``, ``-confirm``, and whatever else is plugged in) is
  stored QUEUED and, once claimed, handed to the processor instead of being
  expanded; it is never delivered to members;
* mail to the other command addresses and to ``-bounces`` (when no handler
  is plugged in) is HELD: kept, with its sub-address, for processing that
  comes later, and never delivered to members;
* a second RCPT of a post or ``-owner`` address in one transaction is DONE at
  once: one copy is enough;
* with a posting policy (``posting``, a
  :class:`~mailrelay.listproc.moderation.Moderation`), each post is decided
  before it is expanded: accepted posts are expanded as above, discarded ones
  (loops, ``nonmember_action = discard``) are DONE at once with the reason,
  and posts to hold or reject are stored QUEUED and, once claimed, handed to
  the list processor with moderation's handler, which holds them (HELD, the
  owners told) or rejects them (the poster told) in one transaction.

The MEMBER and OWNER entries go on to :mod:`~mailrelay.runner.sending`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from mailrelay.errors import RegistryError, RegistryUnavailable, SpoolError
from mailrelay.listproc.posting import PostAction, PostDecision
from mailrelay.logs import FAILED, QUEUED
from mailrelay.model import (
    Destination,
    EntryKind,
    EntryState,
    EntryUpdate,
    Envelope,
    MailingList,
    Route,
    SpoolEntry,
)
from mailrelay.observer import NO_OBSERVER
from mailrelay.runner.outcomes import LOCAL_RETRY_DELAY, retry_after_local_trouble
from mailrelay.runner.sending import JustStored

__all__ = ["Router"]

_log = Logger()

# Sub-addresses whose mail is kept for command and bounce processing.
_HELD_SUBADDRESSES = frozenset({"bounces", "confirm", "join", "leave", "request"})
_DUPLICATE = "{message_id} to {list}: duplicate of entry {original}, not sent twice"


@dataclass(frozen=True)
class _RouteLogLine:
    """How a routing decision is logged: the Logger method, the format and
    any fields of its own (such as the reason of a posting decision)."""

    level: str
    format: str
    fields: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class _Plan:
    """What :meth:`Router._decide` made of one destination: the route, how it
    is logged, the list if it was read, and the posting policy's decision on
    a post that moderation handles (held or rejected)."""

    route: Route
    line: _RouteLogLine
    mlist: MailingList | None = None
    moderate: PostDecision | None = None


# A post stored QUEUED, for a delivery batch to route.
_STORED_FOR_BATCH = _RouteLogLine(
    "info", "{message_id} from {sender} to {list}: stored, to be expanded by a delivery batch"
)
_DUPLICATE_LINE = _RouteLogLine("info", _DUPLICATE)
# The message itself is dead-lettered: no copy is made.
_DEAD_LETTER = (("event", FAILED), ("outcome", "dead-lettered"), ("count", 1))
_GONE = _RouteLogLine("warn", "{message_id} to {list}: the list no longer exists", _DEAD_LETTER)
# Mail to a sub-address the list processor handles.
_STORED_FOR_PROCESSING = _RouteLogLine(
    "info", "{message_id} from {sender} to {list} -{subaddress}: stored for list processing"
)


def _one_copy_per_address(destination: Destination) -> bool:
    """Whether a second RCPT of this address in one transaction is a duplicate:
    posts and -owner mail are sent once; commands and bounces are each kept."""
    return destination.subaddress in (None, "owner")


def _log_route(line: _RouteLogLine, route: Route, fields: dict[str, Any]) -> None:
    if route.kind is not None:
        fields = dict(fields, event=QUEUED, count=len(route.recipients), kind=route.kind.value)
    if line.fields:
        fields = dict(fields, **dict(line.fields))
    getattr(_log, line.level)(line.format, **fields)


class Router:
    """Routes the destinations of new messages, reading lists from ``registry``
    and storing into ``spool`` (an ``ISpool``).

    Posts to lists of more than ``inline_limit`` members are left QUEUED for a
    batch to expand.  The scheduler's side is handed in as callbacks:
    ``has_room(n)`` says whether a batch of ``n`` new entries may start at
    once, ``start_batch(entries, just_stored)`` delivers entries stored in
    flight (with the message and lists routing has in hand), and
    ``wake()`` says new entries are waiting.  ``observer`` (an
    :class:`~mailrelay.interfaces.IRelayObserver`) is told how many copies of
    each message were queued for each list, and what was held.  ``processor`` (a
    :class:`~mailrelay.listproc.processor.ListProcessor`, or ``None``) takes
    the mail to the sub-addresses it handles.  ``posting`` (a
    :class:`~mailrelay.listproc.moderation.Moderation`, or ``None``: every
    post is accepted) decides each post; it needs ``processor``.
    ``delivery_settled(max_wait)`` (optional) returns a Deferred that fires
    once no copies are being delivered, or after ``max_wait``: mail for list
    processing alone waits for it up to ``processing_yield`` seconds before
    it is stored.
    """

    def __init__(
        self,
        spool: Any,
        registry: Any,
        *,
        clock: Any,
        inline_limit: int,
        has_room: Callable[[int], bool],
        start_batch: Callable[[list[SpoolEntry], JustStored], None],
        wake: Callable[[], None],
        observer: Any = NO_OBSERVER,
        processor: Any = None,
        posting: Any = None,
        delivery_settled: Callable[[float], Any] | None = None,
        processing_yield: float = 0.0,
    ):
        if posting is not None and processor is None:
            raise TypeError("a posting policy needs the list processor to hold posts")
        self._spool = spool
        self._registry = registry
        self._clock = clock
        self._inline_limit = inline_limit
        self._has_room = has_room
        self._start_batch = start_batch
        self._wake = wake
        self._observer = observer
        self._processor = processor
        self._posting = posting
        self._delivery_settled = delivery_settled
        self._processing_yield = processing_yield
        # Member counts seen when routing: posts to lists known to be larger
        # than inline_limit are not expanded while being stored.
        self._list_sizes: dict[str, int] = {}

    def _decide(
        self,
        destination: Destination,
        *,
        inline: bool,
        sender: str = "",
        message: Callable[[], bytes] | None = None,
    ) -> _Plan:
        """What becomes of mail to ``destination``, why, and the list if it was read.

        Raises RegistryError or RegistryUnavailable when the registry cannot
        answer.  With ``inline`` (routing while the message is stored), a list
        with more than ``inline_limit`` members is left QUEUED for a batch.
        ``sender`` and ``message`` (which returns the bytes) are for the
        posting policy.
        """
        subaddress = destination.subaddress
        if self._processes(subaddress):
            return _Plan(Route(), _STORED_FOR_PROCESSING)
        if subaddress in _HELD_SUBADDRESSES:
            line = _RouteLogLine(
                "info",
                "Holding {message_id} from {sender} to {list} -{subaddress} for later processing",
            )
            return _Plan(Route(EntryState.HELD), line)
        if subaddress not in (None, "owner"):
            line = _RouteLogLine(
                "warn", "Holding {message_id} to {list}: unknown sub-address {subaddress}"
            )
            return _Plan(Route(EntryState.HELD, error=f"unknown sub-address {subaddress!r}"), line)
        list_address = destination.list_address
        if subaddress is None and self._posting is not None and message is not None:
            plan = self._decide_post(list_address, sender, message)
            if plan is not None:
                return plan
        if inline and subaddress is None:
            known = self._list_sizes.get(list_address)
            if known is None:
                # First post to this list here: count before reading a
                # large list only to leave it to a batch.
                count = getattr(self._registry, "member_count", None)
                with contextlib.suppress(RegistryError):
                    known = count(list_address) if count is not None else None
            if known is not None and known > self._inline_limit:
                return _Plan(Route(), _STORED_FOR_BATCH)
        mlist = self._registry.get_list(list_address)
        if mlist is None:
            return _Plan(Route(EntryState.FAILED, error="the list no longer exists"), _GONE)
        if subaddress is None:
            kind = EntryKind.MEMBER
            recipients = tuple(
                m.address for m in self._registry.members(mlist.posting_address, enabled_only=True)
            )
            self._list_sizes[list_address] = len(recipients)
            if inline and len(recipients) > self._inline_limit:
                return _Plan(Route(), _STORED_FOR_BATCH)
        else:
            kind = EntryKind.OWNER
            recipients = tuple(mlist.owners)
            if not recipients:
                line = _RouteLogLine(
                    "error",
                    "{message_id} to {list}-owner: the list has no owners; dead-lettered",
                    _DEAD_LETTER,
                )
                return _Plan(Route(EntryState.FAILED, error="the list has no owners"), line, mlist)
        line = _RouteLogLine(
            "info", "{message_id} from {sender} to {list}: {count} {kind} copies queued"
        )
        return _Plan(Route(EntryState.DONE, kind, recipients), line, mlist)

    def _decide_post(
        self, list_address: str, sender: str, message: Callable[[], bytes]
    ) -> _Plan | None:
        """The posting policy's plan for a post, or ``None`` to expand it."""
        mlist = self._registry.get_list(list_address)
        if mlist is None:
            return _Plan(Route(EntryState.FAILED, error="the list no longer exists"), _GONE)
        decision = self._posting.decide(mlist, sender, message())
        if decision.action is PostAction.ACCEPT:
            return None
        reason = (("reason", decision.reason),)
        if decision.action is PostAction.DISCARD:
            line = _RouteLogLine(
                "info", "{message_id} from {sender} to {list}: discarded ({reason})", reason
            )
            return _Plan(Route(EntryState.DONE, error=f"discarded: {decision.reason}"), line)
        line = _RouteLogLine(
            "info",
            "{message_id} from {sender} to {list}: stored, to be "
            + ("held for the owners" if decision.action is PostAction.HOLD else "rejected")
            + " ({reason})",
            reason,
        )
        return _Plan(Route(), line, mlist, decision)

    def _processes(self, subaddress: str | None) -> bool:
        return self._processor is not None and self._processor.handles(subaddress)

    def processes(self, entry: SpoolEntry) -> bool:
        """Whether a claimed INBOUND entry goes to the list processor as it is
        (mail to a handled sub-address; a post held by moderation does not)."""
        return self._processes(entry.destination.subaddress)

    # -- routing claimed inbound entries ----------------------------------------

    async def route(
        self, entry: SpoolEntry, posts_seen: dict[tuple[int, str, str | None], int]
    ) -> EntryUpdate | None:
        """Route a claimed INBOUND entry: expand it, or say why not.

        Returns the entry's update, or ``None`` once its copies are QUEUED in
        the spool.  ``posts_seen`` holds the entries of this batch routed so
        far, by message and destination, to recognise a repeated RCPT.
        """
        destination = entry.destination
        fields = dict(
            message_id=entry.message_id,
            list=destination.list_address,
            sender=entry.sender,
            subaddress=destination.subaddress,
        )
        key = (entry.message_key, destination.list_address, destination.subaddress)
        if key in posts_seen and _one_copy_per_address(destination):
            # The same RCPT twice in one LMTP transaction: one copy is enough.
            _log.info(_DUPLICATE, original=posts_seen[key], **fields)
            return EntryUpdate(entry.entry_id, EntryState.DONE)
        posts_seen[key] = entry.entry_id
        if self._processes(destination.subaddress):
            return await self._processor.process(entry)
        stored: list[bytes] = []

        def message() -> bytes:
            if not stored:
                stored.append(self._spool.get_message(entry.message_key))
            return stored[0]

        try:
            plan = self._decide(destination, inline=False, sender=entry.sender, message=message)
        except KeyError:
            return None  # deleted by an operator meanwhile
        except (RegistryError, RegistryUnavailable) as e:
            _log.warn(
                "{message_id} to {list}: cannot read the list ({error}); trying again in {delay}s",
                error=str(e),
                delay=LOCAL_RETRY_DELAY,
                **fields,
            )
            return retry_after_local_trouble(
                entry, f"cannot read the list: {e}", self._clock.seconds()
            )
        route, line = plan.route, plan.line
        if plan.moderate is not None:
            _log_route(line, route, fields)
            handler = self._posting.handler(plan.moderate)
            return await self._processor.process(entry, message(), handler=handler)
        if route.kind is None:
            _log_route(line, route, fields)
            self._note(route, destination.list_address)
            # FAILED counts as an attempt (dead-lettered); HELD does not.
            return EntryUpdate(
                entry.entry_id,
                route.state,
                error=route.error,
                count_attempt=route.state is EntryState.FAILED,
            )
        try:
            await self._spool.expand(entry.entry_id, route.recipients, route.kind)
        except SpoolError as e:
            _log.error(
                "{message_id} to {list}: cannot queue its copies ({error})", error=str(e), **fields
            )
            return retry_after_local_trouble(
                entry, f"cannot queue copies: {e}", self._clock.seconds()
            )
        _log_route(line, route, fields)
        self._note(route, destination.list_address)
        return None

    def _note(self, route: Route, list_address: str) -> None:
        """Tell the observer what routing did with one destination."""
        if route.kind is not None:
            if route.recipients:
                self._observer.recipients_queued(list_address, len(route.recipients))
        elif route.state is EntryState.HELD:
            self._observer.recipients_held(list_address, 1)

    # -- storing new messages -----------------------------------------------------

    async def enqueue(self, envelope: Envelope, message: bytes) -> list[int]:
        """Store an accepted message, routed, and start delivering it (see
        :meth:`DeliveryRunner.enqueue <mailrelay.runner.DeliveryRunner.enqueue>`)."""
        if not isinstance(envelope, Envelope):
            return await self._spool.enqueue(envelope, message)  # its error
        plans = []
        seen: dict[tuple[str, str | None], int] = {}
        lists: dict[str, MailingList] = {}

        def key_of(destination: Destination) -> tuple[str, str | None]:
            return destination.list_address, destination.subaddress

        for index, destination in enumerate(envelope.destinations):
            key = key_of(destination)
            if key in seen and _one_copy_per_address(destination):
                plans.append((Route(EntryState.DONE), _DUPLICATE_LINE))
                continue
            seen[key] = index
            try:
                plan = self._decide(
                    destination, inline=True, sender=envelope.sender, message=lambda: message
                )
            except (RegistryError, RegistryUnavailable):
                plan = _Plan(Route(), _STORED_FOR_BATCH)  # a batch routes it, retrying
            plans.append((plan.route, plan.line))
            if plan.mlist is not None:
                lists[destination.list_address] = plan.mlist
        routes = [route for route, _ in plans]
        # The entries left to deliver or route: copies, and entries left QUEUED.
        waiting = sum(
            len(route.recipients) if route.kind is not None else route.state is EntryState.QUEUED
            for route in routes
        )
        # Mail for list processing alone is left QUEUED for a claim, not
        # processed here one message at a time: a burst of bounces is then
        # claimed and processed in batches (one registry transaction each).
        for_processing = sum(line is _STORED_FOR_PROCESSING for _, line in plans)
        if (
            for_processing
            and for_processing == waiting
            and self._delivery_settled is not None
            and self._processing_yield > 0
        ):
            # Delivery first: while copies go out, list-processing mail waits
            # (not yet stored nor acknowledged, so nothing is at risk) and its
            # sender with it; a burst of bounces then takes no CPU from them.
            await self._delivery_settled(self._processing_yield)
        claim = waiting > for_processing and self._has_room(waiting)
        stored = await self._spool.store(envelope, message, routes, claim)
        for index, (destination, (route, line)) in enumerate(
            zip(envelope.destinations, plans, strict=True)
        ):
            fields = dict(
                message_id=envelope.message_id,
                list=destination.list_address,
                sender=envelope.sender,
                subaddress=destination.subaddress,
                original=stored.entry_ids[seen.get(key_of(destination), index)],
                entry_id=stored.entry_ids[index],
                code=250,
            )
            _log_route(line, route, fields)
            self._note(route, destination.list_address)
        if stored.claimed:
            # Delivered from what is in hand: the bytes just stored and the
            # lists just read, not read back from the spool and the registry.
            claimed = list(stored.claimed)
            self._start_batch(claimed, JustStored(claimed[0].message_key, bytes(message), lists))
        elif waiting:
            self._wake()
        return list(stored.entry_ids)
