"""The benchmark report: Markdown tables, the targets, the chart, the versions.

Turns the rows a run filled in (:class:`~harness.Context`) into
``results/latest.md`` (:func:`markdown`: per scenario a table of medians with
min-max over the runs and the pairwise ratios; then the issue's targets, met
or not) and ``results/latest.png`` (:func:`chart`, when matplotlib is
installed); :func:`versions` describes the machine and the software measured.
Measures nothing itself except one fsync latency probe for the header.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

from harness import ROOT, Context, Row, log, median, pairwise

# Scenario -> table title, in the order the report and the chart show them.
TITLES = {
    "ingest": "LMTP ingest (durable; smtp-sink -L is not), smtp-source -L as the load",
    "outbound": "Outbound: queued 1 KB messages delivered to smtp-sink",
    "e2e": "End to end: posts over LMTP until smtp-sink accepted the last recipient",
    "memory": "Memory: peak RSS of the LMTP server",
    "bounces": "Bounces: VERP bounces over LMTP until every member's score is written",
    "oneclick": "One-click unsubscribe: grouped vs personalised copies of one post",
    "metrics": "Metrics: end to end with the Prometheus endpoint off and on, interleaved",
    "bounceload": "Member delivery alone and during a burst of VERP bounces to another list",
}


def versions(ctx: Context) -> dict[str, str]:
    """The machine and the versions of everything measured, for the report's header."""
    import twisted

    found = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB",
        "os": f"{platform.system()} {platform.release()}",
        # The durable-ingest ratio against aiosmtpd+fsync depends on this:
        # aiosmtpd's handler pays one fsync per message on its event loop,
        # mailrelay shares one among all waiting sessions (group commit).
        "fsync": _fsync_latency(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "mailrelay": _git_revision(),
        "postfix": _command_output(["postconf", "-dh", "mail_version"]),
    }
    if ctx.tools_python:
        found["peers"] = _command_output(
            [
                ctx.tools_python,
                "-c",
                "from importlib.metadata import version as v;"
                "print('aiosmtpd', v('aiosmtpd'), 'aiosmtplib', v('aiosmtplib'))",
            ]
        )
    if ctx.mailman_venv:
        found["mailman"] = _command_output(
            [os.path.join(ctx.mailman_venv, "bin", "python"), "-c", _MAILMAN_VERSIONS]
        )
    return found


_MAILMAN_VERSIONS = (
    "from importlib.metadata import version as v;"
    "print('GNU Mailman', v('mailman'), 'SQLAlchemy', v('sqlalchemy'), 'aiosmtpd', v('aiosmtpd'))"
)


