"""The in-memory spool: :class:`~mailrelay.interfaces.ISpool` without a file,
for tests, embedders and the CLI's dry runs.

Place in the flow: LMTP → routing → **spool** → scheduler → sending → mta.
It honours the contract of :class:`~mailrelay.spool.SQLiteSpool` (the same
checks, from :mod:`mailrelay.spool.common`, and the same state changes), but
nothing survives the process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
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


@implementer(ISpool)
class MemorySpool:
    """An :class:`ISpool` in memory, for tests and embedders.

    Deferreds fire before the method returns; ``clock`` (an ``IReactorTime``)
    stamps attempts.  Nothing survives the process.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._messages: dict[int, tuple[Envelope, bytes]] = {}
        # Entries are frozen values, replaced on each change; handed out as they are.
        self._entries: dict[int, SpoolEntry] = {}
        self._updated_at: dict[int, float] = {}
        self._next_key = 1
        self._next_id = 1
        self._closed = False
        self._status: dict[str, str] = {}
        # Why a message was refused as a whole, by message key (set once).
        self._refusals: dict[int, str] = {}

    def _check_open(self, doing: str) -> None:
        if self._closed:
            raise SpoolError(f"memory spool is closed: cannot {doing}")

    def _put(self, entry: SpoolEntry, now: float) -> None:
        self._entries[entry.entry_id] = entry
        self._updated_at[entry.entry_id] = now

    def _new_id(self) -> int:
        entry_id, self._next_id = self._next_id, self._next_id + 1
        return entry_id

    def enqueue(self, envelope: Envelope, message: bytes) -> Deferred[list[int]]:
        return self.store(envelope, message).addCallback(lambda stored: list(stored.entry_ids))

    @common.deferred_errors
    def store(
        self,
        envelope: Envelope,
        message: bytes,
        routes: Sequence[Route] | None = None,
        claim: bool = False,
    ) -> Deferred[Stored]:
        """Store ``message`` with one entry per destination, routed by ``routes``
        (see :meth:`~mailrelay.interfaces.ISpool.store`)."""
        self._check_open("store a message")
        envelope, data = common.check_enqueue(envelope, message)
        checked = common.check_routes(envelope, routes, claim)
        now = self._clock.seconds()
        waiting = EntryState.INFLIGHT if claim else EntryState.QUEUED
        key, self._next_key = self._next_key, self._next_key + 1
        self._messages[key] = (envelope, data)
        ids = []
        claimed = []

        def add(destination: Destination, state: EntryState, kind: EntryKind, error="") -> int:
            entry = common.new_entry(envelope, key, self._new_id(), destination, state, kind, error)
            self._put(entry, now)
            if claim and state is EntryState.INFLIGHT:
                claimed.append(entry)
            return entry.entry_id

        for destination, route in zip(envelope.destinations, checked, strict=True):
            state = waiting if route.state is EntryState.QUEUED else route.state
            ids.append(add(destination, state, EntryKind.INBOUND, route.error))
            if route.kind is not None:
                subaddress = common.expanded_subaddress(route.kind)
                for address in route.recipients:
                    add(
                        Destination(destination.list_address, subaddress, address),
                        waiting,
                        route.kind,
                    )
        return succeed(Stored(tuple(ids), tuple(claimed)))

    @common.deferred_errors
    def store_outgoing(
        self,
        messages: Iterable[Outgoing],
        finish: Iterable[EntryUpdate] = (),
        refusals: Iterable[Refusal] = (),
    ) -> Deferred[list[int]]:
        """Store messages mailrelay wrote, one QUEUED NOTICE entry per recipient,
        record ``refusals`` (each message's first, with its notices), and apply
        ``finish`` (see :meth:`~mailrelay.interfaces.ISpool.store_outgoing`)."""
        self._check_open("store outgoing messages")
        checked, updates = common.check_outgoing(messages, finish)
        refused = common.check_refusals(refusals)
        now = self._clock.seconds()
        for refusal in refused:
            if refusal.message_key in self._messages and refusal.message_key not in self._refusals:
                self._refusals[refusal.message_key] = refusal.reason
                checked.extend(refusal.notices)
        ids = []
        for message in checked:
            envelope = common.outgoing_envelope(message, now)
            key, self._next_key = self._next_key, self._next_key + 1
            self._messages[key] = (envelope, bytes(message.message))
            for destination in envelope.destinations:
                entry = common.new_entry(
                    envelope, key, self._new_id(), destination, EntryState.QUEUED, EntryKind.NOTICE
                )
                self._put(entry, now)
                ids.append(entry.entry_id)
        self._apply(updates, now)
        return succeed(ids)

    @common.deferred_errors
    def release_held(
        self,
        subaddresses: Iterable[str | None] | None = None,
        entry_ids: Iterable[int] | None = None,
    ) -> Deferred[int]:
        """Make HELD INBOUND entries QUEUED (those to ``subaddresses`` and of
        ``entry_ids``, each ``None`` for any); fires with how many changed."""
        self._check_open("release held entries")
        names, ids = common.check_release(subaddresses, entry_ids)
        now = self._clock.seconds()
        chosen = [
            entry
            for entry in self._entries.values()
            if entry.state is EntryState.HELD
            and entry.kind is EntryKind.INBOUND
            and (names is None or entry.destination.subaddress in names)
            and (ids is None or entry.entry_id in ids)
        ]
        for entry in chosen:
            self._put(replace(entry, state=EntryState.QUEUED, next_attempt_at=None), now)
        return succeed(len(chosen))

    def get_message(self, message_key: int) -> bytes:
        """The stored bytes of a message; ``KeyError`` if it is not (or no longer) spooled."""
        self._check_open(f"read message {message_key}")
        try:
            return self._messages[message_key][1]
        except KeyError:
            raise KeyError(f"no message {message_key} in the memory spool") from None

    @common.deferred_errors
    def claim_due(self, now: float, limit: int) -> Deferred[list[SpoolEntry]]:
        self._check_open("claim due entries")
        limit = common.check_limit(limit, allow_none=False)
        due = [
            entry
            for entry in self._entries.values()
            if entry.state is EntryState.QUEUED
            or (
                entry.state is EntryState.RETRY
                and entry.next_attempt_at is not None
                and entry.next_attempt_at <= now
            )
        ][:limit]
        claimed = [replace(entry, state=EntryState.INFLIGHT) for entry in due]
        for entry in claimed:
            self._put(entry, self._clock.seconds())
        return succeed(claimed)

    @common.deferred_errors
    def update(self, updates: Iterable[EntryUpdate]) -> Deferred[int]:
        """Apply ``updates``; fires with how many entries changed (unknown ids are skipped)."""
        self._check_open("update entries")
        changed = self._apply(common.check_updates(updates), self._clock.seconds())
        return succeed(changed)

    def _apply(self, updates: list[EntryUpdate], now: float) -> int:
        changed = 0
        for update in updates:
            entry = self._entries.get(update.entry_id)
            if entry is None:
                continue
            attempts, first_attempt_at = entry.attempts, entry.first_attempt_at
            if update.count_attempt:
                attempts += 1
                if first_attempt_at is None:
                    first_attempt_at = now
            entry = replace(
                entry,
                state=update.state,
                next_attempt_at=update.next_attempt_at,
                last_error=update.error or entry.last_error,
                attempts=attempts,
                first_attempt_at=first_attempt_at,
            )
            self._put(entry, now)
            changed += 1
        return changed

    @common.deferred_errors
    def expand(
        self, entry_id: int, recipients: Iterable[str], kind: EntryKind = EntryKind.MEMBER
    ) -> Deferred[list[int]]:
        """Replace INBOUND entry ``entry_id`` by one QUEUED ``kind`` entry per
        recipient and make it DONE (see :meth:`SQLiteSpool.expand
        <mailrelay.spool.SQLiteSpool.expand>`)."""
        self._check_open(f"expand entry {entry_id}")
        entry_id, addresses, kind = common.check_expand(entry_id, recipients, kind)
        original = self._entries.get(entry_id)
        if original is None or original.state is EntryState.DONE:
            return succeed([])
        if original.kind is not EntryKind.INBOUND:
            raise common.not_expandable(entry_id, original.kind)
        now = self._clock.seconds()
        envelope = self._messages[original.message_key][0]
        subaddress = common.expanded_subaddress(kind)
        list_address = original.destination.list_address
        ids = []
        for address in addresses:
            destination = Destination(list_address, subaddress, address)
            entry = common.new_entry(
                envelope, original.message_key, self._new_id(), destination, EntryState.QUEUED, kind
            )
            self._put(entry, now)
            ids.append(entry.entry_id)
        self._put(replace(original, state=EntryState.DONE, next_attempt_at=None), now)
        return succeed(ids)

    @common.deferred_errors
    def purge(self, before: float) -> Deferred[int]:
        """Delete DONE entries last changed before ``before``; fires with the count."""
        self._check_open("purge delivered entries")
        before = common.check_time(before)
        old = [
            entry.entry_id
            for entry in self._entries.values()
            if entry.state is EntryState.DONE and self._updated_at[entry.entry_id] < before
        ]
        for entry_id in old:
            del self._entries[entry_id]
            del self._updated_at[entry_id]
        # One pass for the messages, rather than one per deleted entry.
        kept = {entry.message_key for entry in self._entries.values()}
        for key in [key for key in self._messages if key not in kept]:
            del self._messages[key]
            self._refusals.pop(key, None)
        return succeed(len(old))

    @common.deferred_errors
    def set_status(self, key: str, text: str | None) -> Deferred[None]:
        """Publish ``text`` under ``key`` (``None`` removes it)."""
        self._check_open(f"set status {key}")
        key, text = common.check_status(key, text)
        if text is None:
            self._status.pop(key, None)
        else:
            self._status[key] = text
        return succeed(None)

    def get_status(self, key: str) -> str | None:
        """The text published under ``key``, or ``None``."""
        self._check_open(f"read status {key}")
        return self._status.get(common.check_status(key, None)[0])

    @common.deferred_errors
    def recover(
        self, claimed_before: float | None = None, keep: Iterable[int] = ()
    ) -> Deferred[int]:
        self._check_open("recover in-flight entries")
        claimed_before, kept = common.check_recover(claimed_before, keep)
        if claimed_before is None:
            moved = self._move({EntryState.INFLIGHT}, None, keep_retry_time=True)
            return succeed(moved).addCallback(common.log_recovered)
        stale = [
            entry_id
            for entry_id, entry in self._entries.items()
            if entry.state is EntryState.INFLIGHT
            and self._updated_at[entry_id] < claimed_before
            and entry_id not in kept
        ]
        return succeed(self._move({EntryState.INFLIGHT}, stale, keep_retry_time=True))

    def _move(
        self, states: set[EntryState], ids: list[int] | None, keep_retry_time: bool = False
    ) -> int:
        entries = (
            list(self._entries.values())
            if ids is None
            else [self._entries[i] for i in ids if i in self._entries]
        )
        moved = 0
        for entry in entries:
            if entry.state in states:
                if entry.state is EntryState.FAILED:  # a fresh retry period, as in SQLiteSpool
                    entry = replace(entry, attempts=0, first_attempt_at=None)
                entry = replace(entry, state=EntryState.QUEUED)
                if not keep_retry_time:
                    entry = replace(entry, next_attempt_at=None)
                self._put(entry, self._clock.seconds())
                moved += 1
        return moved

    def entries(
        self, state: EntryState | None = None, limit: int | None = None
    ) -> list[SpoolEntry]:
        self._check_open("list entries")
        state = common.check_state(state)
        limit = common.check_limit(limit, allow_none=True)
        rows = [entry for entry in self._entries.values() if state is None or entry.state is state]
        return rows[:limit]

    def counts(self) -> dict[EntryState, int]:
        self._check_open("count entries")
        counts = dict.fromkeys(EntryState, 0)
        for entry in self._entries.values():
            counts[entry.state] += 1
        return counts

    def next_due(self) -> float | None:
        self._check_open("find the next retry")
        times = [
            entry.next_attempt_at
            for entry in self._entries.values()
            if entry.state is EntryState.RETRY and entry.next_attempt_at is not None
        ]
        return min(times, default=None)

    @common.deferred_errors
    def retry_now(self, entry_ids: Iterable[int] | None = None) -> Deferred[int]:
        """Make RETRY and FAILED entries QUEUED again; fires with how many changed.

        RETRY entries keep their attempt history (and so their retry period);
        FAILED (dead-lettered) entries start afresh: attempts and the time of
        the first attempt are cleared, so they get a whole retry period again.
        """
        self._check_open("requeue entries")
        ids = None if entry_ids is None else common.check_ids(entry_ids)
        return succeed(self._move({EntryState.RETRY, EntryState.FAILED}, ids))

    @common.deferred_errors
    def delete(self, entry_ids: Iterable[int]) -> Deferred[int]:
        self._check_open("delete entries")
        deleted = 0
        for entry_id in common.check_ids(entry_ids):
            entry = self._entries.pop(entry_id, None)
            if entry is None:
                continue
            del self._updated_at[entry_id]
            deleted += 1
            if not any(e.message_key == entry.message_key for e in self._entries.values()):
                del self._messages[entry.message_key]
                self._refusals.pop(entry.message_key, None)
        return succeed(deleted)

    # -- operator views: one post and its copies --------------------------------

    def get_entry(self, entry_id: int) -> SpoolEntry | None:
        self._check_open(f"read entry {entry_id}")
        (checked,) = common.check_ids([entry_id])
        return self._entries.get(checked)

    def message_entries(self, message_key: int) -> list[SpoolEntry]:
        self._check_open(f"read the entries of message {message_key}")
        key = common.check_key(message_key)
        return sorted(
            (e for e in self._entries.values() if e.message_key == key),
            key=lambda e: e.entry_id,
        )

    def copy_counts(self, message_key: int) -> dict[EntryState, int]:
        counts = dict.fromkeys(EntryState, 0)
        for entry in self.message_entries(message_key):
            if entry.kind is not EntryKind.INBOUND:
                counts[entry.state] += 1
        return counts

    def delivery_progress(self, message_key: int, delivered: int) -> tuple[bool, bool]:
        counts = self.copy_counts(message_key)
        waiting = counts[EntryState.QUEUED] + counts[EntryState.INFLIGHT] + counts[EntryState.RETRY]
        return counts[EntryState.DONE] <= delivered, not waiting

    def oldest_entry(self, state: EntryState) -> SpoolEntry | None:
        self._check_open("find the oldest entry")
        checked = common.check_state(state)
        if checked is None:
            raise ValueError("oldest_entry needs a state")
        return min(
            (e for e in self._entries.values() if e.state is checked),
            key=lambda e: e.entry_id,
            default=None,
        )

    def posts(
        self,
        limit: int | None = None,
        message_id: str | None = None,
        include_done: bool = False,
    ) -> list[PostSummary]:
        self._check_open("list posts")
        limit = common.check_limit(limit, allow_none=True)
        message_id = common.check_message_id(message_id)
        by_message: dict[int, dict[tuple[str, str, str], int]] = {}
        for entry in sorted(self._entries.values(), key=lambda e: e.entry_id):
            rows = by_message.setdefault(entry.message_key, {})
            row = (entry.destination.list_address, entry.kind.value, entry.state.value)
            rows[row] = rows.get(row, 0) + 1
        posts = []
        for key in sorted(by_message):
            envelope = self._messages[key][0]
            rows = by_message[key]
            if message_id is not None and envelope.message_id != message_id:
                continue
            if not include_done and all(state == "done" for _, _, state in rows):
                continue
            posts.append(
                common.post_summary(
                    key,
                    envelope.message_id,
                    envelope.sender,
                    envelope.received_at,
                    [(*row, count) for row, count in rows.items()],
                    self._refusals.get(key),
                )
            )
        return posts[:limit]

    @common.deferred_errors
    def cancel_messages(self, message_keys: Iterable[int]) -> Deferred[dict[EntryState, int]]:
        self._check_open("cancel messages")
        keys = set(common.check_ids(message_keys))
        deleted = dict.fromkeys(EntryState, 0)
        doomed = [
            e
            for e in self._entries.values()
            if e.message_key in keys and e.state is not EntryState.DONE
        ]
        for entry in doomed:
            deleted[entry.state] += 1
        self.delete([entry.entry_id for entry in doomed])
        return succeed(deleted)

    def delivered_since(self, when: float) -> int:
        self._check_open("count recent deliveries")
        when = common.check_time(when)
        return sum(
            1
            for e in self._entries.values()
            if e.state is EntryState.DONE
            and e.kind is not EntryKind.INBOUND
            and self._updated_at[e.entry_id] >= when
        )

    def posts_since(self, when: float) -> dict[str, int]:
        self._check_open("count recent posts")
        when = common.check_time(when)
        counts: dict[str, int] = {}
        for e in self._entries.values():
            if (
                e.kind is EntryKind.INBOUND
                and e.destination.subaddress is None
                and e.received_at >= when
            ):
                address = e.destination.list_address
                counts[address] = counts.get(address, 0) + 1
        return counts

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)
