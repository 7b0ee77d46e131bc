"""The durable spool: accepted messages and one entry per accepted recipient.

Entries move QUEUED -> INFLIGHT -> DONE/RETRY/FAILED/HELD.  A post is stored
as one INBOUND entry, which is replaced by one MEMBER entry per member, each of
which is then delivered, retried and dead-lettered on its own: either in the
transaction that stores it (:meth:`SQLiteSpool.store` with routes, which can
also hand the new entries to the caller INFLIGHT, saving a claim) or later by
the delivery runner (:meth:`SQLiteSpool.expand`).  Delivery is
at-least-once: an entry that was INFLIGHT when the process died is QUEUED
again by :meth:`~mailrelay.interfaces.ISpool.recover` and sent again, but an
entry the smarthost accepted is DONE and is never sent twice in normal
operation.  A small key/value table (:meth:`SQLiteSpool.set_status`) lets the
running server publish state, such as the delivery circuit breaker, that the
``mailrelay queue`` command (another process) shows.

:class:`SQLiteSpool` keeps SQLite off the reactor thread for writes: a single
writer thread takes every write request waiting in its queue, runs them in one
transaction and commits once, so concurrent callers share one fsync (group
commit).  Only storing a message (what LMTP acknowledges) and operator
changes are fsynced; the runner's bookkeeping (claims, results, fan-out)
commits without a sync of its own: a process crash loses none of it (it is in
the WAL), and a power cut can only make some deliveries happen twice.  Reads
are quick indexed queries on a second connection in the reactor thread, which
WAL mode lets run alongside the writer.
:class:`MemorySpool` honours the same contract in memory.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay._files import create_private_file
from mailrelay.errors import SpoolError
from mailrelay.interfaces import ISpool
from mailrelay.model import (
    Destination,
    EntryKind,
    EntryState,
    EntryUpdate,
    Envelope,
    Route,
    SpoolEntry,
    Stored,
)

__all__ = ["EntryUpdate", "MemorySpool", "SQLiteSpool", "SCHEMA_VERSION"]

log = Logger()
_T = TypeVar("_T")


# -- input checks shared by both spools ---------------------------------------


def _check_enqueue(envelope: object, message: object) -> tuple[Envelope, bytes]:
    if not isinstance(envelope, Envelope):
        raise TypeError(f"envelope must be an Envelope, not {envelope!r}")
    if not envelope.destinations:
        raise ValueError("envelope has no destinations: nothing to spool")
    for destination in envelope.destinations:
        if not isinstance(destination, Destination):
            raise TypeError(f"envelope destination is not a Destination: {destination!r}")
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TypeError(f"message must be bytes, not {type(message).__name__}")
    return envelope, bytes(message)


def _check_routes(envelope: Envelope, routes: object, claim: object) -> list[Route]:
    if not isinstance(claim, bool):
        raise TypeError(f"claim must be a bool, not {claim!r}")
    if routes is None:
        return [_QUEUED] * len(envelope.destinations)
    if isinstance(routes, str | bytes):
        raise TypeError(f"routes must be a sequence of Route, not {routes!r}")
    checked = list(routes)  # type: ignore[call-overload]
    if len(checked) != len(envelope.destinations):
        raise ValueError(
            f"{len(checked)} routes for {len(envelope.destinations)} destinations: one each"
        )
    for index, route in enumerate(checked):
        if not isinstance(route, Route):
            raise TypeError(f"not a Route: {route!r}")
        if route.kind is not None:
            # As expand(): one copy per address, however often it is listed.
            _, addresses, _ = _check_expand(0, route.recipients, route.kind)
            if len(addresses) != len(route.recipients):
                checked[index] = replace(route, recipients=tuple(addresses))
    return checked


_QUEUED = Route()


def _check_updates(updates: Iterable[EntryUpdate]) -> list[EntryUpdate]:
    updates = list(updates)
    for update in updates:
        if not isinstance(update, EntryUpdate):
            raise TypeError(f"not an EntryUpdate: {update!r}")
    return updates


def _check_ids(entry_ids: Iterable[int]) -> list[int]:
    if isinstance(entry_ids, int | str | bytes):
        raise TypeError(f"entry ids must be an iterable of ints, not {entry_ids!r}")
    ids = list(entry_ids)
    for entry_id in ids:
        if not isinstance(entry_id, int) or isinstance(entry_id, bool):
            raise TypeError(f"entry id must be an int, not {entry_id!r}")
    return ids


def _check_expand(
    entry_id: object, recipients: Iterable[str], kind: object
) -> tuple[int, list[str], EntryKind]:
    if not isinstance(entry_id, int) or isinstance(entry_id, bool):
        raise TypeError(f"entry id must be an int, not {entry_id!r}")
    if isinstance(recipients, str | bytes):
        raise TypeError(f"recipients must be an iterable of addresses, not {recipients!r}")
    try:
        kind = EntryKind(kind)
    except ValueError:
        raise ValueError(f"not an entry kind: {kind!r}") from None
    if kind is EntryKind.INBOUND:
        raise ValueError("expanded entries are MEMBER or OWNER deliveries, not INBOUND")
    checked = []
    for recipient in recipients:
        if not isinstance(recipient, str) or not recipient:
            raise TypeError(f"recipient must be a non-empty str, not {recipient!r}")
        checked.append(recipient)
    # A recipient listed twice gets one copy.
    return entry_id, list(dict.fromkeys(checked)), kind


def _expanded_subaddress(kind: EntryKind) -> str | None:
    """Owner copies keep the ``owner`` sub-address, so the queue shows what they are."""
    return "owner" if kind is EntryKind.OWNER else None


def _not_expandable(entry_id: int, kind: EntryKind) -> ValueError:
    return ValueError(
        f"entry {entry_id} is a {kind.value} delivery, not an inbound entry: it cannot be expanded"
    )


def _check_time(when: object) -> float:
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise TypeError(f"time must be a number, not {when!r}")
    return float(when)


def _check_status(key: object, text: object) -> tuple[str, str | None]:
    if not isinstance(key, str) or not key:
        raise TypeError(f"status key must be a non-empty str, not {key!r}")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"status text must be a str or None, not {text!r}")
    return key, text


def _check_state(state: object) -> EntryState | None:
    if state is None:
        return None
    try:
        return EntryState(state)
    except ValueError:
        raise ValueError(f"not an entry state: {state!r}") from None


def _check_limit(limit: object, allow_none: bool) -> int | None:
    if limit is None and allow_none:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit must be a non-negative int, not {limit!r}")
    return limit


def _deferred_call(f: Callable[..., Deferred[_T]], *args: Any) -> Deferred[_T]:
    """Call ``f``, turning a bad-argument exception into a failed Deferred."""
    try:
        return f(*args)
    except (TypeError, ValueError) as e:
        return fail(e)


# -- SQLite ------------------------------------------------------------------

# Each entry upgrades the schema from version N to N+1 (``PRAGMA user_version``).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
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
SCHEMA_VERSION = len(_MIGRATIONS)

_ENTRY_QUERY = """
    SELECT e.id, e.message_key, m.sender, e.list_address, e.subaddress, e.recipient,
           e.state, m.received_at, e.attempts, e.first_attempt_at, e.next_attempt_at,
           e.last_error, m.message_id, e.kind
    FROM entries AS e JOIN messages AS m ON m.key = e.message_key
