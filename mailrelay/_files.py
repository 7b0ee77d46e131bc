"""Private files: the SQLite stores, the daemon's lock on its state directory, secrets."""

from __future__ import annotations

import fcntl
import os
import stat

from mailrelay.errors import StateDirectoryInUse

# In the state directory ([paths] var_dir); holds the pid of the daemon that has it.
LOCK_FILE_NAME = "mailrelay.lock"


def create_private_file(path: str) -> None:
    """Create ``path`` (and its directory, mode 0750) with mode 0640 if missing.

    Member addresses and spooled mail are private; SQLite would create the file
    0644, and it copies the main file's mode to its -wal and -shm files.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o750, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    except FileExistsError:
        pass


def secret_file_problem(path: str, mode: int) -> str | None:
    """Why a file of secrets at ``path`` with ``st_mode`` ``mode`` must be refused, or None.

    As ssh does with private keys: any permission for the group or for others
    is refused, not just warned about (a warning in a log nobody reads leaves
    the password readable).
    """
    permissions = stat.S_IMODE(mode)
    if not permissions & 0o077:
        return None
    return (
        f"{path} is accessible to other users (mode {permissions:04o}); "
        f"it holds a password: run chmod 600 {path} (owned by the user mailrelay runs as)"
    )


class DirectoryLock:
    """An exclusive ``flock`` on ``LOCK_FILE_NAME`` in a directory, held until :meth:`release`.

    One daemon per spool: a second one would requeue the first one's entries
    in flight at start and send them twice.  The lock belongs to the open file,
    so it survives twistd's fork into the background (the parent's copy closes
    when it exits) and goes with the process however it ends, even SIGKILL;
    the file itself stays and is reused.  Only the daemon takes it: the command
    line works alongside a running daemon.
    """

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE_NAME)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirectoryInUse(directory, holder) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self.write_pid()

    def write_pid(self) -> None:
        """Record this process's pid in the file (again after twistd forks)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        """Give the directory up (idempotent); the file stays."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
