"""The benchmark scenarios: what is measured, in which configurations, against whom.

Each scenario is a function of a :class:`~harness.Context` that adds one
:class:`~harness.Row` per configuration it measures.  Every configuration has
an id (``bench/run --list`` prints them) that ``bench/run --only`` selects:

``ingest_<size>kb_<sessions>``   LMTP ingest (1 or 50 KB; 1 or 10 sessions)
``outbound_<rcpts>``             queued messages with 1 or 10 recipients
``e2e_<posts>x<members>``        posts over LMTP until smtp-sink has every recipient
``memory_<sessions>``            peak RSS with 10, 100 or 1,000 concurrent sessions
``bounces_<count>``              VERP bounces over LMTP until every member is scored
``bounceload_<posts>x<members>`` posts delivered alone and during a burst of bounces
``oneclick_<copies>``            1 post x 10,000 members, grouped or personalised copies
``metrics_<posts>x<members>``    e2e with the Prometheus endpoint off and on, interleaved

A scenario name alone (``--only e2e``) stands for all its configurations.  In
every run each peer is measured right after the others (their order rotating
from run to run), so the ratios are taken pair by pair within a run.
"""

from __future__ import annotations

import json
import os
import smtplib
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from harness import (
    E2E_CPUS,
    KB,
    LIST_DOMAIN,
    PEERS,
    SERVER_CPUS,
    Context,
    Row,
    Sink,
    free_port,
    log,
    median,
    pairwise,
    pinned,
    rotated,
    run_timed,
    smtp_source,
    started,
    wait_until,
)
from parties import AiosmtpdLMTP, Mailman, Relay, SinkLMTP

# (posts, members) per e2e configuration; the relay-only ones have no Mailman
# figure (creating 100,000 Mailman members takes hours).
E2E_SIZES = [(200, 10), (20, 1000), (1, 10000), (1, 10)]
E2E_RELAY_ONLY = [(1, 100000)]
_E2E_SMOKE_SIZES = [(3, 5), (1, 20)]
# One post to this many members, each copy type ([mta] personalize no / yes).
ONECLICK_MEMBERS = 10000
_ONECLICK_SMOKE_MEMBERS = 20
ONECLICK_COPIES = ("grouped", "personal")
# The e2e configurations issue 11 bounds the cost of metrics on (3% at most).
METRICS_SIZES = [(200, 10), (1, 10000)]
_METRICS_SMOKE_SIZES = [(3, 5)]
METRICS_OFF, METRICS_ON = "mailrelay", "mailrelay+metrics"


def _ingest_configs(smoke: bool) -> list[tuple[int, int]]:
    return [
        (size, sessions) for size in ((KB,) if smoke else (KB, 50 * KB)) for sessions in (1, 10)
    ]


def _memory_levels(smoke: bool) -> tuple[int, ...]:
    return (10,) if smoke else (10, 100, 1000)


def configurations(smoke: bool) -> dict[str, list[str]]:
    """Every scenario's configuration ids, in the order they are measured."""
    e2e = _E2E_SMOKE_SIZES if smoke else E2E_SIZES + E2E_RELAY_ONLY
    return {
        "ingest": [_ingest_id(size, sessions) for size, sessions in _ingest_configs(smoke)],
        "outbound": [f"outbound_{rcpts}" for rcpts in (1, 10)],
        "e2e": [_e2e_id(size) for size in e2e],
        "memory": [f"memory_{sessions}" for sessions in _memory_levels(smoke)],
        "bounces": [f"bounces_{_bounce_count(smoke)}"],
        "oneclick": [f"oneclick_{copies}" for copies in ONECLICK_COPIES],
        "metrics": [_metrics_id(size) for size in _metrics_sizes(smoke)],
        "bounceload": [_bounceload_id(size) for size in _bounceload_sizes(smoke)],
    }


def _metrics_sizes(smoke: bool) -> list[tuple[int, int]]:
    return _METRICS_SMOKE_SIZES if smoke else METRICS_SIZES


def _metrics_id(size: tuple[int, int]) -> str:
    return f"metrics_{size[0]}x{size[1]}"


def _ingest_id(size: int, sessions: int) -> str:
    return f"ingest_{size // KB}kb_{sessions}"


def _e2e_id(size: tuple[int, int]) -> str:
    return f"e2e_{size[0]}x{size[1]}"


