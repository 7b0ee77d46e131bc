"""mailrelay's benchmark harness (issue 5): every scenario against its peers, in one run.

Started by ``bench/run``, which installs the peers first.  Scenarios:

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

Each configuration is measured ``--runs`` times; in every run each peer is
measured right after the others (their order rotating from run to run), so the
ratios are taken pair by pair within a run.  The table goes to
``results/latest.md`` (raw figures in ``latest.json``), the chart to
``results/latest.png``.

Deliveries are counted at ``smtp-sink``: it appends every transaction to a dump
file (``-D``), one ``X-Rcpt-Args`` line per accepted recipient, which this
harness reads as it grows.  Every wait is bounded; only loopback is used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
LIST_DOMAIN = "bench.example"
SENDER = "poster@outside.example"
# Processes under test on one CPU, load generators and sinks on another, when
# there are two: their figures then vary less from run to run.
SERVER_CPUS = "1"
LOAD_CPUS = "0"
KB = 1024


# -- small helpers -------------------------------------------------------------


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def program(name: str) -> str | None:
    """Path of a Postfix tool (also looked for in sbin directories)."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/lib/postfix/sbin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    """``argv`` run on ``cpus`` with taskset, where that is possible and useful."""
    if cpus and (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *argv]
    return argv


def wait_until(predicate: Callable[[], bool], what: str, timeout: float, step=0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of one process, in KiB; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


class Process:
    """A child process in its own session, stopped (bounded) on exit."""

    def __init__(self, argv: list[str], log_path: str, *, cwd: str | None = None, env=None):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self, what: str) -> None:
        if not self.alive():
            raise RuntimeError(f"{what} exited with {self.popen.returncode}: {self.tail()}")

    def tail(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)
        self._log.close()


def run_timed(argv: list[str], timeout: float, what: str) -> float:
    """Run ``argv`` to completion; the wall-clock seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"{what} failed ({done.returncode}): {output}")
    return elapsed


# -- Postfix's test tools ------------------------------------------------------


