"""Routing new posts: what becomes of each destination of an accepted message.

Place in the flow: the LMTP policy (:mod:`mailrelay.lmtp.policy`) stores each
accepted message through :meth:`Router.enqueue` (the runner's
``IMessageStore`` side), which routes it in the spool transaction that stores
it; entries left QUEUED are routed later by :meth:`Router.route` when the
:mod:`~mailrelay.runner.scheduler` claims them.  Either way:

* a post (an INBOUND entry for the posting address) is replaced, in one
  transaction, by one MEMBER entry per member with delivery enabled; mail to
  ``-owner`` likewise by one OWNER entry per owner;
* mail to the command addresses (``-join``, ``-leave``, ``-request``,
  ``-confirm``) and to ``-bounces`` is HELD: kept, with its sub-address, for
  the processing that comes later, and never delivered to members;
* a second RCPT of a post or ``-owner`` address in one transaction is DONE at
  once: one copy is enough.

The MEMBER and OWNER entries go on to :mod:`~mailrelay.runner.sending`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from mailrelay.errors import RegistryError, RegistryUnavailable, SpoolError
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
    """How a routing decision is logged: the Logger method and the format."""

    level: str
    format: str


# A post stored QUEUED, for a delivery batch to route.
_STORED_FOR_BATCH = _RouteLogLine(
    "info", "{message_id} from {sender} to {list}: stored, to be expanded by a delivery batch"
)
_DUPLICATE_LINE = _RouteLogLine("info", _DUPLICATE)


def _one_copy_per_address(destination: Destination) -> bool:
    """Whether a second RCPT of this address in one transaction is a duplicate:
    posts and -owner mail are sent once; commands and bounces are each kept."""
    return destination.subaddress in (None, "owner")


def _log_route(line: _RouteLogLine, route: Route, fields: dict[str, Any]) -> None:
    if route.kind is not None:
        fields = dict(fields, count=len(route.recipients), kind=route.kind.value)
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
    each message were queued for each list, and what was held.
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
    ):
        self._spool = spool
        self._registry = registry
        self._clock = clock
        self._inline_limit = inline_limit
        self._has_room = has_room
        self._start_batch = start_batch
        self._wake = wake
        self._observer = observer
        # Member counts seen when routing: posts to lists known to be larger
        # than inline_limit are not expanded while being stored.
        self._list_sizes: dict[str, int] = {}

    def _decide(
        self, destination: Destination, *, inline: bool
    ) -> tuple[Route, _RouteLogLine, MailingList | None]:
        """What becomes of a post (or -owner mail) to ``destination``, why, and
        the list if it was read.

        Raises RegistryError or RegistryUnavailable when the registry cannot
        answer.  With ``inline`` (routing while the message is stored), a list
        with more than ``inline_limit`` members is left QUEUED for a batch.
        """
        subaddress = destination.subaddress
        if subaddress in _HELD_SUBADDRESSES:
            line = _RouteLogLine(
                "info",
                "Holding {message_id} from {sender} to {list} -{subaddress} for later processing",
            )
            return Route(EntryState.HELD), line, None
        if subaddress not in (None, "owner"):
            line = _RouteLogLine(
                "warn", "Holding {message_id} to {list}: unknown sub-address {subaddress}"
            )
            return Route(EntryState.HELD, error=f"unknown sub-address {subaddress!r}"), line, None
        list_address = destination.list_address
        if inline and subaddress is None:
            known = self._list_sizes.get(list_address)
            if known is None:
                # First post to this list here: count before reading a
                # large list only to leave it to a batch.
                count = getattr(self._registry, "member_count", None)
                with contextlib.suppress(RegistryError):
                    known = count(list_address) if count is not None else None
            if known is not None and known > self._inline_limit:
                return Route(), _STORED_FOR_BATCH, None
        mlist = self._registry.get_list(list_address)
        if mlist is None:
            line = _RouteLogLine("warn", "{message_id} to {list}: the list no longer exists")
            return Route(EntryState.FAILED, error="the list no longer exists"), line, None
        if subaddress is None:
            kind = EntryKind.MEMBER
            recipients = tuple(
                m.address for m in self._registry.members(mlist.posting_address, enabled_only=True)
            )
            self._list_sizes[list_address] = len(recipients)
            if inline and len(recipients) > self._inline_limit:
                return Route(), _STORED_FOR_BATCH, None
        else:
            kind = EntryKind.OWNER
            recipients = tuple(mlist.owners)
            if not recipients:
                line = _RouteLogLine(
                    "error", "{message_id} to {list}-owner: the list has no owners; dead-lettered"
                )
                return Route(EntryState.FAILED, error="the list has no owners"), line, mlist
        line = _RouteLogLine(
            "info", "{message_id} from {sender} to {list}: {count} {kind} copies queued"
        )
        return Route(EntryState.DONE, kind, recipients), line, mlist

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
        try:
            route, line, _ = self._decide(destination, inline=False)
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
                route, line, mlist = self._decide(destination, inline=True)
            except (RegistryError, RegistryUnavailable):
                route, line, mlist = Route(), _STORED_FOR_BATCH, None  # a batch routes it, retrying
            plans.append((route, line))
            if mlist is not None:
                lists[destination.list_address] = mlist
        routes = [route for route, _ in plans]
        # The entries left to deliver or route: copies, and entries left QUEUED.
        waiting = sum(
            len(route.recipients) if route.kind is not None else route.state is EntryState.QUEUED
            for route in routes
        )
        claim = bool(waiting) and self._has_room(waiting)
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
