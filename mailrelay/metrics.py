"""Prometheus metrics: an :class:`~mailrelay.interfaces.IRelayObserver` that counts.

Place in the flow: :func:`mailrelay.service.makeService` hands one
:class:`RelayMetrics` to the LMTP factory and policy, the delivery runner and
the SMTP connections when ``[http] endpoint`` is set, and
:mod:`mailrelay.web` serves :attr:`RelayMetrics.registry` at ``/metrics``.

Events are counted as they are reported (per session, transaction or batch,
never per recipient); what is cheaper to read than to follow (spool depth by
state, the oldest deferred entry, breaker state, open connections) is read
by a collector at scrape time.  Each instance has its own
:class:`prometheus_client.CollectorRegistry`, so that two relays in one
process (an embedder's, or tests) never share counters.

Per-list series carry a ``list`` label for the first :data:`MAX_LIST_LABELS`
lists seen, and ``other`` beyond, so that the number of series stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.interfaces import IRelayObserver
from mailrelay.model import EntryState

__all__ = ["MAX_LIST_LABELS", "OTHER_LISTS", "RelayMetrics"]

_log = Logger()

MAX_LIST_LABELS = 1000
OTHER_LISTS = "other"

# Seconds: LMTP-to-smarthost latencies run from milliseconds (an idle relay)
# to days (retries), smarthost replies from milliseconds to the 60 s timeout.
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
_REPLY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_OUTCOMES = ("queued", "held", "delivered", "deferred", "dead_lettered", "bounced")
_BREAKER_STATES = ("closed", "open", "half-open")


@implementer(IRelayObserver)
class RelayMetrics:
    """Counts what one relay does, in a registry of its own.

    ``clock`` (an ``IReactorTime``) dates the oldest deferred entry.  What the
    scrape-time collector reads is attached later, by :meth:`watch`.
    """

    def __init__(self, clock: Any = None, *, max_list_labels: int = MAX_LIST_LABELS):
        self.registry = CollectorRegistry()
        self._clock = clock
        self._max_list_labels = max_list_labels
        # outcome -> {label -> counter child}: children cached, labels() is slow.
        self._by_list: dict[str, dict[str, Any]] = {outcome: {} for outcome in _OUTCOMES}
        self._labels: set[str] = set()
        r = self.registry
        self._sessions_open = Gauge(
            "mailrelay_lmtp_sessions_open", "LMTP sessions open now", registry=r
        )
        self._sessions = Counter(
            "mailrelay_lmtp_sessions", "LMTP sessions admitted since start", registry=r
        )
        self._accepted = Counter(
            "mailrelay_messages_accepted", "Messages accepted over LMTP and stored", registry=r
        )
        self._accepted_recipients = Counter(
            "mailrelay_lmtp_recipients_accepted",
            "Recipients of the messages accepted over LMTP",
            registry=r,
        )
        self._refused = Counter(
            "mailrelay_refused",
            "Recipients refused over LMTP, by reason",
            ["reason"],
            registry=r,
        )
        self._held = Counter(
            "mailrelay_messages_held",
            "Messages held for command or bounce processing",
            registry=r,
        )
        self._recipients = Counter(
            "mailrelay_recipients",
            "Recipient copies by outcome and list (lists beyond the label limit: 'other')",
            ["list", "outcome"],
            registry=r,
        )
        self._smtp_opened = Counter(
            "mailrelay_smtp_connections_opened", "Connections made to the smarthost", registry=r
        )
        self._smtp_failed = Counter(
            "mailrelay_smtp_connections_failed",
            "Connections to the smarthost that could not be made or set up",
            registry=r,
        )
        self._smtp_reply = Histogram(
            "mailrelay_smtp_transaction_seconds",
            "Time the smarthost took for one SMTP transaction (MAIL to the reply after DATA)",
            buckets=_REPLY_BUCKETS,
            registry=r,
        )
        self._smtp_transaction_failed = Counter(
            "mailrelay_smtp_transactions_failed",
            "SMTP transactions the smarthost refused or broke off as a whole",
            registry=r,
        )
        self._first = Histogram(
            "mailrelay_post_first_delivery_seconds",
            "From receiving a post to delivering its first copy",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._last = Histogram(
            "mailrelay_post_last_delivery_seconds",
            "From receiving a post to delivering its last waiting copy",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._collector = _StateCollector(self._now)
        r.register(self._collector)

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def watch(
        self,
        *,
        spool: Any = None,
        breaker_state: Callable[[], str] | None = None,
        open_connections: Callable[[], int] | None = None,
    ) -> None:
        """What to read at scrape time: the spool (``counts`` and
        ``oldest_entry``), the breaker's state and the open SMTP connections."""
        self._collector.spool = spool
        self._collector.breaker_state = breaker_state
        self._collector.open_connections = open_connections

    def _list_counter(self, outcome: str, list_address: str) -> Any:
        children = self._by_list[outcome]
        child = children.get(list_address)
        if child is None:
            label = list_address
            if label not in self._labels:
                if len(self._labels) < self._max_list_labels:
                    self._labels.add(label)
                else:
                    label = OTHER_LISTS
            child = self._recipients.labels(label, outcome)
            children[list_address] = child
        return child

    # -- IRelayObserver ---------------------------------------------------------

    def lmtp_session_opened(self) -> None:
        self._sessions.inc()
        self._sessions_open.inc()

    def lmtp_session_closed(self) -> None:
        self._sessions_open.dec()

    def message_accepted(self, recipients: int) -> None:
        self._accepted.inc()
        self._accepted_recipients.inc(recipients)

    def message_refused(self, reason: str, recipients: int) -> None:
        self._refused.labels(reason).inc(recipients)

    def recipients_held(self, list_address: str, count: int) -> None:
        self._held.inc()
        self._list_counter("held", list_address).inc(count)

    def recipients_queued(self, list_address: str, count: int) -> None:
        self._list_counter("queued", list_address).inc(count)

    def recipients_done(
        self, list_address: str, delivered: int, deferred: int, dead_lettered: int, bounced: int
    ) -> None:
        for outcome, count in (
            ("delivered", delivered),
            ("deferred", deferred),
            ("dead_lettered", dead_lettered),
            ("bounced", bounced),
        ):
            if count:
                self._list_counter(outcome, list_address).inc(count)

    def smtp_transaction(self, seconds: float, ok: bool) -> None:
        self._smtp_reply.observe(seconds)
        if not ok:
            self._smtp_transaction_failed.inc()

    def smtp_connection_opened(self) -> None:
        self._smtp_opened.inc()

    def smtp_connection_failed(self) -> None:
        self._smtp_failed.inc()

    def post_delivered(self, list_address: str, seconds: float, first: bool, last: bool) -> None:
        if first:
            self._first.observe(seconds)
        if last:
            self._last.observe(seconds)