class Sink:
    """Postfix's ``smtp-sink`` counting the recipients it accepts (SMTP or LMTP).

    With ``count`` set, each transaction is appended to a dump file, which
    :meth:`recipients` reads as it grows.
    """

    def __init__(self, workdir: str, *, lmtp: bool = False, count: bool = True, cpus=LOAD_CPUS):
        self.port = free_port()
        self.dump = None
        argv = [program("smtp-sink") or "smtp-sink"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to keep running as root
        if lmtp:
            argv.append("-L")
        if count:
            dump_dir = tempfile.mkdtemp(prefix="sink-", dir=workdir)
            os.chmod(dump_dir, 0o777)  # written by the unprivileged sink
            self.dump = os.path.join(dump_dir, "dump")
        if self.dump:
            argv += ["-D", self.dump]
        argv += ["-m", "2000", f"127.0.0.1:{self.port}", "2048"]
        self.process = Process(pinned(cpus, argv), os.path.join(workdir, "smtp-sink.log"))
        self._offset = 0
        self._partial = b""
        self._count = 0
        wait_until(lambda: self._ready(), "smtp-sink to listen", 10)

    def _ready(self) -> bool:
        self.process.check("smtp-sink")
        return listening(self.port)

    def recipients(self) -> int:
        """Recipients accepted so far (read from the dump file)."""
        if self.dump is None:
            return 0
        try:
            with open(self.dump, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        self._count += data[:cut].count(b"\nX-Rcpt-Args:") + data.startswith(b"X-Rcpt-Args:")
        return self._count

    def wait_for(
        self, target: int, timeout: float, check: Callable[[], None] | None = None
    ) -> tuple[float, float]:
        """Wait until ``target`` recipients were accepted in all; the times
        (``perf_counter``) at which the first new one and the last were seen.
        ``check``, called on every poll, raises to give up early."""
        start_count = self.recipients()
        first = time.perf_counter() if start_count >= target else None
        deadline = time.monotonic() + timeout
        while True:
            if check is not None:
                check()
            count = self.recipients()
            now = time.perf_counter()
            if first is None and count > start_count:
                first = now
            if count >= target:
                return first or now, now
            if time.monotonic() > deadline:
                raise TimeoutError(f"smtp-sink saw {count} of {target} recipients in {timeout}s")
            time.sleep(0.001)

    def pause(self) -> None:
        self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.signal(signal.SIGCONT)

    def stop(self) -> None:
        self.process.stop()


def smtp_source(
    port: int,
    *,
    messages: int,
    sessions: int = 1,
    size: int = KB,
    recipient: str,
    lmtp: bool = True,
    recipients: int = 1,
) -> list[str]:
    """The ``smtp-source`` command line: ``messages`` over ``sessions`` reused sessions."""
    argv = [program("smtp-source") or "smtp-source"]
    if lmtp:
        argv.append("-L")
    argv += [
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-r",
        str(recipients),
        "-M",
        "outside.example",
        "-f",
        SENDER,
        "-t",
        recipient,
        "-S",
        "bench",
        f"127.0.0.1:{port}",
    ]
    return pinned(LOAD_CPUS, argv)


# -- the systems under test ----------------------------------------------------


class Relay:
    """mailrelay as operators run it: ``twistd -n mailrelay -C bench.ini``, with
    its spool on disk (durable) and ``smarthost_port`` as the smarthost."""

    def __init__(
        self,
        workdir: str,
        smarthost_port: int,
        lists: dict[str, int],
        *,
        cpus: str | None = SERVER_CPUS,
        python: str = sys.executable,
    ):
        self.dir = tempfile.mkdtemp(prefix="relay-", dir=workdir)
        self.port = free_port()
        config = os.path.join(self.dir, "bench.ini")
        with open(config, "w") as f:
            f.write(
                "[paths]\nvar_dir = var\n"
                "[mta]\n"
                f"lmtp_host = 127.0.0.1\nlmtp_port = {self.port}\n"
                "lmtp_max_sessions = 2000\n"
                f"lmtp_hostname = relay.{LIST_DOMAIN}\n"
                f"smtp_host = 127.0.0.1\nsmtp_port = {smarthost_port}\n"
                f"smtp_helo_name = relay.{LIST_DOMAIN}\n"
            )
        self._create_lists(lists)
        argv = [
            python,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logfile=twistd.log",
            "mailrelay",
            "-C",
            config,
        ]
        stdout = os.path.join(self.dir, "stdout.log")
        self.process = Process(pinned(cpus, argv), stdout, cwd=self.dir)
        wait_until(self._ready, "mailrelay to listen", 30, step=0.02)

    def _create_lists(self, lists: dict[str, int]) -> None:
        from mailrelay.model import Member
        from mailrelay.registry import SQLiteRegistry

        os.makedirs(os.path.join(self.dir, "var"))
        registry = SQLiteRegistry(os.path.join(self.dir, "var", "registry.sqlite3"))
        try:
            for address, members in lists.items():
                registry.create_list(address)
                registry.add_members(
                    address, [Member(f"m{i}@members.example") for i in range(members)]
                )
        finally:
            registry.close()

    def _ready(self) -> bool:
        self.process.check(f"twistd mailrelay (log in {self.dir})")
        return listening(self.port)

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.process.pid)

    def stop(self) -> None:
        self.process.stop(30)


class AiosmtpdLMTP:
    """aiosmtpd's LMTP server with the write+fsync handler (``peers/aiosmtpd_lmtp.py``)."""

    def __init__(self, workdir: str, python: str, cpus: str | None = SERVER_CPUS):
        self.port = free_port()
        spool = tempfile.mkdtemp(prefix="aiosmtpd-", dir=workdir)
        argv = [python, os.path.join(PEERS, "aiosmtpd_lmtp.py"), str(self.port), spool]
        self.process = Process(pinned(cpus, argv), os.path.join(workdir, "aiosmtpd.log"))
        wait_until(self._ready, "aiosmtpd to listen", 30, step=0.02)

    def _ready(self) -> bool:
        self.process.check("aiosmtpd LMTP")
        return listening(self.port)

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.process.pid)

    def stop(self) -> None:
        self.process.stop()


class SinkLMTP:
    """``smtp-sink -L``: the C ceiling for ingest, durability-free."""

    def __init__(self, workdir: str, cpus: str | None = SERVER_CPUS):
        self.sink = Sink(workdir, lmtp=True, count=False, cpus=cpus)
        self.port = self.sink.port

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.sink.process.pid)

    def stop(self) -> None:
        self.sink.stop()