def _fsync_latency(rounds: int = 100) -> str:
    """Median time of a 1 KB append + fsync in a temporary directory (like the spools)."""
    timings = []
    with tempfile.TemporaryDirectory() as directory:
        fd = os.open(os.path.join(directory, "probe"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for _ in range(rounds):
                started = time.perf_counter()
                os.write(fd, b"x" * 1024)
                os.fsync(fd)
                timings.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    return f"{statistics.median(timings) * 1000:.2f} ms median per 1 KB write + fsync"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_revision() -> str:
    return _command_output(["git", "-C", ROOT, "describe", "--always", "--dirty"]) or "unknown"


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    except OSError:
        return ""
    return done.stdout.decode("utf-8", "replace").strip()


# (scenario, configuration prefix, peer, reference peer, minimum ratio): the
# issue's targets, checked against the medians of the pairwise ratios.
TARGETS = [
    ("ingest", "1 KB, 10 sessions", "mailrelay", "aiosmtpd+fsync", 8.0),
    ("ingest", "1 KB, 10 sessions", "mailrelay", "smtp-sink -L", 0.15),
    ("outbound", "", "mailrelay", "smtplib 1 conn", 2.0),
    ("outbound", "x 1 recipients", "mailrelay", "aiosmtplib 10 conns", 1.5),
    ("e2e", "200 posts x 10 members", "mailrelay", "Mailman 3", 40.0),
    ("e2e", "20 posts x 1,000 members", "mailrelay", "Mailman 3", 10.0),
    ("e2e", "1 posts x 10,000 members", "mailrelay", "Mailman 3", 10.0),
]


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{_fmt(median(values))} ({_fmt(min(values))}-{_fmt(max(values))})"


def markdown(ctx: Context, found: dict[str, str], elapsed: float, command: str) -> str:
    """The results as Markdown: a table per scenario, then the targets and notes."""
    lines = [
        "# mailrelay benchmarks",
        "",
        f"Command: `{command}`; {ctx.runs} run(s) per "
        f"configuration, {elapsed / 60:.1f} minutes in all. Cells: median (min-max) over "
        "the runs; ratios are mailrelay / peer taken within each run, then the median "
        "(min-max) of those.",
        "",
    ]
    lines += [f"- {name}: {value}" for name, value in found.items() if value]
    lines.append("")
    for scenario, title in TITLES.items():
        rows = [row for row in ctx.rows if row.scenario == scenario]
        if not rows:
            continue
        peers = list(dict.fromkeys(peer for row in rows for peer in row.values))
        lines += [f"## {title}", ""]
        header = ["configuration", "unit", *peers]
        header += [f"mailrelay / {peer}" for peer in peers if peer != "mailrelay"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            cells = [row.config, row.unit]
            cells += [_spread(row.values.get(peer, [])) for peer in peers]
            cells += [
                _spread(pairwise(row, "mailrelay", peer)) for peer in peers if peer != "mailrelay"
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if scenario == "e2e":
            lines += ["", *_e2e_details(rows, peers)]
        lines.append("")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for scenario, prefix, peer, other, minimum in TARGETS:
        for row in ctx.rows:
            if row.scenario == scenario and prefix in row.config and other in row.values:
                ratio = median(pairwise(row, peer, other))
                lines.append(
                    f"| {scenario} {row.config}: {peer} >= {minimum:g} x {other} "
                    f"| {_fmt(ratio)} x | {'yes' if ratio >= minimum else 'NO'} |"
                )
    lines += _other_targets(ctx)
    lines += [""] + [f"{note}" for note in ctx.notes]
    return "\n".join(lines).rstrip() + "\n"


def _e2e_details(rows: list[Row], peers: list[str]) -> list[str]:
    header = ["configuration", "peer", "posts/s", "first delivery s", "seconds", "peak RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        for peer in peers:
            if peer not in row.values:
                continue
            cells = [row.config, peer]
            for name in ("posts_per_s", "first_delivery_s", "seconds", "peak_rss_mib"):
                cells.append(_spread(row.extra.get(name, {}).get(peer, [])))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _other_targets(ctx: Context) -> list[str]:
    lines = []
    e2e = {row.config: row for row in ctx.rows if row.scenario == "e2e"}
    latency = e2e.get("1 posts x 10 members")
    if latency:
        first = median(latency.extra["first_delivery_s"].get("mailrelay", []))
        limit = 0.05
        mm = latency.extra["first_delivery_s"].get("Mailman 3")
        if mm:
            limit = min(limit, median(mm) / 40)
        met = "yes" if first <= limit else "NO"
        lines.append(
            f"| e2e first delivery <= {limit * 1000:.0f} ms | {first * 1000:.0f} ms | {met} |"
        )
    small, large = e2e.get("1 posts x 10,000 members"), e2e.get("1 posts x 100,000 members")
    if small and large and "mailrelay" in large.values:
        growth = median(large.extra["seconds"]["mailrelay"]) / median(
            small.extra["seconds"]["mailrelay"]
        )
        met = "yes" if growth <= 12 else "NO"
        lines.append(
            f"| e2e 10,000 -> 100,000 members: time grows <= 1.2 x 10 | {growth:.1f} x | {met} |"
        )
    peaks = [
        (row, max(row.extra.get("peak_rss_mib", {}).get("mailrelay", [0])))
        for row in e2e.values()
        if "Mailman 3" in row.values
    ]
    if peaks:
        relay = max(peak for _, peak in peaks)
        mailman = max(max(row.extra["peak_rss_mib"]["Mailman 3"]) for row, _ in peaks)
        met = "yes" if relay * 20 <= mailman else "NO"
        lines.append(
            f"| e2e memory <= 1/20 of Mailman's | {relay:.0f} MiB vs {mailman:.0f} MiB | {met} |"
        )
    for row in ctx.rows:
        if row.scenario == "bounces" and row.config.startswith("10,000 "):
            rate = median(row.values.get("mailrelay", []))
            lines.append(
                f"| bounces: a burst of 10,000 at >= 500/s | {_fmt(rate)}/s | "
                f"{'yes' if rate >= 500 else 'NO'} |"
            )
        if row.scenario == "bounceload" and "10,000 bounces" in row.config:
            ratios = pairwise(row, "mailrelay", "mailrelay + bounce burst")
            if ratios:
                slowdown = median(ratios) - 1
                lines.append(
                    f"| bounces: delivery of {row.config.partition(', ')[0]} slowed by <= 5% "
                    f"during a burst | {slowdown:+.1%} | {'yes' if slowdown <= 0.05 else 'NO'} |"
                )
        if row.scenario == "memory" and row.config.startswith("1,000 "):
            peak = median(row.values.get("mailrelay", []))
            lines.append(
                f"| memory at 1,000 sessions <= 64 MB | {peak:.0f} MiB | "
                f"{'yes' if peak * 2**20 <= 64e6 else 'NO'} |"
            )
    return lines


def chart(ctx: Context, path: str) -> bool:
    """A PNG with one panel per scenario (medians, min-max as error bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart")
        return False
    scenarios = [s for s in TITLES if any(r.scenario == s for r in ctx.rows)]
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(11, 3.6 * len(scenarios)))
    if len(scenarios) == 1:
        axes = [axes]
    for ax, scenario in zip(axes, scenarios, strict=True):
        rows = [r for r in ctx.rows if r.scenario == scenario]
        peers = list(dict.fromkeys(p for r in rows for p in r.values))
        width = 0.8 / len(peers)
        for i, peer in enumerate(peers):
            xs, ys, lo, hi = [], [], [], []
            for j, row in enumerate(rows):
                values = row.values.get(peer)
                if values:
                    m = median(values)
                    xs.append(j + (i - (len(peers) - 1) / 2) * width)
                    ys.append(m)
                    lo.append(m - min(values))
                    hi.append(max(values) - m)
            ax.bar(xs, ys, width, yerr=[lo, hi], label=peer, capsize=2)
        ax.set_xticks(range(len(rows)), [r.config for r in rows], fontsize=8)
        ax.set_ylabel(rows[0].unit)
        if scenario != "memory":
            ax.set_yscale("log")
        ax.set_title(scenario, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(ctx: Context, out: str, elapsed: float, command: str) -> None:
    """Write ``latest.md``, ``latest.json`` (raw figures) and ``latest.png`` into ``out``."""
    found = versions(ctx)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(markdown(ctx, found, elapsed, command))
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump(
            {
                "versions": found,
                "runs": ctx.runs,
                "rows": [row.__dict__ for row in ctx.rows],
                "notes": ctx.notes,
            },
            f,
            indent=1,
        )
    chart(ctx, os.path.join(out, "latest.png"))
