"""A private Exim for the Exim interop tests (not a test module itself).

``scripts/test`` (``install_exim``) unpacks Debian's ``exim4-daemon-light``
into ``/opt/mailrelay-test-mtas/exim`` without installing it (it would remove
Postfix); ``$MAILRELAY_EXIM`` names another ``exim`` binary or wrapper.
:class:`PrivateExim` runs it with a configuration file, spool and logs of its
own in the test's temporary directory (``-C``; never ``/etc/exim4``):

* :meth:`PrivateExim.submit` hands a message to Exim on its command line and
  waits while Exim delivers it (``-odi``), as a local program sending mail would;
* :meth:`PrivateExim.queue_run` runs the queue once, forcing every deferred
  message (``-qff``), so a test drives Exim's retry instead of waiting for it;
* :meth:`PrivateExim.start_daemon` runs it as an SMTP server (``-bdf``).

Exim's processes run as Debian's ``Debian-exim`` user (the binary resolves that
name at start; ``install_exim`` creates it), and the unpacked binary is not
setuid, so Exim delivers as that user, never as root, and logs "exim user lost
privilege for using -C option" (expected).  The test directory must be
readable by it: the constructor opens ``tmp`` to others (mode 0755) and gives
it the spool and log directories.  The configuration names the list domains
``+mailrelay_domains``, as ``docs/mtas.rst`` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from twisted.internet import defer, protocol
from twisted.trial.unittest import SkipTest

from tests.daemon import poll
from tests.support import peers_required

__all__ = ["EXIM_USER", "PrivateExim", "require_exim"]

DEFAULT_EXIM = "/opt/mailrelay-test-mtas/exim/bin/exim"
EXIM_USER = "Debian-exim"

# The parts of the configuration every test shares; {placeholders} are filled
# by PrivateExim.  No DNS (every route is manual), no ident, no IPv6.
_MAIN = """\
primary_hostname = {hostname}
exim_path = {exim}
spool_directory = {tmp}/spool
log_file_path = {tmp}/log/%slog
log_selector = +smtp_confirmation +received_recipients +deliver_time
keep_environment =
disable_ipv6 = true
local_interfaces = 127.0.0.1
host_lookup =
rfc1413_hosts =
smtp_banner = $smtp_active_hostname ESMTP Exim (mailrelay tests)
domainlist mailrelay_domains = {list_domains}
"""

_RETRY = """
begin retry
# Deferred mail is tried again after 10 minutes; the tests force retries with -qff.
*   *   F,2h,10m
"""


def require_exim() -> str:
    """The Exim to run; skip (locally) or fail (CI) without it or without root."""
    path = os.environ.get("MAILRELAY_EXIM") or DEFAULT_EXIM
    why = None
    if not os.access(path, os.X_OK):
        why = f"Exim is not installed at {path}; scripts/test installs it (install_exim)"
    elif os.geteuid() != 0:
        why = "a private Exim must be started as root"
    else:
        try:
            subprocess.run(["getent", "passwd", EXIM_USER], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            why = f"the system user {EXIM_USER} does not exist; scripts/test creates it"
    if why is None:
        return path
    if peers_required():
        raise AssertionError(why)
    raise SkipTest(why)


class _Run(protocol.ProcessProtocol):
    """Feeds ``stdin`` to a process and fires ``done`` with (exit status, output)."""

    def __init__(self, stdin: bytes) -> None:
        self._stdin = stdin
        self._output: list[bytes] = []
        self.done: defer.Deferred[tuple[int, str]] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._output.append(data)

    errReceived = outReceived  # noqa: N815

    def processEnded(self, reason) -> None:  # noqa: N802
        code = reason.value.exitCode
        self.done.callback((code, b"".join(self._output).decode("utf-8", "replace")))


class PrivateExim:
    """An Exim whose configuration, spool and logs live under ``tmp``.

    ``config`` is the rest of the configuration file after the shared main
    options (more main options, then ``begin acl``, ``begin routers``,
    ``begin transports``, ``begin authenticators`` as needed); a retry rule
    section is appended.  ``{tmp}`` and ``{exim}`` in it are filled in.
    """

    def __init__(
        self,
        case,
        reactor,
        tmp: str,
        config: str,
        *,
        hostname: str = "exim.test",
        list_domains: str = "lists.test",
    ) -> None:
        self.exim = require_exim()
        self.reactor = reactor
        self.tmp = tmp
        os.chmod(tmp, 0o755)  # Exim's processes run as Debian-exim
        for name in ("spool", "log"):
            os.makedirs(os.path.join(tmp, name), exist_ok=True)
            shutil.chown(os.path.join(tmp, name), EXIM_USER, EXIM_USER)
        self.config = os.path.join(tmp, "exim.conf")
        self.daemon: subprocess.Popen | None = None
        values = {"tmp": tmp, "exim": self.exim, "hostname": hostname}
        with open(self.config, "w") as f:
            f.write(_MAIN.format(list_domains=list_domains, **values))
            f.write(config.replace("{tmp}", tmp).replace("{exim}", self.exim))
            f.write(_RETRY)
        case.addCleanup(self.stop_daemon)

    def run(self, *argv: str, stdin: bytes = b"") -> defer.Deferred[tuple[int, str]]:
        """Run ``exim -C config argv...`` without blocking the reactor: (exit status, output)."""
        process = _Run(stdin)
        self.reactor.spawnProcess(
            process,
            self.exim,
            [self.exim, "-C", self.config, *argv],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        return process.done

    async def checked(self, *argv: str, stdin: bytes = b"") -> str:
        """:meth:`run`, failing the test unless Exim exits 0; its output."""
        code, output = await self.run(*argv, stdin=stdin)
        if code != 0:
            raise AssertionError(f"exim {' '.join(argv)} exited {code}: {output}\n{self.log()}")
        return output

    async def submit(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Submit ``message`` from ``sender``; fires once Exim has made its delivery attempt.

        ``-odi``: Exim delivers before it exits; ``-oi``: a lone dot is data.
        """
        return await self.checked("-odi", "-oi", "-f", sender, "--", *recipients, stdin=message)

    async def queue_run(self) -> str:
        """Run the queue once in the foreground, forcing deferred (and frozen) messages."""
        return await self.checked("-qff")

    async def queued(self) -> list[str]:
        """Exim's queue listing (``exim -bp``), one line per message and recipient."""
        return [line for line in (await self.checked("-bp")).splitlines() if line.strip()]

    async def start_daemon(self, port: int) -> None:
        """Run Exim as an SMTP server on 127.0.0.1:``port``; fires once it listens."""
        with open(os.path.join(self.tmp, "daemon.err"), "wb") as errors:
            self.daemon = subprocess.Popen(
                [self.exim, "-C", self.config, "-bdf", "-oX", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                # Its own process group: stop_daemon ends the delivery processes too.
                start_new_session=True,
            )

        def listening() -> bool:
            if self.daemon.poll() is not None:
                raise AssertionError(f"exim -bdf exited {self.daemon.returncode}: {self.log()}")
            return f"listening for SMTP on [127.0.0.1]:{port}" in self.log("main")

        await poll(self.reactor, listening, f"Exim listening on port {port}", 20, details=self.log)

    def stop_daemon(self) -> None:
        """Stop the daemon and every Exim process it started (their process group)."""
        if self.daemon is None:
            return
        if self.daemon.poll() is None:
            os.killpg(self.daemon.pid, signal.SIGTERM)
        self.daemon.wait()
        self.daemon = None

    def log(self, which: str | None = None, tail: int = 6000) -> str:
        """Exim's ``main``, ``reject`` or ``panic`` log (all three by default), its end."""
        texts = []
        for name in [which] if which else ["main", "reject", "panic"]:
            try:
                with open(os.path.join(self.tmp, "log", f"{name}log"), errors="replace") as f:
                    texts.append(f"--- Exim {name}log\n" + f.read()[-tail:])
            except OSError:
                pass
        return "\n".join(texts)
