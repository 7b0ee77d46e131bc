"""Creating private files for the SQLite stores."""

from __future__ import annotations

import os


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