def scenario_ingest(ctx: Context) -> None:
    """LMTP ingest: messages per second, durable unless the peer is smtp-sink -L."""
    peers = _lmtp_peers(ctx)
    for size, sessions in _ingest_configs(ctx.smoke):
        if not ctx.wanted(_ingest_id(size, sessions)):
            continue
        count = 20 if ctx.smoke else (3000 if size == KB else 1000)
        row = ctx.row("ingest", f"{size // KB} KB, {sessions} sessions", "messages/s")
        for run in range(ctx.runs):
            for peer in rotated(peers, run):
                seconds, _ = _flood(ctx, peer, messages=count, sessions=sessions, size=size)
                row.add(peer, count / seconds)
            log(f"ingest {row.config} run {run + 1}: " + _last(row))


def _lmtp_peers(ctx: Context) -> list[str]:
    """The LMTP servers compared in the ingest and memory scenarios."""
    peers = ["mailrelay", "smtp-sink -L"]
    if ctx.tools_python:
        peers.insert(1, "aiosmtpd+fsync")
    return peers


def _flood(
    ctx: Context, peer: str, *, messages: int, sessions: int, size: int = KB
) -> tuple[float, float]:
    """Start the LMTP server ``peer`` and send it ``messages`` with ``smtp-source -L``.

    The seconds ``smtp-source`` took and the server's peak RSS in MiB (read
    before it is stopped).
    """
    server = _ingest_server(ctx, peer)
    with started(server):
        argv = smtp_source(
            server.port,
            messages=messages,
            sessions=sessions,
            size=size,
            recipient=f"ingest@{LIST_DOMAIN}",
        )
        seconds = run_timed(argv, 300, f"smtp-source -L to {peer}")
        return seconds, server.peak_rss_kib() / 1024


def _ingest_server(ctx: Context, peer: str) -> Any:
    if peer == "mailrelay":
        # A list without members: what is measured is taking mail in.
        return Relay(ctx.workdir, free_port(), {f"ingest@{LIST_DOMAIN}": 0})
    if peer == "aiosmtpd+fsync":
        assert ctx.tools_python
        return AiosmtpdLMTP(ctx.workdir, ctx.tools_python)
    return SinkLMTP(ctx.workdir)


def _last(row: Row) -> str:
    return ", ".join(f"{peer} {values[-1]:,.0f}" for peer, values in row.values.items())


def scenario_outbound(ctx: Context) -> None:
    """Queued messages delivered to smtp-sink: recipients per second."""
    peers = ["mailrelay", "smtp-source"]
    if ctx.tools_python:
        peers[1:1] = ["smtplib 1 conn", "aiosmtplib 10 conns"]
    for rcpts in (1, 10):
        if not ctx.wanted(f"outbound_{rcpts}"):
            continue
        count = 20 if ctx.smoke else (3000 if rcpts == 1 else 1000)
        row = ctx.row("outbound", f"{count:,} messages x {rcpts} recipients", "recipients/s")
        for run in range(ctx.runs):
            sink = Sink(ctx.workdir)
            try:
                for peer in rotated(peers, run):
                    before = sink.recipients()
                    seconds = _outbound_once(ctx, peer, sink, count, rcpts, before)
                    target = before + count * rcpts
                    wait_until(
                        lambda s=sink, t=target: s.recipients() >= t,
                        "smtp-sink to count every recipient",
                        30,
                    )
                    row.add(peer, count * rcpts / seconds)
            finally:
                sink.stop()
            log(f"outbound {row.config} run {run + 1}: " + _last(row))


def _outbound_once(ctx: Context, peer: str, sink: Sink, count: int, rcpts: int, before: int):
    if peer == "smtp-source":
        argv = smtp_source(
            sink.port,
            messages=count,
            sessions=10,
            recipient=f"member@{LIST_DOMAIN}",
            lmtp=False,
            recipients=rcpts,
        )
        return run_timed(argv, 300, "smtp-source")
    if peer != "mailrelay":
        assert ctx.tools_python
        client = "smtplib" if peer.startswith("smtplib") else "aiosmtplib"
        argv = [
            ctx.tools_python,
            os.path.join(PEERS, "outbound.py"),
            client,
            str(sink.port),
            str(count),
            str(rcpts),
        ]
        done = subprocess.run(
            pinned(SERVER_CPUS, argv), capture_output=True, timeout=600, check=True
        )
        return json.loads(done.stdout)["seconds"]
    # mailrelay: fill its spool over LMTP while the smarthost is stopped, then
    # let the smarthost go and time until it has every recipient.
    address = f"out{rcpts}@{LIST_DOMAIN}"
    with started(Relay(ctx.workdir, sink.port, {address: rcpts})) as relay:
        sink.pause()
        try:
            run_timed(
                smtp_source(relay.port, messages=count, sessions=10, recipient=address),
                300,
                "smtp-source -L to mailrelay",
            )
        finally:
            start = time.perf_counter()
            sink.resume()
        _, last = sink.wait_for(before + count * rcpts, 300)
    return last - start


