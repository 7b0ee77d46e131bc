"""Held posts: holding them for the owners, the owners' decisions, expiry.

Place in the flow: routing asks :meth:`Moderation.decide` (the rules of
:mod:`mailrelay.listproc.posting`) about each post.  A post to HOLD or
REJECT is handed, with the decision, to the list processor with
:meth:`Moderation.handler`, so that the entry's new state and the mail it
causes are stored in one transaction:

* HOLD: the entry stays in the spool, state HELD, its reason recorded
  (``mailrelay queue`` and ``mailrelay held`` show it), never expanded until
  approved.  A MODERATE token (the post's entry id as its reference, valid
  ``held_post_life``) is stored, and each owner gets one notice with the
  sender, subject, size and reason, from and replying to
  ``LIST-confirm+TOKEN``.
* REJECT (``nonmember_action = reject``): DONE at once, with one reply to the
  poster if loop safety and the daily limit allow.

Deciding: an owner's reply to the notice reaches :meth:`Moderation.confirm`
(the MODERATE action of :class:`~mailrelay.listproc.membership.MembershipRequests`),
which reads ``approve``, ``reject REASON`` or ``discard``
(:func:`~mailrelay.listproc.commands.parse_moderation`); the operator uses
``mailrelay held``, which calls :meth:`approve`, :meth:`reject` and
:meth:`discard` directly.  Approving expands the post into member copies,
delivered as any post; rejecting sends the poster one loop-safe reply;
discarding drops it.  Every decision is logged and recorded on the entry.

Expiry: :class:`HeldPostExpiry` runs :meth:`Moderation.expire` periodically
on the given clock; a post held longer than ``held_post_life`` is discarded
and logged.  Neither the owners (who got the notice already; a flood of
held spam would double their mail) nor the poster (who may be forged) are
told.  Mailman 3 keeps held posts until a moderator acts; an unattended
relay must not keep spam forever.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.errors import MailrelayError
from mailrelay.interfaces import IListMailHandler
from mailrelay.listproc import replies
from mailrelay.listproc._mail import decoded_header, parse_header_block
from mailrelay.listproc.commands import ModerationAction, parse_moderation
from mailrelay.listproc.membership import (
    ActionResult,
    Confirmation,
    SiteDefaults,
    list_templates,
)
from mailrelay.listproc.posting import (
    PostAction,
    PostDecision,
    PostingPolicy,
    poster_addresses,
)
from mailrelay.listproc.processor import Handled, ListMail
from mailrelay.listproc.safety import auto_reply_allowed, autoreply_day
from mailrelay.listproc.tokens import PendingAction, new_pending
from mailrelay.model import EntryKind, EntryState, EntryUpdate, MailingList, SpoolEntry

__all__ = [
    "DEFAULT_HELD_POST_LIFE",
    "HeldPost",
    "HeldPostExpiry",
    "Moderation",
    "NotHeld",
    "is_held_post",
]

_log = Logger()

DEFAULT_HELD_POST_LIFE = 14 * 86400.0
HELD_NOTE = "held for moderation: "
_HEADER_BYTES = 256 * 1024


class NotHeld(MailrelayError):
    """The entry named is not a held post (unknown, already decided, expired,
    or mail of another kind)."""


def is_held_post(entry: SpoolEntry) -> bool:
    """Whether ``entry`` is a post held for moderation: an INBOUND entry to
    the posting address (no sub-address) in state HELD."""
    return (
        entry.kind is EntryKind.INBOUND
        and entry.state is EntryState.HELD
        and entry.destination.subaddress is None
    )


@dataclass(frozen=True)
class HeldPost:
    """One held post as ``mailrelay held`` shows it."""

    entry: SpoolEntry
    poster: str
    subject: str
    size: int

    @property
    def entry_id(self) -> int:
        return self.entry.entry_id

    @property
    def list_address(self) -> str:
        return self.entry.destination.list_address

    @property
    def reason(self) -> str:
        """Why it is held (the note routing recorded)."""
        note = self.entry.last_error
        return note[len(HELD_NOTE) :] if note.startswith(HELD_NOTE) else note


class Moderation:
    """Holds posts and carries out the decisions on them.

    ``spool`` (an ``ISpool``) keeps the held posts; ``registry`` (an
    ``IListRegistry`` and ``IListProcessingStore``) the lists, members and
    tokens; ``clock`` gives the time.  ``site`` are the ``[lists]`` defaults
    (templates, reply limit); ``held_post_life`` is how long a post waits.
    ``wake`` (optional) is called after an approval queued member copies, so
    the runner sends them at once rather than at its next poll.
    """

    def __init__(
        self,
        spool: Any,
        registry: Any,
        *,
        clock: Any,
        site: SiteDefaults | None = None,
        held_post_life: float = DEFAULT_HELD_POST_LIFE,
        wake: Callable[[], None] | None = None,
    ) -> None:
        if not held_post_life > 0:
            raise ValueError(f"held_post_life must be positive, not {held_post_life!r}")
        self._spool = spool
        self._registry = registry
        self._clock = clock
        self._site = site if site is not None else SiteDefaults()
        self._life = float(held_post_life)
        self._policy = PostingPolicy(registry)
        self._deciding: dict[int, defer.DeferredLock] = {}
        self.wake = wake

    @property
    def held_post_life(self) -> float:
        return self._life

    # -- deciding new posts (for routing) ----------------------------------

    def decide(self, mlist: MailingList, sender: str, message: bytes) -> PostDecision:
        """The posting policy's decision on a new post (see :mod:`mailrelay.listproc.posting`)."""
        return self._policy.decide(mlist, sender, message)

    def handler(self, decision: PostDecision) -> _DecidedPost:
        """The ``IListMailHandler`` that carries out a HOLD or REJECT decision
        on the post it is handed."""
        if decision.action not in (PostAction.HOLD, PostAction.REJECT):
            raise ValueError(f"only held and rejected posts are handled here, not {decision!r}")
        return _DecidedPost(self, decision)

    def _hold(self, mail: ListMail, decision: PostDecision) -> Handled:
        mlist = mail.mlist
        address = decision.poster or mlist.subaddress("owner")
        pending = new_pending(
            mlist.posting_address,
            address,
            PendingAction.MODERATE,
            mail.now,
            self._life,
            reference=str(mail.entry.entry_id),
        )
        self._registry.add_pending(pending)
        fields = _fields(mail.entry, reason=decision.reason)
        if not mlist.owners:
            _log.warn(
                "{message_id} from {sender} to {list}: held ({reason}); the list has no "
                "owners to tell, decide with `mailrelay held`",
                **fields,
            )
            return Handled(state=EntryState.HELD, note=HELD_NOTE + decision.reason)
        headers = parse_header_block(mail.message, _HEADER_BYTES)
        notice = replies.build_held_notice(
            mlist,
            pending.token,
            self._templates(mlist),
            poster=decision.poster or mail.sender or "(no sender)",
            subject=decoded_header(headers, "subject") if headers is not None else "",
            size=len(mail.message),
            reason=decision.reason,
            now=mail.now,
        )
        _log.info(
            "{message_id} from {sender} to {list}: held ({reason}); {count} owners told",
            count=len(mlist.owners),
            **fields,
        )
        return Handled(
            (notice.to_spool(mlist.posting_address),),
            EntryState.HELD,
            HELD_NOTE + decision.reason,
        )

    def _reject_new(self, mail: ListMail, decision: PostDecision) -> Handled:
        outgoing = self._rejection(mail.mlist, mail.entry, mail.message, decision.reason, mail.now)
        _log.info(
            "{message_id} from {sender} to {list}: rejected ({reason}), {told}",
            told="poster told" if outgoing else "poster not told",
            **_fields(mail.entry, reason=decision.reason),
        )
        note = f"rejected: {decision.reason}" + ("" if outgoing else " (poster not told)")
        return Handled(outgoing, EntryState.DONE, note)

    # -- the held posts --------------------------------------------------------

    def held_posts(self, list_address: str | None = None) -> list[HeldPost]:
        """The posts held now (of one list, or all), oldest first."""
        found = []
        for entry in self._spool.entries(EntryState.HELD):
            if not is_held_post(entry):
                continue
            if list_address is not None and entry.destination.list_address != list_address:
                continue
            found.append(self._describe(entry))
        return found

    def _describe(self, entry: SpoolEntry) -> HeldPost:
        try:
            message = self._spool.get_message(entry.message_key)
        except KeyError:
            message = b""
        headers = parse_header_block(message, _HEADER_BYTES)
        posters = poster_addresses(entry.sender, headers)
        subject = decoded_header(headers, "subject") if headers is not None else ""
        return HeldPost(entry, posters[0] if posters else "", subject, len(message))

    def _find(self, entry_id: int, list_address: str | None = None) -> SpoolEntry:
        if isinstance(entry_id, bool) or not isinstance(entry_id, int):
            raise NotHeld(f"a held post is named by its entry id, not {entry_id!r}")
        for entry in self._spool.entries(EntryState.HELD):
            if entry.entry_id == entry_id and is_held_post(entry):
                if list_address is None or entry.destination.list_address == list_address:
                    return entry
        raise NotHeld(
            f"entry {entry_id} is not a held post (already decided, expired, "
            "or not a post; see `mailrelay held`)"
        )

    # -- the decisions -------------------------------------------------------

    def approve(self, entry_id: int, *, by: str = "the operator") -> defer.Deferred[str]:
        """Send held post ``entry_id`` to the list's members, as any post.
        Fires with a one-line summary; fails with :class:`NotHeld`."""
        return self._on_held(entry_id, lambda entry: self._approve(entry, by))

    def reject(
        self, entry_id: int, reason: str = "", *, by: str = "the operator"
    ) -> defer.Deferred[str]:
        """Refuse held post ``entry_id``, telling the poster (with ``reason``)
        if loop safety and the daily limit allow.  Fires with a summary."""
        return self._on_held(entry_id, lambda entry: self._reject(entry, reason, by))

    def discard(self, entry_id: int, *, by: str = "the operator") -> defer.Deferred[str]:
        """Drop held post ``entry_id`` without telling anyone.  Fires with a summary."""
        return self._on_held(entry_id, lambda entry: self._discard(entry, by))

    def _on_held(
        self, entry_id: int, act: Callable[[SpoolEntry], Awaitable[str]]
    ) -> defer.Deferred[str]:
        return defer.Deferred.fromCoroutine(self._decide(entry_id, act))

    async def _decide(
        self,
        entry_id: int,
        act: Callable[[SpoolEntry], Awaitable[str]],
        list_address: str | None = None,
    ) -> str:
        """Run ``act`` on held post ``entry_id``, one decision at a time per
        post: a second decision waits for the first and then finds the post
        no longer held (:class:`NotHeld`), so two replies in this process
        never both carry one out."""
        if isinstance(entry_id, bool) or not isinstance(entry_id, int):
            raise NotHeld(f"a held post is named by its entry id, not {entry_id!r}")
        lock = self._deciding.setdefault(entry_id, defer.DeferredLock())
        await lock.acquire()
        try:
            return await act(self._find(entry_id, list_address))
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._deciding.pop(entry_id, None)

    async def _approve(self, entry: SpoolEntry, by: str) -> str:
        list_address = entry.destination.list_address
        members = self._registry.members(list_address, enabled_only=True)
        # Recorded first: should the expansion fail, the post is still held
        # (and can be approved again) but the queue shows who approved it.
        await self._spool.update(
            [EntryUpdate(entry.entry_id, EntryState.HELD, error=f"approved by {by}")]
        )
        ids = await self._spool.expand(entry.entry_id, [m.address for m in members])
        self._forget_tokens(entry)
        if self.wake is not None:
            self.wake()
        _log.info(
            "{message_id} from {sender} to {list}: approved by {by}, {count} copies queued",
            by=by,
            count=len(ids),
            **_fields(entry),
        )
        return f"approved: the post from {entry.sender or '<>'} goes to {len(ids)} members"

    async def _reject(self, entry: SpoolEntry, reason: str, by: str) -> str:
        list_address = entry.destination.list_address
        mlist = self._registry.get_list(list_address)
        try:
            message = self._spool.get_message(entry.message_key)
        except KeyError:
            message = b""
        now = self._clock.seconds()
        outgoing = () if mlist is None else self._rejection(mlist, entry, message, reason, now)
        note = f"rejected by {by}" + (f": {reason}" if reason else "")
        update = EntryUpdate(entry.entry_id, EntryState.DONE, error=note)
        if outgoing:
            await self._spool.store_outgoing(outgoing, [update])
            if self.wake is not None:
                self.wake()
        else:
            await self._spool.update([update])
        self._forget_tokens(entry)
        _log.info(
            "{message_id} from {sender} to {list}: rejected by {by} ({reason}), {told}",
            by=by,
            reason=reason or "no reason given",
            told="poster told" if outgoing else "poster not told",
            **_fields(entry),
        )
        return "rejected: " + ("the poster is told" if outgoing else "the poster is not told")

    async def _discard(self, entry: SpoolEntry, by: str) -> str:
        await self._spool.update(
            [EntryUpdate(entry.entry_id, EntryState.DONE, error=f"discarded by {by}")]
        )
        self._forget_tokens(entry)
        _log.info(
            "{message_id} from {sender} to {list}: discarded by {by}", by=by, **_fields(entry)
        )
        return "discarded"

    def _rejection(
        self, mlist: MailingList, entry: SpoolEntry, message: bytes, reason: str, now: float
    ) -> tuple[Any, ...]:
        """The one reply to the poster of a rejected post, or nothing when
        loop safety or the daily limit forbid answering."""
        refusal = auto_reply_allowed(entry.sender, message, self._is_list_address)
        headers = parse_header_block(message, _HEADER_BYTES)
        posters = poster_addresses(entry.sender, headers)
        if refusal is not None or not posters:
            _log.info(
                "{message_id} to {list}: not telling the poster of the rejection ({why})",
                why=refusal or "no poster address",
                **_fields(entry),
            )
            return ()
        poster = posters[0]
        settings = self._registry.list_settings(mlist.posting_address)
        limit = (
            self._site.max_autoresponses_per_day
            if settings.max_autoresponses_per_day is None
            else settings.max_autoresponses_per_day
        )
        if not self._registry.claim_autoreply(
            mlist.posting_address, poster, autoreply_day(now), limit
        ):
            _log.info(
                "Not answering {recipient} for {list}: {limit} automatic replies today already",
                recipient=poster,
                list=mlist.posting_address,
                limit=limit,
            )
            return ()
        notice = replies.build_reject_notice(
            mlist,
            poster,
            self._templates(mlist),
            subject=decoded_header(headers, "subject") if headers is not None else "",
            reason=reason,
            in_reply_to=entry.message_id,
            now=now,
        )
        return (notice.to_spool(mlist.posting_address),)

    # -- deciding by mail ----------------------------------------------------

    async def confirm(self, confirmation: Confirmation, registry: Any) -> ActionResult:
        """The MODERATE token action: carry out the decision in the owner's
        reply (``approve``, ``reject REASON``, ``discard``) on the held post
        the token names, and answer the owner with the outcome.

        Registered with ``spends_token=True``: the token is handed over
        unspent and dropped only after the decision is recorded in the spool
        (with every other token of the post).  A crash in between leaves the
        post held and the token valid, so the reply, processed again after
        the restart, decides it; a token whose post was decided meanwhile
        finds it no longer held and is dropped.  A reply that decides nothing
        leaves the token as it is, so the owner can still answer properly.
        """
        pending, mail = confirmation.pending, confirmation.mail
        decision = parse_moderation(mail.message)
        by = confirmation.requester or "a reply by mail"
        if decision is None:
            result = "nothing done: the reply's first line was not approve, reject or discard"
        else:
            try:
                result = await self._decide(
                    _entry_id(pending.reference),
                    functools.partial(self._carry_out, decision, by),
                    pending.list_address,
                )
            except NotHeld:
                # Decided (perhaps by this very reply before a crash) or expired.
                registry.discard_pending(pending.token)
                result = "nothing done: the post is no longer held (decided or expired)"
        answer = replies.build_moderation_result(
            mail.mlist,
            confirmation.requester,
            confirmation.templates,
            result=result,
            in_reply_to=mail.entry.message_id,
            now=mail.now,
        )
        return ActionResult((answer,), result)

    async def _carry_out(self, decision: Any, by: str, entry: SpoolEntry) -> str:
        """Carry out an owner's ``decision`` (a parsed moderation reply) on ``entry``."""
        if decision.action is ModerationAction.APPROVE:
            return await self._approve(entry, by)
        if decision.action is ModerationAction.REJECT:
            return await self._reject(entry, decision.reason, by)
        return await self._discard(entry, by)

    # -- expiry --------------------------------------------------------------

    def expire(self) -> defer.Deferred[int]:
        """Discard the posts held longer than ``held_post_life``; fires with how many."""
        return defer.Deferred.fromCoroutine(self._expire())

    async def _expire(self) -> int:
        now = self._clock.seconds()
        expired = [
            entry
            for entry in self._spool.entries(EntryState.HELD)
            if is_held_post(entry) and now - entry.received_at >= self._life
        ]
        if not expired:
            return 0
        note = f"discarded: held longer than held_post_life ({self._life / 86400:g} days)"
        await self._spool.update(
            [EntryUpdate(e.entry_id, EntryState.DONE, error=note) for e in expired]
        )
        for entry in expired:
            _log.info("{message_id} from {sender} to {list}: {note}", note=note, **_fields(entry))
            self._forget_tokens(entry)
        return len(expired)

    # -- helpers -------------------------------------------------------------

    def _forget_tokens(self, entry: SpoolEntry) -> None:
        """Drop the tokens of notices about ``entry``: it is decided."""
        reference = str(entry.entry_id)
        for pending in self._registry.pending(entry.destination.list_address):
            if pending.action is PendingAction.MODERATE and pending.reference == reference:
                self._registry.discard_pending(pending.token)

    def _templates(self, mlist: MailingList) -> Any:
        settings = self._registry.list_settings(mlist.posting_address)
        return list_templates(self._site.template_dir, mlist.posting_address, settings.language)

    def _is_list_address(self, address: str) -> bool:
        return self._registry.resolve(address) is not None


