"""Start-up failures of a real ``twistd mailrelay``: one line naming what failed
and how to fix it, a non-zero exit status, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support import temp_dir

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class StartupFailureTests(SynchronousTestCase):
    def setUp(self):
        self.tmp = temp_dir(self)
        self.config = os.path.join(self.tmp, "mailrelay.ini")

    def write_config(self, text: str) -> None:
        with open(self.config, "w") as f:
            f.write("[paths]\nvar_dir = var\n" + text)

    def twistd(self, *options: str, user: str | None = None) -> subprocess.CompletedProcess:
        command = [*TWISTD, "-n", "--pidfile=", *options, "mailrelay", "-C", self.config]
        if user is not None:
            command = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *command]
        return subprocess.run(
            command,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )

    def assert_one_line(self, result: subprocess.CompletedProcess, *parts: str) -> str:
        """Exit status 1 and exactly one error line (on stderr, or in twistd's log
        once logging has started), containing ``parts``; no traceback."""
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        errors = [
            line
            for line in output.splitlines()
            if "mailrelay:" in line and ("#info]" not in line) and ("#debug]" not in line)
        ]
        self.assertEqual(len(errors), 1, output)
        other_errors = [line for line in output.splitlines() if "#error]" in line]
        self.assertLessEqual(len(other_errors), 1, output)
        for part in parts:
            self.assertIn(part, errors[0])
        return errors[0]

    def test_bad_config(self):
        """A bad value prints one line naming file, section, key and value on
        stderr (not twistd's usage text)."""
        self.write_config("[mta]\nsmtp_port = abc\n")
        result = self.twistd()
        self.assert_one_line(result, self.config, "[mta] smtp_port = 'abc'", "not a port number")
        self.assertEqual(result.stdout, "")
        self.assertEqual(
            result.stderr,
            f"mailrelay: {self.config}: [mta] smtp_port = 'abc': not a port number (1-65535)\n",
        )

    def test_port_in_use(self):
        """A port another process listens on: one line naming the address and the fix."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            self.write_config(f"[mta]\nlmtp_port = {port}\n")
            result = self.twistd()
        self.assert_one_line(
            result,
            f"cannot listen for LMTP on 127.0.0.1:{port}: Address already in use",
            "change [mta] lmtp_endpoint or lmtp_port",
        )

    def test_port_in_use_with_json_log(self):
        """With [log] format = json the failure is still one line and no traceback:
        twistd has started logging, so the line is one JSON record (twistd's
        "stderr" namespace) among the JSON lines on stdout (-n)."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            self.write_config(f"[mta]\nlmtp_port = {port}\n[log]\nformat = json\n")
            result = self.twistd()
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        records = [json.loads(text) for text in result.stdout.splitlines()]
        errors = [r["log_text"] for r in records if r["log_level"]["name"] in ("error", "critical")]
        self.assertEqual(len(errors), 1, records)
        self.assertTrue(
            errors[0].startswith(f"mailrelay: cannot listen for LMTP on 127.0.0.1:{port}"), errors
        )

    def test_logger_option_gives_json(self):
        """twistd --logger mailrelay.logs.json_observer writes JSON lines to stdout
        even with [log] format = text (an explicit --logger wins)."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            self.write_config(f"[mta]\nlmtp_port = {port}\n[log]\nformat = text\n")
            result = self.twistd("--logger", "mailrelay.logs.json_observer")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        records = [json.loads(text) for text in result.stdout.splitlines()]
        self.assertTrue(any("cannot listen for LMTP" in r["log_text"] for r in records), records)

    def test_bad_certificate_file(self):
        """A CA file that holds no certificate: one line naming the file."""
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write("not a certificate\n")
        self.write_config(f"[mta]\nsmtp_secure_mode = starttls\nsmtp_ca_file = {ca}\n")
        self.assert_one_line(self.twistd(), ca)

    def test_unusable_spool(self):
        """A spool that cannot be opened (here a directory in its place): one line
        naming the spool file and what to check."""
        os.makedirs(os.path.join(self.tmp, "var", "spool.sqlite3"))
        self.write_config("")
        self.assert_one_line(
            self.twistd(),
            f"cannot open spool {os.path.join(self.tmp, 'var', 'spool.sqlite3')}",
            "check [paths] var_dir",
        )

    def test_unreadable_state_directory(self):
        """Run as a user who may not use the state directory: one line naming the
        file and the reason."""
        if os.getuid() != 0 or not shutil.which("setpriv"):
            raise SkipTest("needs root and setpriv to run twistd as nobody")
        # The checkout may sit under a private directory (a mktemp -d clone):
        # then nobody cannot even import mailrelay, which is not this test's case.
        probe = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            + [sys.executable, "-c", "import twisted.scripts.twistd, mailrelay"],
            cwd=self.tmp,
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            raise SkipTest("nobody cannot import mailrelay from this checkout's location")
        os.chmod(self.tmp, 0o755)
        os.makedirs(os.path.join(self.tmp, "var"), mode=0o700)
        self.write_config(f"[mta]\nlmtp_endpoint = unix:{os.path.join(self.tmp, 'x.sock')}\n")
        self.assert_one_line(
            self.twistd(user="nobody"),
            os.path.join(self.tmp, "var", "mailrelay.lock"),
            "Permission denied",
        )

    def test_second_daemon(self):
        """A second daemon on the same state directory refuses to start, naming the
        first one's pid; the first keeps running."""
        self.write_config(f"[mta]\nlmtp_endpoint = unix:{os.path.join(self.tmp, 'a.sock')}\n")
        first = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "mailrelay", "-C", self.config],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(first.wait)
        self.addCleanup(first.kill)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(self.tmp, "a.sock")):
            self.assertIsNone(first.poll(), "the first daemon exited")
            self.assertLess(time.monotonic(), deadline, "the first daemon did not start")
            time.sleep(0.05)
        self.write_config(f"[mta]\nlmtp_endpoint = unix:{os.path.join(self.tmp, 'b.sock')}\n")
        self.assert_one_line(
            self.twistd(),
            f"{os.path.join(self.tmp, 'var')} is in use by another mailrelay daemon "
            f"(pid {first.pid})",
        )
        self.assertIsNone(first.poll())
