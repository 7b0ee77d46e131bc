"""mailrelay's benchmarks (issue 5): the command line; every scenario against its peers.

Started by ``bench/run``, which installs the peers first, then passes its
arguments on.  Scenarios (``bench/scenarios.py``):

``ingest``
    LMTP ingest, 1 KB and 50 KB messages from 1 and 10 concurrent sessions of
    Postfix's ``smtp-source -L``: mailrelay (durable) vs aiosmtpd's LMTP server
    with a write+fsync handler vs Postfix's ``smtp-sink -L`` (C, not durable).
``outbound``
    N queued 1 KB messages with 1 and 10 recipients delivered to ``smtp-sink``:
    mailrelay vs smtplib (one connection) vs aiosmtplib (10 connections) vs
    ``smtp-source`` (C).
``e2e``
    The same lists, members and posts over LMTP to mailrelay and to GNU
    Mailman 3, timed from the first LMTP connection until ``smtp-sink`` has
    accepted the last recipient.
``memory``
    Peak RSS of the LMTP servers with 10, 100 and 1,000 concurrent sessions.
``bounces``
    10,000 VERP bounces over 10 LMTP sessions until every member is scored.
``oneclick``
    One post to 10,000 members, grouped vs personalised copies.
``bounceload``
    200 posts to a 10-member list delivered alone and during a burst of
    10,000 bounces to another list (the two alternate): the slowdown.
``metrics``
    200 posts x 10 members and 1 post x 10,000 end to end, with the Prometheus
    endpoint (``[http] endpoint``) off and on in turn; each relay with metrics
    is scraped once at the end, and its delivered count must match
    (``results/metrics.md``).

Measuring before and after a change: run a subset of configurations, several
times each, e.g. ::

    bench/run --only e2e_200x10,e2e_1x10000 --repeat 3 --no-mailman

``--list`` prints every configuration id (``ingest_1kb_10``, ``outbound_1``,
``e2e_20x1000``, ``memory_1000``, ...); a scenario name in ``--only`` stands for
all its configurations.  ``--out DIR`` keeps one run's results apart from
another's.

Each configuration is measured ``--runs`` (``--repeat``) times; in every run
each peer is measured right after the others, so the ratios are taken pair by
pair within a run.  The table goes to ``results/latest.md`` (raw figures in
``latest.json``), the chart to ``results/latest.png`` (``bench/report.py``).
Deliveries are counted at ``smtp-sink``: it appends every transaction to a dump
file (``-D``), one ``X-Rcpt-Args`` line per accepted recipient, which the
harness (``bench/harness.py``) reads as it grows.  Every wait is bounded; only
loopback is used.  The systems under test are in ``bench/parties.py``.

The modules next to this one are imported as top-level modules (``harness``,
``parties``, ``scenarios``, ``report``): this script's directory is first on
``sys.path`` when it runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time

import report
from harness import HERE, LOAD_CPUS, Context, log, program
from scenarios import SCENARIOS, configurations


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="mailrelay's benchmarks. Example, before and after a change: "
        "bench/run --only e2e_200x10,e2e_1x10000 --repeat 3",
    )
    parser.add_argument(
        "--runs", "--repeat", type=int, default=3, help="runs per configuration (3)"
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of: %(default)s"
    )
    parser.add_argument(
        "--only",
        help="comma-separated configuration ids (see --list) or scenario names to measure; "
        "the others are skipped",
    )
    parser.add_argument("--list", action="store_true", help="print the configuration ids and exit")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, mailrelay only, 1 run")
    parser.add_argument("--tools-python", help="Python with aiosmtpd, aiosmtplib (the peers)")
    parser.add_argument("--mailman-venv", help="virtualenv holding GNU Mailman 3.3.10")
    return parser


def _selection(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], frozenset[str] | None]:
    """The scenarios to run and the configuration ids to measure (None: all of them)."""
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if not args.only:
        return wanted, None
    known = configurations(args.smoke)
    only: set[str] = set()
    for item in (s.strip() for s in args.only.split(",")):
        if not item:
            continue
        if item in known:
            only.update(known[item])
        elif any(item in ids for ids in known.values()):
            only.add(item)
        else:
            mode = " with --smoke" if args.smoke else ""
            parser.error(f"--only: no configuration {item!r}{mode} (bench/run --list names them)")
    return [s for s in wanted if only & set(known[s])], frozenset(only)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for scenario, ids in configurations(args.smoke).items():
            print(f"{scenario}: {' '.join(ids)}")
        return 0
    wanted, only = _selection(parser, args)
    for tool in ("smtp-sink", "smtp-source"):
        if program(tool) is None:
            parser.error(f"{tool} is not installed (Debian package postfix; bench/run installs it)")
    os.makedirs(args.out, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="mailrelay-bench-")
    os.chmod(workdir, 0o755)  # smtp-sink, run as nobody, writes its dump below
    ctx = Context(
        workdir=workdir,
        runs=1 if args.smoke else max(1, args.runs),
        smoke=args.smoke,
        tools_python=None
        if args.smoke or not args.tools_python
        else os.path.abspath(args.tools_python),
        mailman_venv=None
        if args.smoke or not args.mailman_venv
        else os.path.abspath(args.mailman_venv),
        only=only,
    )
    started_at = time.monotonic()
    if LOAD_CPUS and (os.cpu_count() or 1) > 1 and hasattr(os, "sched_setaffinity"):
        # The harness polls smtp-sink's dump while servers work: keep it off
        # their CPU, with the load generators.
        os.sched_setaffinity(0, {int(cpu) for cpu in LOAD_CPUS.split(",")})
    # SIGTERM (timeout, Ctrl-C's cousin) unwinds like an exception, so every
    # server started so far is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for name in wanted:
            log(f"scenario {name}")
            SCENARIOS[name](ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started_at
    command = shlex.join(["bench/run", *(sys.argv[1:] if argv is None else argv)])
    report.write(ctx, args.out, elapsed, command)
    log(f"results in {args.out}/latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
