"""Mailing lists and their members: an SQLite store and an in-memory one.

Both implement :class:`mailrelay.interfaces.IListRegistry`.  ``resolve`` runs
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
from mailrelay.interfaces import IListRegistry
from mailrelay.model import Bounce, Destination, MailingList, Member

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
)
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


@implementer(IListRegistry)
class MemoryRegistry(_BounceRecorder):
    """An :class:`IListRegistry` held in memory, for tests and embedders."""

    def __init__(self) -> None:
        self._lists: dict[str, MailingList] = {}
        self._members: dict[str, dict[str, Member]] = {}
        self._bounces: dict[str, list[Bounce]] = {}

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

    def close(self) -> None:
        pass

    def _require(self, list_address: str) -> dict[str, Member]:
        try:
            return self._members[list_address]
        except KeyError:
            raise RegistryError(f"no such list: {list_address}") from None


@implementer(IListRegistry)
class SQLiteRegistry(_BounceRecorder):
    """An :class:`IListRegistry` stored in an SQLite file shared with the admin CLI.

    The file, its directory and the schema are created on first use.  Every
    method is synchronous and runs in the caller's thread.  SQLite errors are
    raised as :class:`RegistryUnavailable` (a temporary condition).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        try:
            if self.path != ":memory:":
                create_private_file(self.path)
            # Autocommit mode: transactions are explicit (see _transaction).
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise RegistryUnavailable(f"cannot open list registry {self.path}: {e}") from e
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            # WAL: the LMTP server's reads never wait for a CLI write.
            self._db.execute("PRAGMA journal_mode = WAL")
            self._migrate()
        except sqlite3.Error as e:
            self._db.close()
            raise RegistryUnavailable(f"cannot open list registry {self.path}: {e}") from e
        except RegistryError:
            self._db.close()
            raise
        self._data_version: int | None = None
        self._posting_addresses: frozenset[str] = frozenset()
        # Lists and member lists read since the registry last changed (in any
        # process): the runner asks for the same list for every post.
        self._cache: dict[tuple[str, str], Any] = {}
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
    def _transaction(self) -> Iterator[None]:
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
        # Our own commits do not change our connection's data_version.
        self._data_version = None

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
        with self._errors("recording bounces"), self._transaction():
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

    def close(self) -> None:
        self._db.close()

    def _exists(self, address: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM lists WHERE posting_address = ?", (address,)
        ).fetchone()
        return row is not None

    def _require(self, address: str) -> None:
        if not self._exists(address):
            raise RegistryError(f"no such list: {address}")