def scenario_e2e(ctx: Context) -> None:
    """Posts over LMTP to recipients at smtp-sink: mailrelay vs Mailman 3."""
    sizes = [s for s in (_E2E_SMOKE_SIZES if ctx.smoke else E2E_SIZES) if ctx.wanted(_e2e_id(s))]
    extra = [] if ctx.smoke else [s for s in E2E_RELAY_ONLY if ctx.wanted(_e2e_id(s))]
    if not sizes + extra:
        return
    rows = {
        size: ctx.row("e2e", f"{size[0]:,} posts x {size[1]:,} members", "recipients/s")
        for size in sizes + extra
    }
    sink = Sink(ctx.workdir)
    mailman = None
    try:
        if ctx.mailman_venv and sizes:
            lists = {_e2e_list(size): size[1] for size in sizes}
            log("starting Mailman 3 (creating lists first; 10,000 members take a while)")
            mailman = Mailman(ctx.workdir, ctx.mailman_venv, sink.port, lists)
        for run in range(ctx.runs):
            for size in sizes + extra:
                peers = ["mailrelay"] + (["Mailman 3"] if mailman and size in sizes else [])
                for peer in rotated(peers, run):
                    if peer == "mailrelay":
                        address = _e2e_list(size)
                        relay = Relay(ctx.workdir, sink.port, {address: size[1]}, cpus=E2E_CPUS)
                        with started(relay):
                            result = _post_and_wait(sink, relay.port, address, size)
                            rss = relay.peak_rss_kib()
                    else:
                        assert mailman is not None
                        result = _post_and_wait(sink, mailman.port, _e2e_list(size), size)
                        rss = mailman.peak_rss_kib()
                    total, first = result
                    posts, members = size
                    rows[size].add(
                        peer,
                        posts * members / total,
                        seconds=total,
                        posts_per_s=posts / total,
                        first_delivery_s=first,
                        peak_rss_mib=rss / 1024,
                    )
                log(f"e2e {rows[size].config} run {run + 1}: " + _last(rows[size]))
        if mailman:
            ctx.notes.append(f"Mailman 3 ran {mailman.processes()} processes.")
    finally:
        if mailman:
            mailman.stop()
        sink.stop()


def _e2e_list(size: tuple[int, int]) -> str:
    return f"e2e-{size[0]}x{size[1]}@{LIST_DOMAIN}"


def _post_and_wait(sink: Sink, port: int, address: str, size: tuple[int, int]):
    """Post while watching ``smtp-sink``: the seconds until the last and the
    first recipient arrived, counted from the start of posting."""
    posts, members = size
    target = sink.recipients() + posts * members
    argv = smtp_source(port, messages=posts, sessions=1, recipient=address)
    start = time.perf_counter()
    poster = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    def posting_failed() -> None:
        if poster.poll():
            output = poster.stdout.read().decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"posting over LMTP failed ({poster.returncode}): {output}")

    try:
        first, last = sink.wait_for(target, 900, posting_failed)
        poster.wait(60)
        posting_failed()
    finally:
        if poster.poll() is None:
            poster.kill()
            poster.wait()
        poster.stdout.close()
    return last - start, first - start


def scenario_memory(ctx: Context) -> None:
    """Peak RSS of the LMTP servers with 10, 100 and 1,000 concurrent sessions."""
    peers = _lmtp_peers(ctx)
    for sessions in _memory_levels(ctx.smoke):
        if not ctx.wanted(f"memory_{sessions}"):
            continue
        row = ctx.row("memory", f"{sessions:,} concurrent sessions", "peak RSS MiB")
        for run in range(ctx.runs):
            for peer in rotated(peers, run):
                _, peak_mib = _flood(ctx, peer, messages=sessions * 3, sessions=sessions)
                row.add(peer, peak_mib)
            log(f"memory {row.config} run {run + 1}: " + _last(row))