"""

# The claim's two queries; each must be answered in index order, without a sort.
_CLAIM_QUEUED = _ENTRY_QUERY + " WHERE e.state = 'queued' ORDER BY e.id LIMIT ?"
_CLAIM_RETRY = (
    _ENTRY_QUERY + " WHERE e.state = 'retry' AND e.next_attempt_at <= ?"
    " ORDER BY e.next_attempt_at LIMIT ?"
)


# Enum lookups by value through a dict: EntryState(value) costs microseconds,
# paid for every row a claim reads.
_STATES = {state.value: state for state in EntryState}
_KINDS = {kind.value: kind for kind in EntryKind}


def _entry_from_row(row: Sequence[Any]) -> SpoolEntry:
    (
        entry_id,
        message_key,
        sender,
        list_address,
        subaddress,
        recipient,
        state,
        received_at,
        attempts,
        first_attempt_at,
        next_attempt_at,
        last_error,
        message_id,
        kind,
    ) = row
    return SpoolEntry(
        entry_id=entry_id,
        message_key=message_key,
        sender=sender,
        destination=Destination(list_address, subaddress, recipient),
        state=_STATES[state],
        received_at=received_at,
        attempts=attempts,
        first_attempt_at=first_attempt_at,
        next_attempt_at=next_attempt_at,
        last_error=last_error,
        message_id=message_id,
        kind=_KINDS[kind],
    )


def _chunks(ids: list[int], size: int = 500) -> Iterator[list[int]]:
    """``ids`` in slices small enough for one statement's parameters (SQLite
    builds before 3.32 allow 999)."""
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _placeholders(ids: list[int]) -> str:
    return ",".join("?" * len(ids))


def _insert_copies(
    db: sqlite3.Connection,
    message_key: int,
    list_address: str,
    subaddress: str | None,
    route: Route,
    state: EntryState,
    now: float,
) -> int:
    """Insert one ``route.kind`` entry per recipient; the id of the first.

    One executemany rather than a statement per copy.  The ids are
    consecutive: this connection is the only writer, and AUTOINCREMENT hands
    out max(rowid, highest ever) + 1 for each row in turn.
    """
    assert route.kind is not None
    db.executemany(
        "INSERT INTO entries (message_key, list_address, subaddress, recipient,"
        " state, kind, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (message_key, list_address, subaddress, address, state.value, route.kind.value, now)
            for address in route.recipients
        ],
    )
    (last,) = db.execute("SELECT last_insert_rowid()").fetchone()
    return last - len(route.recipients) + 1


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, sqlite3.Error) and (
        getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "database or disk is full" in str(error)
    )


@dataclass
class _Request:
    """A write waiting for the writer thread; ``operation`` runs there."""

    doing: str
    operation: Callable[[sqlite3.Connection], Any]
    deferred: Deferred[Any]
    durable: bool = True


# (request, succeeded, result or exception)
_Outcome = tuple[_Request, bool, Any]
_STOP = object()


@implementer(ISpool)
class SQLiteSpool:
    """An :class:`ISpool` in an SQLite file (WAL, ``synchronous=FULL`` for what
    must survive a power cut, ``NORMAL`` for delivery bookkeeping).

    ``reactor`` must provide ``IReactorThreads`` and ``IReactorTime``: results
    come back through ``callFromThread``.  ``max_bytes`` caps the database size;
    a write beyond it fails like a full disk.  ``commit_count`` counts the
    transactions committed so far.  Call :meth:`close` to stop the writer thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reactor: Any,
        *,
        max_bytes: int | None = None,
        max_batch: int = 1000,
    ) -> None:
        self.path = os.fspath(path)
        self.commit_count = 0
        self._reactor = reactor
        self._max_batch = max_batch
        self._closing = False
        self._close_waiters: list[Deferred[None]] | None = []
        self._writer = self._open(max_bytes)
        self._synced = True  # the writer's synchronous setting is FULL
        try:
            self._reader = sqlite3.connect(self.path, isolation_level=None)
            self._reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error as e:
            self._writer.close()
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._write_loop, name=f"mailrelay spool writer {self.path}", daemon=True
        )
        self._thread.start()

    def _open(self, max_bytes: int | None) -> sqlite3.Connection:
        try:
            create_private_file(self.path)
            # Used only by the writer thread once it starts; autocommit mode
            # because transactions are explicit (see _transaction).
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        try:
            (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise SpoolError(f"spool {self.path}: SQLite refused WAL mode (got {mode!r})")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            if max_bytes is not None:
                (page_size,) = db.execute("PRAGMA page_size").fetchone()
                # PRAGMA takes no parameters; this is our own integer.
                db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size):d}")
            self._migrate(db)
        except sqlite3.Error as e:
            db.close()
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        except SpoolError:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"spool {self.path} has schema version {version}; this mailrelay "
                    f"understands up to {SCHEMA_VERSION} (was it written by a newer release?)"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[number]:
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- the writer thread ---------------------------------------------------

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is _STOP for item in batch)
            requests = [item for item in batch if isinstance(item, _Request)]
            if requests:
                try:
                    outcomes = self._commit(requests)
                except Exception as e:  # a bug; callers must still hear back
                    outcomes = [(request, False, e) for request in requests]
                self._reactor.callFromThread(self._deliver, outcomes)
        self._writer.close()
        self._reactor.callFromThread(self._writer_stopped)

    def _commit(self, requests: list[_Request]) -> list[_Outcome]:
        """Run ``requests`` in as few transactions as possible; one outcome each."""
        outcomes: dict[int, _Outcome] = {}
        remaining = list(requests)
        while remaining:
            results, culprit = self._transaction(remaining)
            if culprit is None:
                outcomes.update((id(outcome[0]), outcome) for outcome in results)
                break
            # SQLite rolled the whole transaction back (disk full, I/O error)
            # while running one request: it fails, the others get another go.
            outcomes[id(culprit[0])] = culprit
            remaining = [request for request in remaining if request is not culprit[0]]
        return [outcomes[id(request)] for request in requests]

    def _transaction(
        self, requests: list[_Request], isolate: bool = False
    ) -> tuple[list[_Outcome], _Outcome | None]:
        """Run ``requests`` in one transaction.  Requests almost never fail, so
        they first run as they are; when one does, they all run again with
        ``isolate``: each in a savepoint of its own, so that the failing one
        leaves the others in the batch unharmed."""
        db = self._writer
        results: list[_Outcome] = []
        durable = any(request.durable for request in requests)
        try:
            if durable != self._synced:
                # Only what must survive a power cut pays for an fsync; a
                # later durable commit syncs the earlier frames of the WAL too.
                db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._synced = durable
            db.execute("BEGIN IMMEDIATE")
            for request in requests:
                if isolate:
                    db.execute("SAVEPOINT request")
                try:
                    value = request.operation(db)
                except Exception as e:
                    if not isolate:
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        return self._transaction(requests, isolate=True)
                    if not db.in_transaction:
                        return [], (request, False, e)
                    db.execute("ROLLBACK TO request")
                    db.execute("RELEASE request")
                    results.append((request, False, e))
                else:
                    if isolate:
                        db.execute("RELEASE request")
                    results.append((request, True, value))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [(request, False, e) for request in requests], None
        self.commit_count += 1
        return results, None

    # -- the reactor thread --------------------------------------------------

    def _deliver(self, outcomes: list[_Outcome]) -> None:
        for request, succeeded, value in outcomes:
            if succeeded:
                request.deferred.callback(value)
            else:
                request.deferred.errback(self._translate(value, request.doing))

    def _translate(self, error: BaseException, doing: str) -> BaseException:
        if not isinstance(error, sqlite3.Error):
            return error
        disk_full = _is_disk_full(error)
        log.warn(
            "Spool {path} could not {doing}: {error}",
            path=self.path,
            doing=doing,
            error=str(error),
            disk_full=disk_full,
        )
        return SpoolError(f"spool {self.path}: cannot {doing}: {error}", disk_full=disk_full)

    def _submit(
        self,
        doing: str,
        operation: Callable[[sqlite3.Connection], _T],
        *,
        durable: bool = True,
    ) -> Deferred[_T]:
        """Queue ``operation`` for the writer thread.  ``durable=False`` is for
        bookkeeping whose loss in a power cut (not a process crash: the WAL
        holds it) costs at most a repeated delivery: it is committed without
        an fsync of its own."""
        if self._closing:
            return fail(SpoolError(f"spool {self.path} is closed: cannot {doing}"))
        d: Deferred[_T] = Deferred()
        self._queue.put(_Request(doing, operation, d, durable))
        return d

    def _read(self, doing: str, query: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._close_waiters is None:
            raise SpoolError(f"spool {self.path} is closed: cannot {doing}")
        try:
            return self._reader.execute(query, params).fetchall()
        except sqlite3.Error as e:
            raise self._translate(e, doing) from e

    def _writer_stopped(self) -> None:
        self._thread.join()  # it has nothing left to do but return
        self._reader.close()
        waiters, self._close_waiters = self._close_waiters or [], None
        for waiter in waiters:
            waiter.callback(None)

    # -- ISpool --------------------------------------------------------------

    def enqueue(self, envelope: Envelope, message: bytes) -> Deferred[list[int]]:
        d = self.store(envelope, message)
        d.addCallback(lambda stored: list(stored.entry_ids))
        return d

    def store(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Sequence[Route] | None = None,
        claim: bool = False,
    ) -> Deferred[Stored]:
        """Store ``message`` with one entry per destination, routed by ``routes``
        (see :meth:`~mailrelay.interfaces.ISpool.store`), in one durable
        transaction."""
        return _deferred_call(self._store, envelope, message, routes, claim)

    def _store(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Sequence[Route] | None,
        claim: bool,
    ) -> Deferred[Stored]:
        envelope, data = _check_enqueue(envelope, message)
        checked = _check_routes(envelope, routes, claim)
        now = self._reactor.seconds()
        waiting = EntryState.INFLIGHT if claim else EntryState.QUEUED

        def store(db: sqlite3.Connection) -> Stored:
            key = db.execute(
                "INSERT INTO messages (sender, message_id, received_at, peer, data)"
                " VALUES (?, ?, ?, ?, ?)",
                (envelope.sender, envelope.message_id, envelope.received_at, envelope.peer, data),
            ).lastrowid
            ids = []
            claimed = []

            def entry(entry_id: int, destination: Destination, kind: EntryKind) -> SpoolEntry:
                return SpoolEntry(
                    entry_id=entry_id,
                    message_key=key,
                    sender=envelope.sender,
                    destination=destination,
                    state=EntryState.INFLIGHT,
                    received_at=envelope.received_at,
                    message_id=envelope.message_id,
                    kind=kind,
                )

            for destination, route in zip(envelope.destinations, checked, strict=True):
                state = waiting if route.state is EntryState.QUEUED else route.state
                entry_id = db.execute(
                    "INSERT INTO entries (message_key, list_address, subaddress, recipient,"
                    " state, last_error, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        destination.list_address,
                        destination.subaddress,
                        destination.address,
                        state.value,
                        route.error,
                        now,
                    ),
                ).lastrowid
                ids.append(entry_id)
                if claim and state is EntryState.INFLIGHT:
                    claimed.append(entry(entry_id, destination, EntryKind.INBOUND))
                if route.kind is None or not route.recipients:
                    continue
                subaddress = _expanded_subaddress(route.kind)
                first = _insert_copies(
                    db, key, destination.list_address, subaddress, route, waiting, now
                )
                if claim:
                    claimed.extend(
                        entry(
                            first + offset,
                            Destination(destination.list_address, subaddress, address),
                            route.kind,
                        )
                        for offset, address in enumerate(route.recipients)
                    )
            return Stored(tuple(ids), tuple(claimed))

        return self._submit("store a message", store)

    def get_message(self, message_key: int) -> bytes:
        """The stored bytes of a message; ``KeyError`` if it is not (or no longer) spooled."""
        rows = self._read(
            f"read message {message_key}",
            "SELECT data FROM messages WHERE key = ?",
            (message_key,),
        )
        if not rows:
            raise KeyError(f"no message {message_key} in spool {self.path}")
        return bytes(rows[0][0])

    def claim_due(self, now: float, limit: int) -> Deferred[list[SpoolEntry]]:
        return _deferred_call(self._claim_due, now, limit)

    def _claim_due(self, now: float, limit: int) -> Deferred[list[SpoolEntry]]:
        limit = _check_limit(limit, allow_none=False)
        updated_at = self._reactor.seconds()

        def claim(db: sqlite3.Connection) -> list[SpoolEntry]:
            # Two index-ordered queries instead of one with OR, which SQLite
            # could only answer by sorting every queued entry on each claim.
            rows = db.execute(_CLAIM_QUEUED, (limit,)).fetchall()
            rows += db.execute(_CLAIM_RETRY, (now, limit)).fetchall()
            rows = sorted(rows)[:limit]
            for ids in _chunks([row[0] for row in rows]):
                db.execute(
                    "UPDATE entries SET state = 'inflight', updated_at = ?"
                    f" WHERE id IN ({_placeholders(ids)})",
                    (updated_at, *ids),
                )
            return [_entry_from_row(row[:6] + ("inflight",) + row[7:]) for row in rows]

        return self._submit("claim due entries", claim, durable=False)

    def update(self, updates: Iterable[EntryUpdate]) -> Deferred[int]:
        """Apply ``updates`` in one transaction; fires with how many entries
        changed (ids of entries deleted meanwhile are skipped)."""
        return _deferred_call(self._update, updates)

    def _update(self, updates: Iterable[EntryUpdate]) -> Deferred[int]:
        checked = _check_updates(updates)
        now = self._reactor.seconds()
        # Entries that change the same way (typically a whole batch delivered)
        # share one statement: one UPDATE ... IN (...) costs half as much as
        # a row at a time, index upkeep included.
        groups: dict[tuple[str, float | None, str, int], list[int]] = {}
        for u in checked:
            key = (u.state.value, u.next_attempt_at, u.error, int(u.count_attempt))
            groups.setdefault(key, []).append(u.entry_id)
        plan = list(groups.items())
        if len({u.entry_id for u in checked}) != len(checked):
            # An entry updated twice: apply them in order, so the last one wins.
            plan = [
                ((u.state.value, u.next_attempt_at, u.error, int(u.count_attempt)), [u.entry_id])
                for u in checked
            ]

        def apply(db: sqlite3.Connection) -> int:
            changed = 0
            for (state, next_attempt_at, error, count), entry_ids in plan:
                for ids in _chunks(entry_ids):
                    changed += db.execute(
                        f"""UPDATE entries SET
                               state = ?,
                               next_attempt_at = ?,
                               last_error = coalesce(nullif(?, ''), last_error),
                               attempts = attempts + ?,
                               first_attempt_at = CASE WHEN ? THEN coalesce(first_attempt_at, ?)
                                                  ELSE first_attempt_at END,
                               updated_at = ?
                           WHERE id IN ({_placeholders(ids)})""",
                        (state, next_attempt_at, error, count, count, now, now, *ids),
                    ).rowcount
            return changed

        return self._submit("update entries", apply, durable=False)

    def expand(
        self, entry_id: int, recipients: Iterable[str], kind: EntryKind = EntryKind.MEMBER
    ) -> Deferred[list[int]]:
        """Replace INBOUND entry ``entry_id`` by one QUEUED ``kind`` entry per recipient.

        The new entries share the message and list address of the original and
        name the recipient as their address; the original becomes DONE, all in
        one transaction.  Fires with the new ids.  An entry that is already
        DONE, or was deleted, expands to nothing (``[]``); a MEMBER or OWNER
        entry fails with ``ValueError``.
        """
        return _deferred_call(self._expand, entry_id, recipients, kind)

    def _expand(
        self, entry_id: int, recipients: Iterable[str], kind: EntryKind
    ) -> Deferred[list[int]]:
        entry_id, addresses, kind = _check_expand(entry_id, recipients, kind)
        now = self._reactor.seconds()
        subaddress = _expanded_subaddress(kind)

        def expand(db: sqlite3.Connection) -> list[int]:
            row = db.execute(
                "SELECT message_key, list_address, state, kind FROM entries WHERE id = ?",
                (entry_id,),
            ).fetchone()
            if row is None or row[2] == EntryState.DONE.value:
                return []
            message_key, list_address, _state, original_kind = row
            if original_kind != EntryKind.INBOUND.value:
                raise _not_expandable(entry_id, EntryKind(original_kind))
            ids = []
            if addresses:
                route = Route(EntryState.DONE, kind, tuple(addresses))
                first = _insert_copies(
                    db, message_key, list_address, subaddress, route, EntryState.QUEUED, now
                )
                ids = list(range(first, first + len(addresses)))
            db.execute(
                "UPDATE entries SET state = 'done', next_attempt_at = NULL, updated_at = ?"
                " WHERE id = ?",
                (now, entry_id),
            )
            return ids

        return self._submit(f"expand entry {entry_id}", expand, durable=False)

    def purge(self, before: float) -> Deferred[int]:
        """Delete DONE entries last changed before ``before`` (and messages left
        without entries); fires with how many entries went."""
        return _deferred_call(self._purge, before)

    def _purge(self, before: float) -> Deferred[int]:
        before = _check_time(before)

        def remove(db: sqlite3.Connection) -> int:
            # The entries_drop_message trigger removes orphaned messages.
            return db.execute(
                "DELETE FROM entries WHERE state = 'done' AND updated_at < ?", (before,)
            ).rowcount

        return self._submit("purge delivered entries", remove)

    def set_status(self, key: str, text: str | None) -> Deferred[None]:
        """Publish ``text`` under ``key`` for other processes (``None`` removes it)."""
        return _deferred_call(self._set_status, key, text)

    def _set_status(self, key: str, text: str | None) -> Deferred[None]:
        key, text = _check_status(key, text)
        now = self._reactor.seconds()

        def store(db: sqlite3.Connection) -> None:
            if text is None:
                db.execute("DELETE FROM status WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO status (key, value, updated_at) VALUES (?, ?, ?)",
                    (key, text, now),
                )

        return self._submit(f"set status {key}", store)

    def get_status(self, key: str) -> str | None:
        """The text published under ``key``, or ``None`` (synchronous)."""
        key, _ = _check_status(key, None)
        rows = self._read(f"read status {key}", "SELECT value FROM status WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def recover(self) -> Deferred[int]:
        now = self._reactor.seconds()

        def requeue(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE entries SET state = 'queued', updated_at = ? WHERE state = 'inflight'",
                (now,),
            ).rowcount

        return self._submit("recover in-flight entries", requeue).addCallback(_log_recovered)

    def entries(
        self, state: EntryState | None = None, limit: int | None = None
    ) -> list[SpoolEntry]:
        state = _check_state(state)
        limit = _check_limit(limit, allow_none=True)
        query, params = _ENTRY_QUERY, []
        if state is not None:
            query += " WHERE e.state = ?"
            params.append(state.value)
        query += " ORDER BY e.id LIMIT ?"
        params.append(-1 if limit is None else limit)
        return [_entry_from_row(row) for row in self._read("list entries", query, params)]

    def counts(self) -> dict[EntryState, int]:
        rows = self._read("count entries", "SELECT state, count(*) FROM entries GROUP BY state")
        counts = dict.fromkeys(EntryState, 0)
        counts.update((EntryState(state), n) for state, n in rows)
        return counts

    def next_due(self) -> float | None:
        rows = self._read(
            "find the next retry",
            "SELECT min(next_attempt_at) FROM entries WHERE state = 'retry'",
        )
        return rows[0][0]

    def retry_now(self, entry_ids: Iterable[int] | None = None) -> Deferred[int]:
        """Make RETRY and FAILED entries QUEUED again; fires with how many changed.

        RETRY entries keep their attempt history (and so their retry period);
        FAILED (dead-lettered) entries start afresh: attempts and the time of
        the first attempt are cleared, so they get a whole retry period again.
        """
        return _deferred_call(self._retry_now, entry_ids)

    def _retry_now(self, entry_ids: Iterable[int] | None) -> Deferred[int]:
        ids = None if entry_ids is None else _check_ids(entry_ids)
        now = self._reactor.seconds()
        # A dead-lettered entry that an operator retries gets a fresh retry
        # period: its attempt history starts again.
        sql = (
            "UPDATE entries SET next_attempt_at = NULL, updated_at = ?,"
            " attempts = CASE state WHEN 'failed' THEN 0 ELSE attempts END,"
            " first_attempt_at = CASE state WHEN 'failed' THEN NULL ELSE first_attempt_at END,"
            " state = 'queued'"
            " WHERE state IN ('retry', 'failed')"
        )

        def requeue(db: sqlite3.Connection) -> int:
            if ids is None:
                return db.execute(sql, (now,)).rowcount
            return sum(db.execute(sql + " AND id = ?", (now, i)).rowcount for i in ids)

        return self._submit("requeue entries", requeue)

    def delete(self, entry_ids: Iterable[int]) -> Deferred[int]:
        return _deferred_call(self._delete, entry_ids)

    def _delete(self, entry_ids: Iterable[int]) -> Deferred[int]:
        ids = _check_ids(entry_ids)

        def remove(db: sqlite3.Connection) -> int:
            # The entries_drop_message trigger removes orphaned messages.
            return db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids]).rowcount

        return self._submit("delete entries", remove)

    def close(self) -> Deferred[None]:
        """Commit the writes already requested, stop the writer thread and
        close the database; refuses new writes at once."""
        if self._close_waiters is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        if not self._closing:
            self._closing = True
            self._queue.put(_STOP)
        return d


