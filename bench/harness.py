"""The benchmark harness's plumbing: processes, Postfix's load tools, measurements.

Everything the scenarios (``bench/scenarios.py``) and the systems under test
(``bench/parties.py``) share: child processes in their own session that are
always stopped (:class:`Process`), CPU pinning, bounded waits, peak-RSS reads
from ``/proc``, Postfix's ``smtp-sink`` counting recipients (:class:`Sink`)
and ``smtp-source`` command lines, and the result rows a run fills in
(:class:`Context`, :class:`Row`).  Imports nothing else from ``bench/``.
"""

from __future__ import annotations

import contextlib
import os
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


def cpu_seconds(pid: int) -> float:
    """CPU time one process's live threads have used, in nanosecond resolution
    (``schedstat``; ``stat`` counts 10 ms ticks); 0 if it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


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


# Mailman 3 (all its processes) and mailrelay get the same CPU; smtp-sink and
# the poster get the other one.  (Unpinned, mailrelay measured slower here.)
E2E_CPUS = SERVER_CPUS


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


@dataclass
class Context:
    """One benchmark run: its settings, and the rows the scenarios add.

    ``only`` is the set of configuration ids (``bench/run --only``) to
    measure; None measures every configuration.
    """

    workdir: str
    runs: int
    smoke: bool
    tools_python: str | None
    mailman_venv: str | None
    only: frozenset[str] | None = None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def wanted(self, config_id: str) -> bool:
        """Whether the configuration ``config_id`` is to be measured in this run."""
        return self.only is None or config_id in self.only

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
