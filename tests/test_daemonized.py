"""A real ``twistd mailrelay`` daemonized (no ``-n``): twistd forks into the
background after ``makeService``, so everything that does not survive a fork
(the spool's writer thread, SQLite connections) must be made after it, when the
service starts.  One post goes in over LMTP and out to a recording smarthost,
``mailrelay status`` names the daemon's pid, and SIGTERM through the pidfile
ends it cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys

from twisted.internet import endpoints, reactor
from twisted.trial.unittest import TestCase

from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import connect_lmtp
from tests.daemon import poll, run_cli
from tests.support import as_deferred, temp_dir

LIST = "daemon-list@example.com"
MEMBERS = ["m1@members.example", "m2@members.example"]
POST = (
    b"From: anne@example.org\r\nTo: daemon-list@example.com\r\nSubject: forked\r\n"
    b"Message-ID: <forked@example.org>\r\n\r\nSent to a daemonized relay.\r\n"
)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited: no such process, or a zombie nobody reaped yet
    (the daemon is not our child; the container's init may not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class DaemonizedTests(TestCase):
    timeout = 120

    def setUp(self):
        self.tmp = temp_dir(self)
        self.socket = os.path.join(self.tmp, "lmtp.sock")
        self.config = os.path.join(self.tmp, "mailrelay.ini")
        self.pidfile = os.path.join(self.tmp, "twistd.pid")
        self.logfile = os.path.join(self.tmp, "twistd.log")
        self.addCleanup(self._kill_leftover)

    def _kill_leftover(self) -> None:
        # A failed test must not leave a daemon behind.
        try:
            with open(self.pidfile) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def log(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return "(no log file)"

    def cli(self, *argv: str) -> str:
        code, out = run_cli(self.config, *argv)
        self.assertEqual(code, 0, out)
        return out

    def twistd(self) -> subprocess.CompletedProcess:
        """Run ``twistd mailrelay`` without -n; returns once twistd's parent has
        exited (after the daemon started, or failed to)."""
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                f"--pidfile={self.pidfile}",
                f"--logfile={self.logfile}",
                "mailrelay",
                "-C",
                self.config,
            ],
            cwd=self.tmp,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )

    def test_unusable_spool_fails_before_daemonizing(self):
        """A spool that cannot be opened stops twistd without -n as with it: one
        line naming the file on stderr, exit status 1, no traceback, and no
        daemon left behind (no pidfile)."""
        os.makedirs(os.path.join(self.tmp, "var", "spool.sqlite3"))
        with open(self.config, "w") as f:
            f.write(f"[paths]\nvar_dir = var\n[mta]\nlmtp_endpoint = unix:{self.socket}\n")
        result = self.twistd()
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        spool = os.path.join(self.tmp, "var", "spool.sqlite3")
        self.assertRegex(
            result.stderr,
            rf"\Amailrelay: cannot open spool {re.escape(spool)}: [^\n]+; "
            r"check \[paths\] var_dir and its permissions\n\Z",
        )
        self.assertFalse(os.path.exists(self.pidfile))

    def test_daemonized_relay_delivers_reports_and_stops(self):
        """Started without -n, the daemon accepts a post over LMTP, delivers it to
        the smarthost, is reported running by ``mailrelay status`` with the pid in
        its pidfile, and on SIGTERM exits, removing its pidfile and its status
        record, with nothing left in flight and an intact spool file."""

        async def go():
            mta = FakeMTA(reactor)
            await mta.start()
            self.addCleanup(mta.stop)
            with open(self.config, "w") as f:
                f.write(
                    "[paths]\nvar_dir = var\n[mta]\n"
                    f"lmtp_endpoint = unix:{self.socket}\n"
                    f"smtp_host = 127.0.0.1\nsmtp_port = {mta.port}\n"
                )
            self.cli("lists", "create", LIST)
            self.cli("lists", "set", LIST, "posting=open")
            self.cli("members", "add", LIST, *MEMBERS)

            # twistd's parent process returns once the daemon has started (or
            # failed to: it prints the daemon's error and exits non-zero).
            started = self.twistd()
            self.assertEqual(started.returncode, 0, started.stdout + started.stderr + self.log())
            with open(self.pidfile) as f:
                pid = int(f.read().strip())
            self.assertNotEqual(pid, os.getpid())
            self.assertFalse(_gone(pid), self.log())

            client = await connect_lmtp(
                endpoints.UNIXClientEndpoint(reactor, self.socket, timeout=5)
            )
            # Dropped at the end if the test fails with the session open.
            self.addCleanup(client.protocol.transport.abortConnection)
            self.assertEqual((await client.lhlo("mx.example.org")).code, 250)
            replies = await client.sendmail("anne@example.org", [LIST], POST).addTimeout(
                20, reactor
            )
            self.assertEqual([r.code for r in replies], [250], self.log())
            await client.quit()
            await poll(
                reactor,
                lambda: sum(len(t.rcpts) for t in mta.transactions) >= len(MEMBERS),
                "delivery to both members",
                details=self.log,
            )
            self.assertEqual(sorted(r for t in mta.transactions for r in t.rcpts), sorted(MEMBERS))

            status = json.loads(self.cli("status", "--json"))["daemon"]
            self.assertEqual((status["running"], status["pid"]), (True, pid), status)

            os.kill(pid, signal.SIGTERM)
            await poll(reactor, lambda: _gone(pid), "the daemon's exit", details=self.log)
            self.assertFalse(os.path.exists(self.pidfile), self.log())
            log = self.log()
            self.assertIn("Main loop terminated.", log)
            self.assertNotIn("Traceback", log)

            after = json.loads(self.cli("status", "--json"))
            self.assertEqual(after["daemon"]["running"], False, after)
            self.assertIsNone(after["daemon"]["stale_pid"], after)
            self.assertEqual((after["spool"]["inflight"], after["spool"]["queued"]), (0, 0))
            db = sqlite3.connect(os.path.join(self.tmp, "var", "spool.sqlite3"))
            try:
                self.assertEqual(db.execute("PRAGMA integrity_check").fetchone(), ("ok",))
            finally:
                db.close()

        return as_deferred(go())