class Mailman:
    """GNU Mailman 3 from ``mailman_venv``: SQLite, its LMTP runner, the
    default runners except archive, NNTP, REST and digest, no moderation."""

    def __init__(self, workdir: str, mailman_venv: str, smarthost_port: int, lists: dict[str, int]):
        self.dir = tempfile.mkdtemp(prefix="mailman-", dir=workdir)
        self.port = free_port()
        self._mailman = os.path.join(mailman_venv, "bin", "mailman")
        self.config = os.path.join(self.dir, "mailman.cfg")
        var = os.path.join(self.dir, "var")
        with open(self.config, "w") as f:
            f.write(
                "[mailman]\nlayout: bench\nsite_owner: owner@outside.example\n"
                f"[paths.bench]\nvar_dir: {var}\n"
                "[database]\nclass: mailman.database.sqlite.SQLiteDatabase\n"
                f"url: sqlite:///{var}/data/mailman.db\n"
                "[mta]\nincoming: mailman.mta.null.NullMTA\n"
                f"lmtp_host: 127.0.0.1\nlmtp_port: {self.port}\n"
                f"smtp_host: 127.0.0.1\nsmtp_port: {smarthost_port}\n"
                "[runner.archive]\nstart: no\n[runner.nntp]\nstart: no\n"
                "[runner.rest]\nstart: no\n[runner.digest]\nstart: no\n"
                "[archiver.prototype]\nenable: no\n"
            )
        env = dict(os.environ, PYTHONPATH=PEERS)
        for address, members in lists.items():
            log(f"mailman: creating {address} with {members} members")
            subprocess.run(
                [
                    *self._command(),
                    "shell",
                    "-r",
                    "mailman_setup.create",
                    address,
                    str(members),
                ],
                env=env,
                check=True,
                capture_output=True,
                timeout=1800,
            )
        self._master = os.path.join(var, "master.pid")
        # Not captured: the master inherits the output and would hold a pipe open.
        with open(os.path.join(self.dir, "start.log"), "ab") as output:
            subprocess.run(
                pinned(E2E_CPUS, [*self._command(), "start"]),
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=120,
                cwd=self.dir,
            )
        try:
            wait_until(lambda: listening(self.port), "Mailman's LMTP runner", 120, step=0.1)
        except BaseException:
            self.stop()
            raise

    def _command(self) -> list[str]:
        command = [self._mailman, "-C", self.config]
        if os.geteuid() == 0:
            command.append("--run-as-root")
        return command

    def master_pid(self) -> int | None:
        try:
            with open(self._master) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def peak_rss_kib(self) -> int:
        """The sum of the peak RSS of the master and its runners."""
        pid = self.master_pid()
        return sum(peak_rss_kib(p) for p in process_tree(pid)) if pid else 0

    def processes(self) -> int:
        pid = self.master_pid()
        return len(process_tree(pid)) if pid else 0

    def stop(self) -> None:
        pid = self.master_pid()
        ours = process_tree(pid) if pid else []
        subprocess.run([*self._command(), "stop"], capture_output=True, timeout=60, check=False)
        if pid:
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "Mailman to stop", 30, 0.1)
        for p in ours:
            # Only a process still running our configuration (pids get reused).
            with contextlib.suppress(OSError), open(f"/proc/{p}/cmdline", "rb") as f:
                if self.config.encode() in f.read():
                    os.kill(p, signal.SIGKILL)


# -- results -------------------------------------------------------------------


@dataclass
class Row:
    """One configuration of one scenario: a value per peer per run."""

    scenario: str
    config: str
    unit: str
    values: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, peer: str, value: float, **extra: float) -> None:
        self.values.setdefault(peer, []).append(value)
        for name, number in extra.items():
            self.extra.setdefault(name, {}).setdefault(peer, []).append(number)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pairwise(row: Row, peer: str, other: str) -> list[float]:
    """The ratio ``peer / other`` in each run in which both were measured."""
    # Runs in which one of them was not measured have no ratio.
    pairs = zip(row.values.get(peer, []), row.values.get(other, []), strict=False)
    return [a / b for a, b in pairs if b]


# -- scenarios -----------------------------------------------------------------


@dataclass
class Context:
    workdir: str
    runs: int
    smoke: bool
    tools_python: str | None
    mailman_venv: str | None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, scenario: str, config: str, unit: str) -> Row:
        row = Row(scenario, config, unit)
        self.rows.append(row)
        return row


def rotated(peers: list[str], run: int) -> list[str]:
    """Run ``run``'s order: each peer goes first in turn (no warm-cache favourite)."""
    shift = run % len(peers)
    return peers[shift:] + peers[:shift]


@contextlib.contextmanager
def started(server: Any) -> Iterator[Any]:
    try:
        yield server
    finally:
        server.stop()


