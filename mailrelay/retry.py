"""Delivery outcome classification and the retry schedule (pure functions).

Classification follows Mailman (``mta/deliver.py``, after RFC 5321 4.5.3.1.10):
a 5xx reply other than 552 is permanent, everything else (4xx, 552, and 444
for "no reply": connection or TLS trouble) is temporary, except that a
``552 5.3.4`` refusing a whole message (too big) is permanent.  On top of that, an
authentication reply (530, 534, 535, 538, 571) or an error flagged
``site_problem`` (TLS, missing STARTTLS, refused credentials) says nothing
about the recipients: it is a *site problem*, which must pause delivery rather
than count against, or bounce, any member.

The schedule is Postfix's doubling backoff between a minimum and a maximum
(300 s and 4000 s by default) with jitter, so that recipients deferred
together do not all come back at the same instant, and a give-up deadline
counted from the first attempt.
"""

from __future__ import annotations

import enum
import math
import random as _random
from dataclasses import dataclass

from mailrelay._checks import check_count

__all__ = [
    "SITE_PROBLEM_CODES",
    "RetryPolicy",
    "Verdict",
    "backoff",
    "classify",
    "classify_error",
    "is_too_big",
    "next_attempt_at",
]

# Authentication required (530), mechanism too weak (534), credentials
# invalid (535), encryption required for the mechanism (538), and the 571
# that Mailman's test MTA and some servers answer to bad credentials.
SITE_PROBLEM_CODES = frozenset({530, 534, 535, 538, 571})


class Verdict(enum.Enum):
    """What one recipient's result means for its spool entry."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # retry later
    PERMANENT = "permanent"  # give up now
    SITE_PROBLEM = "site_problem"  # our fault: pause delivery, never a bounce


def classify(code: int, *, site_problem: bool = False) -> Verdict:
    """The verdict for SMTP reply ``code`` (444 meaning no reply at all).

    ``site_problem`` marks a failure already known to be the site's own
    (:attr:`mailrelay.mta.errors.DeliveryError.site_problem`).
    """
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"reply code must be an int, not {code!r}")
    if site_problem or code in SITE_PROBLEM_CODES:
        return Verdict.SITE_PROBLEM
    if 200 <= code < 300:
        return Verdict.DELIVERED
    if code >= 500 and code != 552:
        return Verdict.PERMANENT
    return Verdict.TEMPORARY


def classify_error(error: object) -> Verdict:
    """The verdict for a whole-transaction failure carrying ``code``, ``response``
    and ``site_problem`` (a :class:`~mailrelay.mta.errors.DeliveryError`).

    A ``552 5.3.4`` (message too big, RFC 3463) refusing the whole message is
    permanent, like a 554: the same message will not shrink.  (A 552 to one
    recipient stays temporary, as RFC 5321 4.5.3.1.10 asks.)
    """
    code = getattr(error, "code", None)
    if not isinstance(code, int):
        raise TypeError(f"not a delivery error with a reply code: {error!r}")
    site_problem = bool(getattr(error, "site_problem", False))
    if code == 552 and not site_problem and is_too_big(getattr(error, "response", b"")):
        return Verdict.PERMANENT
    return classify(code, site_problem=site_problem)


def is_too_big(response: bytes | str) -> bool:
    """Whether a reply text starts with the enhanced status 5.3.4 (too big)."""
    if isinstance(response, bytes | bytearray):
        response = bytes(response).decode("ascii", "replace")
    return str(response).lstrip().startswith("5.3.4")


def _check_duration(name: str, value: object, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be greater than zero, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a temporarily failing recipient again, and when to stop.

    ``jitter`` is the fraction by which a delay may stray either side of the
    doubling schedule (always kept within ``min_backoff``..``max_backoff``).
    """

    retry_period: float = 5 * 86400.0
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        _check_duration("retry_period", self.retry_period, zero_ok=True)
        _check_duration("min_backoff", self.min_backoff)
        _check_duration("max_backoff", self.max_backoff)
        if self.min_backoff > self.max_backoff:
            raise ValueError(
                f"min_backoff ({self.min_backoff}) must not exceed max_backoff ({self.max_backoff})"
            )
        if (
            isinstance(self.jitter, bool)
            or not isinstance(self.jitter, int | float)
            or not (0 <= self.jitter < 1)
        ):
            raise ValueError(f"jitter must be a fraction in [0, 1), not {self.jitter!r}")

    def backoff(self, attempt: int, random: _random.Random) -> float:
        """The delay after failed attempt number ``attempt`` (1 for the first)."""
        return backoff(
            attempt,
            min_backoff=self.min_backoff,
            max_backoff=self.max_backoff,
            random=random,
            jitter=self.jitter,
        )

    def next_attempt_at(
        self, now: float, attempt: int, first_attempt_at: float | None, random: _random.Random
    ) -> float | None:
        """When to try again after failed attempt ``attempt``, or ``None`` to give up."""
        return next_attempt_at(
            now,
            attempt,
            first_attempt_at,
            retry_period=self.retry_period,
            min_backoff=self.min_backoff,
            max_backoff=self.max_backoff,
            random=random,
            jitter=self.jitter,
        )


def backoff(
    attempt: int,
    *,
    min_backoff: float,
    max_backoff: float,
    random: _random.Random,
    jitter: float = 0.25,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    The nominal delay doubles from ``min_backoff`` and stops growing at
    ``max_backoff``; the result is drawn uniformly from ``jitter`` either side
    of it, clipped to ``min_backoff``..``max_backoff``.
    """
    check_count("attempt", attempt)
    # Capping the exponent keeps 2**n finite for absurd attempt counts.
    nominal = min(max_backoff, min_backoff * 2.0 ** min(attempt - 1, 64))
    low = max(min_backoff, nominal * (1 - jitter))
    high = min(max_backoff, nominal * (1 + jitter))
    return random.uniform(low, high)


def next_attempt_at(
    now: float,
    attempt: int,
    first_attempt_at: float | None,
    *,
    retry_period: float,
    min_backoff: float,
    max_backoff: float,
    random: _random.Random,
    jitter: float = 0.25,
) -> float | None:
    """When to try again after failed attempt ``attempt``, or ``None`` to give up.

    Gives up once ``retry_period`` has passed since ``first_attempt_at``
    (``now`` when this was the first attempt).  A retry that would fall past
    that deadline is moved onto it, so the last attempt happens right at the
    end of the period rather than never.
    """
    first = now if first_attempt_at is None else first_attempt_at
    deadline = first + retry_period
    if now >= deadline:
        return None
    delay = backoff(
        attempt, min_backoff=min_backoff, max_backoff=max_backoff, random=random, jitter=jitter
    )
    return min(now + delay, deadline)
