"""What the poster and the owners are told when the smarthost refused a post
as a whole after mailrelay had acknowledged it.

Place in the flow: the delivery runner (:mod:`mailrelay.runner.service`) sees a
post's transaction refused permanently at MAIL or DATA (or found too large
for the smarthost's SIZE), and asks :class:`RefusalNotices` for the messages
to store with the copies' final state (:meth:`~mailrelay.interfaces.ISpool.store_outgoing`,
which stores them once per post).  Nothing here sends, stores or reads the spool.

Two messages, both :class:`~mailrelay.model.Outgoing`:

* to the post's envelope sender, an RFC 3464 delivery status notification:
  ``multipart/report; report-type=delivery-status`` with a human-readable
  part, a ``message/delivery-status`` part (``Reporting-MTA``, then per list
  address ``Final-Recipient``, ``Action: failed``, ``Status`` and
  ``Diagnostic-Code``) and the post's header block as ``text/rfc822-headers``;
  From the list's ``-owner`` address, envelope sender ``<>`` (RFC 3464 section 2,
  so that it can never bounce back).  It is not written when
  :func:`~mailrelay.listproc.safety.auto_reply_allowed` says the post must
  not be answered (empty envelope sender, ``Auto-Submitted``,
  ``Precedence: bulk/junk/list``, a list or daemon sender): no backscatter,
  no loops;
* to the lists' owners, a notice naming the sender, the Message-ID, the
  subject and the smarthost's reply (always, when the list has owners).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from email import policy
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.interfaces import IRefusalNotices
from mailrelay.listproc import replies
from mailrelay.listproc._mail import decoded_header, parse_prefix
from mailrelay.listproc.safety import auto_reply_allowed
from mailrelay.listproc.templating import Templates
from mailrelay.model import MailingList, Outgoing, RefusedPost

__all__ = ["RefusalNotices", "delivery_status"]

_log = Logger()

_ENHANCED = re.compile(r"\A\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# Only the header block of the post is parsed and returned (RFC 3462's
# text/rfc822-headers): enough to identify it, never its content.
_MAX_HEADER_BYTES = 64 * 1024
# What the generator writes for this module's own messages: CRLF, 7-bit safe.
_SMTP_COMPAT = policy.compat32.clone(linesep="\r\n")


def _never_a_list(address: str) -> bool:
    return False


def _status(reply: str) -> str:
    """The RFC 3463 status of a permanent reply: its enhanced code, else ``5.0.0``."""
    match = _ENHANCED.match(reply)
    if match is not None and match.group(1).startswith("5"):
        return match.group(1)
    return "5.0.0"


def delivery_status(refused: RefusedPost, reporting_mta: str) -> Message:
    """The ``message/delivery-status`` part for ``refused``: the per-message
    fields, then one block per list address (RFC 3464 section 2.2 and 2.3)."""
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    blocks = [per_message]
    status = _status(refused.reply)
    diagnostic = replies._one_line(refused.reply)
    for mlist in refused.lists:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {mlist.posting_address}"
        block["Action"] = "failed"
        block["Status"] = status
        block["Diagnostic-Code"] = f"smtp; {diagnostic}"
        blocks.append(block)
    part = MIMEBase("message", "delivery-status")
    del part["MIME-Version"]  # only the message's own header carries it
    part.set_payload(blocks)
    return part


def _text_part(text: str, subtype: str) -> MIMEText:
    """A text part, 7-bit when it is ASCII (most reports are), else UTF-8."""
    part = MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")
    del part["MIME-Version"]
    return part


def _header_block(message: bytes) -> bytes:
    head = message[:_MAX_HEADER_BYTES]
    blank = _BLANK_LINE.search(head)
    return head if blank is None else head[: blank.start()] + b"\r\n"


@implementer(IRefusalNotices)
class RefusalNotices:
    """Writes the DSN and the owner notice for a refused post.

    ``templates(mlist)`` gives the list's :class:`~mailrelay.listproc.templating.Templates`
    (default: the shipped English texts); ``is_list_address(address)`` says
    whether an address is one of this site's lists or sub-addresses (no DSN
    goes there); ``reporting_mta`` names this host in the report (default:
    the list's domain); ``clock`` (an ``IReactorTime``) dates the messages.
    """

    def __init__(
        self,
        *,
        templates: Callable[[MailingList], Templates] | None = None,
        is_list_address: Callable[[str], bool] = _never_a_list,
        reporting_mta: str = "",
        clock: object = None,
    ):
        self._templates = templates if templates is not None else (lambda mlist: Templates())
        self._is_list_address = is_list_address
        self._reporting_mta = reporting_mta
        self._clock = clock

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def notices(self, refused: RefusedPost) -> tuple[Outgoing, ...]:
        """The DSN to the poster (unless it must not be answered) and the notice
        to the owners of the first list with owners; ``()`` without lists."""
        if not refused.lists:
            return ()
        mlist = refused.lists[0]
        templates = self._templates(mlist)
        headers = parse_prefix(_header_block(refused.message), _MAX_HEADER_BYTES)
        subject = decoded_header(headers, "subject") or "(no subject)"
        values = {
            "lists": ", ".join(m.posting_address for m in refused.lists),
            "subject": subject,
            "reply": replies._one_line(refused.reply),
        }
        now = self._now()
        notices = []
        why_not = auto_reply_allowed(refused.sender, headers, self._is_list_address)
        if why_not is None:
            notices.append(self._dsn(mlist, refused, templates, values, now))
        else:
            _log.info(
                "{message_id}: no delivery status notification to {sender} ({reason})",
                message_id=refused.message_id,
                sender=refused.sender or "<>",
                reason=why_not,
                list=mlist.posting_address,
            )
        owned = next((m for m in refused.lists if m.owners), None)
        if owned is not None:
            notices.append(self._owner_notice(owned, refused, values, why_not, now))
        return tuple(notices)

    def _dsn(
        self,
        mlist: MailingList,
        refused: RefusedPost,
        templates: Templates,
        values: dict[str, object],
        now: float,
    ) -> Outgoing:
        # The headers every reply carries (From, To, Date, Message-ID,
        # Auto-Submitted, ...) come from the common builder; the body becomes
        # the human-readable first part of the report.
        text = replies._from_template(
            mlist,
            templates,
            "refused-dsn",
            values,
            to=refused.sender,
            from_=mlist.subaddress("owner"),
            fallback_subject="Undeliverable mail",
            in_reply_to=refused.message_id,
            now=now,
        ).message
        report = MIMEMultipart("report", report_type="delivery-status")
        for name, value in text.items():
            if not name.lower().startswith(("content-", "mime-version")):
                report[name] = str(value)
        report.attach(_text_part(text.get_content(), "plain"))
        report.attach(delivery_status(refused, self._reporting_mta or mlist.domain))
        head = _header_block(refused.message).decode("utf-8", "replace")
        report.attach(_text_part(head, "rfc822-headers"))
        return Outgoing(
            sender="",
            recipients=(refused.sender,),
            message=report.as_bytes(policy=_SMTP_COMPAT),
            list_address=mlist.posting_address,
            message_id=str(report["Message-ID"]),
        )

    def _owner_notice(
        self,
        mlist: MailingList,
        refused: RefusedPost,
        values: dict[str, object],
        why_not: str | None,
        now: float,
    ) -> Outgoing:
        poster = refused.sender or "<>"
        told = (
            "The poster was sent a delivery status notification."
            if why_not is None
            else f"The poster was not told ({why_not})."
        )
        built = replies._from_template(
            mlist,
            self._templates(mlist),
            "refused-owner",
            {
                **values,
                "poster": replies._one_line(poster),
                "message_id": replies._one_line(refused.message_id) or "(none)",
                "poster_told": told,
            },
            to=mlist.owners,
            from_=mlist.subaddress("owner"),
            fallback_subject=f"A post to {mlist.posting_address} could not be delivered",
            in_reply_to=None,
            now=now,
        )
        return Outgoing(
            sender=built.sender,
            recipients=built.recipients,
            message=built.as_bytes(),
            list_address=mlist.posting_address,
            message_id=str(built.message["Message-ID"]),
        )