def scenario_ingest(ctx: Context) -> None:
    """LMTP ingest: messages per second, durable unless the peer is smtp-sink -L."""
    peers = _lmtp_peers(ctx)
    for size in (KB,) if ctx.smoke else (KB, 50 * KB):
        for sessions in (1, 10):
            count = 20 if ctx.smoke else (3000 if size == KB else 1000)
            row = ctx.row("ingest", f"{size // KB} KB, {sessions} sessions", "messages/s")
            for run in range(ctx.runs):
                for peer in rotated(peers, run):
                    server = _ingest_server(ctx, peer)
                    with started(server):
                        argv = smtp_source(
                            server.port,
                            messages=count,
                            sessions=sessions,
                            size=size,
                            recipient=f"ingest@{LIST_DOMAIN}",
                        )
                        seconds = run_timed(argv, 300, f"smtp-source -L to {peer}")
                    row.add(peer, count / seconds)
                log(f"ingest {row.config} run {run + 1}: " + _last(row))


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


# Mailman 3 (all its processes) and mailrelay get the same CPU; smtp-sink and
# the poster get the other one.  (Unpinned, mailrelay measured slower here.)
E2E_CPUS = SERVER_CPUS
E2E_SIZES = [(200, 10), (20, 1000), (1, 10000), (1, 10)]
E2E_RELAY_ONLY = [(1, 100000)]


def scenario_e2e(ctx: Context) -> None:
    """Posts over LMTP to recipients at smtp-sink: mailrelay vs Mailman 3."""
    sizes = [(3, 5), (1, 20)] if ctx.smoke else E2E_SIZES
    extra = [] if ctx.smoke else E2E_RELAY_ONLY
    rows = {
        size: ctx.row("e2e", f"{size[0]:,} posts x {size[1]:,} members", "recipients/s")
        for size in sizes + extra
    }
    sink = Sink(ctx.workdir)
    mailman = None
    try:
        if ctx.mailman_venv:
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
    levels = (10,) if ctx.smoke else (10, 100, 1000)
    for sessions in levels:
        row = ctx.row("memory", f"{sessions:,} concurrent sessions", "peak RSS MiB")
        for run in range(ctx.runs):
            for peer in rotated(peers, run):
                server = _ingest_server(ctx, peer)
                with started(server):
                    argv = smtp_source(
                        server.port,
                        messages=sessions * 3,
                        sessions=sessions,
                        recipient=f"ingest@{LIST_DOMAIN}",
                    )
                    run_timed(argv, 300, f"smtp-source -L to {peer}")
                    row.add(peer, server.peak_rss_kib() / 1024)
            log(f"memory {row.config} run {run + 1}: " + _last(row))


SCENARIOS = {
    "ingest": scenario_ingest,
    "outbound": scenario_outbound,
    "e2e": scenario_e2e,
    "memory": scenario_memory,
}


# -- report --------------------------------------------------------------------


def versions(ctx: Context) -> dict[str, str]:
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


def _lmtp_peers(ctx: Context) -> list[str]:
    """The LMTP servers compared in the ingest and memory scenarios."""
    peers = ["mailrelay", "smtp-sink -L"]
    if ctx.tools_python:
        peers.insert(1, "aiosmtpd+fsync")
    return peers


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


def markdown(ctx: Context, found: dict[str, str], elapsed: float) -> str:
    lines = [
        "# mailrelay benchmarks",
        "",
        f"Command: `bench/run{' --smoke' if ctx.smoke else ''}`; {ctx.runs} run(s) per "
        f"configuration, {elapsed / 60:.1f} minutes in all. Cells: median (min-max) over "
        "the runs; ratios are mailrelay / peer taken within each run, then the median "
        "(min-max) of those.",
        "",
    ]
    lines += [f"- {name}: {value}" for name, value in found.items() if value]
    lines.append("")
    titles = {
        "ingest": "LMTP ingest (durable; smtp-sink -L is not), smtp-source -L as the load",
        "outbound": "Outbound: queued 1 KB messages delivered to smtp-sink",
        "e2e": "End to end: posts over LMTP until smtp-sink accepted the last recipient",
        "memory": "Memory: peak RSS of the LMTP server",
    }
    for scenario, title in titles.items():
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
    scenarios = [s for s in SCENARIOS if any(r.scenario == s for r in ctx.rows)]
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


# -- main ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mailrelay's benchmarks (see bench/run)")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (3)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of: %(default)s"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, mailrelay only, 1 run")
    parser.add_argument("--tools-python", help="Python with aiosmtpd, aiosmtplib (the peers)")
    parser.add_argument("--mailman-venv", help="virtualenv holding GNU Mailman 3.3.10")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
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
    found = versions(ctx)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(markdown(ctx, found, elapsed))
    with open(os.path.join(args.out, "latest.json"), "w") as f:
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
    chart(ctx, os.path.join(args.out, "latest.png"))
    log(f"results in {args.out}/latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
