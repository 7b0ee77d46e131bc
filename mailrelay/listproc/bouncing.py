"""Bounce processing: scoring members, disabling, warning and removing them,
and keeping the bounces that name nobody.

Place in the flow: mail to ``LIST-bounces[+MEMBER=DOMAIN]@host`` reaches
:class:`BounceHandler` through the
:class:`~mailrelay.listproc.processor.ListProcessor`; the runner's permanent
SMTP refusals of members reach :meth:`BounceScorer.register_failures` after it
recorded them.  Both go through :meth:`BounceScorer.register`, the one place
the scoring rules live (:func:`score_bounce`).  :class:`BounceWarnings`, a
service on the same clock, sends the warnings and removes members; its state
is the member records in the registry, so a restart loses nothing.

The model and key names are Mailman 3's (site defaults in ``[lists]``, a
list's own settings win):

* A permanent failure adds one to the member's ``bounce_score``, at most once
  per (UTC) day; the score starts again when the last bounce is older than
  ``bounce_info_stale_after``.  Temporary failures are only logged.
* At ``bounce_score_threshold`` delivery is disabled (``disabled_reason``
  ``by_bounces``); the member stays subscribed, and routing, which sends
  posts to ``members(enabled_only=True)``, skips them.
* Every ``bounce_you_are_disabled_warnings_interval`` the member gets one of
  ``bounce_you_are_disabled_warnings`` warnings, each with a fresh re-enable
  token (``-confirm+TOKEN``, :data:`PendingAction.REENABLE`); one interval
  after the last warning the member is removed and, with
  ``bounce_notify_owner_on_removal``, the owners are told.
* With ``bounce_notify_owner_on_disable`` the owners get one notice per
  disable, stored with the first warning (so the member record, which says
  whether that warning went, says whether the owners were told: a restart
  loses none).  With no warnings configured the member is
  removed at the first check, and the removal notice is the only one.
* A bounce naming no address is never dropped: its entry is HELD (kept in the
  spool, ``mailrelay queue --state held``), counted in the log, and copied to
  the owners when ``forward_unrecognized_bounces_to = owners``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.errors import RegistryError, RegistryUnavailable, SpoolError
from mailrelay.interfaces import IBatchListMailHandler
from mailrelay.listproc import replies
from mailrelay.listproc.bounces import MAX_BYTES, parse_bounce
from mailrelay.listproc.membership import ActionResult, Confirmation, list_templates
from mailrelay.listproc.processor import Handled, ListMail
from mailrelay.listproc.safety import autoreply_day
from mailrelay.listproc.tokens import PendingAction, new_pending
from mailrelay.listsettings import ForwardBounces, ListSettings
from mailrelay.logs import BOUNCED
from mailrelay.model import Bounce, DisabledReason, EntryState, MemberRecord, Outgoing

__all__ = [
    "BounceHandler",
    "BounceRules",
    "BounceScorer",
    "BounceWarnings",
    "Scored",
    "reenable_member",
    "score_bounce",
]

_log = Logger()

_DAY = 86400.0
# The owners get at most this much of an unrecognised bounce; the spool keeps it all.
MAX_FORWARDED = 256 * 1024
CHECK_INTERVAL = 3600.0  # Mailman's task runner looks at bounces hourly too


@dataclass(frozen=True)
class BounceRules:
    """The bounce settings in force for one list (Mailman 3's names, shortened)."""

    threshold: int = 5  # bounce_score_threshold
    stale_after: float = 7 * _DAY  # bounce_info_stale_after
    warnings: int = 3  # bounce_you_are_disabled_warnings
    warnings_interval: float = 7 * _DAY  # bounce_you_are_disabled_warnings_interval
    notify_owner_on_disable: bool = True  # bounce_notify_owner_on_disable
    notify_owner_on_removal: bool = True  # bounce_notify_owner_on_removal
    forward_unrecognised: bool = True  # forward_unrecognized_bounces_to = owners

    @classmethod
    def from_site(cls, lists: Any) -> BounceRules:
        """The site's rules from the ``[lists]`` settings (a ``ListsSettings``)."""
        return cls(
            threshold=lists.bounce_score_threshold,
            stale_after=lists.bounce_info_stale_after,
            warnings=lists.bounce_you_are_disabled_warnings,
            warnings_interval=lists.bounce_you_are_disabled_warnings_interval,
            notify_owner_on_disable=lists.bounce_notify_owner_on_disable,
            notify_owner_on_removal=lists.bounce_notify_owner_on_removal,
            forward_unrecognised=lists.forward_unrecognized_bounces_to == ForwardBounces.OWNERS,
        )

    def for_list(self, settings: ListSettings) -> BounceRules:
        """These rules with the list's own settings (those not ``None``) applied."""

        def pick(own: Any, site: Any) -> Any:
            return site if own is None else own

        forward = settings.forward_unrecognized_bounces_to
        return BounceRules(
            threshold=pick(settings.bounce_score_threshold, self.threshold),
            stale_after=pick(settings.bounce_info_stale_after, self.stale_after),
            warnings=pick(settings.bounce_you_are_disabled_warnings, self.warnings),
            warnings_interval=pick(
                settings.bounce_you_are_disabled_warnings_interval, self.warnings_interval
            ),
            notify_owner_on_disable=pick(
                settings.bounce_notify_owner_on_disable, self.notify_owner_on_disable
            ),
            notify_owner_on_removal=pick(
                settings.bounce_notify_owner_on_removal, self.notify_owner_on_removal
            ),
            forward_unrecognised=(
                self.forward_unrecognised if forward is None else forward is ForwardBounces.OWNERS
            ),
        )


class Scored(str, enum.Enum):
    """What one permanent bounce did to a member."""

    NOT_A_MEMBER = "not a member"
    ALREADY_DISABLED = "delivery already disabled"
    SAME_DAY = "already counted today"
    COUNTED = "counted"
    DISABLED = "delivery disabled"


def score_bounce(
    record: MemberRecord, now: float, rules: BounceRules
) -> tuple[Scored, dict[str, Any]]:
    """Mailman 3's scoring of one permanent bounce of ``record`` at ``now``:
    what it does, and the member fields to change (empty: none)."""
    if not record.delivery_enabled:
        # Mailman: a "residual bounce" of a disabled member changes nothing.
        return Scored.ALREADY_DISABLED, {}
    last = record.last_bounce_at
    if last is not None and autoreply_day(last) == autoreply_day(now):
        return Scored.SAME_DAY, {}
    stale = last is not None and now - last > rules.stale_after
    score = 1 if stale else int(record.bounce_score) + 1
    changes: dict[str, Any] = {"bounce_score": float(score), "last_bounce_at": now}
    if score < rules.threshold:
        return Scored.COUNTED, changes
    changes.update(
        delivery_enabled=False,
        disabled_reason=DisabledReason.BY_BOUNCES.value,
        # The first warning goes at the next check; the count starts afresh.
        warnings_sent=0,
        last_warning_at=None,
    )
    return Scored.DISABLED, changes


def reenable_member(registry: Any, list_address: str, address: str) -> MemberRecord | None:
    """Turn delivery to ``address`` back on and clear its bounce score and
    warnings (the bounce history stays); ``None`` if it is not a member."""
    if registry.get_member(list_address, address) is None:
        return None
    return registry.update_member(
        list_address,
        address,
        {
            "delivery_enabled": True,
            "disabled_reason": "",
            "bounce_score": 0.0,
            "warnings_sent": 0,
            "last_warning_at": None,
        },
    )


class BounceScorer:
    """Applies :func:`score_bounce` to the registry's member records.

    ``registry`` provides ``IListProcessingStore``; ``site`` holds the
    ``[lists]`` rules, which each list's settings override.
    """

    def __init__(self, registry: Any, site: BounceRules = BounceRules()) -> None:
        self._registry = registry
        self._site = site

    def rules(self, list_address: str) -> BounceRules:
        """The rules in force for ``list_address``, read afresh (``mailrelay
        lists set`` takes effect without a restart)."""
        return self._site.for_list(self._registry.list_settings(list_address))

    def register(
        self,
        list_address: str,
        address: str,
        now: float,
        reason: str = "",
        rules: BounceRules | None = None,
        *,
        code: int | None = None,
        response: str | None = None,
    ) -> Scored:
        """Count one permanent failure of ``address`` on ``list_address``, and
        log it (event ``bounced``, with the smarthost's ``code`` and
        ``response`` when it refused the member)."""
        smarthost = {} if code is None else {"code": code, "response": response or ""}
        return self.register_many(
            list_address, [(address, reason)], now, rules, log_fields=smarthost
        )[0]

    def register_many(
        self,
        list_address: str,
        failures: Sequence[tuple[str, str]],
        now: float,
        rules: BounceRules | None = None,
        *,
        quiet: bool = False,
        log_fields: dict[str, Any] | None = None,
    ) -> list[Scored]:
        """Count permanent failures ``(address, reason)`` on ``list_address``,
        in order, written in one registry transaction; one result each (a
        second failure of the same member is SAME_DAY, as it would be later).
        Raises before anything is written when the registry fails.  Each
        result is logged (event ``bounced``, plus ``log_fields``); with
        ``quiet`` only a disabling is (the caller logs the others, as the list
        processor does with each bounce's note)."""
        records: dict[str, MemberRecord | None] = {}
        changes: dict[str, dict[str, Any]] = {}
        results: list[Scored] = []
        for address, _ in failures:
            if address not in records:
                records[address] = self._registry.get_member(list_address, address)
            record = records[address]
            if record is None:
                results.append(Scored.NOT_A_MEMBER)
                continue
            if rules is None:
                rules = self.rules(list_address)
            result, change = score_bounce(record, now, rules)
            if change:
                records[address] = replace(record, **change)
                changes.setdefault(address, {}).update(change)
            results.append(result)
        if changes:
            written = self._registry.update_members(list_address, changes)
            for address in changes:
                # Removed meanwhile (by another process): not a member after all.
                records[address] = written.get(address.lower())
        final: list[Scored] = []
        for (address, reason), result in zip(failures, results, strict=True):
            record = records[address]
            if record is None:
                result = Scored.NOT_A_MEMBER
            final.append(result)
            if quiet and result is not Scored.DISABLED:
                continue
            log = _log.warn if result is Scored.DISABLED else _log.info
            log(
                "Bounce of {recipient} on {list} ({reason}): {result}, score {score}",
                event=BOUNCED,
                recipient=address,
                list=list_address,
                reason=reason or "permanent failure",
                result=result.value,
                score=None if record is None else record.bounce_score,
                **(log_fields or {}),
            )
        return final

    def register_failures(self, bounces: Iterable[Bounce]) -> None:
        """Score the permanent SMTP refusals the delivery runner recorded.
        Registry trouble is logged, never raised (delivery goes on)."""
        for bounce in bounces:
            try:
                response = " ".join(bounce.response.split())
                self.register(
                    bounce.list_address,
                    bounce.address,
                    bounce.at,
                    f"refused by the smarthost: {bounce.code} {response}",
                    code=bounce.code,
                    response=response,
                )
            except (RegistryError, RegistryUnavailable) as e:
                _log.warn(
                    "Could not score the bounce of {recipient} on {list}: {error}",
                    recipient=bounce.address,
                    list=bounce.list_address,
                    error=str(e),
                )


@implementer(IBatchListMailHandler)
class BounceHandler:
    """The handler of ``-bounces`` mail.

    Reads each bounce with :func:`~mailrelay.listproc.bounces.parse_bounce`
    (at most ``max_bytes`` of it), scores the permanent failures of members
    through ``scorer``, and keeps what names nobody: HELD, counted, and
    copied to the owners if the list's rules say so.  ``template_dir`` is the
    site's ``[lists] template_dir``.  A batch of bounces of one list
    (:meth:`handle_batch`) is scored in one registry transaction.
    """

    SUBADDRESSES = ("bounces",)

    def __init__(
        self,
        registry: Any,
        scorer: BounceScorer,
        *,
        template_dir: str = "",
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._registry = registry
        self._scorer = scorer
        self._template_dir = template_dir
        self._max_bytes = max_bytes
        self.unrecognised = 0  # since start; each one is also logged with the count

    def handle(self, mail: ListMail) -> Handled:
        return self.handle_batch([mail])[0]

    def handle_batch(self, mails: Sequence[ListMail]) -> list[Handled]:
        """Handle bounces of one list: every member's score is written in one
        registry transaction (see ``IBatchListMailHandler``)."""
        if not mails:
            return []
        list_address = mails[0].mlist.posting_address
        reports = [
            parse_bounce(list_address, mail.recipient, mail.message, self._max_bytes)
            for mail in mails
        ]
        failures = [
            (address, report.how.value)
            for report in reports
            if report.recognised
            for address in sorted(report.permanent)
        ]
        scored = iter(
            # Not quiet: each scored member is its own "bounced" event, which
            # a log shipper follows (README, Logging).
            self._scorer.register_many(
                list_address, failures, mails[0].now, self._scorer.rules(list_address)
            )
            if failures
            else ()
        )
        handled = []
        for mail, report in zip(mails, reports, strict=True):
            if not report.recognised:
                handled.append(self._unrecognised(mail, report.detail))
                continue
            notes = [f"{address}: {next(scored).value}" for address in sorted(report.permanent)]
            for address in sorted(report.temporary):
                _log.info(
                    "{message_id}: temporary failure of {recipient} on {list} ({how}), not counted",
                    message_id=mail.entry.message_id,
                    recipient=address,
                    list=list_address,
                    how=report.how.value,
                )
                notes.append(f"{address}: temporary, not counted")
            handled.append(Handled(note=f"{report.how.value} bounce: " + "; ".join(notes)))
        return handled

    def _unrecognised(self, mail: ListMail, detail: str) -> Handled:
        mlist = mail.mlist
        self.unrecognised += 1
        rules = self._scorer.rules(mlist.posting_address)
        forward = rules.forward_unrecognised and bool(mlist.owners)
        if forward and _is_forwarded_copy(mail.message):
            # The bounce of our own copy to an owner: forwarding it would loop.
            forward = False
            detail += "; a bounce of a forwarded bounce, not forwarded again"
        _log.warn(
            "{message_id} to {recipient}: unrecognised bounce ({detail}); kept held, "
            "{forwarded} (unrecognised bounces since start: {count})",
            message_id=mail.entry.message_id,
            recipient=mail.recipient,
            list=mlist.posting_address,
            detail=detail,
            forwarded="copied to the owners" if forward else "not forwarded",
            count=self.unrecognised,
        )
        note = f"unrecognised bounce: {detail}"
        if not forward:
            return Handled(state=EntryState.HELD, note=note)
        settings = self._registry.list_settings(mlist.posting_address)
        copy = replies.build_unrecognised_bounce(
            mlist,
            mail.message,
            list_templates(self._template_dir, mlist.posting_address, settings.language),
            recipient=mail.recipient,
            reason=detail,
            max_attached=MAX_FORWARDED,
            now=mail.now,
        )
        return Handled(
            (copy.to_spool(mlist.posting_address),),
            state=EntryState.HELD,
            note=note + "; copied to the owners",
        )


def _is_forwarded_copy(message: bytes) -> bool:
    head = bytes(message[:MAX_BYTES]).lower()
    return replies.UNRECOGNISED_MARK.lower().encode() + b":" in head


class ReenableAction:
    """Confirms a :data:`PendingAction.REENABLE` token (the one in a bounce
    warning): delivery on again, score and warnings cleared, and a short notice.
    For :meth:`~mailrelay.listproc.membership.MembershipRequests.add_action`."""

    def __call__(self, confirmation: Confirmation, registry: Any) -> ActionResult:
        pending = confirmation.pending
        record = reenable_member(registry, pending.list_address, pending.address)
        if record is None:
            # Removed meanwhile: nothing to turn on, and nothing said about membership.
            return ActionResult((), "not a member any more")
        _log.info(
            "{recipient} re-enabled delivery on {list} by token",
            recipient=pending.address,
            list=pending.list_address,
        )
        mail = confirmation.mail
        notice = replies.build_reenabled(
            mail.mlist,
            pending.address,
            confirmation.templates,
            in_reply_to=mail.entry.message_id,
            now=mail.now,
        )
        return ActionResult((notice,), "delivery enabled")


class BounceWarnings(service.Service):
    """Sends the warnings to members disabled by bounces and removes them
    after the last one, every ``interval`` seconds on ``clock`` (and once at
    start, so a restart catches up at once).

    ``registry`` provides ``IListRegistry`` and ``IListProcessingStore``;
    ``spool`` (an ``ISpool``) stores the messages; ``wake`` (optional) is
    called after storing them, so the runner sends them at once.  A message is
    stored before the member record says it was sent, so a crash in between
    repeats a warning rather than losing one.
    """

    name = "mailrelay-bounce-warnings"

    def __init__(
        self,
        registry: Any,
        spool: Any,
        scorer: BounceScorer,
        *,
        clock: Any,
        template_dir: str = "",
        interval: float = CHECK_INTERVAL,
        wake: Any = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self._registry = registry
        self._spool = spool
        self._scorer = scorer
        self._clock = clock
        self._template_dir = template_dir
        self._interval = interval
        self._wake = wake
        self._loop: task.LoopingCall | None = None
        self._running_check: defer.Deferred[Any] | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        pending = self._running_check
        if pending is None:
            return defer.succeed(None)
        # Let a check in progress finish its writes before the stores close.
        done: defer.Deferred[None] = defer.Deferred()
        pending.addBoth(lambda _: done.callback(None))
        return done

    def _tick(self) -> defer.Deferred[Any]:
        d = defer.Deferred.fromCoroutine(self._check_logged())
        self._running_check = d

        def finished(result: Any) -> Any:
            self._running_check = None
            return result

        return d.addBoth(finished)

    async def _check_logged(self) -> None:
        try:
            await self.check()
        except (RegistryUnavailable, SpoolError) as e:
            _log.warn("Bounce warnings: cannot check now ({error}); next check later", error=str(e))
        except Exception:
            _log.failure("Bounce warnings: the check failed")

    def check(self) -> defer.Deferred[int]:
        """Send the warnings and make the removals due now; fires with how
        many members were warned or removed."""
        return defer.Deferred.fromCoroutine(self._check())

    async def _check(self) -> int:
        now = self._clock.seconds()
        done = 0
        for mlist in self._registry.lists():
            rules = self._scorer.rules(mlist.posting_address)
            due = [
                record
                for record in self._registry.member_records(mlist.posting_address)
                if _due(record, now, rules)
            ]
            if due:
                done += await self._act(mlist, due, now, rules)
        return done

    async def _act(
        self, mlist: Any, due: list[MemberRecord], now: float, rules: BounceRules
    ) -> int:
        list_address = mlist.posting_address
        settings = self._registry.list_settings(list_address)
        templates = list_templates(self._template_dir, list_address, settings.language)
        outgoing: list[Outgoing] = []
        warned: list[MemberRecord] = []
        removed: list[MemberRecord] = []
        told: list[str] = []  # owners told of the disable
        for record in due:
            if record.warnings_sent >= rules.warnings:
                removed.append(record)
                if rules.notify_owner_on_removal and mlist.owners:
                    notice = replies.build_removal_notice(
                        mlist,
                        record.address,
                        templates,
                        reason=f"delivery was disabled by bounces and {record.warnings_sent} "
                        "warnings went unanswered",
                        now=now,
                    )
                    outgoing.append(notice.to_spool(list_address))
                continue
            number = record.warnings_sent + 1
            # Valid until the member would be removed: every warning's token works.
            lifetime = (rules.warnings - number + 1) * rules.warnings_interval
            pending = new_pending(
                list_address, record.address, PendingAction.REENABLE, now, lifetime
            )
            self._registry.add_pending(pending)
            warning = replies.build_disabled_warning(
                mlist,
                record.address,
                pending.token,
                templates,
                warnings_left=rules.warnings - number,
                now=now,
            )
            outgoing.append(warning.to_spool(list_address))
            warned.append(record)
            if number == 1 and rules.notify_owner_on_disable and mlist.owners:
                # The first warning of this disable: the owners hear of it once.
                notice = replies.build_disabled_notice(
                    mlist,
                    record.address,
                    templates,
                    reason=_disabled_reason(record, rules),
                    now=now,
                )
                outgoing.append(notice.to_spool(list_address))
                told.append(record.address)
        if outgoing:
            await self._spool.store_outgoing(outgoing, [])
        for record in warned:
            self._registry.update_member(
                list_address,
                record.address,
                {"warnings_sent": record.warnings_sent + 1, "last_warning_at": now},
            )
            _log.info(
                "Bounce warning {number} of {total} sent to {recipient} on {list}{told}",
                number=record.warnings_sent + 1,
                total=rules.warnings,
                recipient=record.address,
                list=list_address,
                told=", owners told of the disable" if record.address in told else "",
            )
        if removed:
            self._registry.remove_members(list_address, [r.address for r in removed])
            for record in removed:
                _log.warn(
                    "Removed {recipient} from {list}: disabled by bounces, {count} warnings "
                    "unanswered{told}",
                    recipient=record.address,
                    list=list_address,
                    count=record.warnings_sent,
                    told=", owners told" if rules.notify_owner_on_removal else "",
                )
        if outgoing and self._wake is not None:
            self._wake()
        return len(warned) + len(removed)


def _disabled_reason(record: MemberRecord, rules: BounceRules) -> str:
    """Why ``record`` was disabled, for the owners' notice."""
    when = ""
    if record.last_bounce_at is not None:
        when = time.strftime(", the last on %Y-%m-%d", time.gmtime(record.last_bounce_at))
    return (
        f"bounce score {record.bounce_score:g} reached the threshold of {rules.threshold}"
        f"{when}; {rules.warnings} warnings go to the member, "
        f"{rules.warnings_interval / _DAY:g} days apart"
    )


def _due(record: MemberRecord, now: float, rules: BounceRules) -> bool:
    """Whether a warning or the removal of ``record`` is due at ``now``."""
    if record.delivery_enabled or record.disabled_reason != DisabledReason.BY_BOUNCES.value:
        return False
    return record.last_warning_at is None or now >= record.last_warning_at + rules.warnings_interval
