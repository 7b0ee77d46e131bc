"""The delivery runner: the service that composes routing, scheduling and sending.

Place in the flow: LMTP → :mod:`~mailrelay.runner.routing` → spool →
:mod:`~mailrelay.runner.scheduler` → :mod:`~mailrelay.runner.sending` → mta,
with :mod:`~mailrelay.runner.outcomes` deciding what each reply means and the
results written back to the spool here, one write per batch.

:class:`DeliveryRunner` claims due spool entries in batches and routes each by
its kind and sub-address (a message stored through :meth:`DeliveryRunner.enqueue`
is routed in the transaction that stores it, and delivered without a claim);
see :mod:`~mailrelay.runner.routing` for what becomes of each destination.
MEMBER and OWNER entries are delivered, grouped by message: the stored
message (with the list headers, for posts) is encoded once and sent in
transactions of at most ``max_recipients`` (one per recipient with VERP)
from the list's ``-bounces`` address.

Each recipient's result is recorded on its own entry: accepted is DONE; a
temporary failure is retried with backoff until ``retry_period`` after the
first attempt, then dead-lettered (FAILED, with the reason); a permanent
refusal of a recipient is FAILED and recorded as a bounce of that member.
A permanent refusal of the message itself (5xx to MAIL or DATA, or larger
than the smarthost's SIZE) is FAILED too, never a bounce; the poster gets one
delivery status notification and the owners one notice, stored with the
copies' final state and recorded on the post, so that a post refused in
several batches is told about once (``mailrelay queue`` shows the reason).

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

import random as _random
from collections import defaultdict
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay._checks import check_count
from mailrelay.addresses import check_mailbox
from mailrelay.errors import RegistryError, RegistryUnavailable, SpoolError
from mailrelay.interfaces import IMessageStore
from mailrelay.listproc.refusals import RefusalNotices
from mailrelay.model import (
    Bounce,
    EntryKind,
    EntryState,
    EntryUpdate,
    Envelope,
    MailingList,
    Refusal,
    RefusedPost,
    SpoolEntry,
)
from mailrelay.observer import NO_OBSERVER
from mailrelay.retry import RetryPolicy
from mailrelay.runner.breaker import CIRCUIT_STATUS_KEY, CircuitBreaker
from mailrelay.runner.outcomes import RecipientResult
from mailrelay.runner.routing import Router
from mailrelay.runner.scheduler import Scheduler
from mailrelay.runner.sending import CopySender, GroupKey, JustStored

__all__ = ["DeliveryRunner"]

_log = Logger()

_RESULT_WRITE_TRIES = 5
# Delivery counts as under way this long after a batch of copies started or
# ended: posts arriving one after another keep list processing waiting.
DELIVERY_QUIET = 0.05
_PENDING = frozenset({EntryState.QUEUED, EntryState.RETRY})
_WAITING = (EntryState.QUEUED, EntryState.INFLIGHT, EntryState.RETRY)


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
    ``max_connections``, else 1), and the batches run at once (two at least):
    mail stored while a few slow replies are pending still goes out on the
    free connections.  DONE entries (and messages no entry needs
    any more) are purged ``keep_done`` seconds after delivery (``None``: never).
    The spool is also checked every ``poll_interval`` seconds for entries
    re-queued by another process, such as ``mailrelay queue retry``, and for
    entries in flight longer than ``claim_lease`` seconds that no batch holds
    (their results could not be recorded): those go back to the queue.

    The runner is also an ``IMessageStore`` (:meth:`enqueue`): given to the
    LMTP policy in place of the spool, it routes each accepted message while
    storing it and starts delivering at once.  Posts to lists of more than
    ``inline_limit`` members are left for a batch to expand (0: every post is).

    ``observer`` (an :class:`~mailrelay.interfaces.IRelayObserver`, default
    none) is told, once per group or batch, what was queued, held, delivered,
    deferred, dead-lettered and bounced, each SMTP transaction's duration, and
    how long after receipt each post's first and last waiting copies went out.

    ``processor`` (a :class:`~mailrelay.listproc.processor.ListProcessor`)
    takes mail to the sub-addresses it handles; at start the runner releases
    such mail that an earlier release held.  ``posting`` (a
    :class:`~mailrelay.listproc.moderation.Moderation`) decides each post
    before it is expanded (see :mod:`~mailrelay.runner.routing`).  ``on_bounces`` (optional) is
    called with the permanent refusals after they were recorded in the
    registry (bounce processing scores them).

    ``personalize`` and ``unsubscribe_urls``: one copy per member, and the
    unsubscribe URLs in posts, as :class:`~mailrelay.runner.sending.CopySender`
    describes.

    ``processing_yield``: new mail for list processing alone (bounces,
    commands) waits up to this many seconds, before it is stored and
    acknowledged, while copies are being delivered (see
    :meth:`delivery_settled`): member delivery goes first in a burst of
    bounces (0: never wait).

    ``notices`` (an :class:`~mailrelay.interfaces.IRefusalNotices`) writes what
    the poster and the owners are told of a post the smarthost refused as a
    whole (default: :class:`~mailrelay.listproc.refusals.RefusalNotices` with
    the shipped texts).
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
        claim_lease: float | None = 300.0,
        observer: Any = None,
        processor: Any = None,
        posting: Any = None,
        on_bounces: Any = None,
        personalize: bool = False,
        unsubscribe_urls: Any = None,
        notices: Any = None,
        processing_yield: float = 1.0,
    ):
        if not callable(getattr(sender, "sendmail", None)):
            raise TypeError(f"sender must provide sendmail(), not {sender!r}")
        max_recipients = check_count("max_recipients", max_recipients, 0)
        policy = RetryPolicy(retry_period, min_backoff, max_backoff)
        if not isinstance(verp, bool):
            raise TypeError(f"verp must be a bool, not {verp!r}")
        if (
            isinstance(processing_yield, bool)
            or not isinstance(processing_yield, int | float)
            or not 0 <= processing_yield < float("inf")
        ):
            raise ValueError(
                f"processing_yield must be a number of seconds >= 0, not {processing_yield!r}"
            )
        if not isinstance(personalize, bool):
            raise TypeError(f"personalize must be a bool, not {personalize!r}")
        if devmode_recipient is not None:
            check_mailbox(devmode_recipient)
        batch_size = check_count("batch_size", batch_size)
        inline_limit = check_count("inline_limit", inline_limit, 0)
        if max_parallel is None:
            max_parallel = getattr(sender, "max_connections", 1)
        max_parallel = check_count("max_parallel", max_parallel)
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
        if claim_lease is not None and not claim_lease > 0:
            raise ValueError(f"claim_lease must be > 0 or None, not {claim_lease!r}")
        self._keep_done = keep_done
        self._observer = observer if observer is not None else NO_OBSERVER
        self._verp = verp
        self._spool = spool
        self._registry = registry
        self._clock = clock
        self._breaker = CircuitBreaker(clock, breaker_min_delay, breaker_max_delay)
        self._scheduler = Scheduler(
            spool,
            clock=clock,
            breaker=self._breaker,
            batch_size=batch_size,
            poll_interval=poll_interval,
            keep_done=keep_done,
            run_batch=self._run_batch,
            claim_lease=claim_lease,
            max_parallel=max_parallel,
        )
        self._copies = CopySender(
            spool,
            registry,
            sender,
            clock=clock,
            breaker=self._breaker,
            policy=policy,
            random=random if random is not None else _random.Random(),
            max_recipients=max_recipients,
            max_parallel=max_parallel,
            verp=verp,
            devmode_recipient=devmode_recipient,
            is_running=lambda: bool(self.running),
            publish_circuit=self._publish_circuit,
            observer=self._observer,
            personalize=personalize,
            unsubscribe_urls=unsubscribe_urls,
        )
        self._router = Router(
            spool,
            registry,
            clock=clock,
            inline_limit=inline_limit,
            has_room=self._scheduler.has_room,
            start_batch=self._scheduler.start_batch,
            wake=self._scheduler.wake,
            observer=self._observer,
            processor=processor,
            posting=posting,
            delivery_settled=self.delivery_settled,
            processing_yield=processing_yield,
        )
        self._processor = processor
        self._on_bounces = on_bounces
        # Batches delivering copies now, and when one last started or ended.
        self._delivering = 0
        self._delivery_seen = float("-inf")
        if notices is None:
            notices = RefusalNotices(
                is_list_address=lambda address: _resolves(registry, address), clock=clock
            )
        self._notices = notices

    # -- public API -----------------------------------------------------------

    def wake(self) -> None:
        """New entries were stored: look for work on the next reactor turn.

        Cheap and safe to call often; calls before the next turn coalesce.
        """
        self._scheduler.wake()

    def breaker_state(self) -> str:
        """The circuit breaker's state: ``closed``, ``open`` or ``half-open``."""
        return self._breaker.state()

    @property
    def paused_until(self) -> float | None:
        """While the circuit breaker holds delivery, when it tries again; else ``None``."""
        return self._breaker.retry_at

    def when_idle(self) -> defer.Deferred[None]:
        """Fires once nothing is being claimed, delivered or written and nothing
        is due before the next scheduled wake-up (at once when stopped)."""
        return self._scheduler.when_idle()

    def startService(self) -> None:  # noqa: N802
        """Return entries left in flight by a crash to the queue, then start delivering."""
        super().startService()
        self._scheduler.start()
        if self._processor is not None:
            # Mail that an earlier release HELD for what is now processed.
            d = self._processor.release_held()
            d.addCallbacks(
                lambda count: self._scheduler.wake() if count else None,
                lambda f: _log.warn(
                    "Could not release held mail for list processing: {error}",
                    error=f.getErrorMessage(),
                ),
            )
            self._scheduler.track(d)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        """Stop claiming; fires when the transactions in flight are done and
        recorded.  Entries not yet handed to the sender go back to the queue."""
        super().stopService()
        return self._scheduler.stop()

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
        return defer.Deferred.fromCoroutine(self._router.enqueue(envelope, message))

    # -- one batch ----------------------------------------------------------------

    def delivery_settled(self, max_wait: float) -> defer.Deferred[None]:
        """Fires once delivery has been quiet for a moment (no batch delivering
        copies, none started or finished in the last :data:`DELIVERY_QUIET`
        seconds; at once if so), or after ``max_wait`` seconds at the latest.
        New list-processing mail waits for it before it is stored, so that a
        burst of bounces yields to posts being received and delivered."""
        return defer.Deferred.fromCoroutine(self._settled(max_wait))

    async def _settled(self, max_wait: float) -> None:
        deadline = self._clock.seconds() + max_wait
        while True:
            now = self._clock.seconds()
            if now >= deadline:
                return
            if self._delivering:
                wait = DELIVERY_QUIET
            else:
                wait = self._delivery_seen + DELIVERY_QUIET - now
                if wait <= 0:
                    return
            await task.deferLater(self._clock, min(wait, deadline - now), lambda: None)

    async def _run_batch(self, entries: list[SpoolEntry], just_stored: JustStored | None) -> None:
        """Route the INBOUND entries, deliver the copies, record every result.

        ``just_stored`` comes with entries that routing stored in flight.
        """
        delivering = any(entry.kind is not EntryKind.INBOUND for entry in entries)
        if delivering:
            self._delivering += 1
            self._delivery_seen = self._clock.seconds()
        try:
            await self._run_entries(entries, just_stored)
        finally:
            if delivering:
                self._delivering -= 1
                self._delivery_seen = self._clock.seconds()

    async def _run_entries(self, entries: list[SpoolEntry], just_stored: JustStored | None) -> None:
        updates: list[EntryUpdate] = []
        bounces: list[Bounce] = []
        deliveries: dict[GroupKey, list[SpoolEntry]] = defaultdict(list)
        posts_seen: dict[tuple[int, str, str | None], int] = {}
        to_process: list[SpoolEntry] = []
        for entry in entries:
            if entry.kind is EntryKind.INBOUND and self._router.processes(entry):
                to_process.append(entry)
            elif entry.kind is EntryKind.INBOUND:
                update = await self._router.route(entry, posts_seen)
                if update is None:
                    self._scheduler.note_backlog()  # the copies are QUEUED: claim them next
                else:
                    updates.append(update)
            else:
                deliveries[(entry.message_key, entry.destination.list_address, entry.kind)].append(
                    entry
                )
        groups = [
            defer.Deferred.fromCoroutine(self._copies.deliver_group(key, group, just_stored))
            for key, group in deliveries.items()
        ]
        if to_process:
            # After the copies are handed to the sender: delivery goes first.
            # Mail to one list's sub-address is processed together (a burst
            # of bounces in one registry transaction); the updates are
            # written with the batch's other results, in one transaction.
            processed = await self._processor.process_batch(to_process)
            if len(processed) < len(to_process):
                # Some were stored with their replies, QUEUED: claim them next.
                self._scheduler.note_backlog()
            updates.extend(processed)
        # Copies delivered in this batch, by message: (count, received_at, list).
        delivered: dict[int, list[Any]] = {}
        # Messages the smarthost refused as a whole: the lists and the reply.
        refused: dict[int, list[tuple[MailingList, RecipientResult, SpoolEntry]]] = {}
        watching = self._observer is not NO_OBSERVER
        results = await defer.gatherResults(groups)
        for (key, group), result in zip(deliveries.items(), results, strict=True):
            updates.extend(result.updates)
            bounces.extend(result.bounces)
            if result.refusal is not None and result.mlist is not None:
                refused.setdefault(key[0], []).append((result.mlist, result.refusal, group[0]))
            if watching:
                count = sum(u.state is EntryState.DONE for u in result.updates)
                if count:
                    seen = delivered.setdefault(key[0], [0, group[0].received_at, key[1]])
                    seen[0] += count
        refusals = [self._refusal(key, groups) for key, groups in refused.items()]
        if updates or refusals:
            await self._write_results(updates, refusals)
        if refusals or any(u.state in _PENDING for u in updates):
            # QUEUED or RETRY again (or refusal notices QUEUED): the next claim
            # (or next_due) must see them.  Noted once written: a claim that
            # finished meanwhile, before they were in the spool, clears the note.
            self._scheduler.note_backlog()
        if bounces:
            self._record_bounces(bounces)
        if delivered:
            self._report_latency(delivered)

    def _refusal(
        self, message_key: int, groups: list[tuple[MailingList, RecipientResult, SpoolEntry]]
    ) -> Refusal:
        """The record of a message the smarthost refused as a whole, with the
        notices about it (which the spool stores only the first time)."""
        _, result, entry = groups[0]
        lists = tuple(mlist for mlist, _, _ in groups)
        reason = f"refused as a whole by the smarthost: {result.reply}"
        fields = dict(
            message_id=entry.message_id,
            sender=entry.sender or "<>",
            list=", ".join(m.posting_address for m in lists),
            code=result.code,
            response=result.text,
        )
        _log.error(
            "{message_id} from {sender} to {list} refused as a whole by the smarthost: "
            "{code} {response}; telling the poster and the owners (once per post)",
            **fields,
        )
        try:
            message = self._spool.get_message(message_key)
        except (KeyError, SpoolError) as e:
            _log.warn("{message_id}: cannot read the refused post ({error})", error=e, **fields)
            return Refusal(message_key, reason)
        post = RefusedPost(
            message_key, entry.message_id, entry.sender, lists, result.code, result.reply, message
        )
        try:
            notices = tuple(self._notices.notices(post))
        except Exception:
            _log.failure("{message_id}: writing the refusal notices failed", **fields)
            notices = ()
        return Refusal(message_key, reason, notices)

    def _report_latency(self, delivered: dict[int, list[Any]]) -> None:
        """Tell the observer how long after receipt these posts' copies went out,
        and whether they were the first or the last waiting ones (read from the
        spool once the batch's results are written; two batches finishing one
        message at once may both report it last)."""
        progress = getattr(self._spool, "delivery_progress", None)
        if progress is None:
            if getattr(self._spool, "copy_counts", None) is None:
                return
            progress = self._progress_from_counts
        now = self._clock.seconds()
        for message_key, (count, received_at, list_address) in delivered.items():
            try:
                first, last = progress(message_key, count)
            except SpoolError:
                continue
            self._observer.post_delivered(list_address, now - received_at, first, last)

    def _progress_from_counts(self, message_key: int, delivered: int) -> tuple[bool, bool]:
        """``delivery_progress`` for a spool that only has ``copy_counts``."""
        counts = self._spool.copy_counts(message_key)
        first = counts.get(EntryState.DONE, 0) <= delivered
        return first, not any(counts.get(state, 0) for state in _WAITING)

    async def _write_results(
        self, updates: list[EntryUpdate], refusals: list[Refusal] = ()
    ) -> None:
        """Record a batch's results; with ``refusals``, in the transaction that
        records those refusals and stores their notices (so a crash neither
        loses nor doubles a notice)."""
        delay = 1.0
        for attempt in range(1, _RESULT_WRITE_TRIES + 1):
            try:
                if refusals:
                    await self._spool.store_outgoing((), finish=updates, refusals=refusals)
                else:
                    await self._spool.update(updates)
                return
            except SpoolError as e:
                if attempt == _RESULT_WRITE_TRIES:
                    _log.error(
                        "Could not record {count} delivery results: {error}; those entries "
                        "stay in flight and are sent again when their claim's lease runs out",
                        count=len(updates),
                        error=str(e),
                    )
                    return
                _log.warn(
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
            _log.warn("Could not record {count} bounces: {error}", count=len(bounces), error=str(e))
        if self._on_bounces is not None:
            try:
                self._on_bounces(bounces)
            except Exception:
                _log.failure("Scoring {count} bounces failed", count=len(bounces))

    def _publish_circuit(self, text: str | None) -> None:
        """Record the breaker's state (``None``: closed) for ``mailrelay queue``."""
        d = defer.maybeDeferred(self._spool.set_status, CIRCUIT_STATUS_KEY, text)
        d.addErrback(
            lambda f: _log.warn(
                "Could not record the circuit breaker state: {error}", error=f.getErrorMessage()
            )
        )
        self._scheduler.track(d)


def _resolves(registry: Any, address: str) -> bool:
    """Whether ``address`` is one of the registry's lists or sub-addresses
    (unreadable counts as yes: better no notice than one to a list)."""
    try:
        return registry.resolve(address) is not None
    except Exception:
        return True
