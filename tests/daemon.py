"""Helpers for the black-box reliability tests (not a test module itself).

* :class:`RelayProcess` runs a real ``twistd -n mailrelay`` in a temporary
  directory from a configuration file it writes, and starts, kills and
  restarts it; the smarthost (a :class:`~mailrelay.testing.FakeMTA` in the
  test process) survives every kill.
* :class:`PersistentPoster` posts over LMTP the way an MTA does: a post whose
  reply never came is not acknowledged and is sent again, and every recipient
  that got 250 is remembered, so a test can check that nothing acknowledged
  was lost.
* :func:`delivered_copies` counts what the smarthost received per
  (Message-ID, recipient); :func:`record_figures` keeps the figures of a run
  in ``_trial_temp/reliability-figures.json`` for ``docs/reliability.md``.
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable

from twisted.internet import defer, endpoints, task
from twisted.logger import Logger

from mailrelay import cli
from mailrelay.testing.lmtp import connect_lmtp

_log = Logger()

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES_PATH = os.path.join(_ROOT, "_trial_temp", "reliability-figures.json")


def record_figures(scenario: str, **figures: object) -> None:
    """Merge one scenario's figures into :data:`FIGURES_PATH` and print them.

    Both trial and pytest runs write here (the later run wins per scenario);
    ``docs/reliability.md`` quotes the file.
    """
    os.makedirs(os.path.dirname(FIGURES_PATH), exist_ok=True)
    try:
        with open(FIGURES_PATH) as f:
            everything = json.load(f)
    except (OSError, ValueError):
        everything = {}
    everything[scenario] = {**figures, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(FIGURES_PATH + ".tmp", "w") as f:
        json.dump(everything, f, indent=2, sort_keys=True)
    os.replace(FIGURES_PATH + ".tmp", FIGURES_PATH)
    _log.info("reliability figures {scenario}: {figures}", scenario=scenario, figures=figures)
    print(f"\nreliability figures {scenario}: {json.dumps(figures, sort_keys=True)}")


async def sleep(reactor, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def poll(
    reactor, predicate, what: str, timeout: float = 30.0, interval: float = 0.02, details=None
):
    """Wait, bounded, for something another process (or the reactor) does.

    On timeout the error says what was awaited, and ``details()`` if given.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        await sleep(reactor, interval)


def run_cli(config: str, *argv: str) -> tuple[int, str]:
    """Run ``mailrelay -C config argv...`` in this process: (exit status, output)."""
    out = io.StringIO()
    code = cli.main(["-C", config, *argv], stdout=out, stderr=out)
    return code, out.getvalue()


