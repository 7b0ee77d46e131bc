"""The SQLite spool's writer thread: group commit of every write to the file.

Place in the flow: LMTP → routing → **spool** → scheduler → sending → mta.
:class:`~mailrelay.spool.SQLiteSpool` hands each write to
:meth:`GroupCommitWriter.submit` as a function of the connection; one thread
takes every request waiting in its queue, runs them in one transaction and
commits once, so concurrent callers share one fsync.  Only what must survive a
power cut (``durable``) pays for ``synchronous=FULL``; the results come back to
the reactor thread through ``callFromThread``.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from mailrelay.errors import SpoolError

_log = Logger()
_T = TypeVar("_T")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, sqlite3.Error) and (
        getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or "database or disk is full" in str(error)
    )


def spool_error(path: str, error: BaseException, doing: str) -> BaseException:
    """``error`` as the caller should see it: an SQLite error becomes a logged
    :class:`SpoolError` that says what could not be done (and whether the disk
    is full); anything else (a bad argument, a bug) passes unchanged."""
    if not isinstance(error, sqlite3.Error):
        return error
    disk_full = is_disk_full(error)
    _log.warn(
        "Spool {path} could not {doing}: {error}",
        path=path,
        doing=doing,
        error=str(error),
        disk_full=disk_full,
    )
    return SpoolError(f"spool {path}: cannot {doing}: {error}", disk_full=disk_full)


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


class GroupCommitWriter:
    """Runs write requests against ``db`` (opened ``synchronous=FULL``) in a
    thread of its own, batching up to ``max_batch`` of them per transaction.

    ``reactor`` must provide ``IReactorThreads``.  ``commit_count`` counts the
    transactions committed so far.  :meth:`stop` ends the thread.
    """

    def __init__(self, db: sqlite3.Connection, reactor: Any, path: str, max_batch: int) -> None:
        self.commit_count = 0
        self._db = db
        self._reactor = reactor
        self._path = path
        self._max_batch = max_batch
        self._synced = True  # the connection's synchronous setting is FULL
        self._stopping = False
        self._stopped_already = False
        self._stop_waiters: list[Deferred[None]] = []
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._write_loop, name=f"mailrelay spool writer {path}", daemon=True
        )
        self._thread.start()

    # -- the reactor thread --------------------------------------------------

    def submit(
        self,
        doing: str,
        operation: Callable[[sqlite3.Connection], _T],
        *,
        durable: bool = True,
    ) -> Deferred[_T]:
        """Queue ``operation`` for the writer thread; fires with its result.
        ``durable=False`` is for bookkeeping whose loss in a power cut (not a
        process crash: the WAL holds it) costs at most a repeated delivery: it
        is committed without an fsync of its own."""
        if self._stopping:
            return fail(SpoolError(f"spool {self._path} is closed: cannot {doing}"))
        d: Deferred[_T] = Deferred()
        self._queue.put(_Request(doing, operation, d, durable))
        return d

    def stop(self) -> Deferred[None]:
        """Commit the writes already submitted, close the connection and end
        the thread; refuses new writes at once.  Fires once the thread is gone."""
        if self._stopped_already:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if not self._stopping:
            self._stopping = True
            self._queue.put(_STOP)
        return d

    def _deliver(self, outcomes: list[_Outcome]) -> None:
        for request, succeeded, value in outcomes:
            if succeeded:
                request.deferred.callback(value)
            else:
                request.deferred.errback(spool_error(self._path, value, request.doing))

    def _stopped(self) -> None:
        self._thread.join()  # it has nothing left to do but return
        self._stopped_already = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)

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
        self._db.close()
        self._reactor.callFromThread(self._stopped)

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
        db = self._db
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
