"""What each recipient's SMTP result means for its spool entry: pure decisions.

Place in the flow: :mod:`~mailrelay.runner.sending` turns the smarthost's reply
to a transaction into one :class:`RecipientResult` per recipient; this module
turns each result into the :class:`~mailrelay.model.EntryUpdate` the spool
records (and, for a member's permanent refusal, a :class:`~mailrelay.model.Bounce`
for the registry).  Nothing here touches the spool, the registry or the network;
the only side effect is the summary log lines of deferrals, refusals and dead letters.

A permanent refusal of the whole message (:func:`message_refusal`) is also
reported once per post: the runner records it with the notices to the
poster and the owners (:mod:`mailrelay.listproc.refusals`).

Accepted is DONE; a temporary failure is retried with backoff until
``retry_period`` after the first attempt, then dead-lettered (FAILED, with the
reason); a permanent refusal is FAILED.  Deferrals, refusals and dead letters
are logged one line per message, outcome and reply (a count and the first
few recipients), never one line per recipient.  A site problem, or a recipient not
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

from mailrelay.logs import DEFERRED, FAILED, listed
from mailrelay.model import Bounce, EntryKind, EntryState, EntryUpdate, MailingList, SpoolEntry
from mailrelay.retry import RetryPolicy, Verdict, classify

__all__ = [
    "DELIVERED",
    "LOCAL_RETRY_DELAY",
    "NotAttempted",
    "RecipientResult",
    "entry_updates",
    "message_refusal",
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
    # The smarthost refused the message itself (MAIL, DATA, or too big for
    # its SIZE), not this recipient: the poster is told when it is permanent.
    refused_message: bool = False

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


def message_refusal(kind: EntryKind, results: dict[str, RecipientResult]) -> RecipientResult | None:
    """The permanent refusal of the message itself among one group's results,
    if there is one: what the poster and the owners are told about.  Only
    for posts and ``-owner`` mail (never for mailrelay's own notices, which
    would be told about in turn)."""
    if kind is EntryKind.NOTICE or kind is EntryKind.INBOUND:
        return None
    for result in results.values():
        if result.refused_message and result.verdict is Verdict.PERMANENT:
            return result
    return None


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
    # One log line per outcome and reply, not per recipient: a 50,000-member
    # post to a smarthost that is down would otherwise log 50,000 lines at
    # every retry round.
    notes: dict[tuple[str, int, str], _Summary] = {}
    for address, entries in by_address.items():
        result = results[address]
        for entry in entries:
            update, outcome, delay = _update_for(
                entry, result, now, paused_until, policy, random, paused_between
            )
            updates.append(update)
            if outcome is not None:
                key = (outcome, result.code, result.text)
                notes.setdefault(key, _Summary()).add(entry, delay)
        if result.verdict is Verdict.PERMANENT and result.bounce and kind is EntryKind.MEMBER:
            bounces.append(Bounce(mlist.posting_address, address, result.code, result.text, now))
    for (outcome, code, text), summary in notes.items():
        summary.log(outcome, mlist, code, text)
    return updates, bounces


# How many recipients a summary line names before "and N more".
_NAMED_RECIPIENTS = 3


class _Summary:
    """The recipients of one message that had the same outcome and reply."""

    def __init__(self) -> None:
        self.message_id = ""
        self.recipients: list[str] = []
        self.attempts: list[int] = []
        self.delays: list[float] = []

    def add(self, entry: SpoolEntry, delay: float | None) -> None:
        self.message_id = entry.message_id
        self.recipients.append(entry.destination.address)
        self.attempts.append(entry.attempts + 1)
        if delay is not None:
            self.delays.append(delay)

    def log(self, outcome: str, mlist: MailingList, code: int, text: str) -> None:
        """One line: event ``deferred`` or ``failed`` (:mod:`mailrelay.logs`),
        with the recipients' count and the first of them."""
        named = ", ".join(self.recipients[:_NAMED_RECIPIENTS])
        if len(self.recipients) > _NAMED_RECIPIENTS:
            named += f" and {len(self.recipients) - _NAMED_RECIPIENTS} more"
        fields = dict(
            event=DEFERRED if outcome == _DEFERRED else FAILED,
            outcome=outcome,
            message_id=self.message_id,
            list=mlist.posting_address,
            count=len(self.recipients),
            recipients=listed(self.recipients),
            names=named,
            code=code,
            response=text,
            attempt=_span(self.attempts, "{:d}"),
        )
        if outcome == _DEFERRED:
            _log.info(
                "{message_id} to {count} recipient(s) of {list} deferred: {code} {response}; "
                "attempt {attempt}, next in {delay} ({names})",
                delay=_span(self.delays, "{:.0f}s"),
                **fields,
            )
        elif outcome == _REFUSED:
            _log.warn(
                "{message_id} to {count} recipient(s) of {list} refused permanently: "
                "{code} {response} ({names})",
                **fields,
            )
        else:
            _log.error(
                "{message_id} to {count} recipient(s) of {list} dead-lettered: gave up "
                "after the retry period, attempt {attempt}: {code} {response} ({names})",
                **fields,
            )


def _span(values: list, form: str) -> str:
    """``5`` or ``3-7``: the range of ``values`` in ``form``."""
    low, high = form.format(min(values)), form.format(max(values))
    return low if low == high else f"{low}-{high}"


_DEFERRED, _REFUSED, _DEAD = "deferred", "refused", "dead-lettered"


def _update_for(
    entry: SpoolEntry,
    result: RecipientResult,
    now: float,
    paused_until: float,
    policy: RetryPolicy,
    random: _random.Random,
    paused_between: Callable[[float, float], float],
) -> tuple[EntryUpdate, str | None, float | None]:
    """The entry's update, the outcome to log (``None``: nothing to log) and,
    for a deferral, the delay until the next attempt."""
    verdict = result.verdict
    entry_id = entry.entry_id
    if verdict is Verdict.DELIVERED:
        return EntryUpdate(entry_id, EntryState.DONE, count_attempt=True), None, None
    if verdict is NotAttempted.STOPPING:
        return EntryUpdate(entry_id, EntryState.QUEUED), None, None
    if verdict is NotAttempted.PAUSED or verdict is Verdict.SITE_PROBLEM:
        # Not the recipient's fault: no attempt counted, back when the
        # breaker next tries (a few seconds from now if it has closed since).
        # The breaker logs the pause once.
        update = EntryUpdate(
            entry_id,
            EntryState.RETRY,
            next_attempt_at=paused_until,
            error=f"delivery paused by a site problem (not counted as an attempt): {result.reply}",
        )
        return update, None, None
    if verdict is Verdict.PERMANENT:
        update = EntryUpdate(entry_id, EntryState.FAILED, error=result.reply, count_attempt=True)
        return update, _REFUSED, None
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
        update = EntryUpdate(entry_id, EntryState.FAILED, error=reason, count_attempt=True)
        return update, _DEAD, None
    update = EntryUpdate(
        entry_id,
        EntryState.RETRY,
        next_attempt_at=retry_at,
        error=result.reply,
        count_attempt=True,
    )
    return update, _DEFERRED, retry_at - now


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
