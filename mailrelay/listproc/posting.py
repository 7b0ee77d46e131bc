"""Posting policy: may a post go to the list's members, and if not, what becomes of it.

Place in the flow: LMTP → **routing asks** :class:`PostingPolicy` → spool.
Routing (:mod:`mailrelay.runner.routing`) asks :meth:`PostingPolicy.decide`
about every post after the message is accepted and before it is expanded
into member copies.  ACCEPT expands it as before; DISCARD finishes it at once
(logged); HOLD and REJECT go to :mod:`mailrelay.listproc.moderation`, which
holds the post for the owners or answers the poster.

The rules (issue 12 section 3; Mailman 3's chain where the issue is silent):

1. A post carrying this list's own ``List-Id``, or an ``X-BeenThere`` naming
   its posting address, has been through the list already: a loop, DISCARD.
2. A poster is every address in ``From:`` and the envelope sender (Mailman's
   ``sender_headers`` less ``Reply-To`` and ``Sender``, which anyone may set
   to a member's address without the member's mail client showing it).  Any
   poster that is a member with the ``moderated`` flag: HOLD, whatever the
   list's ``posting`` (Mailman's member moderation runs first, too).
3. ``posting = moderated``: every post is HELD.  ``posting = open``: ACCEPT.
4. ``posting = members``: a post with a member among its posters is
   ACCEPTED; others get the list's ``nonmember_action`` (default HOLD).

:func:`decide_post` is the pure rule; :class:`PostingPolicy` reads what it
needs from the registry (settings and member records, so a change made with
``mailrelay lists set`` is seen by the next post).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Any

from twisted.logger import Logger

from mailrelay.addresses import is_valid_mailbox
from mailrelay.listproc._mail import header_addresses, parse_header_block
from mailrelay.listsettings import ListSettings, NonmemberAction, Posting
from mailrelay.model import MailingList, MemberRecord

__all__ = [
    "PostAction",
    "PostDecision",
    "PostingPolicy",
    "decide_post",
    "loop_reason",
    "poster_addresses",
]

_log = Logger()

_MAX_HEADER_BYTES = 256 * 1024


class PostAction(str, enum.Enum):
    """What becomes of a post."""

    ACCEPT = "accept"  # expand to the members
    HOLD = "hold"  # keep for the owners' decision
    REJECT = "reject"  # refuse, telling the poster (loop-safe)
    DISCARD = "discard"  # drop, logged


_NONMEMBER_ACTIONS = {
    NonmemberAction.ACCEPT: PostAction.ACCEPT,
    NonmemberAction.HOLD: PostAction.HOLD,
    NonmemberAction.REJECT: PostAction.REJECT,
    NonmemberAction.DISCARD: PostAction.DISCARD,
}


@dataclass(frozen=True)
class PostDecision:
    """The policy's verdict on one post: the ``action``, a short ``reason``
    (logged, recorded on the spool entry, shown to owners in the held
    notice and to the poster in a rejection), and the ``poster`` it is about
    (the first ``From:`` address, else the envelope sender)."""

    action: PostAction
    reason: str
    poster: str = ""


def loop_reason(headers: Message | None, mlist: MailingList) -> str | None:
    """Why the post looks like one this list already sent (a loop), or ``None``.

    ``List-Id`` is compared by its ``<list.id>`` (RFC 2919: the display name
    is free text); ``X-BeenThere`` (Mailman's header, which every post mailrelay
    sends carries too) by the posting address it holds, the whole value.
    Case-insensitive; another list's headers do not count.
    """
    if headers is None:
        return None
    own_id = mlist.list_id.lower()
    for value in _all(headers, "list-id"):
        text = value.lower()
        start, end = text.rfind("<"), text.rfind(">")
        list_id = text[start + 1 : end] if 0 <= start < end else text
        if list_id.strip() == own_id:
            return "loop: the post carries this list's own List-Id"
    for value in _all(headers, "x-beenthere"):
        # One address per field (Mailman's form), compared whole: a post that
        # went through alltest@example.com is no loop for test@example.com.
        if value.strip().strip("<>").strip().lower() == mlist.posting_address:
            return "loop: the post carries this list's own X-BeenThere"
    return None


def poster_addresses(envelope_sender: str, headers: Message | None) -> tuple[str, ...]:
    """The addresses a post is from: every valid ``From:`` address, then the
    envelope sender; lower-cased, each once."""
    found = header_addresses(headers, "from") if headers is not None else []
    found.append(envelope_sender.strip().strip("<>").lower())
    return tuple(dict.fromkeys(a for a in found if a and is_valid_mailbox(a)))


def decide_post(
    settings: ListSettings,
    posters: Sequence[str],
    members: Sequence[MemberRecord],
    loop: str | None = None,
) -> PostDecision:
    """The rule of this module's docstring, with nothing read from storage.

    ``posters`` are the post's addresses (:func:`poster_addresses`),
    ``members`` the member records found for them, ``loop`` what
    :func:`loop_reason` said.
    """
    poster = posters[0] if posters else ""
    if loop is not None:
        return PostDecision(PostAction.DISCARD, loop, poster)
    moderated = [m for m in members if m.moderated]
    if moderated:
        return PostDecision(
            PostAction.HOLD, f"the member {moderated[0].address} is moderated", poster
        )
    if settings.posting is Posting.MODERATED:
        return PostDecision(PostAction.HOLD, "every post to this list is moderated", poster)
    if settings.posting is Posting.OPEN:
        return PostDecision(PostAction.ACCEPT, "the list is open", poster)
    if members:
        return PostDecision(PostAction.ACCEPT, f"from the member {members[0].address}", poster)
    action = _NONMEMBER_ACTIONS[settings.nonmember_action]
    return PostDecision(action, f"{poster or 'the poster'} is not a member of the list", poster)


class PostingPolicy:
    """Decides posts with what ``registry`` (an ``IListProcessingStore``) says now."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    def decide(self, mlist: MailingList, sender: str, message: bytes) -> PostDecision:
        """The decision for a post of ``message`` from envelope ``sender`` to
        ``mlist``.  Raises what the registry raises (``RegistryError``,
        ``RegistryUnavailable``): routing retries then, it never guesses."""
        headers = parse_header_block(message, _MAX_HEADER_BYTES)
        posters = poster_addresses(sender, headers)
        settings = self._registry.list_settings(mlist.posting_address)
        members = [
            record
            for record in (self._registry.get_member(mlist.posting_address, a) for a in posters)
            if record is not None
        ]
        return decide_post(settings, posters, members, loop_reason(headers, mlist))


def _all(headers: Message, name: str) -> list[str]:
    try:
        return [str(value) for value in headers.get_all(name, [])]
    except Exception:  # compat32 can fail on some 8-bit headers; treat as absent
        return []
