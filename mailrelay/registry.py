"""Mailing lists and their members: an SQLite store and an in-memory one.

Both implement :class:`mailrelay.interfaces.IListRegistry` and, for list
processing, :class:`mailrelay.interfaces.IListProcessingStore`: per-list
settings, member flags (moderation, bounce score), pending confirmations and
the per-day auto-reply counts.  ``resolve`` runs
at every RCPT, so it answers from an in-memory set of posting addresses; the
SQLite registry refreshes that set whenever ``PRAGMA data_version`` says another
connection (the admin CLI, another process) has committed a change.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay._files import create_private_file
from mailrelay.addresses import check_list_address, check_mailbox, resolve_recipient
from mailrelay.errors import InvalidAddress, RegistryError, RegistryUnavailable
from mailrelay.interfaces import IListProcessingStore, IListRegistry
from mailrelay.listsettings import (
    ListSettings,
    settings_from_text,
    settings_to_text,
    stored_settings,
)
from mailrelay.model import (
    MEMBER_FLAGS,
    Bounce,
    Destination,
    DisabledReason,
    MailingList,
    Member,
    MemberRecord,
    Pending,
    PendingAction,
)

__all__ = ["MemoryRegistry", "SQLiteRegistry", "SCHEMA_VERSION"]

_log = Logger()

# At most this many members are kept in SQLiteRegistry's read cache (about
# 100 bytes each); larger member lists are read afresh for every post.
_CACHED_MEMBERS = 50_000

# Each entry upgrades the schema from version N to N+1 (``PRAGMA user_version``).
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE lists (
        posting_address TEXT PRIMARY KEY NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE owners (
        list_address TEXT NOT NULL
            REFERENCES lists (posting_address) ON DELETE CASCADE,
        address TEXT NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (list_address, address)
    ) WITHOUT ROWID;
    CREATE TABLE members (
        list_address TEXT NOT NULL
            REFERENCES lists (posting_address) ON DELETE CASCADE,
        address TEXT NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        delivery_enabled INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (list_address, address)
    ) WITHOUT ROWID;
    -- "Which lists is this address on?" for the CLI and bounce processing.
    CREATE INDEX members_by_address ON members (address);
    CREATE INDEX owners_by_address ON owners (address);
    """,
    """
    CREATE TABLE bounces (
        id INTEGER PRIMARY KEY,
        list_address TEXT NOT NULL
            REFERENCES lists (posting_address) ON DELETE CASCADE,
        address TEXT NOT NULL,
        code INTEGER NOT NULL,
        response TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX bounces_by_list ON bounces (list_address, address);
    """,
    """
    -- Version 3: list processing.  Member flags after Mailman 3's member
    -- record.  Settings as text, one row per key that differs from its
    -- default (mailrelay.listsettings), so adding a setting needs no migration.
    -- (No semicolons in comments: the statements are split on them.)
    ALTER TABLE members ADD COLUMN moderated INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN disabled_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE members ADD COLUMN bounce_score REAL NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN last_bounce_at REAL;
    ALTER TABLE members ADD COLUMN last_warning_at REAL;
    ALTER TABLE members ADD COLUMN warnings_sent INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE list_settings (
        list_address TEXT NOT NULL
            REFERENCES lists (posting_address) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (list_address, key)
    ) WITHOUT ROWID;
    CREATE TABLE pending (
        token TEXT PRIMARY KEY NOT NULL,
        list_address TEXT NOT NULL
            REFERENCES lists (posting_address) ON DELETE CASCADE,
        address TEXT NOT NULL,
        action TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX pending_by_list ON pending (list_address, created_at);
    CREATE INDEX pending_by_expiry ON pending (expires_at);
    CREATE TABLE autoreplies (
        list_address TEXT NOT NULL
            REFERENCES lists (posting_address) ON DELETE CASCADE,
        address TEXT NOT NULL,
        day TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (list_address, address, day)
    ) WITHOUT ROWID;
    CREATE INDEX autoreplies_by_day ON autoreplies (day);
    """,
)

# The members table's columns, in MemberRecord's field order.
_MEMBER_COLUMNS = (
    "address, display_name, delivery_enabled, moderated, disabled_reason,"
    " bounce_score, last_bounce_at, last_warning_at, warnings_sent"
)
_UPDATE_MEMBER = (
    "UPDATE members SET display_name = ?, delivery_enabled = ?, moderated = ?,"
    " disabled_reason = ?, bounce_score = ?, last_bounce_at = ?, last_warning_at = ?,"
    " warnings_sent = ? WHERE list_address = ? AND address = ?"
)
# In Pending's field order (the column is "data": what the action needs).
_PENDING_COLUMNS = "token, list_address, address, action, created_at, expires_at, data"
SCHEMA_VERSION = len(_MIGRATIONS)


def _lookup_key(address: object, what: str = "list address") -> str:
    """An address to look up: lower-cased, or ``RegistryError`` if it is no string."""
    if not isinstance(address, str):
        raise RegistryError(f"{what} must be a string, not {address!r}")
    return address.lower()


def _check_list_address(address: object) -> str:
    try:
        return check_list_address(address)
    except InvalidAddress as e:
        raise RegistryError(f"cannot create list: {e}") from None