@implementer(IListMailHandler)
class _DecidedPost:
    """Carries out one HOLD or REJECT decision on the post it is handed."""

    def __init__(self, moderation: Moderation, decision: PostDecision) -> None:
        self._moderation = moderation
        self._decision = decision

    def handle(self, mail: ListMail) -> Handled:
        if self._decision.action is PostAction.HOLD:
            return self._moderation._hold(mail, self._decision)
        return self._moderation._reject_new(mail, self._decision)


def _entry_id(reference: str) -> int:
    try:
        return int(reference)
    except ValueError:
        raise NotHeld(f"not a held post's reference: {reference!r}") from None


def _fields(entry: SpoolEntry, **extra: Any) -> dict[str, Any]:
    return dict(
        message_id=entry.message_id,
        sender=entry.sender,
        list=entry.destination.list_address,
        entry_id=entry.entry_id,
        **extra,
    )


class HeldPostExpiry(service.Service):
    """Runs :meth:`Moderation.expire` every ``interval`` seconds on ``clock``
    (and once at start), while the service runs."""

    name = "mailrelay-held-expiry"

    def __init__(self, moderation: Moderation, *, clock: Any, interval: float = 3600.0) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self._moderation = moderation
        self._interval = interval
        self._loop = task.LoopingCall(self._run)
        self._loop.clock = clock

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Any:  # noqa: N802
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _run(self) -> defer.Deferred[None]:
        d = self._moderation.expire()
        # A failure is logged and the loop goes on: the next run tries again.
        d.addErrback(
            lambda f: _log.warn("Could not expire held posts: {error}", error=f.getErrorMessage())
        )
        return d.addCallback(lambda _: None)
