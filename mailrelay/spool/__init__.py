"""The durable spool: accepted messages and one entry per accepted recipient.

Place in the flow: LMTP → routing → **spool** → scheduler → sending → mta.
Storage: it imports values, errors and interfaces only (and ``mailrelay._files``
to create its file private).

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

The package's modules: :mod:`~mailrelay.spool.sqlite` (the SQL operations),
:mod:`~mailrelay.spool.writer` (the group-commit writer thread),
:mod:`~mailrelay.spool.schema` (the file's layout and migrations),
:mod:`~mailrelay.spool.memory` (the in-memory spool),
:mod:`~mailrelay.spool.reserve` (room kept on the spool's file system for
delivery, and the refusal of new messages when it runs out) and
:mod:`~mailrelay.spool.common` (the checks and entry builder both spools share).
This module only re-exports the public names.
"""

from mailrelay.model import EntryUpdate
from mailrelay.spool.memory import MemorySpool
from mailrelay.spool.reserve import ReservedStore, SpaceReserve
from mailrelay.spool.schema import SCHEMA_VERSION
from mailrelay.spool.sqlite import SQLiteSpool

__all__ = [
    "EntryUpdate",
    "MemorySpool",
    "ReservedStore",
    "SQLiteSpool",
    "SCHEMA_VERSION",
    "SpaceReserve",
]