def _check_address(what: str, address: object) -> str:
    try:
        return check_mailbox(address).lower()
    except InvalidAddress as e:
        raise RegistryError(f"invalid {what}: {e}") from None


def _check_members(list_address: str, members: Iterable[Member | str]) -> list[Member]:
    """Validate and lower-case ``members`` (``Member`` values or bare addresses)."""
    checked = []
    for member in members:
        if isinstance(member, str):
            member = Member(member)
        elif not isinstance(member, Member):
            raise RegistryError(f"{member!r} is neither a Member nor an address string")
        address = _check_address(f"member address for {list_address}", member.address)
        if address != member.address:
            member = replace(member, address=address)
        checked.append(member)
    return checked


def _check_bounce(bounce: object) -> Bounce:
    """A validated, normalised copy of ``bounce``, or ``RegistryError``."""
    if not isinstance(bounce, Bounce):
        raise RegistryError(f"not a Bounce: {bounce!r}")
    list_address = _lookup_key(bounce.list_address)
    address = _check_address(f"bounced address for {list_address}", bounce.address)
    code = bounce.code
    if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 999:
        raise RegistryError(f"bounce of {address}: code must be an SMTP reply code, not {code!r}")
    response = bounce.response
    if isinstance(response, bytes | bytearray):
        response = bytes(response).decode("utf-8", "replace")
    if not isinstance(response, str):
        raise RegistryError(f"bounce of {address}: response must be text, not {response!r}")
    at = bounce.at
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise RegistryError(f"bounce of {address}: time must be a number, not {at!r}")
    return Bounce(list_address, address, code, response, float(at))


def _record_from_row(row: tuple[Any, ...]) -> MemberRecord:
    address, name, enabled, moderated, reason, score, last_bounce, last_warning, warnings = row
    return MemberRecord(
        address,
        name,
        bool(enabled),
        bool(moderated),
        reason,
        score,
        last_bounce,
        last_warning,
        warnings,
    )


def _record_row(record: MemberRecord) -> tuple[Any, ...]:
    """The members table's changeable columns, in the order of :data:`_UPDATE_MEMBER`."""
    return (
        record.display_name,
        int(record.delivery_enabled),
        int(record.moderated),
        record.disabled_reason,
        float(record.bounce_score),
        record.last_bounce_at,
        record.last_warning_at,
        record.warnings_sent,
    )


