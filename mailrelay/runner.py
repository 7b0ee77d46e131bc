"""The delivery runner: from the spool to the list's members through the smarthost.

:class:`DeliveryRunner` claims due spool entries in batches and routes each by
its kind and sub-address (a message stored through :meth:`DeliveryRunner.enqueue`
is routed in the transaction that stores it, and delivered without a claim):

* a post (an INBOUND entry for the posting address) is replaced in the spool,
  in one transaction, by one MEMBER entry per member with delivery enabled;
  mail to ``-owner`` likewise by one OWNER entry per owner;
* mail to the command addresses (``-join``, ``-leave``, ``-request``,
  ``-confirm``) and to ``-bounces`` is HELD: kept, with its sub-address, for
  the processing that comes later, and never delivered to members;
* MEMBER and OWNER entries are delivered, grouped by message: the stored
  message (with the list headers, for posts) is encoded once and sent in
  transactions of at most ``max_recipients`` (one per recipient with VERP)
  from the list's ``-bounces`` address.

Each recipient's result is recorded on its own entry: accepted is DONE; a
temporary failure is retried with backoff until ``retry_period`` after the
first attempt, then dead-lettered (FAILED, with the reason); a permanent
refusal of a recipient is FAILED and recorded as a bounce of that member.

Problems of the site itself (refused credentials, TLS trouble, missing
STARTTLS) never count against a member: nothing is bounced, no attempt is
counted, the entries stay queued, and a circuit breaker pauses all delivery,
retrying one transaction at a time with a doubling delay until the smarthost
accepts one.  Its state is published in the spool's status table under
``"circuit"``, where ``mailrelay queue`` shows it.

Delivery is at-least-once: entries in flight when the process dies are sent
again after :meth:`DeliveryRunner.startService` recovers them, but a recipient
the smarthost accepted is DONE and is not sent the message again.
"""

from __future__ import annotations

import contextlib
import enum
import random as _random
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.addresses import check_mailbox, is_valid_mailbox, split_mailbox
from mailrelay.errors import InvalidAddress, RegistryError, RegistryUnavailable, SpoolError
from mailrelay.interfaces import IMessageStore
from mailrelay.listheaders import add_list_headers
from mailrelay.model import (
    Bounce,
    Destination,
    EntryKind,
    EntryState,
    EntryUpdate,
    Envelope,
    MailingList,
    Route,
    SpoolEntry,
)
from mailrelay.mta.bulk import INVALID_ADDRESS, chunkify
from mailrelay.mta.errors import NO_REPLY, DeliveryError, SmarthostUnreachable
from mailrelay.mta.message import WireMessage, prepare_message
from mailrelay.retry import RetryPolicy, Verdict, classify, classify_error

__all__ = ["CIRCUIT_STATUS_KEY", "DeliveryRunner"]

log = Logger()

# The spool status key under which the circuit breaker publishes its state.
CIRCUIT_STATUS_KEY = "circuit"

# Sub-addresses whose mail is kept for command and bounce processing.
_HELD_SUBADDRESSES = frozenset({"bounces", "confirm", "join", "leave", "request"})
# How long to wait before trying again when our own storage is unavailable.
_LOCAL_RETRY_DELAY = 60.0
# After the smarthost could not be reached at all, transactions starting within
# this many seconds are deferred without dialling again: with a black-holed
# smarthost every chunk would otherwise wait out the connect timeout in turn.
_UNREACHABLE_HOLD = 5.0
_SPOOL_RETRY_DELAY = 10.0
_RESULT_WRITE_TRIES = 5
# Batches processed at the same time: a slow transaction in one does not
# hold up the next, and the spool round trips overlap with sending.
_MAX_BATCHES = 2
_CACHED_MESSAGES = 8
# Delivered entries older than keep_done are purged at most this often, when
# the queue has drained (no timer of its own: an idle relay has nothing to purge).
_PURGE_INTERVAL = 3600.0


_PENDING = frozenset({EntryState.QUEUED, EntryState.RETRY})
_DUPLICATE = "{message_id} to {list}: duplicate of entry {original}, not sent twice"


@dataclass(frozen=True)
class _Note:
    """How a routing decision is logged: the Logger method and the format."""

    level: str
    text: str


# A post stored QUEUED, for a delivery batch to route.
_STORED_FOR_BATCH = _Note(
    "info", "{message_id} from {sender} to {list}: stored, to be expanded by a delivery batch"
)
_DUPLICATE_NOTE = _Note("info", _DUPLICATE)


