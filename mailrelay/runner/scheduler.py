"""Scheduling delivery: claims due spool entries in batches, on a timer.

Place in the flow: between the spool and :mod:`~mailrelay.runner.sending`.
:class:`Scheduler` claims due entries (at most ``batch_size``, one while the
circuit breaker probes, none while it is open) and hands each batch to the
``run_batch`` coroutine it was given, with up to one batch per transaction
the sender takes at once (``max_parallel``, and two at least), so that slow
transactions in some batches do not hold up the next: posts arriving one by
one while the smarthost is slow to answer still use every connection.  It wakes for
:meth:`Scheduler.wake` (new entries stored), the next retry time, and every
``poll_interval`` for entries re-queued by another process; after the queue
has drained it purges delivered entries older than ``keep_done``.

It owns the bookkeeping the runner's life cycle needs: the Deferreds still
running (awaited on stop) and the waiters of :meth:`Scheduler.when_idle`.

A claim has a lease: an entry left INFLIGHT longer than ``claim_lease`` that
no batch of this process holds (its result could not be recorded, however
often that was tried) goes back to the queue at the next poll, without a
restart.  Only one process delivers from a spool (the daemon locks its state
directory), so an in-flight entry no batch holds is nobody's; the lease only
spares claims whose results are on their way back from the spool's thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailrelay.errors import SpoolError
from mailrelay.model import SpoolEntry
from mailrelay.runner.breaker import CIRCUIT_STATUS_KEY, CircuitBreaker

__all__ = ["Scheduler"]

_log = Logger()

_SPOOL_RETRY_DELAY = 10.0
# Batches processed at the same time, at least: a slow transaction in one
# does not hold up the next, and the spool round trips overlap with sending.
# Up to max_parallel run: a batch may hold a single transaction (one post
# stored and claimed inline), and a cap below the sender's connections left
# them idle while a few replies were slow to come, with mail waiting.
_MIN_BATCHES = 2
# Delivered entries older than keep_done are purged at most this often, when
# the queue has drained (no timer of its own: an idle relay has nothing to purge).
_PURGE_INTERVAL = 3600.0


class Scheduler:
    """Claims due entries from ``spool`` (an ``ISpool``) and runs
    ``run_batch(entries, just_stored)`` on each batch; ``clock`` schedules
    everything.  ``just_stored`` is what :meth:`start_batch` was given (``None``
    for a claimed batch), handed through without being looked at.  At most
    ``max_parallel`` batches (the transactions the sender is handed at once;
    two at least) run at the same time."""

    def __init__(
        self,
        spool: Any,
        *,
        clock: Any,
        breaker: CircuitBreaker,
        batch_size: int,
        poll_interval: float | None,
        keep_done: float | None,
        run_batch: Callable[[list[SpoolEntry], Any], Awaitable[None]],
        claim_lease: float | None = 300.0,
        max_parallel: int = 1,
    ):
        self._spool = spool
        self._clock = clock
        self._breaker = breaker
        self._batch_size = batch_size
        # Entries made QUEUED by another process (``mailrelay queue retry``)
        # send no wake(): look at the spool at least this often.
        self._poll_interval = poll_interval
        self._keep_done = keep_done
        self._run_batch = run_batch
        self._claim_lease = claim_lease
        self._max_batches = max(_MIN_BATCHES, max_parallel)
        # Entry ids the running batches hold, and when stale claims were last looked for.
        self._held: set[int] = set()
        self._last_lease_check: float | None = None
        self._last_purge: float | None = None
        self.running = False
        self._ready = False  # recover() has run
        self._in_pump = False
        self._pump_again = False
        self._claiming = False
        self._rescan = False
        self._batches = 0
        # Whether the spool may hold due entries no batch has claimed.
        self._backlog = True
        self._timer: Any = None
        self._tasks: set[defer.Deferred[Any]] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []

    # -- the runner's life cycle ------------------------------------------------

    def start(self) -> None:
        """Return entries left in flight by a crash to the queue, then start claiming."""
        self.running = True
        self.track(defer.Deferred.fromCoroutine(self._start()))

    def stop(self) -> defer.Deferred[None]:
        """Stop claiming; fires when everything tracked is done."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return defer.Deferred.fromCoroutine(self._drain())

    def wake(self) -> None:
        """New entries were stored: look for work on the next reactor turn."""
        self._backlog = True
        if self.running:
            self._schedule_at(self._clock.seconds())

    def note_backlog(self) -> None:
        """Entries were made due (QUEUED copies, RETRY results): claim again
        when a batch finishes."""
        self._backlog = True

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once nothing is being claimed, delivered or written and nothing
        is due before the next scheduled wake-up (at once when stopped)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def has_room(self, entries: int) -> bool:
        """Whether a batch of ``entries`` new entries may start at once."""
        return bool(
            self.running
            and self._ready
            and self._batches < self._max_batches
            and entries <= self._batch_size
            and self._breaker.state() == CircuitBreaker.CLOSED
        )

    def track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Keep ``d`` among the work that stopping waits for and idleness excludes."""
        if not d.called:
            self._tasks.add(d)
            d.addBoth(self._untrack, d)
        return d

    async def _start(self) -> None:
        try:
            await self._spool.recover()
        except Exception as e:
            _log.error("Could not return in-flight entries to the queue: {error}", error=str(e))
        try:
            if self._spool.get_status(CIRCUIT_STATUS_KEY) is not None:
                # Left by a previous run; this run's breaker starts closed.
                await self._spool.set_status(CIRCUIT_STATUS_KEY, None)
        except Exception as e:
            _log.warn("Could not clear the circuit breaker status: {error}", error=str(e))
        self._ready = True
        self._pump()

    async def _drain(self) -> None:
        while self._tasks:
            await defer.gatherResults(list(self._tasks), consumeErrors=True)
        self._check_idle()

    def _untrack(self, result: Any, d: defer.Deferred[Any]) -> Any:
        self._tasks.discard(d)
        self._check_idle()
        return result

    # -- the timer and the pump -------------------------------------------------

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
        if state == CircuitBreaker.OPEN:
            self._schedule_at(self._breaker.retry_at)
            return
        if state == CircuitBreaker.HALF_OPEN:
            if self._batches:
                # The probe is under way; its batch pumps when done.  The timer
                # that brought us here is spent: remember that work is due.
                self._backlog = True
                return
            limit = 1
        self._requeue_stale_claims()
        if self._batches >= self._max_batches:
            self._backlog = True  # as above: the next batch to finish claims
            return
        self._claiming = True
        self._rescan = False
        d = defer.maybeDeferred(self._spool.claim_due, self._clock.seconds(), limit)
        d.addCallbacks(self._claimed, self._claim_failed, callbackArgs=(limit,))
        self.track(d)

    def _requeue_stale_claims(self) -> None:
        """At most once per half lease: return to the queue the in-flight entries
        claimed more than a lease ago that no batch of ours holds."""
        now = self._clock.seconds()
        lease = self._claim_lease
        if lease is None or (
            self._last_lease_check is not None and now - self._last_lease_check < lease / 2
        ):
            return
        self._last_lease_check = now

        def requeued(count: int) -> None:
            if count:
                _log.warn(
                    "Returned {count} entries to the queue whose claim outlived its "
                    "{lease}s lease (their delivery results could not be recorded); "
                    "they are sent again",
                    count=count,
                    lease=lease,
                )
                self._backlog = True
                self._pump()

        def failed(failure: Any) -> None:
            _log.warn(
                "Could not return stale in-flight entries to the queue: {error}",
                error=failure.getErrorMessage(),
            )

        d = defer.maybeDeferred(self._spool.recover, now - lease, frozenset(self._held))
        self.track(d.addCallbacks(requeued, failed))

    def _claimed(self, entries: list[SpoolEntry], limit: int) -> None:
        self._claiming = False
        if entries:
            self.start_batch(entries)
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
                _log.info(
                    "Purged {count} delivered entries older than {days:g} days",
                    count=count,
                    days=days,
                )

        def failed(failure: Any) -> None:
            _log.warn("Could not purge delivered entries: {error}", error=failure.getErrorMessage())

        d = defer.maybeDeferred(self._spool.purge, now - self._keep_done)
        self.track(d.addCallbacks(purged, failed))

    def _claim_failed(self, failure: Any) -> None:
        self._claiming = False
        if failure.check(SpoolError):
            _log.error(
                "Could not claim spool entries: {error}; trying again in {delay}s",
                error=str(failure.value),
                delay=_SPOOL_RETRY_DELAY,
            )
        else:
            _log.failure("Claiming spool entries failed", failure)
        if self.running:
            self._schedule_at(self._clock.seconds() + _SPOOL_RETRY_DELAY)
        self._check_idle()

    # -- batches ------------------------------------------------------------------

    def start_batch(self, entries: list[SpoolEntry], just_stored: Any = None) -> None:
        """Run a batch of claimed (in flight) entries now."""
        self._batches += 1
        ids = [entry.entry_id for entry in entries]
        self._held.update(ids)
        d = defer.Deferred.fromCoroutine(self._run_batch(entries, just_stored))
        d.addErrback(
            lambda f: _log.failure(
                "Delivery of a batch of {count} entries failed; they stay in flight "
                "until their claim's lease runs out",
                f,
                count=len(entries),
            )
        )
        d.addBoth(self._batch_done, ids)
        self.track(d)

    def _batch_done(self, _: Any, ids: list[int]) -> None:
        self._batches -= 1
        self._held.difference_update(ids)
        if self._backlog:
            self._pump()
        self._check_idle()

    def _schedule_next_due(self) -> None:
        if not self.running:
            return
        try:
            due = self._spool.next_due()
        except SpoolError as e:
            _log.error("Could not read the next retry time: {error}", error=str(e))
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
