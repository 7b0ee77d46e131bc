"""Commands and confirmations by mail: ``-join``, ``-leave``, ``-request`` and ``-confirm+TOKEN``.

Place in the flow: the :class:`~mailrelay.listproc.processor.ListProcessor`
hands each message to one of these sub-addresses to :class:`MembershipRequests`,
which reads it with the pure building blocks (:mod:`~mailrelay.listproc.safety`,
:mod:`~mailrelay.listproc.commands`, :mod:`~mailrelay.listproc.tokens`,
:mod:`~mailrelay.listproc.replies`), changes the registry (pending
confirmations, members) and returns the replies for the processor to store.

The rules (issue 12, section 1, and Mailman 3 where it is silent):

* Mail that must not be answered (``auto_reply_allowed``: null sender,
  ``Auto-Submitted``, bulk ``Precedence``, ``List-Id``, a list or daemon
  sender) is not acted on at all: an auto-responder answering a
  confirmation request must not confirm it.
* The requester is the ``From:`` address, else the envelope sender.
* Double opt-in: a join or leave creates a pending confirmation (a fresh
  token bound to list, address and action, valid ``pending_request_life``)
  and sends the confirmation request to the address itself, never to a third
  party.  A leave is treated the same whether or not the address is a member
  (request, token and texts alike), so nothing reveals membership.
* ``-confirm+TOKEN`` (any content) or ``confirm TOKEN`` to ``-request``
  spends the token once: a join subscribes, a leave unsubscribes, and the
  address gets the welcome or goodbye text.  Forged, expired, used and
  other-list tokens change nothing and get one short neutral reply.
* At most ``max_autoresponses_per_day`` messages per address, list and day;
  beyond that, silence (the request is still carried out, minus the
  confirmation requests that could not be sent).

Other features confirm their own kinds of token here: pass ``actions``
(:class:`~mailrelay.listproc.tokens.PendingAction` → :data:`ConfirmAction`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.addresses import is_valid_mailbox
from mailrelay.errors import RegistryError
from mailrelay.interfaces import IListMailHandler
from mailrelay.listproc import replies
from mailrelay.listproc._mail import header_addresses, parse_prefix
from mailrelay.listproc.commands import (
    CommandKind,
    CommandResult,
    Outcome,
    immediate_outcome,
    parse_commands,
)
from mailrelay.listproc.processor import Handled, ListMail, service_address
from mailrelay.listproc.safety import auto_reply_allowed, autoreply_day, is_daemon_address
from mailrelay.listproc.templating import Templates
from mailrelay.listproc.tokens import Pending, PendingAction, check_pending, is_token, new_pending
from mailrelay.model import Member, Outgoing

__all__ = [
    "ActionResult",
    "ConfirmAction",
    "Confirmation",
    "MembershipRequests",
    "SiteDefaults",
    "list_templates",
]

_log = Logger()

# Expired confirmations are purged at most this often (a write each time).
_PURGE_INTERVAL = 3600.0
_HEADER_BYTES = 256 * 1024
_ACTIONS = {CommandKind.JOIN: PendingAction.JOIN, CommandKind.LEAVE: PendingAction.LEAVE}


@dataclass(frozen=True)
class SiteDefaults:
    """The site's ``[lists]`` values, which a list's own settings override."""

    pending_request_life: float = 3 * 86400.0
    max_autoresponses_per_day: int = 10
    # The operator's templates: LANG/NAME.txt, lists/LIST/LANG/NAME.txt ("" for none).
    template_dir: str = ""


def list_templates(template_dir: str, list_address: str, language: str) -> Templates:
    """Where a list's reply texts come from: its own directory under
    ``template_dir``, then the site's, then the shipped ones; in ``language``
    (English if that is no language code)."""
    directories: tuple[str, ...] = ()
    if template_dir:
        directories = (os.path.join(template_dir, "lists", list_address), template_dir)
    try:
        return Templates(directories, language)
    except ValueError:
        return Templates(directories)


@dataclass(frozen=True)
class Confirmation:
    """A token just spent, handed to the action it confirms.

    ``requester`` sent the confirming mail (which may come from another
    address than ``pending.address``); ``mail`` is that mail.
    """

    pending: Pending
    mail: ListMail
    requester: str
    templates: Templates


@dataclass(frozen=True)
class ActionResult:
    """What confirming did: the messages to send (built by
    :mod:`mailrelay.listproc.replies`) and a note for the log and the queue."""

    replies: tuple[replies.Outgoing, ...] = ()
    note: str = ""


# Carries out a confirmed token; may return a value, a Deferred or a coroutine.
ConfirmAction = Callable[[Confirmation, Any], "ActionResult | Awaitable[ActionResult]"]


@dataclass
class _Session:
    """One message being handled: what it needs and the replies so far."""

    mail: ListMail
    requester: str
    templates: Templates
    lifetime: float
    limit: int
    outgoing: list[Outgoing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def list_address(self) -> str:
        return self.mail.mlist.posting_address

    @property
    def in_reply_to(self) -> str:
        return self.mail.entry.message_id


@implementer(IListMailHandler)
class MembershipRequests:
    """The handler of ``-join``, ``-leave``, ``-request`` and ``-confirm`` mail.

    ``registry`` provides ``IListRegistry`` and ``IListProcessingStore``;
    ``site`` the ``[lists]`` defaults.  ``actions`` adds the actions other
    features confirm by token (join and leave are built in).
    """

    SUBADDRESSES = ("confirm", "join", "leave", "request")

    def __init__(
        self,
        registry: Any,
        *,
        site: SiteDefaults = SiteDefaults(),
        actions: Mapping[PendingAction, ConfirmAction] | None = None,
    ) -> None:
        self._registry = registry
        self._site = site
        self._actions: dict[PendingAction, ConfirmAction] = {
            PendingAction.JOIN: self._confirm_join,
            PendingAction.LEAVE: self._confirm_leave,
        }
        self._actions.update(actions or {})
        self._spends_own_token: set[PendingAction] = set()
        self._last_purge: float | None = None

    def add_action(
        self, action: PendingAction, confirm: ConfirmAction, *, spends_token: bool = False
    ) -> None:
        """Let tokens of ``action`` be confirmed through ``-confirm`` and ``confirm TOKEN``.

        Normally the token is spent (atomically: of two confirmations racing,
        one wins) before ``confirm`` runs.  With ``spends_token`` it is handed
        over unspent and ``confirm`` spends it once its own work is recorded,
        so that a crash in between leaves the token valid and the confirming
        mail, processed again after the restart, carries the work out (for
        work that lives in another store than the token, such as a held post
        in the spool).  Such an action must be safe to run twice."""
        action = PendingAction(action)
        self._actions[action] = confirm
        if spends_token:
            self._spends_own_token.add(action)
        else:
            self._spends_own_token.discard(action)

    # -- IListMailHandler ----------------------------------------------------

    async def handle(self, mail: ListMail) -> Handled:
        mlist = mail.mlist
        refusal = auto_reply_allowed(mail.sender, mail.message, self._is_list_address)
        if refusal is not None:
            _log.info(
                "{message_id} to {to}: not acted on and not answered ({reason})",
                message_id=mail.entry.message_id,
                list=mlist.posting_address,
                subaddress=mail.subaddress,
                to=service_address(mail.entry.destination),
                reason=refusal,
            )
            return Handled(note=f"ignored, not answered: {refusal}")
        self._purge_expired(mail.now)
        settings = self._registry.list_settings(mlist.posting_address)
        session = _Session(
            mail,
            requester=self._requester(mail),
            templates=list_templates(
                self._site.template_dir, mlist.posting_address, settings.language
            ),
            lifetime=settings.pending_request_life or self._site.pending_request_life,
            limit=(
                self._site.max_autoresponses_per_day
                if settings.max_autoresponses_per_day is None
                else settings.max_autoresponses_per_day
            ),
        )
        if mail.subaddress in ("join", "leave"):
            action = _ACTIONS[CommandKind(mail.subaddress)]
            self._request_confirmation(session, action, session.requester)
        elif mail.subaddress == "confirm":
            if await self._confirm(session, mail.suffix) is None:
                self._send(
                    session,
                    replies.build_token_rejected(
                        mlist,
                        session.requester,
                        session.templates,
                        in_reply_to=session.in_reply_to,
                        now=mail.now,
                    ),
                )
        elif mail.subaddress == "request":
            await self._commands(session)
        else:
            raise RegistryError(f"no membership requests at -{mail.subaddress}")
        return Handled(tuple(session.outgoing), note="; ".join(session.notes))

    # -- the requests ----------------------------------------------------------

    def _request_confirmation(self, session: _Session, action: PendingAction, address: str) -> bool:
        """Ask ``address`` to confirm ``action``; whether a request was sent."""
        mail = session.mail
        if not self._claim(session, address):
            session.notes.append(f"{action.value} {address}: daily reply limit reached")
            return False
        pending = new_pending(session.list_address, address, action, mail.now, session.lifetime)
        self._registry.add_pending(pending)
        outgoing = replies.build_confirmation(
            mail.mlist,
            address,
            action,
            pending.token,
            session.templates,
            in_reply_to=session.in_reply_to,
            now=mail.now,
        )
        session.outgoing.append(outgoing.to_spool(session.list_address))
        session.notes.append(f"{action.value} {address}: confirmation requested")
        return True

    async def _confirm(self, session: _Session, token: str) -> ActionResult | None:
        """Spend ``token`` and carry out its action; ``None`` if it cannot be
        used (the caller answers neutrally)."""
        mail = session.mail
        token = token.strip().lower()
        found = self._registry.get_pending(token) if is_token(token) else None
        reason = check_pending(found, session.list_address, mail.now, tuple(self._actions))
        pending = None
        if reason is None and found is not None and found.action in self._spends_own_token:
            pending = found  # the action spends it once its work is recorded
        elif reason is None:
            # Spent atomically: of two confirmations racing, one wins.
            pending = self._registry.consume_pending(session.list_address, token, mail.now)
            if pending is None:
                reason = "unknown or already used token"
        if pending is None:
            session.notes.append(f"confirm: {reason}")
            return None
        result = self._actions[pending.action](
            Confirmation(pending, mail, session.requester, session.templates), self._registry
        )
        if inspect.isawaitable(result):
            result = await result
        for outgoing in result.replies:
            self._send(session, outgoing)
        session.notes.append(f"confirm {pending.action.value} {pending.address}: {result.note}")
        return result

    async def _commands(self, session: _Session) -> None:
        mail = session.mail
        parsed = parse_commands(mail.message)
        results = []
        for command in parsed.commands:
            outcome = immediate_outcome(command)
            address = ""
            if outcome is None and command.kind in (CommandKind.JOIN, CommandKind.LEAVE):
                address = command.target(session.requester)
                problem = self._cannot_subscribe(address)
                if problem:
                    command, outcome = replace(command, error=problem), Outcome.INVALID
                else:
                    action = (
                        PendingAction.JOIN
                        if command.kind is CommandKind.JOIN
                        else PendingAction.LEAVE
                    )
                    # Reported the same whether or not the request could be
                    # sent (daily limit): the limit is silent.
                    self._request_confirmation(session, action, address)
                    outcome = Outcome.CONFIRMATION_SENT
            elif outcome is None and command.kind is CommandKind.CONFIRM:
                confirmed = await self._confirm(session, command.token or "")
                outcome = Outcome.TOKEN_REJECTED if confirmed is None else Outcome.CONFIRMED
            results.append(CommandResult(command, outcome or Outcome.INVALID, address))
        session.notes.insert(0, f"{len(results)} commands")
        self._send(
            session,
            replies.build_command_results(
                mail.mlist,
                session.requester,
                parsed,
                results,
                session.templates,
                in_reply_to=session.in_reply_to,
                now=mail.now,
            ),
        )

    # -- the built-in actions ----------------------------------------------------

    def _confirm_join(self, confirmation: Confirmation, registry: Any) -> ActionResult:
        pending = confirmation.pending
        already = registry.add_members(pending.list_address, [Member(pending.address)])
        welcome = _to_address(confirmation, replies.build_welcome)
        return _changed(pending, "joined", welcome, "already a member" if already else "subscribed")

    def _confirm_leave(self, confirmation: Confirmation, registry: Any) -> ActionResult:
        pending = confirmation.pending
        missing = registry.remove_members(pending.list_address, [pending.address])
        # The same goodbye for a non-member: confirming reveals nothing either.
        goodbye = _to_address(confirmation, replies.build_goodbye)
        return _changed(pending, "left", goodbye, "was not a member" if missing else "unsubscribed")

    # -- helpers -------------------------------------------------------------

    def _send(self, session: _Session, outgoing: replies.Outgoing) -> None:
        """Keep ``outgoing`` for the recipients still under the daily limit."""
        allowed = tuple(r for r in outgoing.recipients if self._claim(session, r))
        if len(allowed) != len(outgoing.recipients):
            session.notes.append(
                "daily reply limit reached for "
                + ", ".join(r for r in outgoing.recipients if r not in allowed)
            )
        if allowed:
            session.outgoing.append(outgoing.to_spool(session.list_address, allowed))

    def _claim(self, session: _Session, address: str) -> bool:
        allowed = self._registry.claim_autoreply(
            session.list_address, address, autoreply_day(session.mail.now), session.limit
        )
        if not allowed:
            _log.info(
                "Not answering {recipient} for {list}: {limit} automatic replies today already",
                recipient=address,
                list=session.list_address,
                limit=session.limit,
            )
        return allowed

    def _requester(self, mail: ListMail) -> str:
        """The ``From:`` address (Mailman's rule), else the envelope sender."""
        headers = parse_prefix(mail.message, _HEADER_BYTES)
        for address in header_addresses(headers, "from"):
            if is_valid_mailbox(address):
                return address
        return mail.sender.lower()

    def _cannot_subscribe(self, address: str) -> str:
        if self._is_list_address(address) or is_daemon_address(address):
            return f"{address} is a list or service address"
        return ""

    def _is_list_address(self, address: str) -> bool:
        return self._registry.resolve(address) is not None

    def _purge_expired(self, now: float) -> None:
        if self._last_purge is not None and now - self._last_purge < _PURGE_INTERVAL:
            return
        self._last_purge = now
        count = self._registry.purge_pending(now)
        if count:
            _log.info("Purged {count} expired confirmation requests", count=count)


def _to_address(confirmation: Confirmation, build: Callable[..., Any]) -> replies.Outgoing:
    """The text ``build`` makes for the confirmed address, answering the confirming mail."""
    mail = confirmation.mail
    return build(
        mail.mlist,
        confirmation.pending.address,
        confirmation.templates,
        in_reply_to=mail.entry.message_id,
        now=mail.now,
    )


def _changed(pending: Pending, verb: str, reply: replies.Outgoing, note: str) -> ActionResult:
    _log.info(
        "{address} {verb} {list} ({note})",
        address=pending.address,
        verb=verb,
        list=pending.list_address,
        note=note,
    )
    return ActionResult((reply,), note)