def _bounce_count(smoke: bool) -> int:
    return 50 if smoke else 10_000


BOUNCE_SESSIONS = 10
BOUNCE_LIST = f"bouncing@{LIST_DOMAIN}"


def scenario_bounces(ctx: Context) -> None:
    """A burst of VERP bounces (one per member) sent over LMTP in 10 sessions: bounces
    per second from the first LMTP connection until the registry shows every member
    scored (ingest, -bounces processing and the score write, all durable)."""
    count = _bounce_count(ctx.smoke)
    if not ctx.wanted(f"bounces_{count}"):
        return
    row = ctx.row(
        "bounces", f"{count:,} VERP bounces, {BOUNCE_SESSIONS} LMTP sessions", "bounces/s"
    )
    sink = Sink(ctx.workdir, count=False)
    try:
        for run in range(ctx.runs):
            relay = Relay(ctx.workdir, sink.port, {BOUNCE_LIST: count})
            load = os.getloadavg()[0]
            with started(relay):
                _, seconds = _bounce_burst(relay, count)
            row.add("mailrelay", count / seconds, seconds=seconds, load=load)
            log(f"bounces run {run + 1}: {count / seconds:,.0f} bounces/s (load {load:.2f})")
    finally:
        sink.stop()


def _bounceload_sizes(smoke: bool) -> list[tuple[int, int]]:
    return [(3, 5)] if smoke else BOUNCELOAD_SIZES


def _bounceload_id(size: tuple[int, int]) -> str:
    return f"bounceload_{size[0]}x{size[1]}"


# (posts, members) whose delivery is measured with and without a bounce burst.
BOUNCELOAD_SIZES = [(200, 10), (1, 10000)]
QUIET, BURST = "mailrelay", "mailrelay + bounce burst"
BOUNCELOAD_SETTLE = 1.0  # seconds between the relay listening and the measurement


def scenario_bounceload(ctx: Context) -> None:
    """What a burst of bounces does to member delivery: posts to another list
    over LMTP until smtp-sink has every copy, alone ("mailrelay") and while
    10,000 VERP bounces to another list arrive over 10 LMTP sessions, the
    posting starting once a tenth of them was accepted.  The two alternate
    (their order rotating), each with a fresh relay holding both lists,
    measured after it has settled for BOUNCELOAD_SETTLE seconds."""
    count = _bounce_count(ctx.smoke)
    for size in _bounceload_sizes(ctx.smoke):
        if ctx.wanted(_bounceload_id(size)):
            _bounceload(ctx, size, count)


def _bounceload(ctx: Context, size: tuple[int, int], count: int) -> None:
    row = ctx.row(
        "bounceload",
        f"{size[0]:,} posts x {size[1]:,} members, {count:,} bounces in the burst",
        "recipients/s",
    )
    address = f"delivery-{size[0]}x{size[1]}@{LIST_DOMAIN}"
    sink = Sink(ctx.workdir)
    try:
        for run in range(ctx.runs):
            for peer in rotated([QUIET, BURST], run):
                load = os.getloadavg()[0]
                relay = Relay(
                    ctx.workdir, sink.port, {BOUNCE_LIST: count, address: size[1]}, cpus=E2E_CPUS
                )
                with started(relay):
                    # Both start from a settled relay: its start-up work (the
                    # bounce warnings' first check reads every member) is done.
                    time.sleep(BOUNCELOAD_SETTLE)
                    extra: dict[str, float] = {}
                    if peer == BURST:
                        total, extra = _deliver_during_burst(sink, relay, address, size, count)
                    else:
                        total, _ = _post_and_wait(sink, relay.port, address, size)
                row.add(peer, size[0] * size[1] / total, seconds=total, load=load, **extra)
            log(f"bounceload {row.config} run {run + 1}: " + _last(row))
    finally:
        sink.stop()
    if len(row.values.get(BURST, [])) and len(row.values.get(QUIET, [])):
        slowdowns = [ratio - 1 for ratio in pairwise(row, QUIET, BURST)]
        loads = row.extra["load"][QUIET] + row.extra["load"][BURST]
        ctx.notes.append(
            f"Bounce burst, {size[0]:,} posts x {size[1]:,} members: delivery took "
            f"{median(slowdowns):+.1%} longer during it (median of {len(slowdowns)} pairs, "
            f"{min(slowdowns):+.1%} to {max(slowdowns):+.1%}); "
            f"bounces {median(row.extra['bounces_per_s'][BURST]):,.0f}/s meanwhile; "
            f"load average {min(loads):.2f}-{max(loads):.2f} at the starts."
        )


