"""The circuit breaker that pauses all delivery while the site itself has a problem.

Place in the flow: :mod:`~mailrelay.runner.sending` trips it when the smarthost
refuses our credentials or TLS (a problem of the site, never of a member) and
closes it when a transaction started after the latest trip gets through; the
:mod:`~mailrelay.runner.scheduler` claims nothing while it is open and one
entry at a time while it is half open.  Its state is published in the spool's
status table under :data:`CIRCUIT_STATUS_KEY`, where ``mailrelay queue`` shows it.

It also remembers how long delivery was paused (:meth:`CircuitBreaker.paused_between`):
that time does not count toward a recipient's retry period, so a weekend of
bad credentials does not dead-letter mail that members' servers deferred
before it.  The record is kept in memory: a restart forgets earlier pauses.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["CIRCUIT_STATUS_KEY", "CircuitBreaker"]

# Past pauses remembered, oldest forgotten first: far more than a retry
# period's worth at the breaker's shortest cycle would be needed to matter.
_MAX_PAUSES = 1000

# The spool status key under which the circuit breaker publishes its state.
CIRCUIT_STATUS_KEY = "circuit"


class CircuitBreaker:
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
        # (opened, closed) times of the pauses that have ended, oldest first.
        self._pauses: list[tuple[float, float]] = []

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
        assert self.opened_at is not None
        self._pauses.append((self.opened_at, self._clock.seconds()))
        del self._pauses[:-_MAX_PAUSES]
        self.retry_at = self.opened_at = None
        self.delay = self.min_delay
        self.reason = ""
        return True

    def paused_until(self, now: float) -> float:
        """When an entry held back by a site problem is tried again: the next
        probe, or ``min_delay`` from ``now`` if the breaker has closed since."""
        return self.retry_at or now + self.min_delay

    def paused_between(self, start: float, end: float) -> float:
        """Seconds of ``start``..``end`` during which delivery was paused (the
        current pause, if any, counts up to ``end``)."""
        pauses = list(self._pauses)
        if self.opened_at is not None:
            pauses.append((self.opened_at, end))
        return sum(max(0.0, min(end, closed) - max(start, opened)) for opened, closed in pauses)

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
