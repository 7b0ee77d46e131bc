"""The messages mailrelay writes itself: replies, confirmation requests and notices.

Each builder turns a list, an address and the facts of the case into an
:class:`Outgoing`: an :class:`email.message.EmailMessage` plus the envelope
to send it with.  The envelope sender is always the list's ``-bounces``
address, so a bounce of mailrelay's own mail comes back to bounce processing
and never to a person or a list.  Texts come from
:mod:`mailrelay.listproc.templating`.  Nothing here sends mail or reads
storage; the caller has already checked :mod:`mailrelay.listproc.safety`.

Every message carries ``Auto-Submitted: auto-replied`` when it answers a
message (``in_reply_to`` is that message's Message-ID, "" if it had none;
RFC 3834) or ``auto-generated`` otherwise,
``Precedence: bulk`` (as Mailman's notifications do), and
``X-Auto-Response-Suppress: All`` so vacation responders stay quiet: an
automatic answer to a confirmation request must not confirm it.  None is
ever addressed to the list or its sub-addresses, and none reveals whether an
address is a member.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid

from mailrelay.addresses import resolve_recipient
from mailrelay.listproc.commands import CommandKind, CommandResult, Outcome, ParsedCommands
from mailrelay.listproc.templating import Templates
from mailrelay.listproc.tokens import PendingAction
from mailrelay.model import MailingList
from mailrelay.model import Outgoing as StoredOutgoing

__all__ = [
    "Outgoing",
    "build_command_results",
    "build_confirmation",
    "build_disabled_warning",
    "build_goodbye",
    "build_held_notice",
    "build_moderation_result",
    "build_reenabled",
    "build_reject_notice",
    "build_disabled_notice",
    "build_removal_notice",
    "build_token_rejected",
    "build_unrecognised_bounce",
    "build_welcome",
    "confirm_address",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MESSAGE_ID = re.compile(r"<[^<>\s]{1,250}>\Z")


@dataclass(frozen=True, eq=False)
class Outgoing:
    """A message to send: envelope ``sender`` (the list's ``-bounces``),
    envelope ``recipients``, and the ``message``.  ``recipients`` is empty
    for an owner notice of a list without owners (nothing to send)."""

    sender: str
    recipients: tuple[str, ...]
    message: EmailMessage

    def as_bytes(self) -> bytes:
        """The message as bytes with CRLF line ends, for the spool or DATA."""
        return self.message.as_bytes(policy=policy.SMTP)

    def to_spool(
        self, list_address: str, recipients: Sequence[str] | None = None
    ) -> StoredOutgoing:
        """The message as the spool stores it (bytes, sent exactly as written),
        to ``recipients`` (default: all of them)."""
        return StoredOutgoing(
            self.sender,
            tuple(self.recipients if recipients is None else recipients),
            self.as_bytes(),
            list_address,
            message_id=str(self.message.get("Message-ID", "")),
        )


def confirm_address(mlist: MailingList, token: str) -> str:
    """``LIST-confirm+TOKEN@domain``: replying to it confirms ``token``."""
    return f"{mlist.local_part}-confirm+{token}@{mlist.domain}"


# -- the builders ---------------------------------------------------------------


def build_command_results(
    mlist: MailingList,
    requester: str,
    parsed: ParsedCommands,
    results: Sequence[CommandResult],
    templates: Templates,
    *,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The reply to a ``-request`` message: each command read and its result,
    the lines left unread, then the help text (the issue's order)."""
    values = _list_values(mlist)
    blocks = []
    for result in results:
        blocks.append(
            f"> {result.command.line}\n{_indent(_outcome_text(result, templates, values))}"
        )
    unprocessed = ""
    if parsed.unprocessed:
        lines = "\n".join(f"    {line}" for line in parsed.unprocessed)
        unprocessed = templates.render("unprocessed", {**values, "lines": lines}).body
    return _from_template(
        mlist,
        templates,
        "results",
        {
            "results": "\n".join(blocks) if blocks else "(no commands found)\n",
            "unprocessed": unprocessed,
            "help": templates.render("help", values).body,
        },
        to=requester,
        from_=mlist.subaddress("request"),
        fallback_subject="The results of your email commands",
        in_reply_to=in_reply_to,
        now=now,
    )


def build_confirmation(
    mlist: MailingList,
    address: str,
    action: PendingAction,
    token: str,
    templates: Templates,
    *,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The confirmation request for a join or leave, sent to ``address`` (the
    address the request is about, never a third party): From and Reply-To
    ``LIST-confirm+TOKEN@domain``, Subject ``confirm TOKEN``."""
    action = PendingAction(action)
    if action not in (PendingAction.JOIN, PendingAction.LEAVE):
        raise ValueError(f"a confirmation request is for join or leave, not {action.value}")
    return _from_template(
        mlist,
        templates,
        "confirm-join" if action is PendingAction.JOIN else "confirm-leave",
        {"address": address, "token": token},
        to=address,
        from_=confirm_address(mlist, token),
        reply_to=confirm_address(mlist, token),
        subject=f"confirm {token}",  # what a reply to -request must carry
        in_reply_to=in_reply_to,
        now=now,
    )


def build_token_rejected(
    mlist: MailingList,
    address: str,
    templates: Templates,
    *,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The short neutral reply to mail for ``-confirm+TOKEN`` with a token that
    is forged, expired, used or another list's (one text for all)."""
    return _from_template(
        mlist,
        templates,
        "token-rejected",
        {},
        to=address,
        from_=mlist.subaddress("request"),
        fallback_subject="Your confirmation",
        in_reply_to=in_reply_to,
        now=now,
    )


def build_welcome(
    mlist: MailingList,
    address: str,
    templates: Templates,
    *,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The welcome sent to a new member."""
    return _to_member(mlist, templates, "welcome", address, in_reply_to, now)


def build_goodbye(
    mlist: MailingList,
    address: str,
    templates: Templates,
    *,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The notice sent to an address that has left the list."""
    return _to_member(mlist, templates, "goodbye", address, in_reply_to, now)


def build_held_notice(
    mlist: MailingList,
    token: str,
    templates: Templates,
    *,
    poster: str,
    subject: str,
    size: int,
    reason: str,
    now: float | None = None,
) -> Outgoing:
    """The notice to the list's owners of one held post: sender, subject,
    size and why it was held.  From and Reply-To ``-confirm+TOKEN``, so a
    reply saying ``approve``, ``reject REASON`` or ``discard`` acts on it.
    The post itself is not attached (held mail is often spam)."""
    values = {
        "poster": _one_line(poster),
        "subject": _one_line(subject) or "(no subject)",
        "size": size,
        "reason": _one_line(reason),
    }
    return _from_template(
        mlist,
        templates,
        "held-notice",
        values,
        to=mlist.owners,
        from_=confirm_address(mlist, token),
        reply_to=confirm_address(mlist, token),
        fallback_subject=f"A post to {mlist.posting_address} needs approval",
        in_reply_to=None,
        now=now,
    )


def build_reject_notice(
    mlist: MailingList,
    poster: str,
    templates: Templates,
    *,
    subject: str,
    reason: str,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The one reply to the poster of a rejected post, with the reason."""
    values = {
        "subject": _one_line(subject) or "(no subject)",
        "reason": _one_line(reason) or "(none given)",
    }
    return _from_template(
        mlist,
        templates,
        "reject",
        values,
        to=poster,
        from_=mlist.subaddress("owner"),
        fallback_subject="Your post was not accepted",
        in_reply_to=in_reply_to,
        now=now,
    )


def build_moderation_result(
    mlist: MailingList,
    address: str,
    templates: Templates,
    *,
    result: str,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The answer to an owner's reply to a held-post notice: what was done
    (``result``, one line), or why nothing was."""
    return _from_template(
        mlist,
        templates,
        "moderation-result",
        {"result": _one_line(result)},
        to=address,
        from_=mlist.subaddress("owner"),
        fallback_subject=f"Your moderation decision for {mlist.posting_address}",
        in_reply_to=in_reply_to,
        now=now,
    )


def build_disabled_warning(
    mlist: MailingList,
    address: str,
    token: str,
    templates: Templates,
    *,
    warnings_left: int,
    now: float | None = None,
) -> Outgoing:
    """The warning to a member whose delivery bounces disabled, with a
    re-enable token: From and Reply-To ``-confirm+TOKEN``."""
    return _from_template(
        mlist,
        templates,
        "disabled-warning",
        {"address": address, "token": token, "warnings_left": warnings_left},
        to=address,
        from_=confirm_address(mlist, token),
        reply_to=confirm_address(mlist, token),
        fallback_subject=f"Your membership in {mlist.posting_address} is disabled",
        in_reply_to=None,
        now=now,
    )


def build_disabled_notice(
    mlist: MailingList,
    address: str,
    templates: Templates,
    *,
    reason: str,
    now: float | None = None,
) -> Outgoing:
    """The notice to the owners that bounces disabled delivery to ``address``
    (Mailman 3's ``bounce_notify_owner_on_disable``)."""
    return _from_template(
        mlist,
        templates,
        "disabled-owner",
        {"address": address, "reason": _one_line(reason)},
        to=mlist.owners,
        from_=mlist.subaddress("owner"),
        fallback_subject=f"Delivery to {address} disabled on {mlist.posting_address}",
        in_reply_to=None,
        now=now,
    )


def build_removal_notice(
    mlist: MailingList,
    address: str,
    templates: Templates,
    *,
    reason: str,
    now: float | None = None,
) -> Outgoing:
    """The notice to the owners that ``address`` was removed (e.g. after the
    last bounce warning)."""
    return _from_template(
        mlist,
        templates,
        "removed-owner",
        {"address": address, "reason": _one_line(reason)},
        to=mlist.owners,
        from_=mlist.subaddress("owner"),
        fallback_subject=f"{address} removed from {mlist.posting_address}",
        in_reply_to=None,
        now=now,
    )


def build_reenabled(
    mlist: MailingList,
    address: str,
    templates: Templates,
    *,
    in_reply_to: str | None = None,
    now: float | None = None,
) -> Outgoing:
    """The notice to a member whose delivery, disabled by bounces, is on again."""
    return _to_member(mlist, templates, "reenabled", address, in_reply_to, now)


# The header that marks a forwarded unrecognised bounce: a bounce of that
# forward that comes back unrecognised again is kept, not forwarded (no loop).
UNRECOGNISED_MARK = "X-Mailrelay-Unrecognised-Bounce"


def build_unrecognised_bounce(
    mlist: MailingList,
    bounce: bytes,
    templates: Templates,
    *,
    recipient: str,
    reason: str,
    max_attached: int,
    now: float | None = None,
) -> Outgoing:
    """The copy for the owners of a bounce that named no member (Mailman's
    ``forward_unrecognized_bounces_to``): a short text and the first
    ``max_attached`` bytes of the bounce attached as ``application/octet-stream``
    (``bounce.eml``), so that broken or non-UTF-8 mail reaches them unchanged."""
    outgoing = _from_template(
        mlist,
        templates,
        "unrecognised-bounce",
        {"reason": _one_line(reason), "recipient": _one_line(recipient)},
        to=mlist.owners,
        from_=mlist.subaddress("owner"),
        fallback_subject=f"Unrecognised bounce for {mlist.posting_address}",
        in_reply_to=None,
        now=now,
    )
    outgoing.message[UNRECOGNISED_MARK] = "yes"
    attached = bytes(bounce[:max_attached])
    outgoing.message.add_attachment(
        attached, maintype="application", subtype="octet-stream", filename="bounce.eml"
    )
    return outgoing


# -- shared parts -------------------------------------------------------------


def _list_values(mlist: MailingList) -> dict[str, object]:
    return {
        "list_address": mlist.posting_address,
        "display_name": _one_line(mlist.display_name) or mlist.local_part,
        "request_address": mlist.subaddress("request"),
        "owner_address": mlist.subaddress("owner"),
        "join_address": mlist.subaddress("join"),
        "leave_address": mlist.subaddress("leave"),
    }


_OUTCOME_TEMPLATES = {
    Outcome.CONFIRMATION_SENT: "outcome-confirmation-sent",
    Outcome.CONFIRMED: "outcome-confirmed",
    Outcome.TOKEN_REJECTED: "outcome-token-rejected",
    Outcome.HELP: "outcome-help",
    Outcome.END: "outcome-end",
    Outcome.UNKNOWN_COMMAND: "outcome-unknown-command",
    Outcome.INVALID: "outcome-invalid",
}


def _outcome_text(result: CommandResult, templates: Templates, values: dict) -> str:
    command = result.command
    name = _OUTCOME_TEMPLATES[result.outcome]
    if result.outcome is Outcome.CONFIRMATION_SENT and command.kind is CommandKind.LEAVE:
        # One text whether or not the address is a member.
        name = "outcome-leave-sent"
    text = templates.render(
        name,
        {
            **values,
            "address": result.address,
            "word": command.word,
            "error": command.error,
        },
    ).body
    return text.strip()


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())


def _one_line(text: str) -> str:
    """Untrusted text made safe for one line of a header or report."""
    return _CONTROL.sub(" ", str(text)).strip()[:300]


def _to_member(mlist, templates, name, address, in_reply_to, now) -> Outgoing:
    return _from_template(
        mlist,
        templates,
        name,
        {"address": address},
        to=address,
        from_=mlist.subaddress("request"),
        fallback_subject=mlist.posting_address,
        in_reply_to=in_reply_to,
        now=now,
    )


def _from_template(
    mlist: MailingList,
    templates: Templates,
    name: str,
    values: dict[str, object],
    *,
    subject: str | None = None,
    fallback_subject: str = "",
    **headers,
) -> Outgoing:
    """Render template ``name`` with the list's values and ``values``; the
    Subject is ``subject`` if given, else the template's, else the fallback."""
    rendered = templates.render(name, {**_list_values(mlist), **values})
    subject = subject or rendered.subject or fallback_subject
    return _outgoing(mlist, subject=subject, body=rendered.body, **headers)


def _is_own_address(mlist: MailingList, address: str) -> bool:
    destination = resolve_recipient(address, lambda a: a == mlist.posting_address)
    return destination is not None


def _outgoing(
    mlist: MailingList,
    *,
    to: str | Sequence[str],
    from_: str,
    subject: str,
    body: str,
    in_reply_to: str | None,
    now: float | None,
    reply_to: str | None = None,
) -> Outgoing:
    recipients = (to,) if isinstance(to, str) else tuple(to)
    for recipient in recipients:
        if _is_own_address(mlist, recipient):
            raise ValueError(f"refusing to send a reply to the list's own address {recipient}")
    message = EmailMessage(policy=policy.default)
    display = _one_line(mlist.display_name)
    message["From"] = formataddr((display, from_)) if display else from_
    if recipients:
        message["To"] = ", ".join(recipients)
    message["Subject"] = _one_line(subject)
    message["Date"] = formatdate(time.time() if now is None else now, usegmt=True)
    message["Message-ID"] = make_msgid(domain=mlist.domain)
    if reply_to:
        message["Reply-To"] = reply_to
    if in_reply_to is not None:
        # An answer even when the mail answered had no usable Message-ID.
        parent = in_reply_to.strip()
        if _MESSAGE_ID.match(parent):
            message["In-Reply-To"] = parent
            message["References"] = parent
        message["Auto-Submitted"] = "auto-replied"
    else:
        message["Auto-Submitted"] = "auto-generated"
    message["Precedence"] = "bulk"
    message["X-Auto-Response-Suppress"] = "All"
    message.set_content(body, charset="utf-8")
    return Outgoing(mlist.bounces_address, recipients, message)
