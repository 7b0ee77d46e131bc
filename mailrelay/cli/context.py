"""What every ``mailrelay`` command needs: exit codes, errors, streams, settings, storage.

The command modules (:mod:`~mailrelay.cli.lists`, :mod:`~mailrelay.cli.members`,
:mod:`~mailrelay.cli.queue`, ...) are handed one :class:`Context` by
:func:`mailrelay.cli.entry.main`; through it they read their parsed arguments,
write to their streams and open the settings, the list registry and the spool,
the same SQLite files the daemon uses.
"""

from __future__ import annotations

import argparse
import errno
import os
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailrelay.config import CONFIG_ENVIRONMENT_VARIABLE, Settings, load_settings
from mailrelay.errors import ConfigurationError, MailrelayError
from mailrelay.model import MailingList
from mailrelay.registry import MemoryRegistry, SQLiteRegistry
from mailrelay.spool import MemorySpool, SQLiteSpool

EXIT_OK = 0
EXIT_FAILURE = 1  # the command failed: unknown list, bad address, duplicate, storage error
EXIT_USAGE = 2  # bad command line (argparse's own convention)
EXIT_CONFIG = 3  # the configuration file is missing or wrong


class CommandError(MailrelayError):
    """A command cannot do what was asked; the message is shown without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


# -- the thread bridge for SQLiteSpool ----------------------------------------


class ThreadBridge:
    """The two reactor methods :class:`SQLiteSpool` uses, for one short command.

    Not ``task.react``: it runs the global reactor, which can run once per
    process and then calls ``sys.exit``, so ``main`` could not be called twice
    in one process (tests, embedders).  Here the spool's writer thread queues
    its results and :meth:`wait` runs them in the calling thread.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict]] = queue.SimpleQueue()

    def seconds(self) -> float:
        return time.time()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:  # noqa: N802
        self._calls.put((f, args, kwargs))

    def wait(self, result: Any) -> Any:
        """The result of ``result`` if it is a Deferred (raising its failure), else itself."""
        if not isinstance(result, Deferred):
            return result
        outcome: list[Any] = []
        result.addBoth(outcome.append)
        while not outcome:
            f, args, kwargs = self._calls.get()
            f(*args, **kwargs)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]


# -- the command context -------------------------------------------------------


class Context:
    """What a command needs: its streams, the parsed arguments and the storage."""

    def __init__(
        self,
        args: argparse.Namespace,
        stdout: IO[str],
        stderr: IO[str],
        stdin: IO[Any],
        environ: dict[str, str] | Any,
    ):
        self.args = args
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin
        self.environ = environ
        self._settings: Settings | None = None

    def out(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def err(self, text: str) -> None:
        self.stderr.write(f"mailrelay: {text}\n")

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            path = getattr(self.args, "config", None)
            from_environment = False
            if not path:
                path = self.environ.get(CONFIG_ENVIRONMENT_VARIABLE) or None
                from_environment = path is not None
            try:
                self._settings = load_settings(path, environ=self.environ)
            except ConfigurationError as e:
                if from_environment:
                    raise ConfigurationError(
                        f"{e} (file named by the {CONFIG_ENVIRONMENT_VARIABLE} "
                        f"environment variable)"
                    ) from None
                raise
        return self._settings

    def _note_defaults(self) -> None:
        # A relative default var_dir depends on the current directory: an
        # operator running the CLI elsewhere than the daemon sees other data.
        if self.settings.source is None:
            self.err(
                f"note: no configuration file (-C FILE or {CONFIG_ENVIRONMENT_VARIABLE}); "
                f"using the built-in defaults, var_dir = {self.settings.paths.var_dir}"
            )

    def _exists(self, path: str, missing: str) -> bool:
        """Whether ``path`` exists; if not, says ``missing`` as a note on standard error.

        A file this user cannot reach or read is a :class:`CommandError`
        naming it and the reason, never "nothing there yet": an operator must
        not be told the spool is empty when it is only out of reach.
        """
        try:
            os.stat(path)
        except FileNotFoundError:
            self.err(f"note: {missing}")
            return False
        except OSError as e:
            raise CommandError(_unreachable(path, e.strerror or str(e))) from None
        if not os.access(path, os.R_OK):
            raise CommandError(_unreachable(path, os.strerror(errno.EACCES)))
        return True

    @contextmanager
    def registry(self, *, create: bool) -> Iterator[SQLiteRegistry | MemoryRegistry]:
        """The list registry; without ``create``, an empty one if there is no file yet."""
        self._note_defaults()
        path = self.settings.paths.registry_path
        registry: SQLiteRegistry | MemoryRegistry
        missing = f"no list registry at {path} yet (no list was ever created)"
        if create or self._exists(path, missing):
            registry = SQLiteRegistry(path)
        else:
            registry = MemoryRegistry()
        try:
            yield registry
        finally:
            registry.close()

    @contextmanager
    def spool(self) -> Iterator[tuple[SQLiteSpool | MemorySpool, ThreadBridge]]:
        """The spool and the bridge that waits for its Deferreds; closed on exit."""
        self._note_defaults()
        path = self.settings.paths.spool_path
        bridge = ThreadBridge()
        spool: SQLiteSpool | MemorySpool
        if self._exists(path, f"no spool at {path} yet (no message was ever received)"):
            spool = SQLiteSpool(path, bridge)
        else:
            spool = MemorySpool(bridge)
        try:
            yield spool, bridge
        finally:
            bridge.wait(spool.close())

    def confirm(self, action: str) -> None:
        """Ask before doing ``action`` ("delete list x"); without a terminal, ``--yes``
        is required.  Raises :class:`CommandError` unless confirmed."""
        if self.args.yes:
            return
        isatty = getattr(self.stdin, "isatty", None)
        if not (isatty and isatty()):
            raise CommandError(f"not confirmed: {action} (add --yes to confirm without a terminal)")
        self.stderr.write(f"{action[:1].upper()}{action[1:]}? [y/N] ")
        self.stderr.flush()
        answer = self.stdin.readline()
        if answer.strip().lower() not in ("y", "yes"):
            raise CommandError("cancelled; nothing changed")


def _unreachable(path: str, reason: str) -> str:
    return (
        f"cannot open {path}: {reason} (run mailrelay as the user the daemon runs as, or as root)"
    )


def require_list(registry: SQLiteRegistry | MemoryRegistry, address: str) -> MailingList:
    """The list with posting address ``address``; :class:`CommandError` if there is none."""
    mailing_list = registry.get_list(address)
    if mailing_list is None:
        raise CommandError(f"no such list: {address} (see `mailrelay lists list`)")
    return mailing_list
