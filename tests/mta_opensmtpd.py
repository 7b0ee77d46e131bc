"""A private OpenSMTPD for interop tests (not a test module itself).

Debian's ``opensmtpd`` conflicts with ``postfix``, which the suite needs, so
``scripts/test`` (``install_opensmtpd``) never installs it: it unpacks the
package into :data:`PREFIX` and creates the ``opensmtpd`` and ``opensmtpq``
users its postinst would.  ``smtpd`` has its queue (``/var/spool/smtpd``), its
control socket (``/var/run/smtpd.sock``), its chroot
(``/var/lib/opensmtpd/empty``) and its delivery agents
(``/usr/libexec/opensmtpd``) compiled in, and no option moves them; so
:class:`PrivateOpenSMTPD` runs it in a private mount namespace (``unshare
--mount``) in which ``/var`` and ``/run`` are directories of the test and
``/usr/libexec`` is the unpacked package's.  The machine's own ``/var`` and
``/run`` are never written, two instances never share a queue, and
``smtpctl`` reaches an instance by entering its namespace (``nsenter``).
Needs root; skipped locally without it, failed under
``MAILRELAY_REQUIRE_PEERS=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.support import missing_peer, stop_process, wait_for_port

PREFIX = os.path.join(
    os.environ.get("MAILRELAY_TEST_MTAS", "/opt/mailrelay-test-mtas"), "opensmtpd"
)
SMTPD = os.path.join(PREFIX, "usr", "sbin", "smtpd")
SMTPCTL = os.path.join(PREFIX, "usr", "sbin", "smtpctl")


def require_opensmtpd() -> None:
    """Skip (locally) or fail (CI) unless a private OpenSMTPD can run here."""
    if not os.access(SMTPD, os.X_OK):
        missing_peer(
            f"OpenSMTPD is not unpacked in {PREFIX}; scripts/test (install_opensmtpd) does it"
        )
    if os.geteuid() != 0:
        missing_peer("a private OpenSMTPD (its own mount namespace) must be started as root")
    for program in ("unshare", "nsenter"):
        if shutil.which(program) is None:
            missing_peer(f"{program} (util-linux) is needed to run a private OpenSMTPD")


class PrivateOpenSMTPD:
    """An ``smtpd -d`` with the configuration ``conf`` and its own ``/var`` under ``tmp``.

    ``start`` fires once it listens on 127.0.0.1:``port``; the process is
    stopped in a cleanup of ``case``.  Its log (``smtpd -d -v`` output) is in
    ``tmp/smtpd.log``.
    """

    def __init__(self, case, tmp: str, port: int, conf: str):
        self.tmp, self.port = tmp, port
        self.conf = os.path.join(tmp, "smtpd.conf")
        self.log_path = os.path.join(tmp, "smtpd.log")
        self.root = os.path.join(tmp, "root")  # what smtpd sees as /var and /run
        self.var = os.path.join(self.root, "var")
        self.run = os.path.join(self.root, "run")
        for d in (
            os.path.join(self.var, "spool"),
            os.path.join(self.var, "lib", "opensmtpd", "empty"),
            self.run,
        ):
            os.makedirs(d)
        os.symlink("/run", os.path.join(self.var, "run"))
        with open(self.conf, "w") as f:
            f.write(conf)
        self.process: subprocess.Popen | None = None
        case.addCleanup(self.stop)

    @property
    def queue(self) -> str:
        """The instance's queue directory (``/var/spool/smtpd`` inside its namespace)."""
        return os.path.join(self.var, "spool", "smtpd")

    def check_config(self) -> None:
        """``smtpd -n``: raise with smtpd's message if the configuration is invalid."""
        result = subprocess.run(
            [SMTPD, "-n", "-f", self.conf], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"smtpd -n -f {self.conf}: {result.stderr.strip()}")

    async def start(self, reactor) -> None:
        self.check_config()
        mounts = " && ".join(
            f"mount --bind {source} {target}"
            for source, target in (
                (self.run, "/run"),
                (self.var, "/var"),
                (os.path.join(PREFIX, "usr", "libexec"), "/usr/libexec"),
            )
        )
        with open(self.log_path, "ab") as log:
            # unshare without --fork execs: the Popen's pid is smtpd's parent process.
            self.process = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    f'{mounts} && exec "$0" -d -v -f "$1"',
                    SMTPD,
                    self.conf,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            await wait_for_port(reactor, self.port)
        except AssertionError as e:
            raise AssertionError(f"{e}; smtpd log:\n{self.log()}") from None

    def smtpctl(self, *argv: str) -> str:
        """Run ``smtpctl argv...`` against this instance; its output (it must succeed)."""
        assert self.process is not None, "smtpd is not running"
        result = subprocess.run(
            ["nsenter", "-t", str(self.process.pid), "-m", SMTPCTL, *argv],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"smtpctl {' '.join(argv)} exited {result.returncode}: {result.stderr}"
            )
        return result.stdout

    def envelopes(self) -> list[str]:
        """``smtpctl show queue``: one line per envelope still queued."""
        return [line for line in self.smtpctl("show", "queue").splitlines() if line]

    def stop(self) -> None:
        """SIGTERM smtpd (its children exit with it) and reap it."""
        stop_process(self.process)

    def log(self, tail: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-tail:]
        except OSError:
            return ""
