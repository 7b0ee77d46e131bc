"""What each recipient's SMTP result means for its spool entry: pure decisions.

Place in the flow: :mod:`~mailrelay.runner.sending` turns the smarthost's reply
to a transaction into one :class:`RecipientResult` per recipient; this module
turns each result into the :class:`~mailrelay.model.EntryUpdate` the spool
records (and, for a member's permanent refusal, a :class:`~mailrelay.model.Bounce`
for the registry).  Nothing here touches the spool, the registry or the network;
the only side effect is the log line for each deferral, refusal and dead letter.

Accepted is DONE; a temporary failure is retried with backoff until
``retry_period`` after the first attempt, then dead-lettered (FAILED, with the
reason); a permanent refusal is FAILED.  A site problem, or a recipient not
attempted because delivery is paused, counts no attempt and waits for the
circuit breaker's next try; the time delivery was paused since a recipient's
first attempt is added to its retry period.  An unreachable smarthost is a
temporary failure (it counts toward the retry period, as in Postfix) and
never a bounce.
"""

from __future__ import annotations

import enum
import random as _random
from collections.abc import Callable
from dataclasses import dataclass

from twisted.logger import Logger

from mailrelay.model import Bounce, EntryKind, EntryState, EntryUpdate, MailingList, SpoolEntry
from mailrelay.retry import RetryPolicy, Verdict, classify

__all__ = [
    "DELIVERED",
    "LOCAL_RETRY_DELAY",
    "NotAttempted",
    "RecipientResult",
    "entry_updates",
    "one_line",
    "results_for_refusals",
    "retry_after_local_trouble",
]

_log = Logger()

# How long to wait before trying again when our own storage is unavailable.
LOCAL_RETRY_DELAY = 60.0


class NotAttempted(enum.Enum):
    """Why a recipient was not attempted."""

    STOPPING = "stopping"
    PAUSED = "paused"


@dataclass(frozen=True)
class RecipientResult:
    """One recipient's result: a verdict, or why nothing was sent."""

    verdict: Verdict | NotAttempted
    code: int = 0  # 0 when nothing was sent
    text: str = ""
    bounce: bool = False  # a permanent refusal of this recipient (not of the message)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}".strip() if self.code else self.text


# Shared by every accepted recipient (a RecipientResult is immutable).
DELIVERED = RecipientResult(Verdict.DELIVERED, 250)


def one_line(response: bytes | str) -> str:
    """A server response as one line of text: decoded, whitespace collapsed."""
    if isinstance(response, bytes | bytearray):
        response = bytes(response).decode("utf-8", "replace")
    return " ".join(str(response).split())


def results_for_refusals(
    chunk: list[str], refused: dict[str, tuple[int, bytes | str]]
) -> tuple[dict[str, RecipientResult], str | None]:
    """Each recipient's result after a transaction the smarthost took, given
    the recipients it ``refused`` (address → code and response); and the reply
    of a site problem among the refusals, if any (the last one)."""
    results = {}
    site_problem = None
    for address in chunk:
        if address not in refused:
            results[address] = DELIVERED
            continue
        code, response = refused[address]
        verdict = classify(code)
        results[address] = RecipientResult(
            verdict, code, one_line(response), bounce=verdict is Verdict.PERMANENT
        )
        if verdict is Verdict.SITE_PROBLEM:
            site_problem = results[address].reply
    return results, site_problem


def retry_after_local_trouble(entry: SpoolEntry, error: str, now: float) -> EntryUpdate:
    """Try ``entry`` again shortly, without counting an attempt (our own trouble)."""
    return EntryUpdate(
        entry.entry_id,
        EntryState.RETRY,
        next_attempt_at=now + LOCAL_RETRY_DELAY,
        error=error,
    )


