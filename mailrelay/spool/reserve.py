"""The spool's space reserve: room kept on its file system for delivering what it holds.

Place in the flow: LMTP → **reserve** → runner → spool.  When the file system
under the spool fills up (through the spool's own intake or anything else),
SQLite can no longer claim an entry or record a delivery result, so delivery
of what the spool already holds would stop until space is freed.
:class:`SpaceReserve` keeps ``size`` bytes for that bookkeeping in a file of
its own (``var_dir/space-reserve``) while there is room.  When less than
``size`` is free it empties that file, so claims and results still fit, and
refuses new messages until twice ``size`` is free again, when it takes the
bytes back.  :class:`ReservedStore` puts it in front of the store LMTP uses: a
refused message fails with a disk-full :class:`~mailrelay.errors.SpoolError`,
which LMTP answers ``452 4.3.1`` per recipient.  :meth:`SpaceReserve.check`
also runs every few seconds (see :mod:`mailrelay.service`), so the bytes are
given back even when no mail arrives.

The reserve must exceed the size SQLite's write-ahead log grows to before it
checkpoints (1,000 pages, about 4 MB): result writes append to the log until
then.  On a file system that compresses or deduplicates, an allocated file may hold
less than it says; the reserve is then smaller than configured.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.errors import SpoolError
from mailrelay.interfaces import IMessageStore

__all__ = ["ReservedStore", "SpaceReserve", "available_bytes"]

_log = Logger()


def available_bytes(directory: str) -> int:
    """Bytes an unprivileged writer can still use on the file system of ``directory``."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


class SpaceReserve:
    """Holds ``size`` bytes in the file ``path`` while more than ``size`` is free besides.

    ``free_space(directory)`` measures the free bytes (default
    :func:`available_bytes`; tests pass their own).
    """

    def __init__(
        self,
        path: str,
        size: int,
        free_space: Callable[[str], int] = available_bytes,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a whole number of bytes above 0, not {size!r}")
        self.path = path
        self.size = size
        self._directory = os.path.dirname(path) or "."
        self._free_space = free_space
        try:
            self._held = os.stat(path).st_size
        except FileNotFoundError:
            self._held = 0
        # Whether the latest check refused: a change is logged, not every refusal.
        self._refusing = False

    @property
    def held(self) -> int:
        """Bytes the reserve file holds now (``size``, or 0 once given back)."""
        return self._held

    def check(self, needed: int = 0) -> bool:
        """Whether a message of ``needed`` bytes may be stored now.

        Gives the reserve's bytes back when less than ``size`` is free, and
        takes them again once twice ``size`` is free.  A file system that
        cannot be measured allows the message: the spool then reports a full
        disk itself.
        """
        try:
            free = self._free_space(self._directory)
        except OSError as e:
            _log.warn(
                "Cannot measure free space under {directory}: {error}",
                directory=self._directory,
                error=e.strerror or str(e),
            )
            return True
        if self._held < self.size:
            # The hysteresis: taking the bytes must leave ``size`` free.
            if free < 2 * self.size - self._held or not self._take():
                self._refuse(free)
                return False
            free -= self.size - self._held
            self._held = self.size
        if free < self.size:
            self._give_back()
            self._refuse(free)
            return False
        if self._refusing:
            self._refusing = False
            _log.info(
                "Spool file system under {directory} has {free} bytes free again: "
                "new messages are accepted",
                directory=self._directory,
                free=free,
            )
        # Refused, but the reserve is kept: only this message is too big for now.
        return free - needed >= self.size

    def refusal(self) -> SpoolError:
        """The error a refused message gets (disk full: LMTP answers 452 4.3.1)."""
        return SpoolError(
            f"spool file system under {self._directory} has less than {self.size} bytes "
            f"free besides this message ([mta] spool_reserve, kept for delivery)",
            disk_full=True,
        )

    def _take(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as e:
            _log.warn(
                "Cannot take the spool's space reserve {path}: {error}",
                path=self.path,
                error=e.strerror or str(e),
            )
            self._give_back()
            return False
        return True

    def _give_back(self) -> None:
        try:
            os.truncate(self.path, 0)
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warn(
                "Cannot empty the spool's space reserve {path}: {error}",
                path=self.path,
                error=e.strerror or str(e),
            )
            return
        self._held = 0

    def _refuse(self, free: int) -> None:
        if self._refusing:
            return
        self._refusing = True
        _log.warn(
            "Spool file system under {directory} has {free} bytes free, less than "
            "spool_reserve ({reserve} bytes): new messages get 452 4.3.1 until "
            "{wanted} bytes are free; the reserve is left to deliveries",
            directory=self._directory,
            free=free,
            reserve=self.size,
            wanted=2 * self.size,
        )


@implementer(IMessageStore)
class ReservedStore:
    """Stores through ``store`` (an ``IMessageStore``) only what ``reserve`` has room for."""

    def __init__(self, store: Any, reserve: SpaceReserve) -> None:
        self._store = store
        self._reserve = reserve

    def enqueue(self, envelope: Any, message: bytes) -> Deferred[list[int]]:
        if not self._reserve.check(len(message)):
            return fail(self._reserve.refusal())
        return self._store.enqueue(envelope, message)