class _StateCollector(Collector):
    """Reads the spool, the breaker and the SMTP pool at scrape time."""

    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.spool: Any = None
        self.breaker_state: Callable[[], str] | None = None
        self.open_connections: Callable[[], int] | None = None

    def describe(self) -> list[Any]:
        return []  # nothing to check for clashes at registration

    def collect(self) -> Iterator[Any]:
        if self.spool is not None:
            yield from self._spool_metrics()
        if self.breaker_state is not None:
            state = self.breaker_state()
            family = GaugeMetricFamily(
                "mailrelay_circuit_breaker_state",
                "Delivery circuit breaker: 1 for the state it is in",
                labels=["state"],
            )
            for name in _BREAKER_STATES:
                family.add_metric([name], 1.0 if name == state else 0.0)
            yield family
        if self.open_connections is not None:
            yield GaugeMetricFamily(
                "mailrelay_smtp_connections_open",
                "Connections to the smarthost open now",
                value=self.open_connections(),
            )

    def _spool_metrics(self) -> Iterator[Any]:
        try:
            counts = self.spool.counts()
            oldest_entry = getattr(self.spool, "oldest_entry", None)
            oldest = oldest_entry(EntryState.RETRY) if oldest_entry is not None else None
        except Exception as e:  # a scrape must not take the relay down
            _log.warn("Metrics: cannot read the spool: {error}", error=str(e))
            return
        depth = GaugeMetricFamily(
            "mailrelay_spool_entries", "Spool entries by state", labels=["state"]
        )
        for state in EntryState:
            depth.add_metric([state.value], counts.get(state, 0))
        yield depth
        age = 0.0 if oldest is None else max(0.0, self._now() - oldest.received_at)
        yield GaugeMetricFamily(
            "mailrelay_spool_oldest_deferred_age_seconds",
            "Age of the oldest entry waiting for a retry (0 when none)",
            value=age,
        )