def entry_updates(
    mlist: MailingList,
    kind: EntryKind,
    by_address: dict[str, list[SpoolEntry]],
    results: dict[str, RecipientResult],
    *,
    now: float,
    paused_until: float,
    policy: RetryPolicy,
    random: _random.Random,
    paused_between: Callable[[float, float], float] = lambda start, end: 0.0,
) -> tuple[list[EntryUpdate], list[Bounce]]:
    """Spool updates (and bounces) for every entry, from its recipient's result.

    ``paused_until`` is when entries held back by a site problem are tried
    again; ``policy`` and ``random`` set the next attempt after a deferral;
    ``paused_between(start, end)`` is how long delivery was paused in that
    time, which extends a deferred recipient's retry period.
    """
    updates: list[EntryUpdate] = []
    bounces: list[Bounce] = []
    for address, entries in by_address.items():
        result = results[address]
        for entry in entries:
            updates.append(
                _update_for(entry, result, now, mlist, paused_until, policy, random, paused_between)
            )
        if result.verdict is Verdict.PERMANENT and result.bounce and kind is EntryKind.MEMBER:
            bounces.append(Bounce(mlist.posting_address, address, result.code, result.text, now))
    return updates, bounces


def _update_for(
    entry: SpoolEntry,
    result: RecipientResult,
    now: float,
    mlist: MailingList,
    paused_until: float,
    policy: RetryPolicy,
    random: _random.Random,
    paused_between: Callable[[float, float], float],
) -> EntryUpdate:
    verdict = result.verdict
    entry_id = entry.entry_id
    if verdict is Verdict.DELIVERED:
        return EntryUpdate(entry_id, EntryState.DONE, count_attempt=True)
    if verdict is NotAttempted.STOPPING:
        return EntryUpdate(entry_id, EntryState.QUEUED)
    if verdict is NotAttempted.PAUSED or verdict is Verdict.SITE_PROBLEM:
        # Not the recipient's fault: no attempt counted, back when the
        # breaker next tries (a few seconds from now if it has closed since).
        return EntryUpdate(
            entry_id,
            EntryState.RETRY,
            next_attempt_at=paused_until,
            error=f"delivery paused by a site problem (not counted as an attempt): {result.reply}",
        )
    fields = dict(
        message_id=entry.message_id,
        list=mlist.posting_address,
        recipient=entry.destination.address,
        code=result.code,
        response=result.text,
        attempt=entry.attempts + 1,
    )
    if verdict is Verdict.PERMANENT:
        _log.warn(
            "{message_id} to {recipient} (list {list}) refused permanently: {code} {response}",
            **fields,
        )
        return EntryUpdate(entry_id, EntryState.FAILED, error=result.reply, count_attempt=True)
    attempt = entry.attempts + 1
    # Time the breaker held delivery back is not the recipient's: the retry
    # period runs as if the first attempt had come that much later.
    first = entry.first_attempt_at
    if first is not None:
        first += paused_between(first, now)
    retry_at = policy.next_attempt_at(now, attempt, first, random)
    if retry_at is None:
        since = entry.first_attempt_at if entry.first_attempt_at is not None else now
        reason = f"gave up after {attempt} attempts in {_duration(now - since)}: {result.reply}"
        _log.error(
            "{message_id} to {recipient} (list {list}) dead-lettered: {reason}",
            reason=reason,
            **fields,
        )
        return EntryUpdate(entry_id, EntryState.FAILED, error=reason, count_attempt=True)
    _log.info(
        "{message_id} to {recipient} (list {list}) deferred: {code} {response}; "
        "attempt {attempt}, next in {delay:.0f}s",
        delay=retry_at - now,
        **fields,
    )
    return EntryUpdate(
        entry_id,
        EntryState.RETRY,
        next_attempt_at=retry_at,
        error=result.reply,
        count_attempt=True,
    )


def _duration(seconds: float) -> str:
    """``5d 0h``, ``3h 20m``, ``12m 5s``, ``42s``: for dead-letter reasons."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