def _one_copy_per_address(destination: Destination) -> bool:
    """Whether a second RCPT of this address in one transaction is a duplicate:
    posts and -owner mail are sent once; commands and bounces are each kept."""
    return destination.subaddress in (None, "owner")


class _Breaker:
    """The circuit breaker's state: closed, open until ``retry_at``, or half open
    (``retry_at`` reached: one probe transaction at a time)."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, clock: Any, min_delay: float, max_delay: float):
        self._clock = clock
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.delay = min_delay
        self.retry_at: float | None = None
        self.opened_at: float | None = None
        self.reason = ""
        # Bumped at each trip: only a transaction started after the latest
        # trip proves the problem is gone.
        self.generation = 0

    def state(self) -> str:
        if self.retry_at is None:
            return self.CLOSED
        return self.OPEN if self._clock.seconds() < self.retry_at else self.HALF_OPEN

    def trip(self, reason: str) -> bool:
        """Open (or re-open after a failed probe); False if it was open already."""
        state = self.state()
        if state == self.OPEN:
            return False
        now = self._clock.seconds()
        if state == self.CLOSED:
            self.delay = self.min_delay
            self.opened_at = now
        else:
            self.delay = min(self.max_delay, self.delay * 2)
        self.retry_at = now + self.delay
        self.reason = reason
        self.generation += 1
        return True

    def succeeded(self, generation: int) -> bool:
        """Close after a transaction started at ``generation`` got through; True if it closed."""
        if self.retry_at is None or generation != self.generation:
            return False
        self.retry_at = self.opened_at = None
        self.delay = self.min_delay
        self.reason = ""
        return True

    def describe(self) -> str:
        """One line for ``mailrelay queue`` (which prefixes "DELIVERY PAUSED"):
        since when, why, and the next try."""
        assert self.retry_at is not None and self.opened_at is not None
        return (
            f"since {_utc(self.opened_at)}, site problem: {self.reason} "
            f"(nothing bounced, all mail kept); next attempt at {_utc(self.retry_at)}"
        )


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


class _Outcome(enum.Enum):
    """Why a recipient was not attempted."""

    STOPPING = "stopping"
    PAUSED = "paused"


@dataclass(frozen=True)
class _Result:
    """One recipient's result: a verdict, or an outcome when nothing was sent."""

    verdict: Verdict | _Outcome
    code: int = 0  # 0 when nothing was sent
    text: str = ""
    bounce: bool = False  # a permanent refusal of this recipient (not of the message)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}".strip() if self.code else self.text


# Shared by every accepted recipient (a _Result is immutable).
_DELIVERED = _Result(Verdict.DELIVERED, 250)


def _text(response: bytes | str) -> str:
    if isinstance(response, bytes | bytearray):
        response = bytes(response).decode("utf-8", "replace")
    return " ".join(str(response).split())


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
    log.info(
        "Cannot VERP-encode {recipient}; using {sender}",
        recipient=recipient,
        sender=mlist.bounces_address,
        list=mlist.posting_address,
    )
    return mlist.bounces_address


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


