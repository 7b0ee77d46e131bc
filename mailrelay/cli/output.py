"""How commands word what they print: counts, problem lists, times, durations, progress.

Formatting shared by the command modules; :func:`report` and :class:`Progress`
write to the command's standard error (through its
:class:`~mailrelay.cli.context.Context` or its stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

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


# Work smaller than this finishes before a progress line would be worth reading.
PROGRESS_THRESHOLD = 1000
_BAR_WIDTH = 30


class Progress:
    """A one-line progress bar on standard error, redrawn in place with ``\\r``.

    Shown only when the stream is a terminal and the work has at least
    :data:`PROGRESS_THRESHOLD` items: piped or redirected output (scripts,
    cron, log files) stays exactly as without it.  :attr:`enabled` tells a
    command whether to split its work into batches for the bar's sake.
    """

    def __init__(self, stream: IO[str], total: int, label: str):
        self._stream = stream
        self._total = total
        self._label = label
        self.enabled = total >= PROGRESS_THRESHOLD and is_terminal(stream)
        self._drawn = False

    def update(self, done: int) -> None:
        """Show ``done`` of the total as finished."""
        if not self.enabled:
            return
        fraction = min(done / self._total, 1.0) if self._total else 1.0
        filled = int(fraction * _BAR_WIDTH)
        self._stream.write(
            f"\r{self._label} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
            f"{done:,}/{self._total:,} {fraction:4.0%}"
        )
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the line (once, and only if one was drawn), so later messages start afresh."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a stream without ``isatty`` is not)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def batches(total: int, progress: Progress, count: int = 10) -> int:
    """The batch size for ``total`` items: about ``count`` batches when ``progress``
    is shown (one transaction each), else one batch of everything."""
    if progress.enabled:
        return max(1, -(-total // count))
    return max(total, 1)


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the first one the headings) as aligned lines: every column padded
    but the last, which may be long (an SMTP reply, a Message-ID)."""
    if not rows:
        return []
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = []
    for *cells, last in rows:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        lines.append("  ".join([*padded, last]).rstrip())
    return lines


def one_line(text: str) -> str:
    """``text`` (a multi-line SMTP reply) on one line, runs of white space as one space."""
    return " ".join(text.split())