def _log_recovered(count: int) -> int:
    if count:
        log.info("Returned {count} in-flight entries to the queue", count=count)
    return count


# -- in memory ---------------------------------------------------------------


@dataclass
class _MemoryEntry:
    entry_id: int
    message_key: int
    destination: Destination
    state: EntryState
    attempts: int = 0
    first_attempt_at: float | None = None
    next_attempt_at: float | None = None
    last_error: str = ""
    updated_at: float = 0.0
    kind: EntryKind = EntryKind.INBOUND


@implementer(ISpool)
class MemorySpool:
    """An :class:`ISpool` in memory, for tests and embedders.

    Deferreds fire before the method returns; ``clock`` (an ``IReactorTime``)
    stamps attempts.  Nothing survives the process.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._messages: dict[int, tuple[Envelope, bytes]] = {}
        self._entries: dict[int, _MemoryEntry] = {}
        self._next_key = 1
        self._next_id = 1
        self._closed = False
        self._status: dict[str, str] = {}

    def _entry(self, row: _MemoryEntry) -> SpoolEntry:
        envelope = self._messages[row.message_key][0]
        return SpoolEntry(
            entry_id=row.entry_id,
            message_key=row.message_key,
            sender=envelope.sender,
            destination=row.destination,
            state=row.state,
            received_at=envelope.received_at,
            attempts=row.attempts,
            first_attempt_at=row.first_attempt_at,
            next_attempt_at=row.next_attempt_at,
            last_error=row.last_error,
            message_id=envelope.message_id,
            kind=row.kind,
        )

    def _check_open(self, doing: str) -> None:
        if self._closed:
            raise SpoolError(f"memory spool is closed: cannot {doing}")

    def _write(self, doing: str, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        try:
            self._check_open(doing)
            return succeed(f(*args))
        except (TypeError, ValueError, SpoolError) as e:
            return fail(e)

    def enqueue(self, envelope: Envelope, message: bytes) -> Deferred[list[int]]:
        return self._write(
            "store a message", lambda: list(self._store(envelope, message, None, False).entry_ids)
        )

    def store(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Sequence[Route] | None = None,
        claim: bool = False,
    ) -> Deferred[Stored]:
        """Store ``message`` with one entry per destination, routed by ``routes``
        (see :meth:`~mailrelay.interfaces.ISpool.store`)."""
        return self._write("store a message", self._store, envelope, message, routes, claim)

    def _store(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Sequence[Route] | None,
        claim: bool,
    ) -> Stored:
        envelope, data = _check_enqueue(envelope, message)
        checked = _check_routes(envelope, routes, claim)
        now = self._clock.seconds()
        waiting = EntryState.INFLIGHT if claim else EntryState.QUEUED
        key, self._next_key = self._next_key, self._next_key + 1
        self._messages[key] = (envelope, data)
        ids = []
        claimed = []

        def add(destination: Destination, state: EntryState, kind: EntryKind, error="") -> int:
            entry_id, self._next_id = self._next_id, self._next_id + 1
            row = _MemoryEntry(
                entry_id, key, destination, state, last_error=error, updated_at=now, kind=kind
            )
            self._entries[entry_id] = row
            if claim and state is EntryState.INFLIGHT:
                claimed.append(self._entry(row))
            return entry_id

        for destination, route in zip(envelope.destinations, checked, strict=True):
            state = waiting if route.state is EntryState.QUEUED else route.state
            ids.append(add(destination, state, EntryKind.INBOUND, route.error))
            if route.kind is not None:
                subaddress = _expanded_subaddress(route.kind)
                for address in route.recipients:
                    add(
                        Destination(destination.list_address, subaddress, address),
                        waiting,
                        route.kind,
                    )
        return Stored(tuple(ids), tuple(claimed))

    def get_message(self, message_key: int) -> bytes:
        """The stored bytes of a message; ``KeyError`` if it is not (or no longer) spooled."""
        self._check_open(f"read message {message_key}")
        try:
            return self._messages[message_key][1]
        except KeyError:
            raise KeyError(f"no message {message_key} in the memory spool") from None

    def claim_due(self, now: float, limit: int) -> Deferred[list[SpoolEntry]]:
        return self._write("claim due entries", self._claim_due, now, limit)

    def _claim_due(self, now: float, limit: int) -> list[SpoolEntry]:
        limit = _check_limit(limit, allow_none=False)
        due = [
            row
            for row in self._entries.values()
            if row.state is EntryState.QUEUED
            or (
                row.state is EntryState.RETRY
                and row.next_attempt_at is not None
                and row.next_attempt_at <= now
            )
        ][:limit]
        for row in due:
            row.state = EntryState.INFLIGHT
            row.updated_at = self._clock.seconds()
        return [self._entry(row) for row in due]

    def update(self, updates: Iterable[EntryUpdate]) -> Deferred[int]:
        """Apply ``updates``; fires with how many entries changed (unknown ids are skipped)."""
        return self._write("update entries", self._update, updates)

    def _update(self, updates: Iterable[EntryUpdate]) -> int:
        now = self._clock.seconds()
        changed = 0
        for update in _check_updates(updates):
            row = self._entries.get(update.entry_id)
            if row is None:
                continue
            row.state = update.state
            row.next_attempt_at = update.next_attempt_at
            row.last_error = update.error or row.last_error
            if update.count_attempt:
                row.attempts += 1
                if row.first_attempt_at is None:
                    row.first_attempt_at = now
            row.updated_at = now
            changed += 1
        return changed

    def expand(
        self, entry_id: int, recipients: Iterable[str], kind: EntryKind = EntryKind.MEMBER
    ) -> Deferred[list[int]]:
        """Replace INBOUND entry ``entry_id`` by one QUEUED ``kind`` entry per
        recipient and make it DONE (see :meth:`SQLiteSpool.expand`)."""
        return self._write(f"expand entry {entry_id}", self._expand, entry_id, recipients, kind)

    def _expand(self, entry_id: int, recipients: Iterable[str], kind: EntryKind) -> list[int]:
        entry_id, addresses, kind = _check_expand(entry_id, recipients, kind)
        original = self._entries.get(entry_id)
        if original is None or original.state is EntryState.DONE:
            return []
        if original.kind is not EntryKind.INBOUND:
            raise _not_expandable(entry_id, original.kind)
        now = self._clock.seconds()
        subaddress = _expanded_subaddress(kind)
        list_address = original.destination.list_address
        ids = []
        for address in addresses:
            new_id, self._next_id = self._next_id, self._next_id + 1
            self._entries[new_id] = _MemoryEntry(
                new_id,
                original.message_key,
                Destination(list_address, subaddress, address),
                EntryState.QUEUED,
                updated_at=now,
                kind=kind,
            )
            ids.append(new_id)
        original.state = EntryState.DONE
        original.next_attempt_at = None
        original.updated_at = now
        return ids

    def purge(self, before: float) -> Deferred[int]:
        """Delete DONE entries last changed before ``before``; fires with the count."""
        return self._write("purge delivered entries", self._purge, before)

    def _purge(self, before: float) -> int:
        before = _check_time(before)
        old = [
            row.entry_id
            for row in self._entries.values()
            if row.state is EntryState.DONE and row.updated_at < before
        ]
        for entry_id in old:
            del self._entries[entry_id]
        # One pass for the messages, rather than one per deleted entry.
        kept = {row.message_key for row in self._entries.values()}
        for key in [key for key in self._messages if key not in kept]:
            del self._messages[key]
        return len(old)

    def set_status(self, key: str, text: str | None) -> Deferred[None]:
        """Publish ``text`` under ``key`` (``None`` removes it)."""
        return self._write(f"set status {key}", self._set_status, key, text)

    def _set_status(self, key: str, text: str | None) -> None:
        key, text = _check_status(key, text)
        if text is None:
            self._status.pop(key, None)
        else:
            self._status[key] = text

    def get_status(self, key: str) -> str | None:
        """The text published under ``key``, or ``None``."""
        self._check_open(f"read status {key}")
        return self._status.get(_check_status(key, None)[0])

    def recover(self) -> Deferred[int]:
        return self._write("recover in-flight entries", self._recover).addCallback(_log_recovered)

    def _recover(self) -> int:
        return self._move({EntryState.INFLIGHT}, None, keep_retry_time=True)

    def _move(
        self, states: set[EntryState], ids: list[int] | None, keep_retry_time: bool = False
    ) -> int:
        rows = (
            self._entries.values()
            if ids is None
            else [self._entries[i] for i in ids if i in self._entries]
        )
        moved = 0
        for row in rows:
            if row.state in states:
                if row.state is EntryState.FAILED:  # a fresh retry period, as in SQLiteSpool
                    row.attempts = 0
                    row.first_attempt_at = None
                row.state = EntryState.QUEUED
                if not keep_retry_time:
                    row.next_attempt_at = None
                row.updated_at = self._clock.seconds()
                moved += 1
        return moved

    def entries(
        self, state: EntryState | None = None, limit: int | None = None
    ) -> list[SpoolEntry]:
        self._check_open("list entries")
        state = _check_state(state)
        limit = _check_limit(limit, allow_none=True)
        rows = [row for row in self._entries.values() if state is None or row.state is state]
        return [self._entry(row) for row in rows[:limit]]

    def counts(self) -> dict[EntryState, int]:
        self._check_open("count entries")
        counts = dict.fromkeys(EntryState, 0)
        for row in self._entries.values():
            counts[row.state] += 1
        return counts

    def next_due(self) -> float | None:
        self._check_open("find the next retry")
        times = [
            row.next_attempt_at
            for row in self._entries.values()
            if row.state is EntryState.RETRY and row.next_attempt_at is not None
        ]
        return min(times, default=None)

    def retry_now(self, entry_ids: Iterable[int] | None = None) -> Deferred[int]:
        """Make RETRY and FAILED entries QUEUED again; fires with how many changed.

        RETRY entries keep their attempt history (and so their retry period);
        FAILED (dead-lettered) entries start afresh: attempts and the time of
        the first attempt are cleared, so they get a whole retry period again.
        """
        return self._write("requeue entries", self._retry_now, entry_ids)

    def _retry_now(self, entry_ids: Iterable[int] | None) -> int:
        ids = None if entry_ids is None else _check_ids(entry_ids)
        return self._move({EntryState.RETRY, EntryState.FAILED}, ids)

    def delete(self, entry_ids: Iterable[int]) -> Deferred[int]:
        return self._write("delete entries", self._delete, entry_ids)

    def _delete(self, entry_ids: Iterable[int]) -> int:
        deleted = 0
        for entry_id in _check_ids(entry_ids):
            row = self._entries.pop(entry_id, None)
            if row is None:
                continue
            deleted += 1
            if not any(r.message_key == row.message_key for r in self._entries.values()):
                del self._messages[row.message_key]
        return deleted

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)