def _deliver_during_burst(
    sink: Sink, relay: Relay, address: str, size: tuple[int, int], count: int
) -> tuple[float, dict[str, float]]:
    """Start a bounce burst, post once it is under way, and wait for both: the
    delivery's seconds, and the burst's rate and how long it outlasted the delivery."""
    under_way = threading.Event()
    burst: list[Any] = []

    def bounce() -> None:
        try:
            burst.append(_bounce_burst(relay, count, under_way))
        except BaseException as e:
            burst.append(e)

    thread = threading.Thread(target=bounce)
    start = time.perf_counter()
    thread.start()
    under_way.wait(300)
    posted = time.perf_counter()
    total, _ = _post_and_wait(sink, relay.port, address, size)
    thread.join(900)
    if not burst or isinstance(burst[0], BaseException):
        raise RuntimeError(f"the bounce burst failed: {burst[0] if burst else 'timed out'!r}")
    sent, scored = burst[0]
    return total, {
        "bounces_per_s": count / scored,
        # > 0: the burst went on after the last copy was delivered (it covered the delivery).
        "burst_after_s": start + sent - (posted + total),
    }


def _bounce_burst(
    relay: Relay, count: int, under_way: threading.Event | None = None
) -> tuple[float, float]:
    """Send ``count`` VERP bounces over LMTP and wait until every member is
    scored: the seconds until the last was accepted and until all were scored.
    ``under_way`` is set once a tenth of them were accepted."""
    local, _, domain = BOUNCE_LIST.partition("@")
    errors: list[BaseException] = []
    accepted: list[int] = []

    def send(first: int) -> None:
        try:
            client = smtplib.LMTP("127.0.0.1", relay.port)
            for i in range(first, count, BOUNCE_SESSIONS):
                if under_way is not None and len(accepted) * 10 >= count:
                    under_way.set()
                rcpt = f"{local}-bounces+m{i}=members.example@{domain}"
                client.sendmail(
                    "",
                    [rcpt],
                    f"From: MAILER-DAEMON@mx.members.example\r\nTo: {rcpt}\r\n"
                    f"Subject: Undeliverable\r\nMessage-ID: <b{i}@mx.members.example>\r\n"
                    "\r\nThe mailbox does not exist.\r\n",
                )
                accepted.append(i)
            client.quit()
        except BaseException as e:
            errors.append(e)
        finally:
            if under_way is not None:
                under_way.set()  # also on failure: nobody waits for a burst that died

    start = time.perf_counter()
    threads = [threading.Thread(target=send, args=(n,)) for n in range(BOUNCE_SESSIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"sending bounces over LMTP failed: {errors[0]!r}")
    registry = sqlite3.connect(os.path.join(relay.dir, "var", "registry.sqlite3"), timeout=30)
    try:

        def scored() -> bool:
            (done,) = registry.execute(
                "SELECT count(*) FROM members WHERE bounce_score >= 1"
            ).fetchone()
            return done >= count

        wait_until(scored, "every member to be scored", 600, step=0.05)
    finally:
        registry.close()
    return sent, time.perf_counter() - start


def scenario_oneclick(ctx: Context) -> None:
    """What per-member copies cost: one post to 10,000 members, with the one-click
    unsubscribe URLs on, as grouped copies (max_recipients per transaction, a
    list-level URL) and as personal ones (a transaction and a URL per member)."""
    members = _ONECLICK_SMOKE_MEMBERS if ctx.smoke else ONECLICK_MEMBERS
    copies = [c for c in ONECLICK_COPIES if ctx.wanted(f"oneclick_{c}")]
    if not copies:
        return
    titles = {"grouped": "grouped copies", "personal": "personalised copies"}
    rows = {
        c: ctx.row("oneclick", f"1 post x {members:,} members, {titles[c]}", "recipients/s")
        for c in copies
    }
    address = f"oneclick-{members}@{LIST_DOMAIN}"
    sink = Sink(ctx.workdir)
    try:
        for run in range(ctx.runs):
            for copy in rotated(copies, run):
                extra = (
                    f"personalize = {'yes' if copy == 'personal' else 'no'}\n"
                    f"[http]\nendpoint = tcp:{free_port()}:interface=127.0.0.1\n"
                    f"public_url = https://lists.{LIST_DOMAIN}/\n"
                )
                relay = Relay(
                    ctx.workdir, sink.port, {address: members}, cpus=E2E_CPUS, extra_ini=extra
                )
                with started(relay):
                    total, first = _post_and_wait(sink, relay.port, address, (1, members))
                    rss = relay.peak_rss_kib()
                rows[copy].add(
                    "mailrelay",
                    members / total,
                    seconds=total,
                    first_delivery_s=first,
                    peak_rss_mib=rss / 1024,
                )
                log(f"oneclick {rows[copy].config} run {run + 1}: " + _last(rows[copy]))
    finally:
        sink.stop()
    if len(rows) == 2:
        grouped, personal = (median(rows[c].extra["seconds"]["mailrelay"]) for c in ONECLICK_COPIES)
        ctx.notes.append(
            f"One-click: personalised copies took {personal / grouped:.2f} x the time of "
            f"grouped ones ({members:,} members, median seconds {personal:.2f} vs {grouped:.2f})."
        )


def scenario_metrics(ctx: Context) -> None:
    """What the Prometheus endpoint costs end to end: the same posts with
    ``[http] endpoint`` unset and set, measured in turn (off, on, then on,
    off, ...: the machine's drift hits both alike).  Each relay with metrics
    is scraped once at the end, and its delivered counter must match."""
    sizes = [s for s in _metrics_sizes(ctx.smoke) if ctx.wanted(_metrics_id(s))]
    if not sizes:
        return
    rows = {
        size: ctx.row("metrics", f"{size[0]:,} posts x {size[1]:,} members", "recipients/s")
        for size in sizes
    }
    sink = Sink(ctx.workdir)
    try:
        for run in range(ctx.runs):
            for size in sizes:
                address = f"metrics-{size[0]}x{size[1]}@{LIST_DOMAIN}"
                for peer in rotated([METRICS_OFF, METRICS_ON], run):
                    metrics = peer == METRICS_ON
                    relay = Relay(
                        ctx.workdir, sink.port, {address: size[1]}, cpus=E2E_CPUS, metrics=metrics
                    )
                    with started(relay):
                        cpu = relay.cpu_seconds()
                        total, first = _post_and_wait(sink, relay.port, address, size)
                        # CPU time drifts less than wall time on a shared machine.
                        cpu = relay.cpu_seconds() - cpu
                        if metrics:
                            _check_scrape(relay, size[0] * size[1])
                    rows[size].add(
                        peer,
                        size[0] * size[1] / total,
                        seconds=total,
                        cpu_s=cpu,
                        first_delivery_s=first,
                        load1=os.getloadavg()[0],
                    )
                log(f"metrics {rows[size].config} run {run + 1}: " + _last(rows[size]))
    finally:
        sink.stop()
    for row in rows.values():
        ratios = _ratios(row.values)
        if ratios:
            cpu = _ratios(row.extra["cpu_s"])
            loads = _loads(row)
            ctx.notes.append(
                f"Metrics, {row.config}: throughput on / off {_median_range(ratios)}, "
                f"relay CPU seconds on / off {_median_range(cpu)}, over {len(ratios)} "
                f"pair(s); 1-minute load average {min(loads):.2f}-{max(loads):.2f} after "
                "each run."
            )


def _ratios(values: dict[str, list[float]]) -> list[float]:
    """on / off in each run (each pair measured back to back)."""
    on, off = values.get(METRICS_ON, []), values.get(METRICS_OFF, [])
    return [a / b for a, b in zip(on, off, strict=False) if b]


def _median_range(values: list[float]) -> str:
    return f"{median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _loads(row: Row) -> list[float]:
    return [load for loads in row.extra.get("load1", {}).values() for load in loads]


def _check_scrape(relay: Relay, expected: int) -> None:
    """Scrape ``/metrics`` once: proof that the endpoint was on and counting."""
    delivered = relay.recipients_counted("delivered")
    if delivered != expected:
        raise RuntimeError(f"/metrics counted {delivered:g} delivered recipients, not {expected}")


SCENARIOS: dict[str, Callable[[Context], None]] = {
    "ingest": scenario_ingest,
    "outbound": scenario_outbound,
    "e2e": scenario_e2e,
    "memory": scenario_memory,
    "bounces": scenario_bounces,
    "oneclick": scenario_oneclick,
    "metrics": scenario_metrics,
    "bounceload": scenario_bounceload,
}
