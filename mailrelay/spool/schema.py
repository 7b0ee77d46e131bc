"""The SQLite spool's on-disk format: its tables and migrations, how a database
is opened (WAL, sync level, size cap), and how an entry row reads back.

Place in the flow: LMTP → routing → **spool** → scheduler → sending → mta.
Only :mod:`mailrelay.spool.sqlite` uses this module; the ``mailrelay queue``
command reads the same file through :class:`~mailrelay.spool.SQLiteSpool`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from mailrelay._files import create_private_file
from mailrelay.errors import SpoolError
from mailrelay.model import Destination, EntryKind, EntryState, SpoolEntry

# Each entry upgrades the schema from version N to N+1 (``PRAGMA user_version``).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # AUTOINCREMENT: ids are never reused, so an id the runner still holds
        # cannot land on a newer entry after an operator deleted the old one.
        """CREATE TABLE messages (
            key INTEGER PRIMARY KEY AUTOINCREMENT,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL DEFAULT '',
            received_at REAL NOT NULL,
            peer TEXT NOT NULL DEFAULT '',
            data BLOB NOT NULL
        )""",
        """CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            message_key INTEGER NOT NULL REFERENCES messages (key),
            list_address TEXT NOT NULL,
            subaddress TEXT,
            recipient TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('queued', 'inflight', 'retry', 'done', 'failed', 'held')),
            attempts INTEGER NOT NULL DEFAULT 0,
            first_attempt_at REAL,
            next_attempt_at REAL,
            last_error TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX entries_due ON entries (state, next_attempt_at)",
        "CREATE INDEX entries_by_message ON entries (message_key)",
        # A message lives exactly as long as one of its entries does.
        """CREATE TRIGGER entries_drop_message AFTER DELETE ON entries
            WHEN NOT EXISTS (SELECT 1 FROM entries WHERE message_key = OLD.message_key)
            BEGIN DELETE FROM messages WHERE key = OLD.message_key; END""",
    ),
    (
        # Version 2: per-recipient fan-out and published runner state.
        """ALTER TABLE entries ADD COLUMN kind TEXT NOT NULL DEFAULT 'inbound'
            CHECK (kind IN ('inbound', 'member', 'owner'))""",
        """CREATE TABLE status (
            key TEXT PRIMARY KEY NOT NULL,
            value TEXT NOT NULL,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID""",
    ),
    (
        # Version 3: queued entries in id order straight from an index (the
        # rowid is the index's last column), so claiming the oldest N costs
        # O(N) however many are queued, rather than a sort of all of them.
        "CREATE INDEX entries_by_state ON entries (state)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

ENTRY_QUERY = """
    SELECT e.id, e.message_key, m.sender, e.list_address, e.subaddress, e.recipient,
           e.state, m.received_at, e.attempts, e.first_attempt_at, e.next_attempt_at,
           e.last_error, m.message_id, e.kind
    FROM entries AS e JOIN messages AS m ON m.key = e.message_key
"""

# The claim's two queries; each must be answered in index order, without a sort.
CLAIM_QUEUED = ENTRY_QUERY + " WHERE e.state = 'queued' ORDER BY e.id LIMIT ?"
CLAIM_RETRY = (
    ENTRY_QUERY + " WHERE e.state = 'retry' AND e.next_attempt_at <= ?"
    " ORDER BY e.next_attempt_at LIMIT ?"
)


# Enum lookups by value through a dict: EntryState(value) costs microseconds,
# paid for every row a claim reads.
_STATES = STATES = {state.value: state for state in EntryState}
_KINDS = {kind.value: kind for kind in EntryKind}


def entry_from_row(row: Sequence[Any]) -> SpoolEntry:
    """The :class:`SpoolEntry` of a row of :data:`ENTRY_QUERY` (its columns in
    the order of :class:`SpoolEntry`'s fields, the destination in three)."""
    (entry_id, message_key, sender, list_address, subaddress, recipient, state) = row[:7]
    received_at, attempts, first, next_, last_error, message_id, kind = row[7:]
    return SpoolEntry(
        entry_id,
        message_key,
        sender,
        Destination(list_address, subaddress, recipient),
        _STATES[state],
        received_at,
        attempts,
        first,
        next_,
        last_error,
        message_id,
        _KINDS[kind],
    )


def open_database(path: str, max_bytes: int | None) -> sqlite3.Connection:
    """Open (creating it private if need be) and migrate the spool at ``path``
    for the writer thread: WAL, ``synchronous=FULL``, foreign keys, and a page
    cap for ``max_bytes``.  Raises :class:`SpoolError` naming ``path``."""
    try:
        create_private_file(path)
        # Used only by the writer thread once it starts; autocommit mode
        # because transactions are explicit (see GroupCommitWriter).
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        raise SpoolError(f"cannot open spool {path}: {e}") from e
    try:
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise SpoolError(f"spool {path}: SQLite refused WAL mode (got {mode!r})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        if max_bytes is not None:
            (page_size,) = db.execute("PRAGMA page_size").fetchone()
            # PRAGMA takes no parameters; this is our own integer.
            db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size):d}")
        _migrate(db, path)
    except sqlite3.Error as e:
        db.close()
        raise SpoolError(f"cannot open spool {path}: {e}") from e
    except SpoolError:
        db.close()
        raise
    return db


def open_reader(path: str) -> sqlite3.Connection:
    """A read-only connection to the spool at ``path``, for the reactor thread
    (WAL lets it read alongside the writer)."""
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("PRAGMA query_only = ON")
    return reader


def _migrate(db: sqlite3.Connection, path: str) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {path} has schema version {version}; this mailrelay "
                f"understands up to {SCHEMA_VERSION} (was it written by a newer release?)"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[number]:
                db.execute(statement)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
