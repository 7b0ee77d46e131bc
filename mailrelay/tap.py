"""``twistd mailrelay``: command-line options and the service maker.

A start-up failure an operator can fix (a bad configuration, a port in use,
a spool that cannot be opened, another relay on the same state directory)
ends twistd with one line naming what failed and how to fix it, and exit
status 1, never a traceback: :class:`StartupFailed`.  A failure that is a bug
still shows its traceback.

With ``[log] format = json`` twistd's log (the file of ``--logfile``, or
standard output with ``-n`` or ``--logfile=-``) gets one JSON object per line
(:func:`mailrelay.logs.json_observer`) instead of text lines; an explicit
``twistd --logger`` still wins.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from mailrelay.config import CONFIG_ENVIRONMENT_VARIABLE, load_settings
from mailrelay.errors import ConfigurationError, MailrelayError, StateDirectoryInUse

_log = Logger()


class StartupFailed(SystemExit):
    """Ends the process with ``mailrelay: <reason>`` on stderr and exit status 1.

    A ``SystemExit``: twistd lets it through without printing its usage text or
    a traceback, and Python prints the message and exits non-zero.
    """

    def __init__(self, reason: str):
        super().__init__(f"mailrelay: {reason}")
        self.reason = reason


def describe_startup_failure(error: BaseException) -> str | None:
    """One line saying what failed and how to fix it, or ``None`` for a bug."""
    if isinstance(error, CannotListenError):
        where = (
            f"{error.interface}:{error.port}" if error.interface is not None else str(error.port)
        )
        reason = getattr(error.socketError, "strerror", None) or error.socketError
        return (
            f"cannot listen for LMTP on {where}: {reason}; stop what holds it (another "
            f"relay?) or change [mta] lmtp_endpoint or lmtp_port"
        )
    if isinstance(error, (ConfigurationError, StateDirectoryInUse)):
        return str(error)
    if isinstance(error, MailrelayError):
        # A store that cannot be opened, a state directory in use: the
        # message names the file or directory.
        return f"{error}; check [paths] var_dir and its permissions"
    if isinstance(error, OSError):
        name = f" {error.filename}" if error.filename else ""
        return (
            f"cannot start:{name}: {error.strerror or error}; check [paths] var_dir "
            f"and its permissions"
        )
    return None


class Options(usage.Options):
    synopsis = "[-C CONFIG]"
    longdesc = (
        "Run the mailrelay LMTP server, spool and delivery runner. Without -C the "
        f"file named by ${CONFIG_ENVIRONMENT_VARIABLE} is read, and without that the embedded "
        "defaults apply (LMTP on 127.0.0.1:8024, spool under ./var, smarthost localhost:25)."
    )
    optParameters = [
        ["config", "C", None, "configuration file (INI)"],
    ]

    def postOptions(self):  # noqa: N802
        path = self["config"] or os.environ.get(CONFIG_ENVIRONMENT_VARIABLE) or None
        try:
            self["settings"] = settings = load_settings(path)
            check_outbound(settings)
        except ConfigurationError as e:
            # Not a UsageError: twistd would print its whole usage text first.
            raise StartupFailed(str(e)) from None


def check_outbound(settings) -> None:
    """Load the TLS material and credentials file the smarthost connection will
    use, so that a file that exists but is unusable (not PEM, a malformed
    authinfo line) stops twistd with a one-line error instead of a traceback."""
    from mailrelay.mta.credentials import CredentialsFile
    from mailrelay.mta.tls import client_tls_options
    from mailrelay.service import connection_arguments, tls_arguments

    arguments = connection_arguments(settings)
    if arguments["secure_mode"] != "smtp":
        client_tls_options(arguments["host"], **tls_arguments(settings))
    if arguments["credentials_file"]:
        CredentialsFile.load(arguments["credentials_file"])


class _Guarded(service.MultiService):
    """The relay under twistd: a start-up failure an operator can fix becomes one line.

    twistd starts services after it has forked into the background.  In the
    foreground (``-n``) a :class:`StartupFailed` ends the process; in the
    background the same line is raised as an ordinary exception, which
    twistd passes to the waiting parent to print.
    """

    def __init__(self, relay: service.IService, foreground: bool, log_observer=None):
        super().__init__()
        self._foreground = foreground
        self._log_observer = log_observer
        relay.setServiceParent(self)

    def setServiceParent(self, parent):  # noqa: N802
        # twistd adds the service to its Application, then starts logging to
        # the application's ILogObserver component if it has one (as a .tac
        # file's setComponent would), unless --logger names another.
        if self._log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self):  # noqa: N802
        self._guard(super().privilegedStartService)

    def startService(self):  # noqa: N802
        self._guard(super().startService)

    def _guard(self, start) -> None:
        try:
            start()
        except Exception as e:
            reason = describe_startup_failure(e)
            if reason is None:
                raise
            if self._foreground:
                raise StartupFailed(reason) from None
            # The log file gets the traceback twistd prints; this line says it all.
            _log.critical("mailrelay cannot start: {reason}", reason=reason)
            raise RuntimeError(reason) from None


def makeService(options):  # noqa: N802
    # The reactor is imported here, never at module level: twistd installs the
    # one chosen with -r before calling us.
    from twisted.internet import reactor

    from mailrelay.service import makeService as make

    try:
        relay = make(options["settings"], reactor)
    except Exception as e:
        # Still in the foreground: twistd forks after this returns.
        reason = describe_startup_failure(e)
        if reason is None:
            raise
        raise StartupFailed(reason) from None
    parent = getattr(options, "parent", None)
    foreground = bool(parent is None or parent.get("nodaemon"))
    observer = None
    if options["settings"].log.format == "json" and parent is not None:
        observer = json_log_observer(parent)
    return _Guarded(relay, foreground, observer)


def json_log_observer(twistd_options):
    """The JSON observer for ``[log] format = json``, writing where twistd's
    text log would go with the same options: standard output with ``-n``
    and no ``--logfile`` or with ``--logfile=-``, otherwise the file (default
    ``twistd.log``), rotated as twistd rotates it (by size, and on SIGUSR1).
    ``None`` when ``--logger`` names an observer of its own."""
    import signal
    import sys

    from twisted.python.logfile import LogFile

    from mailrelay.logs import json_observer

    if twistd_options.get("logger"):
        return None
    if twistd_options.get("syslog"):
        raise StartupFailed(
            "[log] format = json writes to twistd's log file or standard output, not "
            "to syslog: drop --syslog, or set [log] format = text"
        )
    path = twistd_options.get("logfile") or ""
    nodaemon = bool(twistd_options.get("nodaemon"))
    if path == "-" or (nodaemon and not path):
        if not nodaemon:
            raise StartupFailed("a daemon cannot log to standard output: use -n or --logfile")
        return json_observer(sys.stdout)
    path = path or "twistd.log"
    try:
        log_file = LogFile.fromFullPath(path)
    except OSError as e:
        raise StartupFailed(f"cannot open the log file {path}: {e.strerror or e}") from None
    if not signal.getsignal(signal.SIGUSR1):
        # As twistd does for its text log (it never sees this file).
        def rotate(signum, frame):
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return json_observer(log_file)