@implementer(IMessageStore)
class DeliveryRunner(service.Service):
    """Delivers spooled mail through ``sender`` (an ``IMessageSender``, normally a
    :class:`~mailrelay.mta.pool.ConnectionPool`), recording every result in ``spool``.

    ``registry`` supplies lists, members and owners, and records bounces.
    ``clock`` (an ``IReactorTime``) schedules everything.  ``random`` (a
    :class:`random.Random`) draws the retry jitter.  ``devmode_recipient``
    makes the runner itself send every copy there, one recipient per
    transaction; leave it ``None`` when the sender already rewrites (as
    :class:`~mailrelay.mta.connection.Connection` does).  ``max_parallel``
    bounds the transactions handed to the sender at once (default: its
    ``max_connections``, else 1).  DONE entries (and messages no entry needs
    any more) are purged ``keep_done`` seconds after delivery (``None``: never).
    The spool is also checked every ``poll_interval`` seconds for entries
    re-queued by another process, such as ``mailrelay queue retry``.

    The runner is also an ``IMessageStore`` (:meth:`enqueue`): given to the
    LMTP policy in place of the spool, it routes each accepted message while
    storing it and starts delivering at once.  Posts to lists of more than
    ``inline_limit`` members are left for a batch to expand (0: every post is).
    """

    name = "delivery"

    def __init__(
        self,
        spool: Any,
        registry: Any,
        sender: Any,
        *,
        clock: Any,
        max_recipients: int = 10,
        retry_period: float = 5 * 86400.0,
        min_backoff: float = 300.0,
        max_backoff: float = 4000.0,
        verp: bool = False,
        devmode_recipient: str | None = None,
        batch_size: int = 1000,
        random: _random.Random | None = None,
        max_parallel: int | None = None,
        breaker_min_delay: float = 30.0,
        breaker_max_delay: float = 600.0,
        keep_done: float | None = 7 * 86400.0,
        poll_interval: float | None = 30.0,
        inline_limit: int = 1000,
    ):
        if not callable(getattr(sender, "sendmail", None)):
            raise TypeError(f"sender must provide sendmail(), not {sender!r}")
        self._max_recipients = _check_positive_int("max_recipients", max_recipients, 0)
        self._policy = RetryPolicy(retry_period, min_backoff, max_backoff)
        if not isinstance(verp, bool):
            raise TypeError(f"verp must be a bool, not {verp!r}")
        if devmode_recipient is not None:
            check_mailbox(devmode_recipient)
        self._batch_size = _check_positive_int("batch_size", batch_size)
        self._inline_limit = _check_positive_int("inline_limit", inline_limit, 0)
        if max_parallel is None:
            max_parallel = getattr(sender, "max_connections", 1)
        max_parallel = _check_positive_int("max_parallel", max_parallel)
        if not 0 < breaker_min_delay <= breaker_max_delay:
            raise ValueError(
                "breaker delays must satisfy 0 < breaker_min_delay <= breaker_max_delay, "
                f"not {breaker_min_delay!r} and {breaker_max_delay!r}"
            )
        if keep_done is not None and (
            isinstance(keep_done, bool) or not isinstance(keep_done, int | float) or keep_done < 0
        ):
            raise ValueError(
                f"keep_done must be a number of seconds >= 0 or None, not {keep_done!r}"
            )
        if poll_interval is not None and not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0 or None, not {poll_interval!r}")
        # Entries made QUEUED by another process (``mailrelay queue retry``)
        # send no wake(): look at the spool at least this often.
        self._poll_interval = poll_interval
        self._keep_done = keep_done
        self._last_purge: float | None = None
        self._spool = spool
        self._registry = registry
        self._sender = sender
        self._clock = clock
        self._verp = verp
        self._devmode_recipient = devmode_recipient
        self._random = random if random is not None else _random.Random()
        self._slots = defer.DeferredSemaphore(max_parallel)
        self._breaker = _Breaker(clock, breaker_min_delay, breaker_max_delay)
        self._unreachable: tuple[float, SmarthostUnreachable] | None = None
        self._messages: OrderedDict[tuple[int, str, EntryKind], WireMessage] = OrderedDict()
        self._ready = False  # recover() has run
        self._in_pump = False
        self._pump_again = False
        self._claiming = False
        self._rescan = False
        self._batches = 0
        # Whether the spool may hold due entries no batch has claimed.
        self._backlog = True
        # Member counts seen when routing: posts to lists known to be larger
        # than inline_limit are not expanded while being stored.
        self._list_sizes: dict[str, int] = {}
        self._timer: Any = None
        self._tasks: set[defer.Deferred[Any]] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []

    # -- public API -----------------------------------------------------------

    def wake(self) -> None:
        """New entries were stored: look for work on the next reactor turn.

        Cheap and safe to call often; calls before the next turn coalesce.
        """
        self._backlog = True
        if self.running:
            self._schedule_at(self._clock.seconds())

    @property
    def paused_until(self) -> float | None:
        """While the circuit breaker holds delivery, when it tries again; else ``None``."""
        return self._breaker.retry_at

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once nothing is being claimed, delivered or written and nothing
        is due before the next scheduled wake-up (at once when stopped)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def startService(self) -> None:  # noqa: N802
        """Return entries left in flight by a crash to the queue, then start delivering."""
        super().startService()
        self._track(defer.Deferred.fromCoroutine(self._start()))

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        """Stop claiming; fires when the transactions in flight are done and
        recorded.  Entries not yet handed to the sender go back to the queue."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return defer.Deferred.fromCoroutine(self._drain())

    # -- scheduling -------------------------------------------------------------

    async def _start(self) -> None:
        try:
            await self._spool.recover()
        except Exception as e:
            log.error("Could not return in-flight entries to the queue: {error}", error=str(e))
        try:
            if self._spool.get_status(CIRCUIT_STATUS_KEY) is not None:
                # Left by a previous run; this run's breaker starts closed.
                await self._spool.set_status(CIRCUIT_STATUS_KEY, None)
        except Exception as e:
            log.warn("Could not clear the circuit breaker status: {error}", error=str(e))
        self._ready = True
        self._pump()

    async def _drain(self) -> None:
        while self._tasks:
            await defer.gatherResults(list(self._tasks), consumeErrors=True)
        self._check_idle()

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        if not d.called:
            self._tasks.add(d)
            d.addBoth(self._untrack, d)
        return d

    def _untrack(self, result: Any, d: defer.Deferred[Any]) -> Any:
        self._tasks.discard(d)
        self._check_idle()
        return result

    def _schedule_at(self, when: float) -> None:
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        delay = max(0.0, when - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        """Claim the next batch if there is room for one, else note that we must look again."""
        # With a spool and sender that answer synchronously, a batch finishes
        # (and pumps again) inside the call that started it: loop instead of
        # recursing once per batch.
        if self._in_pump:
            self._pump_again = True
            return
        self._in_pump = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                self._pump_once()
        finally:
            self._in_pump = False
        self._check_idle()

    def _pump_once(self) -> None:
        if not (self.running and self._ready):
            return
        if self._claiming:
            self._rescan = True
            return
        limit = self._batch_size
        state = self._breaker.state()
        if state == _Breaker.OPEN:
            self._schedule_at(self._breaker.retry_at)
            return
        if state == _Breaker.HALF_OPEN:
            if self._batches:
                return  # the probe is under way; its batch pumps when done
            limit = 1
        if self._batches >= _MAX_BATCHES:
            return
        self._claiming = True
        self._rescan = False
        d = defer.maybeDeferred(self._spool.claim_due, self._clock.seconds(), limit)
        d.addCallbacks(self._claimed, self._claim_failed, callbackArgs=(limit,))
        self._track(d)

    def _claimed(self, entries: list[SpoolEntry], limit: int) -> None:
        self._claiming = False
        if entries:
            self._start_batch(entries)
        if len(entries) >= limit or self._rescan:
            self._pump()
            return
        # Nothing else is due now; until wake() or one of our own writes says
        # otherwise, finished batches need not ask the spool again.
        self._backlog = False
        self._schedule_next_due()
        self._maybe_purge()
        self._check_idle()

    def _maybe_purge(self) -> None:
        now = self._clock.seconds()
        if (
            self._keep_done is None
            or not self.running
            or (self._last_purge is not None and now - self._last_purge < _PURGE_INTERVAL)
        ):
            return
        self._last_purge = now
        days = self._keep_done / 86400

        def purged(count: int) -> None:
            if count:
                log.info(
                    "Purged {count} delivered entries older than {days:g} days",
                    count=count,
                    days=days,
                )

        def failed(failure: Any) -> None:
            log.warn("Could not purge delivered entries: {error}", error=failure.getErrorMessage())

        d = defer.maybeDeferred(self._spool.purge, now - self._keep_done)
        self._track(d.addCallbacks(purged, failed))

    def _claim_failed(self, failure: Any) -> None:
        self._claiming = False
        if failure.check(SpoolError):
            log.error(
                "Could not claim spool entries: {error}; trying again in {delay}s",
                error=str(failure.value),
                delay=_SPOOL_RETRY_DELAY,
            )
        else:
            log.failure("Claiming spool entries failed", failure)
        if self.running:
            self._schedule_at(self._clock.seconds() + _SPOOL_RETRY_DELAY)
        self._check_idle()

    def _start_batch(self, entries: list[SpoolEntry]) -> None:
        self._batches += 1
        d = defer.Deferred.fromCoroutine(self._process(entries))
        d.addErrback(
            lambda f: log.failure(
                "Delivery of a batch of {count} entries failed; they stay in flight "
                "until the next start",
                f,
                count=len(entries),
            )
        )
        d.addBoth(self._batch_done)
        self._track(d)

    def _batch_done(self, _: Any) -> None:
        self._batches -= 1
        if self._backlog:
            self._pump()
        self._check_idle()

    def _schedule_next_due(self) -> None:
        if not self.running:
            return
        try:
            due = self._spool.next_due()
        except SpoolError as e:
            log.error("Could not read the next retry time: {error}", error=str(e))
            due = self._clock.seconds() + _SPOOL_RETRY_DELAY
        if self._poll_interval is not None:
            poll = self._clock.seconds() + self._poll_interval
            due = poll if due is None else min(due, poll)
        if due is not None:
            self._schedule_at(due)

    def _check_idle(self) -> None:
        if not self._idle_waiters:
            return
        if self.running:
            if not self._ready or self._in_pump or self._claiming or self._batches or self._tasks:
                return
            timer = self._timer
            if timer is not None and timer.active() and timer.getTime() <= self._clock.seconds():
                return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    # -- one batch --------------------------------------------------------------

    async def _process(self, entries: list[SpoolEntry]) -> None:
        updates: list[EntryUpdate] = []
        bounces: list[Bounce] = []
        deliveries: dict[tuple[int, str, EntryKind], list[SpoolEntry]] = defaultdict(list)
        posts_seen: dict[tuple[int, str, str | None], int] = {}
        for entry in entries:
            if entry.kind is EntryKind.INBOUND:
                await self._route(entry, posts_seen, updates)
            else:
                deliveries[(entry.message_key, entry.destination.list_address, entry.kind)].append(
                    entry
                )
        groups = [
            defer.Deferred.fromCoroutine(self._deliver_group(key, group))
            for key, group in deliveries.items()
        ]
        for group_updates, group_bounces in await defer.gatherResults(groups):
            updates.extend(group_updates)
            bounces.extend(group_bounces)
        if any(u.state in _PENDING for u in updates):
            # QUEUED or RETRY again: the next claim (or next_due) must see them.
            self._backlog = True
        if updates:
            await self._write_results(updates)
        if bounces:
            self._record_bounces(bounces)

    async def _write_results(self, updates: list[EntryUpdate]) -> None:
        delay = 1.0
        for attempt in range(1, _RESULT_WRITE_TRIES + 1):
            try:
                await self._spool.update(updates)
                return
            except SpoolError as e:
                if attempt == _RESULT_WRITE_TRIES:
                    log.error(
                        "Could not record {count} delivery results: {error}; those entries "
                        "stay in flight and are sent again after a restart",
                        count=len(updates),
                        error=str(e),
                    )
                    return
                log.warn(
                    "Could not record {count} delivery results: {error}; retrying",
                    count=len(updates),
                    error=str(e),
                )
                await task.deferLater(self._clock, delay, lambda: None)
                delay *= 2

    def _record_bounces(self, bounces: list[Bounce]) -> None:
        try:
            self._registry.record_bounces(bounces)
        except (RegistryError, RegistryUnavailable) as e:
            log.warn("Could not record {count} bounces: {error}", count=len(bounces), error=str(e))

    # -- routing inbound entries -----------------------------------------------

    def _later(self, entry: SpoolEntry, error: str) -> EntryUpdate:
        """Try ``entry`` again shortly, without counting an attempt (our own trouble)."""
        return EntryUpdate(
            entry.entry_id,
            EntryState.RETRY,
            next_attempt_at=self._clock.seconds() + _LOCAL_RETRY_DELAY,
            error=error,
        )

    def _decide(self, destination: Destination, *, inline: bool) -> tuple[Route, _Note]:
        """What becomes of a post (or -owner mail) to ``destination``, and why.

        Raises RegistryError or RegistryUnavailable when the registry cannot
        answer.  With ``inline`` (routing while the message is stored), a list
        with more than ``inline_limit`` members is left QUEUED for a batch.
        """
        subaddress = destination.subaddress
        if subaddress in _HELD_SUBADDRESSES:
            return Route(EntryState.HELD), _Note(
                "info",
                "Holding {message_id} from {sender} to {list} -{subaddress} for later processing",
            )
        if subaddress not in (None, "owner"):
            return Route(EntryState.HELD, error=f"unknown sub-address {subaddress!r}"), _Note(
                "warn", "Holding {message_id} to {list}: unknown sub-address {subaddress}"
            )
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
                return Route(), _STORED_FOR_BATCH
        mlist = self._registry.get_list(list_address)
        if mlist is None:
            return Route(EntryState.FAILED, error="the list no longer exists"), _Note(
                "warn", "{message_id} to {list}: the list no longer exists"
            )
        if subaddress is None:
            kind = EntryKind.MEMBER
            recipients = tuple(
                m.address for m in self._registry.members(mlist.posting_address, enabled_only=True)
            )
            self._list_sizes[list_address] = len(recipients)
            if inline and len(recipients) > self._inline_limit:
                return Route(), _STORED_FOR_BATCH
        else:
            kind = EntryKind.OWNER
            recipients = tuple(mlist.owners)
            if not recipients:
                return Route(EntryState.FAILED, error="the list has no owners"), _Note(
                    "error", "{message_id} to {list}-owner: the list has no owners; dead-lettered"
                )
        return Route(EntryState.DONE, kind, recipients), _Note(
            "info", "{message_id} from {sender} to {list}: {count} {kind} copies queued"
        )

    @staticmethod
    def _log_route(note: _Note, route: Route, fields: dict[str, Any]) -> None:
        if route.kind is not None:
            fields = dict(fields, count=len(route.recipients), kind=route.kind.value)
        getattr(log, note.level)(note.text, **fields)

    async def _route(
        self,
        entry: SpoolEntry,
        posts_seen: dict[tuple[int, str, str | None], int],
        updates: list[EntryUpdate],
    ) -> None:
        """Route a claimed INBOUND entry: expand it, or record why not."""
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
            log.info(_DUPLICATE, original=posts_seen[key], **fields)
            updates.append(EntryUpdate(entry.entry_id, EntryState.DONE))
            return
        posts_seen[key] = entry.entry_id
        try:
            route, note = self._decide(destination, inline=False)
        except (RegistryError, RegistryUnavailable) as e:
            log.warn(
                "{message_id} to {list}: cannot read the list ({error}); trying again in {delay}s",
                error=str(e),
                delay=_LOCAL_RETRY_DELAY,
                **fields,
            )
            updates.append(self._later(entry, f"cannot read the list: {e}"))
            return
        if route.kind is None:
            # FAILED counts as an attempt (dead-lettered); HELD does not.
            updates.append(
                EntryUpdate(
                    entry.entry_id,
                    route.state,
                    error=route.error,
                    count_attempt=route.state is EntryState.FAILED,
                )
            )
            self._log_route(note, route, fields)
            return
        try:
            await self._spool.expand(entry.entry_id, route.recipients, route.kind)
        except SpoolError as e:
            log.error(
                "{message_id} to {list}: cannot queue its copies ({error})", error=str(e), **fields
            )
            updates.append(self._later(entry, f"cannot queue copies: {e}"))
            return
        self._backlog = True  # the copies are QUEUED: claim them next
        self._log_route(note, route, fields)

    # -- storing new messages ---------------------------------------------------

    def enqueue(self, envelope: Envelope, message: bytes) -> defer.Deferred[list[int]]:
        """Store an accepted message and start delivering it (``IMessageStore``).

        Posts to lists of at most ``inline_limit`` members, -owner mail and
        mail to the command addresses are routed in the transaction that
        stores the message (one fsync, as for the message alone); larger lists
        are routed by a batch later.  When the runner has room for another
        batch, what is to be delivered is stored in flight and delivered at
        once, without waiting for a claim.  Fires with one entry id per
        destination once the message is on stable storage, as
        :meth:`ISpool.enqueue <mailrelay.interfaces.IMessageStore.enqueue>`.
        """
        return defer.Deferred.fromCoroutine(self._enqueue(envelope, message))

    async def _enqueue(self, envelope: Envelope, message: bytes) -> list[int]:
        if not isinstance(envelope, Envelope):
            return await self._spool.enqueue(envelope, message)  # its error
        plans = []
        seen: dict[tuple[str, str | None], int] = {}

        def key_of(destination: Destination) -> tuple[str, str | None]:
            return destination.list_address, destination.subaddress

        for index, destination in enumerate(envelope.destinations):
            key = key_of(destination)
            if key in seen and _one_copy_per_address(destination):
                plans.append((Route(EntryState.DONE), _DUPLICATE_NOTE))
                continue
            seen[key] = index
            try:
                plans.append(self._decide(destination, inline=True))
            except (RegistryError, RegistryUnavailable):
                plans.append((Route(), _STORED_FOR_BATCH))  # a batch routes it, retrying
        routes = [route for route, _ in plans]
        # The entries left to deliver or route: copies, and entries left QUEUED.
        waiting = sum(
            len(route.recipients) if route.kind is not None else route.state is EntryState.QUEUED
            for route in routes
        )
        claim = bool(waiting) and self._has_room(waiting)
        stored = await self._spool.store(envelope, message, routes, claim)
        for index, (destination, (route, note)) in enumerate(
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
            self._log_route(note, route, fields)
        if stored.claimed:
            self._start_batch(list(stored.claimed))
        elif waiting:
            self.wake()
        return list(stored.entry_ids)

    def _has_room(self, entries: int) -> bool:
        """Whether a batch of ``entries`` new entries may start at once."""
        return bool(
            self.running
            and self._ready
            and self._batches < _MAX_BATCHES
            and entries <= self._batch_size
            and self._breaker.state() == _Breaker.CLOSED
        )

    # -- delivering member and owner copies ------------------------------------

    def _wire_message(self, message_key: int, mlist: MailingList, kind: EntryKind) -> WireMessage:
        """The DATA bytes for this message and list, built once per message."""
        key = (message_key, mlist.posting_address, kind)
        wire = self._messages.get(key)
        if wire is not None:
            self._messages.move_to_end(key)
            return wire
        raw = self._spool.get_message(message_key)
        if kind is EntryKind.MEMBER:
            raw = add_list_headers(raw, mlist)
        wire = prepare_message(raw)
        self._messages[key] = wire
        if len(self._messages) > _CACHED_MESSAGES:
            self._messages.popitem(last=False)
        return wire

    async def _deliver_group(
        self, key: tuple[int, str, EntryKind], entries: list[SpoolEntry]
    ) -> tuple[list[EntryUpdate], list[Bounce]]:
        message_key, list_address, kind = key
        first = entries[0]
        fields = dict(message_id=first.message_id, list=list_address)
        try:
            mlist = self._registry.get_list(list_address)
        except (RegistryError, RegistryUnavailable) as e:
            log.warn(
                "{message_id}: cannot read list {list} ({error}); trying again in {delay}s",
                error=str(e),
                delay=_LOCAL_RETRY_DELAY,
                **fields,
            )
            return [self._later(e_, f"cannot read the list: {e}") for e_ in entries], []
        if mlist is None:
            log.warn(
                "{message_id}: list {list} no longer exists; {count} copies dead-lettered",
                count=len(entries),
                **fields,
            )
            return [
                EntryUpdate(
                    e.entry_id,
                    EntryState.FAILED,
                    count_attempt=True,
                    error="the list no longer exists",
                )
                for e in entries
            ], []
        try:
            wire = self._wire_message(message_key, mlist, kind)
        except KeyError:
            return [], []  # deleted by an operator meanwhile
        except SpoolError as e:
            log.error("{message_id}: cannot read the message ({error})", error=str(e), **fields)
            return [self._later(e_, f"cannot read the message: {e}") for e_ in entries], []

        by_address: dict[str, list[SpoolEntry]] = defaultdict(list)
        for entry in entries:
            by_address[entry.destination.address].append(entry)
        results: dict[str, _Result] = {}
        valid = []
        for address in by_address:
            if is_valid_mailbox(address):
                valid.append(address)
            else:
                code, response = INVALID_ADDRESS
                results[address] = _Result(Verdict.PERMANENT, code, _text(response), bounce=True)
        if self._verp or self._devmode_recipient is not None:
            chunks = [[address] for address in sorted(valid)]
        else:
            chunks = chunkify(valid, self._max_recipients)
        # At most max_parallel transactions in the sender's hands: the others
        # wait their turn here, and look at the breaker when they get it.
        transactions = [
            self._slots.run(self._send, mlist, kind, first.message_id, chunk, wire)
            for chunk in chunks
        ]
        for chunk_results in await defer.gatherResults(transactions):
            results.update(chunk_results)
        return self._record(mlist, kind, by_address, results)

    async def _send(
        self,
        mlist: MailingList,
        kind: EntryKind,
        message_id: str,
        chunk: list[str],
        wire: WireMessage,
    ) -> dict[str, _Result]:
        """Send one SMTP transaction; a result for each recipient of ``chunk``."""
        if not self.running:
            return dict.fromkeys(chunk, _Result(_Outcome.STOPPING))
        if self._breaker.state() == _Breaker.OPEN:
            return dict.fromkeys(chunk, _Result(_Outcome.PAUSED, text=self._breaker.reason))
        if self._unreachable is not None:
            failed_at, error = self._unreachable
            if self._clock.seconds() < failed_at + _UNREACHABLE_HOLD:
                return dict.fromkeys(
                    chunk, _Result(classify_error(error), error.code, _text(error.response))
                )
            self._unreachable = None
        if self._verp and kind is EntryKind.MEMBER:
            envelope_sender = _verp_sender(mlist, chunk[0])
        else:
            envelope_sender = mlist.bounces_address
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
            log.failure("{message_id}: the sender raised unexpectedly", **fields)
            e = DeliveryError(NO_REPLY, b"Internal error in the SMTP client")
            return self._whole_failure(e, chunk, started, fields)
        duration = self._clock.seconds() - started
        if self._devmode_recipient is not None and refused:
            # One real recipient per devmode transaction: its result is the only one.
            refused = {chunk[0]: next(iter(refused.values()))}
        log.info(
            "{message_id} smtp to {list} for {count} recips, completed in {duration:.3f} "
            "seconds, {refused} refused",
            duration=duration,
            refused=len(refused),
            **fields,
        )
        results = {}
        site_problem = None
        for address in chunk:
            if address not in refused:
                results[address] = _DELIVERED
                continue
            code, response = refused[address]
            verdict = classify(code)
            results[address] = _Result(
                verdict, code, _text(response), bounce=verdict is Verdict.PERMANENT
            )
            if verdict is Verdict.SITE_PROBLEM:
                site_problem = results[address].reply
        if site_problem is not None:
            self._trip(site_problem)
        elif self._breaker.succeeded(generation):
            log.info("Delivery resumed: the smarthost accepted a transaction again")
            self._publish(None)
        return results

    def _whole_failure(
        self, error: DeliveryError, chunk: list[str], started: float, fields: dict[str, Any]
    ) -> dict[str, _Result]:
        verdict = classify_error(error)
        text = _text(error.response)
        log.warn(
            "{message_id} smtp to {list} for {count} recips failed after {duration:.3f} "
            "seconds: {code} {response}",
            duration=self._clock.seconds() - started,
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
        return dict.fromkeys(chunk, _Result(verdict, error.code, text))

    def _trip(self, reason: str) -> None:
        if self._breaker.trip(reason):
            log.error(
                "Delivery paused for {delay:.0f}s by a site problem: {reason}. No member is "
                "bounced and every message stays queued; check the smarthost settings "
                "(credentials, TLS).",
                delay=self._breaker.delay,
                reason=reason,
            )
            self._publish(self._breaker.describe())

    def _publish(self, text: str | None) -> None:
        d = defer.maybeDeferred(self._spool.set_status, CIRCUIT_STATUS_KEY, text)
        d.addErrback(
            lambda f: log.warn(
                "Could not record the circuit breaker state: {error}", error=f.getErrorMessage()
            )
        )
        self._track(d)

    def _record(
        self,
        mlist: MailingList,
        kind: EntryKind,
        by_address: dict[str, list[SpoolEntry]],
        results: dict[str, _Result],
    ) -> tuple[list[EntryUpdate], list[Bounce]]:
        """Spool updates (and bounces) for every entry, from its recipient's result."""
        now = self._clock.seconds()
        updates: list[EntryUpdate] = []
        bounces: list[Bounce] = []
        for address, entries in by_address.items():
            result = results[address]
            for entry in entries:
                updates.append(self._update_for(entry, result, now, mlist))
            if result.verdict is Verdict.PERMANENT and result.bounce and kind is EntryKind.MEMBER:
                bounces.append(
                    Bounce(mlist.posting_address, address, result.code, result.text, now)
                )
        return updates, bounces

    def _update_for(
        self, entry: SpoolEntry, result: _Result, now: float, mlist: MailingList
    ) -> EntryUpdate:
        verdict = result.verdict
        entry_id = entry.entry_id
        if verdict is Verdict.DELIVERED:
            return EntryUpdate(entry_id, EntryState.DONE, count_attempt=True)
        if verdict is _Outcome.STOPPING:
            return EntryUpdate(entry_id, EntryState.QUEUED)
        if verdict is _Outcome.PAUSED or verdict is Verdict.SITE_PROBLEM:
            # Not the recipient's fault: no attempt counted, back when the
            # breaker next tries (a few seconds from now if it has closed since).
            retry_at = self._breaker.retry_at or now + self._breaker.min_delay
            return EntryUpdate(
                entry_id,
                EntryState.RETRY,
                next_attempt_at=retry_at,
                error=f"delivery paused by a site problem (not counted as an attempt): "
                f"{result.reply}",
            )
        fields = dict(
            message_id=entry.message_id,
            list=mlist.posting_address,
            recipient=entry.destination.address,
            code=result.code,
            response=result.text,
            attempt=entry.attempts + 1,
        )
        if verdict is Verdict.PERMANENT:
            log.warn(
                "{message_id} to {recipient} (list {list}) refused permanently: {code} {response}",
                **fields,
            )
            return EntryUpdate(entry_id, EntryState.FAILED, error=result.reply, count_attempt=True)
        attempt = entry.attempts + 1
        retry_at = self._policy.next_attempt_at(now, attempt, entry.first_attempt_at, self._random)
        if retry_at is None:
            since = entry.first_attempt_at if entry.first_attempt_at is not None else now
            reason = f"gave up after {attempt} attempts in {_duration(now - since)}: {result.reply}"
            log.error(
                "{message_id} to {recipient} (list {list}) dead-lettered: {reason}",
                reason=reason,
                **fields,
            )
            return EntryUpdate(entry_id, EntryState.FAILED, error=reason, count_attempt=True)
        log.info(
            "{message_id} to {recipient} (list {list}) deferred: {code} {response}; "
            "attempt {attempt}, next in {delay:.0f}s",
            delay=retry_at - now,
            **fields,
        )
        return EntryUpdate(
            entry_id,
            EntryState.RETRY,
            next_attempt_at=retry_at,
            error=result.reply,
            count_attempt=True,
        )


def _duration(seconds: float) -> str:
    """``5d 0h``, ``3h 20m``, ``12m 5s``, ``42s``: for dead-letter reasons."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
