"""Argument checks shared by every layer: one wording for "must be a positive number".

Constructors (the runner, the connection pool, the LMTP factory) and the
configuration's value parsers reject a count or a duration that is out of
range with the same ``ValueError``.  This module imports nothing of mailrelay,
so storage, wire modules, the runner and the configuration may all use it.
"""

from __future__ import annotations

import math

__all__ = ["check_count", "check_positive"]


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``.

    Raises ``ValueError("<name> must be an int >= <minimum>, not <value>")``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


def check_positive(name: str, value: object) -> float:
    """Return ``value`` if it is a finite ``int`` or ``float`` (not a ``bool``) above zero.

    Raises ``ValueError("<name> must be greater than zero, not <value>")``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be greater than zero, not {value!r}")
    return value
