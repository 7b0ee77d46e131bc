"""The SQLite spool: the operations of :class:`~mailrelay.interfaces.ISpool`
on an SQLite file, as SQL.

Place in the flow: LMTP → routing → **spool** → scheduler → sending → mta.
Writes go to the group-commit writer thread (:mod:`mailrelay.spool.writer`) as
functions of its connection: only storing a message (what LMTP acknowledges)
and operator changes are fsynced; the runner's bookkeeping (claims, results,
fan-out) commits without a sync of its own: a process crash loses none of it
(it is in the WAL), and a power cut can only make some deliveries happen
twice.  Reads are quick indexed queries on a second connection in the reactor
thread, which WAL mode lets run alongside the writer.  The file's layout and
migrations are in :mod:`mailrelay.spool.schema`.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mailrelay.errors import SpoolError
from mailrelay.interfaces import ISpool
from mailrelay.model import (
    Destination,
    EntryKind,
    EntryState,
    EntryUpdate,
    Envelope,
    Outgoing,
    PostSummary,
    Refusal,
    Route,
    SpoolEntry,
    Stored,
)
from mailrelay.spool import common
from mailrelay.spool.schema import (
    CLAIM_QUEUED,
    CLAIM_RETRY,
    ENTRY_QUERY,
    entry_from_row,
    open_database,
    open_reader,
)
from mailrelay.spool.schema import (
    STATES as _STATES,
)
from mailrelay.spool.writer import GroupCommitWriter, spool_error

_T = TypeVar("_T")


def _chunks(ids: list[int], size: int = 500) -> Iterator[list[int]]:
    """``ids`` in slices small enough for one statement's parameters (SQLite
    builds before 3.32 allow 999)."""
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _placeholders(ids: list[int]) -> str:
    return ",".join("?" * len(ids))


_UpdatePlan = list[tuple[tuple[str, float | None, str, int], list[int]]]


def _update_plan(checked: list[EntryUpdate]) -> _UpdatePlan:
    """The statements of a batch of updates: entries that change the same way
    (typically a whole batch delivered) share one ``UPDATE ... IN (...)``,
    which costs half as much as a row at a time, index upkeep included."""
    groups: dict[tuple[str, float | None, str, int], list[int]] = {}
    for u in checked:
        key = (u.state.value, u.next_attempt_at, u.error, int(u.count_attempt))
        groups.setdefault(key, []).append(u.entry_id)
    if len({u.entry_id for u in checked}) != len(checked):
        # An entry updated twice: apply them in order, so the last one wins.
        return [
            ((u.state.value, u.next_attempt_at, u.error, int(u.count_attempt)), [u.entry_id])
            for u in checked
        ]
    return list(groups.items())


def _apply_updates(db: sqlite3.Connection, plan: _UpdatePlan, now: float) -> int:
    """Run an update plan; how many entries changed."""
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


@implementer(ISpool)
class SQLiteSpool:
    """An :class:`ISpool` in an SQLite file (WAL, ``synchronous=FULL`` for what
    must survive a power cut, ``NORMAL`` for delivery bookkeeping).

    ``reactor`` must provide ``IReactorThreads`` and ``IReactorTime``: results
    come back through ``callFromThread``.  ``max_bytes`` caps the database size;
    a write beyond it fails like a full disk.  ``commit_count`` counts the
    transactions committed so far.  Call :meth:`close` to stop the writer thread.

    The file is opened and the writer thread started at once, or with
    ``open_now=False`` only by :meth:`open`: a daemon opens its spool after
    twistd has forked into the background, since neither the thread nor the
    SQLite connections survive a fork.  Until then every operation fails with
    a :class:`SpoolError` saying the spool is not open.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reactor: Any,
        *,
        max_bytes: int | None = None,
        max_batch: int = 1000,
        open_now: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self._reactor = reactor
        self._max_bytes = max_bytes
        self._max_batch = max_batch
        self._reader: sqlite3.Connection | None = None
        self._writer: GroupCommitWriter | None = None
        self._commits_before = 0
        self._closing = False
        if open_now:
            self.open()

    @staticmethod
    def check(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> None:
        """Open the spool at ``path`` as :meth:`open` would (creating and
        migrating it), then close it again, starting no thread: raises the
        :class:`SpoolError` that opening it would."""
        path = os.fspath(path)
        db = open_database(path, max_bytes)
        try:
            open_reader(path).close()
        except sqlite3.Error as e:
            raise SpoolError(f"cannot open spool {path}: {e}") from e
        finally:
            db.close()

    @property
    def is_open(self) -> bool:
        """Whether the spool is open: after :meth:`open`, until :meth:`close` begins."""
        return self._writer is not None and not self._closing

    def open(self) -> None:
        """Open (creating and migrating) the file and start the writer thread;
        does nothing if the spool is open.  Raises :class:`SpoolError` naming
        the file.  A closed spool may be opened again."""
        if self._closing:
            raise SpoolError(f"spool {self.path} is still closing: cannot open it")
        if self._writer is not None:
            return
        db = open_database(self.path, self._max_bytes)
        try:
            self._reader = open_reader(self.path)
        except sqlite3.Error as e:
            db.close()
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        self._writer = GroupCommitWriter(db, self._reactor, self.path, self._max_batch)

    def _submit(
        self, doing: str, operation: Callable[[sqlite3.Connection], _T], *, durable: bool = True
    ) -> Deferred[_T]:
        # Every write goes to the writer thread as a function of its connection.
        if self._writer is None:
            return fail(SpoolError(f"spool {self.path} is not open: cannot {doing}"))
        # The writer refuses on its own once it is stopping.
        return self._writer.submit(doing, operation, durable=durable)

    @property
    def commit_count(self) -> int:
        """How many transactions the writer thread has committed so far."""
        current = self._writer.commit_count if self._writer is not None else 0
        return self._commits_before + current

    def _read(self, doing: str, query: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader is None:
            raise SpoolError(f"spool {self.path} is not open: cannot {doing}")
        try:
            return self._reader.execute(query, params).fetchall()
        except sqlite3.Error as e:
            raise spool_error(self.path, e, doing) from e

    # -- ISpool --------------------------------------------------------------

    def enqueue(self, envelope: Envelope, message: bytes) -> Deferred[list[int]]:
        d = self.store(envelope, message)
        d.addCallback(lambda stored: list(stored.entry_ids))
        return d

    @common.deferred_errors
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
        envelope, data = common.check_enqueue(envelope, message)
        checked = common.check_routes(envelope, routes, claim)
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
                return common.new_entry(
                    envelope, key, entry_id, destination, EntryState.INFLIGHT, kind
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
                subaddress = common.expanded_subaddress(route.kind)
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

    @common.deferred_errors
    def store_outgoing(
        self,
        messages: Iterable[Outgoing],
        finish: Iterable[EntryUpdate] = (),
        refusals: Iterable[Refusal] = (),
    ) -> Deferred[list[int]]:
        """Store messages mailrelay wrote, one QUEUED NOTICE entry per recipient,
        record ``refusals`` (each message's first, with its notices), and apply
        ``finish``, in one durable transaction (see
        :meth:`~mailrelay.interfaces.ISpool.store_outgoing`)."""
        checked, updates = common.check_outgoing(messages, finish)
        refused = common.check_refusals(refusals)
        now = self._reactor.seconds()

        def outgoing(messages: Iterable[Outgoing]) -> list[tuple[Envelope, bytes]]:
            return [(common.outgoing_envelope(m, now), bytes(m.message)) for m in messages]

        envelopes = outgoing(checked)
        notices = [(r.message_key, r.reason, outgoing(r.notices)) for r in refused]

        def insert(db: sqlite3.Connection, envelopes: list[tuple[Envelope, bytes]]) -> list[int]:
            ids = []
            for envelope, data in envelopes:
                key = db.execute(
                    "INSERT INTO messages (sender, message_id, received_at, peer, data)"
                    " VALUES (?, ?, ?, '', ?)",
                    (envelope.sender, envelope.message_id, envelope.received_at, data),
                ).lastrowid
                for destination in envelope.destinations:
                    ids.append(
                        db.execute(
                            "INSERT INTO entries (message_key, list_address, subaddress,"
                            " recipient, state, kind, updated_at)"
                            " VALUES (?, ?, NULL, ?, 'queued', 'notice', ?)",
                            (key, destination.list_address, destination.address, now),
                        ).lastrowid
                    )
            return ids

        def store(db: sqlite3.Connection) -> list[int]:
            ids = insert(db, envelopes)
            for message_key, reason, refusal_notices in notices:
                # Only the first refusal of a message is recorded and told.
                first = db.execute(
                    "UPDATE messages SET refusal = ? WHERE key = ? AND refusal IS NULL",
                    (reason, message_key),
                ).rowcount
                if first:
                    ids += insert(db, refusal_notices)
            if updates:
                _apply_updates(db, _update_plan(updates), now)
            return ids

        return self._submit("store outgoing messages", store)

    @common.deferred_errors
    def release_held(
        self,
        subaddresses: Iterable[str | None] | None = None,
        entry_ids: Iterable[int] | None = None,
    ) -> Deferred[int]:
        """Make HELD INBOUND entries QUEUED (those to ``subaddresses`` and of
        ``entry_ids``, each ``None`` for any); fires with how many changed."""
        names, ids = common.check_release(subaddresses, entry_ids)
        now = self._reactor.seconds()

        def release(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT id, subaddress FROM entries WHERE state = 'held' AND kind = 'inbound'"
            ).fetchall()
            chosen = [
                entry_id
                for entry_id, subaddress in rows
                if (names is None or subaddress in names) and (ids is None or entry_id in ids)
            ]
            for chunk in _chunks(chosen):
                db.execute(
                    "UPDATE entries SET state = 'queued', next_attempt_at = NULL, updated_at = ?"
                    f" WHERE id IN ({_placeholders(chunk)})",
                    (now, *chunk),
                )
            return len(chosen)

        return self._submit("release held entries", release)

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

    @common.deferred_errors
    def claim_due(self, now: float, limit: int) -> Deferred[list[SpoolEntry]]:
        limit = common.check_limit(limit, allow_none=False)
        updated_at = self._reactor.seconds()

        def claim(db: sqlite3.Connection) -> list[SpoolEntry]:
            # Two index-ordered queries instead of one with OR, which SQLite
            # could only answer by sorting every queued entry on each claim.
            rows = db.execute(CLAIM_QUEUED, (limit,)).fetchall()
            rows += db.execute(CLAIM_RETRY, (now, limit)).fetchall()
            rows = sorted(rows)[:limit]
            for ids in _chunks([row[0] for row in rows]):
                db.execute(
                    "UPDATE entries SET state = 'inflight', updated_at = ?"
                    f" WHERE id IN ({_placeholders(ids)})",
                    (updated_at, *ids),
                )
            return [entry_from_row(row[:6] + ("inflight",) + row[7:]) for row in rows]

        return self._submit("claim due entries", claim, durable=False)

    @common.deferred_errors
    def update(self, updates: Iterable[EntryUpdate]) -> Deferred[int]:
        """Apply ``updates`` in one transaction; fires with how many entries
        changed (ids of entries deleted meanwhile are skipped)."""
        checked = common.check_updates(updates)
        now = self._reactor.seconds()
        plan = _update_plan(checked)

        def apply(db: sqlite3.Connection) -> int:
            return _apply_updates(db, plan, now)

        return self._submit("update entries", apply, durable=False)

    @common.deferred_errors
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
        entry_id, addresses, kind = common.check_expand(entry_id, recipients, kind)
        now = self._reactor.seconds()
        subaddress = common.expanded_subaddress(kind)

        def expand(db: sqlite3.Connection) -> list[int]:
            row = db.execute(
                "SELECT message_key, list_address, state, kind FROM entries WHERE id = ?",
                (entry_id,),
            ).fetchone()
            if row is None or row[2] == EntryState.DONE.value:
                return []
            message_key, list_address, _state, original_kind = row
            if original_kind != EntryKind.INBOUND.value:
                raise common.not_expandable(entry_id, EntryKind(original_kind))
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

    @common.deferred_errors
    def purge(self, before: float) -> Deferred[int]:
        """Delete DONE entries last changed before ``before`` (and messages left
        without entries); fires with how many entries went."""
        before = common.check_time(before)

        def remove(db: sqlite3.Connection) -> int:
            # The entries_drop_message trigger removes orphaned messages.
            return db.execute(
                "DELETE FROM entries WHERE state = 'done' AND updated_at < ?", (before,)
            ).rowcount

        return self._submit("purge delivered entries", remove)

    @common.deferred_errors
    def set_status(self, key: str, text: str | None) -> Deferred[None]:
        """Publish ``text`` under ``key`` for other processes (``None`` removes it)."""
        key, text = common.check_status(key, text)
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
        key, _ = common.check_status(key, None)
        rows = self._read(f"read status {key}", "SELECT value FROM status WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    @common.deferred_errors
    def recover(
        self, claimed_before: float | None = None, keep: Iterable[int] = ()
    ) -> Deferred[int]:
        claimed_before, kept = common.check_recover(claimed_before, keep)
        now = self._reactor.seconds()

        def requeue(db: sqlite3.Connection) -> int:
            if claimed_before is None:
                return db.execute(
                    "UPDATE entries SET state = 'queued', updated_at = ? WHERE state = 'inflight'",
                    (now,),
                ).rowcount
            # A claim's time is its updated_at; the state index finds the few
            # in-flight entries.
            rows = db.execute(
                "SELECT id FROM entries WHERE state = 'inflight' AND updated_at < ?",
                (claimed_before,),
            ).fetchall()
            stale = [entry_id for (entry_id,) in rows if entry_id not in kept]
            return sum(
                db.execute(
                    "UPDATE entries SET state = 'queued', updated_at = ?"
                    f" WHERE id IN ({_placeholders(ids)})",
                    (now, *ids),
                ).rowcount
                for ids in _chunks(stale)
            )

        d = self._submit("recover in-flight entries", requeue)
        return d.addCallback(common.log_recovered) if claimed_before is None else d

    def entries(
        self, state: EntryState | None = None, limit: int | None = None
    ) -> list[SpoolEntry]:
        state = common.check_state(state)
        limit = common.check_limit(limit, allow_none=True)
        query, params = ENTRY_QUERY, []
        if state is not None:
            query += " WHERE e.state = ?"
            params.append(state.value)
        query += " ORDER BY e.id LIMIT ?"
        params.append(-1 if limit is None else limit)
        return [entry_from_row(row) for row in self._read("list entries", query, params)]

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

    @common.deferred_errors
    def retry_now(self, entry_ids: Iterable[int] | None = None) -> Deferred[int]:
        """Make RETRY and FAILED entries QUEUED again; fires with how many changed.

        RETRY entries keep their attempt history (and so their retry period);
        FAILED (dead-lettered) entries start afresh: attempts and the time of
        the first attempt are cleared, so they get a whole retry period again.
        """
        ids = None if entry_ids is None else common.check_ids(entry_ids)
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

    @common.deferred_errors
    def delete(self, entry_ids: Iterable[int]) -> Deferred[int]:
        ids = common.check_ids(entry_ids)

        def remove(db: sqlite3.Connection) -> int:
            # The entries_drop_message trigger removes orphaned messages.
            return db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in ids]).rowcount

        return self._submit("delete entries", remove)

    # -- operator views: one post and its copies --------------------------------

    def get_entry(self, entry_id: int) -> SpoolEntry | None:
        """The entry ``entry_id`` in any state, or ``None``."""
        (checked,) = common.check_ids([entry_id])
        rows = self._read(f"read entry {checked}", ENTRY_QUERY + " WHERE e.id = ?", (checked,))
        return entry_from_row(rows[0]) if rows else None

    def message_entries(self, message_key: int) -> list[SpoolEntry]:
        """Every entry of message ``message_key``, by id (``[]`` if it is gone)."""
        key = common.check_key(message_key)
        rows = self._read(
            f"read the entries of message {key}",
            ENTRY_QUERY + " WHERE e.message_key = ? ORDER BY e.id",
            (key,),
        )
        return [entry_from_row(row) for row in rows]

    def copy_counts(self, message_key: int) -> dict[EntryState, int]:
        """The MEMBER and OWNER copies of ``message_key`` by state."""
        key = common.check_key(message_key)
        rows = self._read(
            f"count the copies of message {key}",
            "SELECT state, count(*) FROM entries WHERE message_key = ? AND kind != 'inbound'"
            " GROUP BY state",
            (key,),
        )
        counts = dict.fromkeys(EntryState, 0)
        counts.update((_STATES[state], n) for state, n in rows)
        return counts

    def delivery_progress(self, message_key: int, delivered: int) -> tuple[bool, bool]:
        """Whether the ``delivered`` copies of ``message_key`` just recorded DONE
        were its first (no other copy DONE) and its last (no copy waiting).

        One statement of two short index walks on the reactor thread, where
        :meth:`copy_counts` reads every copy: this runs after each delivery
        batch when metrics are on.  ``+state`` keeps SQLite on
        the message's index (the state indexes would walk the whole spool).
        """
        key = common.check_key(message_key)
        # One statement (each costs a round through sqlite3): DONE copies,
        # counted no further than needed, and whether any copy waits, looked
        # for from the newest down (a large post is expanded in batches, so
        # its waiting copies are mostly the latest made).
        ((done, waiting),) = self._read(
            f"read the delivery progress of message {key}",
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM entries WHERE message_key = ?1"
            " AND kind != 'inbound' AND +state = 'done' LIMIT ?2)),"
            # Not EXISTS: SQLite drops an ORDER BY inside EXISTS, and would walk
            # the delivered copies first.
            " (SELECT 1 FROM entries WHERE message_key = ?1 AND kind != 'inbound'"
            " AND +state IN ('queued', 'inflight', 'retry') ORDER BY id DESC LIMIT 1)"
            " IS NOT NULL",
            (key, max(0, delivered) + 1),
        )
        return done <= delivered, not waiting

    def oldest_entry(self, state: EntryState) -> SpoolEntry | None:
        """The entry in ``state`` with the lowest id (received first), or ``None``."""
        checked = common.check_state(state)
        if checked is None:
            raise ValueError("oldest_entry needs a state")
        rows = self._read(
            "find the oldest entry",
            ENTRY_QUERY + " WHERE e.state = ? ORDER BY e.id LIMIT 1",
            (checked.value,),
        )
        return entry_from_row(rows[0]) if rows else None

    def posts(
        self,
        limit: int | None = None,
        message_id: str | None = None,
        include_done: bool = False,
    ) -> list[PostSummary]:
        """Stored messages with their copies counted by state, oldest first (see
        :meth:`~mailrelay.interfaces.ISpool.posts`)."""
        limit = common.check_limit(limit, allow_none=True)
        message_id = common.check_message_id(message_id)
        where, params = [], []
        if message_id is not None:
            where.append("m.message_id = ?")
            params.append(message_id)
        if not include_done:
            where.append(
                "EXISTS (SELECT 1 FROM entries AS w WHERE w.message_key = m.key"
                " AND w.state != 'done')"
            )
        query = "SELECT m.key, m.message_id, m.sender, m.received_at, m.refusal FROM messages AS m"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY m.key LIMIT ?"
        params.append(-1 if limit is None else limit)
        messages = self._read("list posts", query, params)
        posts = []
        for key, mid, sender, received_at, refusal in messages:
            rows = self._read(
                f"count the entries of message {key}",
                "SELECT list_address, kind, state, count(*) FROM entries WHERE message_key = ?"
                " GROUP BY list_address, kind, state",
                (key,),
            )
            posts.append(common.post_summary(key, mid, sender, received_at, rows, refusal))
        return posts

    @common.deferred_errors
    def cancel_messages(self, message_keys: Iterable[int]) -> Deferred[dict[EntryState, int]]:
        """Delete every entry of these messages that is not DONE, in one durable
        transaction; fires with how many went, by state."""
        keys = common.check_ids(message_keys)

        def cancel(db: sqlite3.Connection) -> dict[EntryState, int]:
            deleted = dict.fromkeys(EntryState, 0)
            for chunk in _chunks(keys):
                where = f"message_key IN ({_placeholders(chunk)}) AND state != 'done'"
                for state, n in db.execute(
                    f"SELECT state, count(*) FROM entries WHERE {where} GROUP BY state", chunk
                ).fetchall():
                    deleted[_STATES[state]] += n
                # The entries_drop_message trigger removes messages left without entries.
                db.execute(f"DELETE FROM entries WHERE {where}", chunk)
            return deleted

        return self._submit("cancel messages", cancel)

    def delivered_since(self, when: float) -> int:
        """MEMBER and OWNER copies delivered (DONE) at or after ``when``."""
        when = common.check_time(when)
        rows = self._read(
            "count recent deliveries",
            "SELECT count(*) FROM entries WHERE state = 'done' AND kind != 'inbound'"
            " AND updated_at >= ?",
            (when,),
        )
        return rows[0][0]

    def posts_since(self, when: float) -> dict[str, int]:
        """Posts received at or after ``when``, by list."""
        when = common.check_time(when)
        rows = self._read(
            "count recent posts",
            "SELECT e.list_address, count(*) FROM messages AS m"
            " JOIN entries AS e ON e.message_key = m.key"
            " WHERE m.received_at >= ? AND e.kind = 'inbound' AND e.subaddress IS NULL"
            " GROUP BY e.list_address",
            (when,),
        )
        return dict(rows)

    def close(self) -> Deferred[None]:
        """Commit the writes already requested, stop the writer thread and
        close the database; refuses new writes at once, reads once the thread
        is gone.  Closing a spool that is not open does nothing."""
        writer = self._writer
        if writer is None:
            return succeed(None)
        first = not self._closing
        self._closing = True
        stopped = writer.stop()
        if first:
            stopped.addCallback(self._stopped, writer)
        return stopped

    def _stopped(self, _: None, writer: GroupCommitWriter) -> None:
        self._commits_before += writer.commit_count
        reader, self._reader, self._writer = self._reader, None, None
        self._closing = False
        if reader is not None:
            reader.close()
