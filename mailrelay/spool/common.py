"""What both spools share: the argument checks of :class:`~mailrelay.interfaces.ISpool`,
the one builder of new entries, and the rules for expanded copies.

Place in the flow: LMTP → routing → **spool** → scheduler → sending → mta.
:mod:`mailrelay.spool.sqlite` and :mod:`mailrelay.spool.memory` both check
their arguments here, so that the two spools refuse bad input with the same
specific error, and a bad argument to a method that answers with a Deferred
fails that Deferred (:func:`deferred_errors`) rather than raising.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import ParamSpec, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from mailrelay.errors import SpoolError
from mailrelay.model import (
    Destination,
    EntryKind,
    EntryState,
    EntryUpdate,
    Envelope,
    Outgoing,
    PostSummary,
    Refusal,
    Route,
    SpoolEntry,
)

_log = Logger()
_P = ParamSpec("_P")
_T = TypeVar("_T")


def deferred_errors(method: Callable[_P, Deferred[_T]]) -> Callable[_P, Deferred[_T]]:
    """Make ``method`` answer a bad argument (``TypeError``, ``ValueError``) or a
    closed spool (``SpoolError``) with a failed Deferred instead of raising."""

    @functools.wraps(method)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        try:
            return method(*args, **kwargs)
        except (TypeError, ValueError, SpoolError) as e:
            return fail(e)

    return checked


def new_entry(
    envelope: Envelope,
    message_key: int,
    entry_id: int,
    destination: Destination,
    state: EntryState,
    kind: EntryKind,
    last_error: str = "",
) -> SpoolEntry:
    """The entry just stored for ``destination`` of the message ``envelope`` describes."""
    return SpoolEntry(
        entry_id=entry_id,
        message_key=message_key,
        sender=envelope.sender,
        destination=destination,
        state=state,
        received_at=envelope.received_at,
        last_error=last_error,
        message_id=envelope.message_id,
        kind=kind,
    )


def check_enqueue(envelope: object, message: object) -> tuple[Envelope, bytes]:
    if not isinstance(envelope, Envelope):
        raise TypeError(f"envelope must be an Envelope, not {envelope!r}")
    if not envelope.destinations:
        raise ValueError("envelope has no destinations: nothing to spool")
    for destination in envelope.destinations:
        if not isinstance(destination, Destination):
            raise TypeError(f"envelope destination is not a Destination: {destination!r}")
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TypeError(f"message must be bytes, not {type(message).__name__}")
    return envelope, bytes(message)


def check_routes(envelope: Envelope, routes: object, claim: object) -> list[Route]:
    if not isinstance(claim, bool):
        raise TypeError(f"claim must be a bool, not {claim!r}")
    if routes is None:
        return [_QUEUED] * len(envelope.destinations)
    if isinstance(routes, str | bytes):
        raise TypeError(f"routes must be a sequence of Route, not {routes!r}")
    checked = list(routes)  # type: ignore[call-overload]
    if len(checked) != len(envelope.destinations):
        raise ValueError(
            f"{len(checked)} routes for {len(envelope.destinations)} destinations: one each"
        )
    for index, route in enumerate(checked):
        if not isinstance(route, Route):
            raise TypeError(f"not a Route: {route!r}")
        if route.kind is not None:
            # As expand(): one copy per address, however often it is listed.
            _, addresses, _ = check_expand(0, route.recipients, route.kind)
            if len(addresses) != len(route.recipients):
                checked[index] = replace(route, recipients=tuple(addresses))
    return checked


_QUEUED = Route()


def check_updates(updates: Iterable[EntryUpdate]) -> list[EntryUpdate]:
    updates = list(updates)
    for update in updates:
        if not isinstance(update, EntryUpdate):
            raise TypeError(f"not an EntryUpdate: {update!r}")
    return updates


def _instances(values: object, kind: type[_T], what: str) -> list[_T]:
    """``values`` (one value of ``kind``, or an iterable of them) as a list;
    ``TypeError`` naming ``what`` for anything else."""
    if isinstance(values, kind):
        return [values]
    checked = list(values)  # type: ignore[call-overload]
    for value in checked:
        if not isinstance(value, kind):
            raise TypeError(f"not {what}: {value!r}")
    return checked


def check_outgoing(
    messages: Iterable[Outgoing], finish: Iterable[EntryUpdate]
) -> tuple[list[Outgoing], list[EntryUpdate]]:
    return _instances(messages, Outgoing, "an Outgoing message"), check_updates(finish)


def check_refusals(refusals: Iterable[Refusal]) -> list[Refusal]:
    """The refusals of one ``store_outgoing`` call: one per message at most."""
    checked = _instances(refusals, Refusal, "a Refusal")
    keys = [refusal.message_key for refusal in checked]
    if len(set(keys)) != len(keys):
        raise ValueError(f"one Refusal per message, not several for one of {keys}")
    return checked


def outgoing_envelope(message: Outgoing, now: float) -> Envelope:
    """The stored envelope of a message mailrelay wrote: its NOTICE entries name
    the list it is about and each recipient, without a sub-address."""
    return Envelope(
        sender=message.sender,
        destinations=tuple(
            Destination(message.list_address, None, recipient)
            for recipient in dict.fromkeys(message.recipients)
        ),
        received_at=now,
        message_id=message.message_id,
    )


def check_release(
    subaddresses: Iterable[str | None] | None, entry_ids: Iterable[int] | None
) -> tuple[set[str | None] | None, set[int] | None]:
    if isinstance(subaddresses, str):
        raise TypeError(f"subaddresses must be a collection of names, not {subaddresses!r}")
    names = None if subaddresses is None else set(subaddresses)
    ids = None if entry_ids is None else set(check_ids(entry_ids))
    return names, ids


def check_ids(entry_ids: Iterable[int]) -> list[int]:
    if isinstance(entry_ids, int | str | bytes):
        raise TypeError(f"entry ids must be an iterable of ints, not {entry_ids!r}")
    ids = list(entry_ids)
    for entry_id in ids:
        if not isinstance(entry_id, int) or isinstance(entry_id, bool):
            raise TypeError(f"entry id must be an int, not {entry_id!r}")
    return ids


def check_recover(claimed_before: object, keep: Iterable[int]) -> tuple[float | None, frozenset]:
    """The arguments of ``recover``: a time or ``None``, and a set of entry ids."""
    if claimed_before is not None and (
        isinstance(claimed_before, bool) or not isinstance(claimed_before, int | float)
    ):
        raise TypeError(f"claimed_before must be a time in seconds, not {claimed_before!r}")
    return claimed_before, frozenset(check_ids(keep))


def check_expand(
    entry_id: object, recipients: Iterable[str], kind: object
) -> tuple[int, list[str], EntryKind]:
    if not isinstance(entry_id, int) or isinstance(entry_id, bool):
        raise TypeError(f"entry id must be an int, not {entry_id!r}")
    if isinstance(recipients, str | bytes):
        raise TypeError(f"recipients must be an iterable of addresses, not {recipients!r}")
    try:
        kind = EntryKind(kind)
    except ValueError:
        raise ValueError(f"not an entry kind: {kind!r}") from None
    if kind is EntryKind.INBOUND:
        raise ValueError("expanded entries are MEMBER or OWNER deliveries, not INBOUND")
    checked = []
    for recipient in recipients:
        if not isinstance(recipient, str) or not recipient:
            raise TypeError(f"recipient must be a non-empty str, not {recipient!r}")
        checked.append(recipient)
    # A recipient listed twice gets one copy.
    return entry_id, list(dict.fromkeys(checked)), kind


def expanded_subaddress(kind: EntryKind) -> str | None:
    """Owner copies keep the ``owner`` sub-address, so the queue shows what they are."""
    return "owner" if kind is EntryKind.OWNER else None


def not_expandable(entry_id: int, kind: EntryKind) -> ValueError:
    return ValueError(
        f"entry {entry_id} is a {kind.value} delivery, not an inbound entry: it cannot be expanded"
    )


def check_time(when: object) -> float:
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise TypeError(f"time must be a number, not {when!r}")
    return float(when)


def check_status(key: object, text: object) -> tuple[str, str | None]:
    if not isinstance(key, str) or not key:
        raise TypeError(f"status key must be a non-empty str, not {key!r}")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"status text must be a str or None, not {text!r}")
    return key, text


def check_state(state: object) -> EntryState | None:
    if state is None:
        return None
    try:
        return EntryState(state)
    except ValueError:
        raise ValueError(f"not an entry state: {state!r}") from None


def check_limit(limit: object, allow_none: bool) -> int | None:
    if limit is None and allow_none:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit must be a non-negative int, not {limit!r}")
    return limit


def log_recovered(count: int) -> int:
    """Log how many in-flight entries :meth:`~mailrelay.interfaces.ISpool.recover`
    returned to the queue; passes ``count`` on."""
    if count:
        _log.info("Returned {count} in-flight entries to the queue", count=count)
    return count


def check_key(message_key: object) -> int:
    if not isinstance(message_key, int) or isinstance(message_key, bool):
        raise TypeError(f"message key must be an int, not {message_key!r}")
    return message_key


def check_message_id(message_id: object) -> str | None:
    if message_id is not None and not isinstance(message_id, str):
        raise TypeError(f"message_id must be a str or None, not {message_id!r}")
    return message_id


def post_summary(
    key: int,
    message_id: str,
    sender: str,
    received_at: float,
    rows: Iterable[tuple[str, str, str, int]],
    refusal: str | None = None,
) -> PostSummary:
    """A :class:`PostSummary` from (list address, kind, state, count) rows.

    INBOUND entries that are DONE are routing's bookkeeping (expanded into
    copies, or a repeated RCPT), not deliveries: they are not counted.
    """
    lists: dict[str, None] = {}
    counts = dict.fromkeys(EntryState, 0)
    for list_address, kind, state, count in rows:
        lists[list_address] = None
        if kind == EntryKind.INBOUND.value and state == EntryState.DONE.value:
            continue
        counts[EntryState(state)] += count
    return PostSummary(
        key, message_id, sender, received_at, tuple(sorted(lists)), counts, refusal or ""
    )
