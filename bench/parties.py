"""The parties a benchmark measures: mailrelay and the programs it is compared with.

Each is a started server with a ``port``, ``peak_rss_kib()`` and ``stop()``:
:class:`Relay` (mailrelay as operators run it, under ``twistd``),
:class:`AiosmtpdLMTP` (aiosmtpd's LMTP server with a write+fsync handler),
:class:`SinkLMTP` (Postfix's ``smtp-sink -L``, the C ceiling) and
:class:`Mailman` (GNU Mailman 3 in a virtualenv of its own).  The client-side
peers (smtplib, aiosmtplib) and the code that runs inside the peers' own
environments stay scripts in ``bench/peers/``, which these classes start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request

from harness import (
    E2E_CPUS,
    LIST_DOMAIN,
    PEERS,
    SERVER_CPUS,
    Process,
    Sink,
    cpu_seconds,
    free_port,
    listening,
    log,
    peak_rss_kib,
    pinned,
    process_tree,
    wait_until,
)


class Relay:
    """mailrelay as operators run it: ``twistd -n mailrelay -C bench.ini``, with
    its spool on disk (durable) and ``smarthost_port`` as the smarthost.

    With ``metrics`` the Prometheus endpoint is on (``[http] endpoint`` on a
    loopback port), and :meth:`scrape` reads ``/metrics`` from it.
    """

    def __init__(
        self,
        workdir: str,
        smarthost_port: int,
        lists: dict[str, int],
        *,
        cpus: str | None = SERVER_CPUS,
        python: str = sys.executable,
        extra_ini: str = "",
        metrics: bool = False,
    ):
        self.dir = tempfile.mkdtemp(prefix="relay-", dir=workdir)
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None
        if metrics:
            extra_ini += f"[http]\nendpoint = tcp:{self.metrics_port}:interface=127.0.0.1\n"
        config = os.path.join(self.dir, "bench.ini")
        with open(config, "w") as f:
            f.write(
                "[paths]\nvar_dir = var\n"
                "[mta]\n"
                f"lmtp_host = 127.0.0.1\nlmtp_port = {self.port}\n"
                "lmtp_max_sessions = 2000\n"
                f"lmtp_hostname = relay.{LIST_DOMAIN}\n"
                f"smtp_host = 127.0.0.1\nsmtp_port = {smarthost_port}\n"
                f"smtp_helo_name = relay.{LIST_DOMAIN}\n" + extra_ini
                # More [mta] keys, and sections after it, for one scenario.
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
                # The benchmark's posters are not members: measure delivery, not moderation.
                registry.update_list_settings(address, {"posting": "open"})
                registry.add_members(
                    address, [Member(f"m{i}@members.example") for i in range(members)]
                )
        finally:
            registry.close()

    def _ready(self) -> bool:
        self.process.check(f"twistd mailrelay (log in {self.dir})")
        return listening(self.port) and (self.metrics_port is None or listening(self.metrics_port))

    def scrape(self) -> str:
        """The text of ``/metrics`` (the relay must have been started with ``metrics``)."""
        if self.metrics_port is None:
            raise RuntimeError("this relay was started without metrics")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode("utf-8")

    def recipients_counted(self, outcome: str) -> float:
        """The sum over lists of ``mailrelay_recipients_total`` for ``outcome``, scraped now."""
        total = 0.0
        for line in self.scrape().splitlines():
            if line.startswith("mailrelay_recipients_total{") and f'outcome="{outcome}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.process.pid)

    def cpu_seconds(self) -> float:
        """CPU time the relay (reactor and spool writer threads) has used so far."""
        return cpu_seconds(self.process.pid)

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