class RelayProcess:
    """A ``twistd -n mailrelay`` process listening on a unix socket in ``tmp``.

    ``mta`` holds the ``[mta]`` keys written to the configuration file besides
    the LMTP socket, ``sections`` any other sections (change them and call
    :meth:`write_config` before a restart).
    The process's output goes to ``tmp/twistd.log``, kept across restarts.
    """

    def __init__(
        self,
        case,
        reactor,
        tmp: str,
        *,
        tcp_port: int | None = None,
        sections: str = "",
        **mta: object,
    ):
        self.reactor = reactor
        self.tmp = tmp
        self.socket = os.path.join(tmp, "lmtp.sock")
        self.tcp_port = tcp_port
        self.config = os.path.join(tmp, "mailrelay.ini")
        self.log_path = os.path.join(tmp, "twistd.log")
        endpoint = (
            f"unix:{self.socket}" if tcp_port is None else f"tcp:{tcp_port}:interface=127.0.0.1"
        )
        self.mta = {"lmtp_endpoint": endpoint, "smtp_host": "127.0.0.1", **mta}
        self.sections = sections  # INI text written after [mta], e.g. "[log]\nformat = json\n"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.write_config()
        case.addCleanup(self.kill)

    def write_config(self) -> None:
        lines = ["[paths]", "var_dir = var", "[mta]"]
        lines += [f"{key} = {value}" for key, value in self.mta.items()]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n" + self.sections)

    def cli(self, *argv: str) -> str:
        """Run a ``mailrelay`` command on this relay's files; its output (it must succeed)."""
        code, out = run_cli(self.config, *argv)
        if code != 0:
            raise AssertionError(f"mailrelay {' '.join(argv)} exited {code}: {out}")
        return out

    async def start(self, *twistd_options: str, timeout: float = 30.0) -> subprocess.Popen:
        """Start the daemon (with extra ``twistd`` options); fires once it listens for LMTP."""
        if os.path.exists(self.socket):
            os.unlink(self.socket)  # left by a killed process
        with open(self.log_path, "ab") as log:
            self.process = process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from twisted.scripts.twistd import run; run()",
                    "-n",
                    "--pidfile=",
                    *twistd_options,
                    "mailrelay",
                    "-C",
                    self.config,
                ],
                cwd=self.tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1

        def listening():
            if process.poll() is not None:
                raise AssertionError(f"twistd exited with {process.returncode}: {self.log()}")
            # A connection, not the socket file: the file exists from bind(),
            # a moment before listen(), and a client then gets ECONNREFUSED.
            if self.tcp_port is None:
                if not os.path.exists(self.socket):
                    return False
                with socket.socket(socket.AF_UNIX) as probe:
                    return probe.connect_ex(self.socket) == 0
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.tcp_port)) == 0

        await poll(self.reactor, listening, "the LMTP socket", timeout)
        return process

    def kill(self) -> None:
        """SIGKILL the daemon (if running) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    async def terminate(self, timeout: float) -> float:
        """SIGTERM the daemon; fires with the seconds it took to exit (fails past ``timeout``)."""
        assert self.process is not None
        process = self.process
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await poll(self.reactor, lambda: process.poll() is not None, "exit after SIGTERM", timeout)
        return time.monotonic() - started

    def log(self, tail: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-tail:]

    def endpoint(self, timeout: float = 5):
        """A client endpoint for the LMTP listener."""
        if self.tcp_port is None:
            return endpoints.UNIXClientEndpoint(self.reactor, self.socket, timeout=timeout)
        return endpoints.TCP4ClientEndpoint(
            self.reactor, "127.0.0.1", self.tcp_port, timeout=timeout
        )


def delivered_copies(*mtas) -> collections.Counter:
    """How many copies the smarthosts accepted, per (Message-ID, recipient)."""
    return collections.Counter(
        (message["Message-ID"], rcpt)
        for mta in mtas
        for transaction, message in zip(mta.transactions, mta.messages, strict=True)
        for rcpt in transaction.rcpts
    )


async def wait_for_copies(reactor, expected, *mtas, what: str, timeout=60.0, details=None):
    """Wait until the smarthosts hold a copy for every (Message-ID, recipient) in ``expected``."""
    expected = set(expected)
    await poll(
        reactor,
        lambda: expected <= delivered_copies(*mtas).keys(),
        what,
        timeout,
        interval=0.05,
        details=details,
    )


def count_losses(
    acknowledged: Iterable[tuple[str, str]], members: dict[str, list[str]], copies
) -> tuple[list[tuple[str, str]], int]:
    """(missing copies, duplicate copies) for acknowledged (Message-ID, list) pairs.

    Every member of a list whose post was acknowledged must have one copy at
    least; duplicates are copies beyond the first.
    """
    missing = [
        (message_id, member)
        for message_id, list_address in sorted(set(acknowledged))
        for member in members[list_address]
        if copies[(message_id, member)] == 0
    ]
    duplicates = sum(count - 1 for count in copies.values() if count > 1)
    return missing, duplicates


class PersistentPoster:
    """Posts messages over LMTP, resending what was not acknowledged, as an MTA does.

    ``messages`` maps a Message-ID to the list addresses it is sent to.  Each
    of ``sessions`` workers holds one LMTP session and reconnects after any
    failure; a message is sent again, to the lists whose recipient did not get
    250, until each got it.  A post that got no reply within ``reply_timeout``
    counts as not acknowledged (and is counted in ``timeouts``).
    ``message_bytes(message_id)`` makes each message (default: a short post).
    """

    def __init__(
        self,
        reactor,
        endpoint_factory,
        messages: dict[str, list[str]],
        *,
        sessions=8,
        reply_timeout=20.0,
        message_bytes=None,
    ):
        self.reactor = reactor
        self._endpoint = endpoint_factory
        self._todo = collections.deque((mid, list(lists)) for mid, lists in messages.items())
        self.acknowledged: set[tuple[str, str]] = set()
        self.attempts = 0
        self.failures = 0  # sessions that broke (refused, reset, killed)
        self.timeouts = 0
        self.deferrals = 0  # recipients answered 4xx
        self.refusals: list[tuple[str, str, int, str]] = []  # 5xx: must never happen here
        self._sessions = sessions
        self._reply_timeout = reply_timeout
        self._busy = 0
        self._message_bytes = message_bytes or _post

    @property
    def done(self) -> bool:
        return not self._todo and not self._busy

    def run(self) -> defer.Deferred:
        """Fires when every message was acknowledged for every list."""
        workers = [defer.Deferred.fromCoroutine(self._worker()) for _ in range(self._sessions)]
        return defer.gatherResults(workers, consumeErrors=True)

    async def _worker(self) -> None:
        client = None
        while self._todo or self._busy:
            if not self._todo:
                await sleep(self.reactor, 0.02)  # another worker may put one back
                continue
            message_id, lists = self._todo.popleft()
            self._busy += 1
            try:
                if client is None:
                    client = await self._timed(self._connect())
                self.attempts += 1
                replies = await self._timed(
                    client.sendmail("anne@example.org", lists, self._message_bytes(message_id))
                )
            except Exception as e:
                if isinstance(e, defer.TimeoutError):
                    self.timeouts += 1
                self.failures += 1
                if client is not None:
                    client.protocol.transport.abortConnection()
                client = None
                self._todo.append((message_id, lists))
                await sleep(self.reactor, 0.05)
                continue
            finally:
                self._busy -= 1
            again = []
            for reply in replies:
                if reply.code == 250:
                    self.acknowledged.add((message_id, reply.recipient))
                elif reply.code // 100 == 4:
                    self.deferrals += 1
                    again.append(reply.recipient)
                else:
                    self.refusals.append((message_id, reply.recipient, reply.code, reply.text))
            if again:
                self._todo.append((message_id, again))
        if client is not None:
            client.protocol.transport.loseConnection()

    async def _connect(self):
        client = await connect_lmtp(self._endpoint())
        reply = await client.lhlo("mx.example.org")
        if reply.code != 250:
            raise AssertionError(f"LHLO refused: {reply}")
        return client

    def _timed(self, coroutine_or_deferred):
        d = defer.ensureDeferred(coroutine_or_deferred)
        return d.addTimeout(self._reply_timeout, self.reactor)


def _post(message_id: str) -> bytes:
    return (
        f"From: anne@example.org\r\nTo: lists@example.com\r\nSubject: post {message_id}\r\n"
        f"Message-ID: {message_id}\r\n\r\nBody of {message_id}.\r\n"
    ).encode("ascii")