def _optional_time(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RegistryError(f"{name} must be a POSIX time or None, not {value!r}")
    return float(value)


_DISABLED_REASONS = tuple(reason.value for reason in DisabledReason)


def _check_member_changes(member: MemberRecord, changes: Any) -> MemberRecord:
    """``member`` with ``changes`` (a mapping of :data:`MEMBER_FLAGS`) applied and checked."""
    if not hasattr(changes, "items"):
        raise RegistryError(f"member changes must be a mapping, not {changes!r}")
    unknown = set(changes) - MEMBER_FLAGS
    if unknown:
        raise RegistryError(
            f"unknown member fields {sorted(unknown)} (known: {', '.join(sorted(MEMBER_FLAGS))})"
        )
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name in ("delivery_enabled", "moderated"):
            if not isinstance(value, bool):
                raise RegistryError(f"{name} must be True or False, not {value!r}")
        elif name == "display_name":
            if not isinstance(value, str):
                raise RegistryError(f"display_name must be a str, not {value!r}")
        elif name == "disabled_reason":
            value = getattr(value, "value", value)
            if value != "" and value not in _DISABLED_REASONS:
                raise RegistryError(
                    f"disabled_reason must be '' or one of {', '.join(_DISABLED_REASONS)}, "
                    f"not {value!r}"
                )
        elif name == "bounce_score":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise RegistryError(f"bounce_score must be a number >= 0, not {value!r}")
            value = float(value)
        elif name == "warnings_sent":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RegistryError(f"warnings_sent must be a whole number >= 0, not {value!r}")
        else:
            value = _optional_time(name, value)
        checked[name] = value
    return replace(member, **checked)


def _check_batch(changes: Any) -> dict[str, Any]:
    """``{member address: changes}`` keyed by lookup key (a later spelling of
    the same address wins), or ``RegistryError``."""
    if not hasattr(changes, "items"):
        raise RegistryError(f"member changes must be a mapping of addresses, not {changes!r}")
    return {_lookup_key(address, "member address"): c for address, c in changes.items()}


# The member fields that the cached member lists (``Member`` values) show.
_LISTED_FIELDS = frozenset({"display_name", "delivery_enabled"})


def _member_lists_changed(list_address: str, changes: Iterable[Any]) -> list[tuple[str, str]]:
    """The read-cache keys that member ``changes`` of ``list_address`` make
    stale: its member lists, if a change touches what they show."""
    if any(_LISTED_FIELDS.intersection(c) for c in changes if hasattr(c, "keys")):
        return [("members", list_address), ("enabled", list_address)]
    return []


def _check_pending(pending: object) -> Pending:
    """A validated, normalised copy of ``pending``, or ``RegistryError``."""
    if not isinstance(pending, Pending):
        raise RegistryError(f"not a Pending: {pending!r}")
    token = pending.token
    if not isinstance(token, str) or not token or not token.isascii() or not token.isalnum():
        raise RegistryError(f"a confirmation token is letters and digits, not {token!r}")
    list_address = _lookup_key(pending.list_address)
    address = _check_address(f"address of a confirmation for {list_address}", pending.address)
    try:
        action = PendingAction(pending.action)
    except ValueError:
        raise RegistryError(f"not a pending action: {pending.action!r}") from None
    if not isinstance(pending.reference, str):
        raise RegistryError(f"pending reference must be a str, not {pending.reference!r}")
    created = _optional_time("created_at", pending.created_at)
    expires = _optional_time("expires_at", pending.expires_at)
    if created is None or expires is None:
        raise RegistryError("a pending confirmation needs created_at and expires_at")
    return Pending(
        token.lower(), list_address, address, action, created, expires, pending.reference
    )


def _pending_from_row(row: tuple[Any, ...]) -> Pending:
    token, list_address, address, action, created, expires, reference = row
    return Pending(token, list_address, address, PendingAction(action), created, expires, reference)


def _check_token(token: object) -> str:
    if not isinstance(token, str):
        raise RegistryError(f"a confirmation token must be a str, not {token!r}")
    return token.lower()


def _check_autoreply(address: object, day: object, limit: object) -> tuple[str, str, int]:
    key = _lookup_key(address, "reply address")
    if not isinstance(day, str) or not day:
        raise RegistryError(f"day must be a YYYY-MM-DD str, not {day!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise RegistryError(f"limit must be a whole number >= 0, not {limit!r}")
    return key, day, limit


def _check_owners(list_address: str, owners: Iterable[str] | None) -> tuple[str, ...] | None:
    if owners is None:
        return None
    if isinstance(owners, str):
        raise RegistryError(f"owners must be a collection of addresses, not {owners!r}")
    return tuple(dict.fromkeys(_check_address(f"owner of {list_address}", o) for o in owners))


def _check_list_update(
    list_address: object, display_name: object, owners: Iterable[str] | None
) -> tuple[str, str | None, tuple[str, ...] | None]:
    """The arguments of ``update_list``, checked: the list's key, the new
    display name and owners (``None``: unchanged)."""
    key = _lookup_key(list_address)
    if display_name is not None and not isinstance(display_name, str):
        raise RegistryError(f"a display name must be text, not {display_name!r}")
    return key, display_name, _check_owners(key, owners)


def _check_settings(base: ListSettings, changes: Any) -> ListSettings:
    if not hasattr(changes, "items"):
        raise RegistryError(f"setting changes must be a mapping of texts, not {changes!r}")
    try:
        return settings_from_text(dict(changes), base)
    except ValueError as e:
        raise RegistryError(str(e)) from None


def _split_duplicates(
    members: list[Member], is_member: Callable[[str], bool]
) -> tuple[list[Member], tuple[str, ...]]:
    """Members to add, and the addresses already subscribed (or repeated in ``members``)."""
    new: list[Member] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for member in members:
        if member.address in seen or is_member(member.address):
            duplicates.append(member.address)
        else:
            seen.add(member.address)
            new.append(member)
    return new, tuple(duplicates)


class _BounceRecorder:
    """``record_bounce`` for both registries: one bounce, recorded as a batch
    of one by the registry's own ``record_bounces``."""

    def record_bounces(self, bounces: Iterable[Bounce]) -> None:
        raise NotImplementedError

    def record_bounce(
        self, list_address: str, address: str, code: int, response: str | bytes, at: float
    ) -> None:
        self.record_bounces([Bounce(list_address, address, code, response, at)])


@implementer(IListRegistry, IListProcessingStore)
class MemoryRegistry(_BounceRecorder):
    """An :class:`IListRegistry` and :class:`IListProcessingStore` held in
    memory, for tests and embedders."""

    def __init__(self) -> None:
        self._lists: dict[str, MailingList] = {}
        self._members: dict[str, dict[str, Member]] = {}
        self._bounces: dict[str, list[Bounce]] = {}
        self._settings: dict[str, ListSettings] = {}
        # The records of members whose list-processing flags were changed.
        self._records: dict[tuple[str, str], MemberRecord] = {}
        self._pending: dict[str, Pending] = {}
        # (list, address) -> (day, replies sent that day)
        self._autoreplies: dict[tuple[str, str], tuple[str, int]] = {}

    def resolve(self, address: str) -> Destination | None:
        return resolve_recipient(address, self._lists.__contains__)

    def get_list(self, address: str) -> MailingList | None:
        return self._lists.get(_lookup_key(address))

    def lists(self) -> tuple[MailingList, ...]:
        return tuple(self._lists[key] for key in sorted(self._lists))

    def create_list(
        self, address: str, display_name: str = "", owners: Iterable[str] = ()
    ) -> MailingList:
        address = _check_list_address(address)
        owner_addresses = tuple(
            dict.fromkeys(_check_address(f"owner of {address}", o) for o in owners)
        )
        if address in self._lists:
            raise RegistryError(f"list {address} already exists")
        mailing_list = MailingList(address, display_name or "", owner_addresses)
        self._lists[address] = mailing_list
        self._members[address] = {}
        return mailing_list

    def delete_list(self, address: str) -> None:
        address = _lookup_key(address)
        self._require(address)
        del self._lists[address]
        del self._members[address]
        self._bounces.pop(address, None)
        self._settings.pop(address, None)
        for token in [t for t, p in self._pending.items() if p.list_address == address]:
            del self._pending[token]
        for key in [key for key in self._autoreplies if key[0] == address]:
            del self._autoreplies[key]
        for key in [key for key in self._records if key[0] == address]:
            del self._records[key]

    def add_members(self, list_address: str, members: Iterable[Member | str]) -> tuple[str, ...]:
        list_address = _lookup_key(list_address)
        current = self._require(list_address)
        new, duplicates = _split_duplicates(
            _check_members(list_address, members), current.__contains__
        )
        current.update((member.address, member) for member in new)
        return duplicates

    def remove_members(self, list_address: str, addresses: Iterable[str]) -> tuple[str, ...]:
        list_address = _lookup_key(list_address)
        current = self._require(list_address)
        keys = [(address, _lookup_key(address, "member address")) for address in addresses]
        for _, key in keys:
            self._records.pop((list_address, key), None)
        return tuple(address for address, key in keys if current.pop(key, None) is None)

    def member_count(self, list_address: str) -> int:
        return len(self._require(_lookup_key(list_address)))

    def members(self, list_address: str, enabled_only: bool = False) -> tuple[Member, ...]:
        current = self._require(_lookup_key(list_address))
        return tuple(
            current[address]
            for address in sorted(current)
            if current[address].delivery_enabled or not enabled_only
        )

    def record_bounces(self, bounces: Iterable[Bounce]) -> None:
        checked = [_check_bounce(bounce) for bounce in bounces]
        for bounce in checked:
            self._require(bounce.list_address)
        for bounce in checked:
            self._bounces.setdefault(bounce.list_address, []).append(bounce)

    def bounces(self, list_address: str) -> tuple[Bounce, ...]:
        list_address = _lookup_key(list_address)
        self._require(list_address)
        return tuple(sorted(self._bounces.get(list_address, ()), key=lambda b: b.at))

    # -- IListProcessingStore -----------------------------------------------

    def list_settings(self, list_address: str) -> ListSettings:
        list_address = _lookup_key(list_address)
        self._require(list_address)
        return self._settings.get(list_address, ListSettings())

    def update_list_settings(self, list_address: str, changes: Any) -> ListSettings:
        list_address = _lookup_key(list_address)
        self._require(list_address)
        settings = _check_settings(self.list_settings(list_address), changes)
        self._settings[list_address] = settings
        return settings

    def update_list(
        self,
        list_address: str,
        display_name: str | None = None,
        owners: Iterable[str] | None = None,
    ) -> MailingList:
        list_address, display_name, owner_addresses = _check_list_update(
            list_address, display_name, owners
        )
        self._require(list_address)
        mlist = self._lists[list_address]
        mlist = MailingList(
            list_address,
            mlist.display_name if display_name is None else display_name,
            mlist.owners if owner_addresses is None else owner_addresses,
        )
        self._lists[list_address] = mlist
        return mlist

    def _record(self, list_address: str, member: Member) -> MemberRecord:
        record = self._records.get((list_address, member.address))
        if record is None:
            return MemberRecord(member.address, member.display_name, member.delivery_enabled)
        return replace(
            record, display_name=member.display_name, delivery_enabled=member.delivery_enabled
        )

    def get_member(self, list_address: str, address: str) -> MemberRecord | None:
        list_address = _lookup_key(list_address)
        member = self._require(list_address).get(_lookup_key(address, "member address"))
        return None if member is None else self._record(list_address, member)

    def member_records(self, list_address: str) -> tuple[MemberRecord, ...]:
        list_address = _lookup_key(list_address)
        return tuple(self._record(list_address, m) for m in self.members(list_address))

    def update_member(self, list_address: str, address: str, changes: Any) -> MemberRecord:
        list_address = _lookup_key(list_address)
        current = self._require(list_address)
        key = _lookup_key(address, "member address")
        if key not in current:
            raise RegistryError(f"{address} is not a member of {list_address}")
        record = _check_member_changes(self._record(list_address, current[key]), changes)
        self._records[(list_address, key)] = record
        current[key] = record.member
        return record

    def update_members(self, list_address: str, changes: Any) -> dict[str, MemberRecord]:
        list_address = _lookup_key(list_address)
        current = self._require(list_address)
        # Every change is checked before any is made: all or nothing.
        updated = {
            key: _check_member_changes(self._record(list_address, current[key]), member_changes)
            for key, member_changes in _check_batch(changes).items()
            if key in current
        }
        for key, record in updated.items():
            self._records[(list_address, key)] = record
            current[key] = record.member
        return updated

    def add_pending(self, pending: Pending) -> None:
        pending = _check_pending(pending)
        self._require(pending.list_address)
        if pending.token in self._pending:
            raise RegistryError("that confirmation token is already in use")
        self._pending[pending.token] = pending

    def consume_pending(self, list_address: str, token: str, now: float) -> Pending | None:
        list_address, token = _lookup_key(list_address), _check_token(token)
        pending = self._pending.get(token)
        if pending is None or pending.list_address != list_address:
            return None
        del self._pending[token]
        return pending if pending.expires_at > now else None

    def get_pending(self, token: str) -> Pending | None:
        return self._pending.get(_check_token(token))

    def discard_pending(self, token: str) -> Pending | None:
        return self._pending.pop(_check_token(token), None)

    def pending(self, list_address: str | None = None) -> tuple[Pending, ...]:
        if list_address is not None:
            list_address = _lookup_key(list_address)
            self._require(list_address)
        chosen = [p for p in self._pending.values() if list_address in (None, p.list_address)]
        return tuple(sorted(chosen, key=lambda p: (p.created_at, p.token)))

    def purge_pending(self, now: float) -> int:
        expired = [t for t, p in self._pending.items() if p.expires_at <= now]
        for token in expired:
            del self._pending[token]
        return len(expired)

    def claim_autoreply(self, list_address: str, address: str, day: str, limit: int) -> bool:
        list_address = _lookup_key(list_address)
        address, day, limit = _check_autoreply(address, day, limit)
        self._require(list_address)
        counted_day, count = self._autoreplies.get((list_address, address), (day, 0))
        if counted_day != day:
            count = 0
        if limit and count >= limit:
            return False
        self._autoreplies[(list_address, address)] = (day, count + 1)
        return True

    def close(self) -> None:
        pass

    def _require(self, list_address: str) -> dict[str, Member]:
        try:
            return self._members[list_address]
        except KeyError:
            raise RegistryError(f"no such list: {list_address}") from None


class _NotOpen:
    """The connection of an :class:`SQLiteRegistry` that is not open: every
    statement fails as SQLite fails on a closed connection, naming the file."""

    in_transaction = False

    def __init__(self, path: str) -> None:
        self._path = path

    def execute(self, *args: Any) -> Any:
        raise sqlite3.ProgrammingError(f"list registry {self._path} is not open")

    executemany = execute

    def close(self) -> None:
        pass


@implementer(IListRegistry, IListProcessingStore)
class SQLiteRegistry(_BounceRecorder):
    """An :class:`IListRegistry` and :class:`IListProcessingStore` stored in an
    SQLite file shared with the admin CLI.

    The file, its directory and the schema are created on first use.  Every
    method is synchronous and runs in the caller's thread.  SQLite errors are
    raised as :class:`RegistryUnavailable` (a temporary condition).

    The file is opened at once, or with ``open_now=False`` only by
    :meth:`open`: a daemon opens its registry after twistd has forked into the
    background, since an SQLite connection must not cross a fork.  Until then
    every method raises :class:`RegistryUnavailable` saying it is not open.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 5.0, open_now: bool = True
    ) -> None:
        self.path = os.fspath(path)
        self._timeout = timeout
        self._db: Any = _NotOpen(self.path)
        self._data_version: int | None = None
        self._posting_addresses: frozenset[str] = frozenset()
        # Lists and member lists read since the registry last changed (in any
        # process): the runner asks for the same list for every post.
        self._cache: dict[tuple[str, str], Any] = {}
        self._cached_members = 0
        if open_now:
            self.open()

    @property
    def is_open(self) -> bool:
        """Whether the registry is open: after :meth:`open`, until :meth:`close`."""
        return not isinstance(self._db, _NotOpen)

    def open(self) -> None:
        """Open (creating and migrating) the file; does nothing if it is open.
        Raises :class:`RegistryUnavailable` (or :class:`RegistryError` for a
        newer schema) naming the file.  A closed registry may be opened again."""
        if self.is_open:
            return
        try:
            if self.path != ":memory:":
                create_private_file(self.path)
            # Autocommit mode: transactions are explicit (see _transaction).
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise RegistryUnavailable(f"cannot open list registry {self.path}: {e}") from e
        self._db = db
        try:
            db.execute("PRAGMA foreign_keys = ON")
            # WAL: the LMTP server's reads never wait for a CLI write.
            db.execute("PRAGMA journal_mode = WAL")
            self._migrate()
        except sqlite3.Error as e:
            self.close()
            raise RegistryUnavailable(f"cannot open list registry {self.path}: {e}") from e
        except RegistryError:
            self.close()
            raise
        self._data_version = None
        self._cache.clear()
        self._cached_members = 0

    def _migrate(self) -> None:
        with self._transaction():
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"list registry {self.path} has schema version {version}; this mailrelay "
                    f"understands up to {SCHEMA_VERSION} (was it written by a newer release?)"
                )
            for number in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            if version != SCHEMA_VERSION:
                # PRAGMA takes no parameters; SCHEMA_VERSION is our own integer.
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

    @contextmanager
    def _transaction(self, *, stale: Iterable[tuple[str, str]] | None = None) -> Iterator[None]:
        """A write transaction, after which the read cache is emptied; with
        ``stale``, only those cache keys are dropped (``()``: none, for a
        transaction that writes only tables the cache does not hold)."""
        # IMMEDIATE takes the write lock up front, so a check-then-write (such
        # as "not yet a member, so insert") cannot race another writer.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        if stale is None:
            # Our own commits do not change our connection's data_version.
            self._data_version = None
            return
        # The rest of the cache stays valid: our commit changed nothing else,
        # and another process's commit still changes data_version, which the
        # next read sees (and then empties the whole cache).
        self._forget(stale)

    def _forget(self, keys: Iterable[tuple[str, str]]) -> None:
        """Drop ``keys`` from the read cache."""
        for key in keys:
            value = self._cache.pop(key, None)
            if key[0] in ("members", "enabled") and value is not None:
                self._cached_members -= len(value)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            _log.warn(
                "List registry {path} failed while {doing}: {error}",
                path=self.path,
                doing=doing,
                error=str(e),
            )
            raise RegistryUnavailable(f"list registry {self.path}: {doing}: {e}") from e

    def _refresh(self) -> frozenset[str]:
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version != self._data_version:
            rows = self._db.execute("SELECT posting_address FROM lists").fetchall()
            self._posting_addresses = frozenset(address for (address,) in rows)
            self._data_version = version
            self._cache.clear()
            self._cached_members = 0
        return self._posting_addresses

    def resolve(self, address: str) -> Destination | None:
        with self._errors("reading the list addresses"):
            posting_addresses = self._refresh()
        return resolve_recipient(address, posting_addresses.__contains__)

    def get_list(self, address: str) -> MailingList | None:
        address = _lookup_key(address)
        with self._errors(f"reading list {address}"):
            self._refresh()
            key = ("list", address)
            if key in self._cache:
                return self._cache[key]
            row = self._db.execute(
                "SELECT posting_address, display_name FROM lists WHERE posting_address = ?",
                (address,),
            ).fetchone()
            mlist = None if row is None else MailingList(row[0], row[1], self._owners(address))
            self._cache[key] = mlist
            return mlist

    def _owners(self, address: str) -> tuple[str, ...]:
        rows = self._db.execute(
            "SELECT address FROM owners WHERE list_address = ? ORDER BY position", (address,)
        )
        return tuple(owner for (owner,) in rows)

    def lists(self) -> tuple[MailingList, ...]:
        with self._errors("reading the lists"):
            rows = self._db.execute(
                "SELECT posting_address, display_name FROM lists ORDER BY posting_address"
            ).fetchall()
            return tuple(MailingList(a, name, self._owners(a)) for a, name in rows)

    def create_list(
        self, address: str, display_name: str = "", owners: Iterable[str] = ()
    ) -> MailingList:
        address = _check_list_address(address)
        owner_addresses = tuple(
            dict.fromkeys(_check_address(f"owner of {address}", o) for o in owners)
        )
        with self._errors(f"creating list {address}"), self._transaction():
            if self._exists(address):
                raise RegistryError(f"list {address} already exists")
            self._db.execute(
                "INSERT INTO lists (posting_address, display_name, created_at) VALUES (?, ?, ?)",
                (address, display_name or "", time.time()),
            )
            self._db.executemany(
                "INSERT INTO owners (list_address, address, position) VALUES (?, ?, ?)",
                [(address, owner, n) for n, owner in enumerate(owner_addresses)],
            )
        _log.info("Created list {list}", list=address)
        return MailingList(address, display_name or "", owner_addresses)

    def delete_list(self, address: str) -> None:
        address = _lookup_key(address)
        with self._errors(f"deleting list {address}"), self._transaction():
            self._require(address)
            # Members and owners go with it (ON DELETE CASCADE).
            self._db.execute("DELETE FROM lists WHERE posting_address = ?", (address,))
        _log.info("Deleted list {list}", list=address)

    def add_members(self, list_address: str, members: Iterable[Member | str]) -> tuple[str, ...]:
        list_address = _lookup_key(list_address)
        checked = _check_members(list_address, members)
        with self._errors(f"adding members to {list_address}"), self._transaction():
            self._require(list_address)
            # One query for the current members beats one lookup per new member.
            current = {
                address
                for (address,) in self._db.execute(
                    "SELECT address FROM members WHERE list_address = ?", (list_address,)
                )
            }
            new, duplicates = _split_duplicates(checked, current.__contains__)
            self._db.executemany(
                "INSERT INTO members (list_address, address, display_name, delivery_enabled)"
                " VALUES (?, ?, ?, ?)",
                [(list_address, m.address, m.display_name, int(m.delivery_enabled)) for m in new],
            )
        return duplicates

    def remove_members(self, list_address: str, addresses: Iterable[str]) -> tuple[str, ...]:
        list_address = _lookup_key(list_address)
        keys = [(address, _lookup_key(address, "member address")) for address in addresses]
        missing = []
        with self._errors(f"removing members from {list_address}"), self._transaction():
            self._require(list_address)
            for address, key in keys:
                cursor = self._db.execute(
                    "DELETE FROM members WHERE list_address = ? AND address = ?",
                    (list_address, key),
                )
                if cursor.rowcount == 0:
                    missing.append(address)
        return tuple(missing)

    def member_count(self, list_address: str) -> int:
        list_address = _lookup_key(list_address)
        with self._errors(f"counting the members of {list_address}"):
            self._db.execute("BEGIN")
            try:
                self._require(list_address)
                (count,) = self._db.execute(
                    "SELECT count(*) FROM members WHERE list_address = ?", (list_address,)
                ).fetchone()
            finally:
                self._db.execute("COMMIT")
        return count

    def members(self, list_address: str, enabled_only: bool = False) -> tuple[Member, ...]:
        list_address = _lookup_key(list_address)
        query = "SELECT address, display_name, delivery_enabled FROM members WHERE list_address = ?"
        if enabled_only:
            query += " AND delivery_enabled"
        key = ("enabled" if enabled_only else "members", list_address)
        with self._errors(f"reading the members of {list_address}"):
            self._refresh()
            if key in self._cache:
                return self._cache[key]
            # One read transaction, so the existence check and the rows agree.
            # (Should the registry change meanwhile, the next _refresh sees it
            # and empties the cache.)
            self._db.execute("BEGIN")
            try:
                self._require(list_address)
                rows = self._db.execute(query + " ORDER BY address", (list_address,)).fetchall()
            finally:
                self._db.execute("COMMIT")
        members = tuple(Member(address, name, bool(enabled)) for address, name, enabled in rows)
        if self._cached_members + len(members) <= _CACHED_MEMBERS:
            self._cache[key] = members
            self._cached_members += len(members)
        return members

    def record_bounces(self, bounces: Iterable[Bounce]) -> None:
        checked = [_check_bounce(bounce) for bounce in bounces]
        if not checked:
            return
        with self._errors("recording bounces"), self._transaction(stale=()):
            for list_address in {bounce.list_address for bounce in checked}:
                self._require(list_address)
            self._db.executemany(
                "INSERT INTO bounces (list_address, address, code, response, at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(b.list_address, b.address, b.code, b.response, b.at) for b in checked],
            )

    def bounces(self, list_address: str) -> tuple[Bounce, ...]:
        list_address = _lookup_key(list_address)
        with self._errors(f"reading the bounces of {list_address}"):
            self._db.execute("BEGIN")
            try:
                self._require(list_address)
                rows = self._db.execute(
                    "SELECT address, code, response, at FROM bounces WHERE list_address = ?"
                    " ORDER BY at, id",
                    (list_address,),
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        return tuple(Bounce(list_address, *row) for row in rows)

    # -- IListProcessingStore -----------------------------------------------

    @contextmanager
    def _reading(self, doing: str, list_address: str | None = None) -> Iterator[None]:
        """One read transaction (so an existence check and the rows agree),
        requiring ``list_address`` to exist when given."""
        with self._errors(doing):
            self._db.execute("BEGIN")
            try:
                if list_address is not None:
                    self._require(list_address)
                yield
            finally:
                self._db.execute("COMMIT")

    def _settings_rows(self, list_address: str) -> dict[str, str]:
        return dict(
            self._db.execute(
                "SELECT key, value FROM list_settings WHERE list_address = ?", (list_address,)
            ).fetchall()
        )

    def list_settings(self, list_address: str) -> ListSettings:
        list_address = _lookup_key(list_address)
        with self._errors(f"reading the settings of {list_address}"):
            self._refresh()
            key = ("settings", list_address)
            if key in self._cache:
                return self._cache[key]
        with self._reading(f"reading the settings of {list_address}", list_address):
            settings = stored_settings(self._settings_rows(list_address))
        self._cache[key] = settings
        return settings

    def update_list_settings(self, list_address: str, changes: Any) -> ListSettings:
        list_address = _lookup_key(list_address)
        with (
            self._errors(f"changing the settings of {list_address}"),
            self._transaction(stale=[("settings", list_address)]),
        ):
            self._require(list_address)
            settings = _check_settings(stored_settings(self._settings_rows(list_address)), changes)
            self._db.execute("DELETE FROM list_settings WHERE list_address = ?", (list_address,))
            self._db.executemany(
                "INSERT INTO list_settings (list_address, key, value) VALUES (?, ?, ?)",
                [(list_address, k, v) for k, v in settings_to_text(settings).items()],
            )
        _log.info("Changed settings of {list}: {changes}", list=list_address, changes=dict(changes))
        return settings

    def update_list(
        self,
        list_address: str,
        display_name: str | None = None,
        owners: Iterable[str] | None = None,
    ) -> MailingList:
        list_address, display_name, owner_addresses = _check_list_update(
            list_address, display_name, owners
        )
        with (
            self._errors(f"changing list {list_address}"),
            self._transaction(stale=[("list", list_address)]),
        ):
            self._require(list_address)
            if display_name is not None:
                self._db.execute(
                    "UPDATE lists SET display_name = ? WHERE posting_address = ?",
                    (display_name, list_address),
                )
            if owner_addresses is not None:
                self._db.execute("DELETE FROM owners WHERE list_address = ?", (list_address,))
                self._db.executemany(
                    "INSERT INTO owners (list_address, address, position) VALUES (?, ?, ?)",
                    [(list_address, owner, n) for n, owner in enumerate(owner_addresses)],
                )
        _log.info("Changed list {list}", list=list_address)
        mlist = self.get_list(list_address)
        assert mlist is not None
        return mlist

    def _member(self, list_address: str, key: str) -> MemberRecord | None:
        row = self._db.execute(
            f"SELECT {_MEMBER_COLUMNS} FROM members WHERE list_address = ? AND address = ?",
            (list_address, key),
        ).fetchone()
        return None if row is None else _record_from_row(row)

    def get_member(self, list_address: str, address: str) -> MemberRecord | None:
        list_address = _lookup_key(list_address)
        key = _lookup_key(address, "member address")
        with self._reading(f"reading a member of {list_address}", list_address):
            return self._member(list_address, key)

    def member_records(self, list_address: str) -> tuple[MemberRecord, ...]:
        list_address = _lookup_key(list_address)
        with self._reading(f"reading the members of {list_address}", list_address):
            rows = self._db.execute(
                f"SELECT {_MEMBER_COLUMNS} FROM members WHERE list_address = ? ORDER BY address",
                (list_address,),
            ).fetchall()
        return tuple(_record_from_row(row) for row in rows)

    def update_member(self, list_address: str, address: str, changes: Any) -> MemberRecord:
        list_address = _lookup_key(list_address)
        key = _lookup_key(address, "member address")
        with (
            self._errors(f"changing a member of {list_address}"),
            self._transaction(stale=_member_lists_changed(list_address, [changes])),
        ):
            self._require(list_address)
            record = self._member(list_address, key)
            if record is None:
                raise RegistryError(f"{address} is not a member of {list_address}")
            record = _check_member_changes(record, changes)
            self._db.execute(_UPDATE_MEMBER, (*_record_row(record), list_address, key))
        return record

    def update_members(self, list_address: str, changes: Any) -> dict[str, MemberRecord]:
        list_address = _lookup_key(list_address)
        keyed = _check_batch(changes)
        with (
            self._errors(f"changing members of {list_address}"),
            self._transaction(stale=_member_lists_changed(list_address, keyed.values())),
        ):
            self._require(list_address)
            updated: dict[str, MemberRecord] = {}
            rows = []
            for key, member_changes in keyed.items():
                record = self._member(list_address, key)
                if record is None:
                    continue  # removed meanwhile: nothing to change
                record = _check_member_changes(record, member_changes)
                updated[key] = record
                rows.append((*_record_row(record), list_address, key))
            self._db.executemany(_UPDATE_MEMBER, rows)
        return updated

    def add_pending(self, pending: Pending) -> None:
        pending = _check_pending(pending)
        with self._errors("storing a pending confirmation"), self._transaction(stale=()):
            self._require(pending.list_address)
            try:
                self._db.execute(
                    f"INSERT INTO pending ({_PENDING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        pending.token,
                        pending.list_address,
                        pending.address,
                        pending.action.value,
                        pending.created_at,
                        pending.expires_at,
                        pending.reference,
                    ),
                )
            except sqlite3.IntegrityError:
                raise RegistryError("that confirmation token is already in use") from None

    def _pending_row(self, token: str) -> Pending | None:
        row = self._db.execute(
            f"SELECT {_PENDING_COLUMNS} FROM pending WHERE token = ?", (token,)
        ).fetchone()
        return None if row is None else _pending_from_row(row)

    def consume_pending(self, list_address: str, token: str, now: float) -> Pending | None:
        list_address, token = _lookup_key(list_address), _check_token(token)
        # One write transaction: of two processes spending the same token,
        # exactly one gets it.
        with self._errors("spending a confirmation token"), self._transaction(stale=()):
            pending = self._pending_row(token)
            if pending is None or pending.list_address != list_address:
                return None
            self._db.execute("DELETE FROM pending WHERE token = ?", (token,))
        return pending if pending.expires_at > now else None

    def get_pending(self, token: str) -> Pending | None:
        token = _check_token(token)
        with self._errors("reading a pending confirmation"):
            return self._pending_row(token)

    def discard_pending(self, token: str) -> Pending | None:
        token = _check_token(token)
        with self._errors("discarding a pending confirmation"), self._transaction(stale=()):
            pending = self._pending_row(token)
            if pending is not None:
                self._db.execute("DELETE FROM pending WHERE token = ?", (token,))
        return pending

    def pending(self, list_address: str | None = None) -> tuple[Pending, ...]:
        query = f"SELECT {_PENDING_COLUMNS} FROM pending"
        params: tuple[str, ...] = ()
        if list_address is not None:
            list_address = _lookup_key(list_address)
            query += " WHERE list_address = ?"
            params = (list_address,)
        with self._reading("reading the pending confirmations", list_address):
            rows = self._db.execute(query + " ORDER BY created_at, token", params).fetchall()
        return tuple(_pending_from_row(row) for row in rows)

    def purge_pending(self, now: float) -> int:
        with self._errors("purging expired confirmations"), self._transaction(stale=()):
            return self._db.execute("DELETE FROM pending WHERE expires_at <= ?", (now,)).rowcount

    def claim_autoreply(self, list_address: str, address: str, day: str, limit: int) -> bool:
        list_address = _lookup_key(list_address)
        address, day, limit = _check_autoreply(address, day, limit)
        with self._errors("counting automatic replies"), self._transaction(stale=()):
            self._require(list_address)
            # Only today's counts matter; older ones go as soon as a day turns.
            self._db.execute("DELETE FROM autoreplies WHERE day <> ?", (day,))
            row = self._db.execute(
                "SELECT count FROM autoreplies WHERE list_address = ? AND address = ? AND day = ?",
                (list_address, address, day),
            ).fetchone()
            count = 0 if row is None else row[0]
            if limit and count >= limit:
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO autoreplies (list_address, address, day, count)"
                " VALUES (?, ?, ?, ?)",
                (list_address, address, day, count + 1),
            )
        return True

    def close(self) -> None:
        """Close the file (idempotent); :meth:`open` opens it again."""
        db, self._db = self._db, _NotOpen(self.path)
        db.close()

    def _exists(self, address: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM lists WHERE posting_address = ?", (address,)
        ).fetchone()
        return row is not None

    def _require(self, address: str) -> None:
        if not self._exists(address):
            raise RegistryError(f"no such list: {address}")
