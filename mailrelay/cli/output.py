"""How commands word what they print: counts, problem lists, times and durations.

Pure formatting shared by the command modules; only :func:`report` writes, to
the command's standard error through its :class:`~mailrelay.cli.context.Context`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailrelay.cli.context import Context

MAX_REPORTED = 20  # problems listed one by one before "... and N more"


def report(ctx: Context, items: Sequence[str], describe: Callable[[str], str]) -> None:
    """Each of the first :data:`MAX_REPORTED` ``items``, described, on standard error;
    then how many more there were."""
    for item in items[:MAX_REPORTED]:
        ctx.err(describe(item))
    if len(items) > MAX_REPORTED:
        ctx.err(f"... and {len(items) - MAX_REPORTED} more")


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 member``, ``2,000 members``; ``words`` for an irregular plural."""
    return f"{count:,} {word if count == 1 else words or word + 's'}"


def format_time(timestamp: float | None, now: float) -> str:
    """A local time with how far from ``now`` it is: ``... (in 2h)``, ``... (5m ago)``;
    ``-`` for none."""
    if timestamp is None:
        return "-"
    when = datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    delta = timestamp - now
    if abs(delta) < 1:
        return f"{when} (now)"
    distance = rough_duration(abs(delta))
    return f"{when} (in {distance})" if delta > 0 else f"{when} ({distance} ago)"


_UNITS = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def exact_duration(seconds: float) -> str:
    """``5d``, ``90m``, ``0.5s``: the largest unit that divides ``seconds`` evenly,
    as the configuration file accepts it."""
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds}s"


def rough_duration(seconds: float) -> str:
    """``2h``, ``5m``: ``seconds`` in the largest unit it reaches, rounded."""
    seconds = round(seconds)
    for unit, size in _UNITS:
        if seconds >= size:
            return f"{round(seconds / size)}{unit}"
    return "0s"
