"""Tests for :mod:`mailrelay.registry`: one contract, two stores, plus SQLite specifics."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from unittest.mock import patch

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailrelay.errors import RegistryError, RegistryUnavailable
from mailrelay.interfaces import IListRegistry
from mailrelay.model import Bounce, Destination, MailingList, Member
from mailrelay.registry import _MIGRATIONS, SCHEMA_VERSION, MemoryRegistry, SQLiteRegistry
from tests.support import temp_dir


class RegistryContractMixin:
    """Behaviour every IListRegistry must have; mixed into one TestCase per store."""

    def make_registry(self):
        raise NotImplementedError

    def setUp(self):
        self.registry = self.make_registry()
        self.addCleanup(self.registry.close)

    def test_provides_interface(self):
        """The store fully implements IListRegistry."""
        self.assertTrue(verifyObject(IListRegistry, self.registry))

    def test_create_and_get(self):
        """A created list is returned lower-cased, with owners in order and deduplicated."""
        created = self.registry.create_list(
            "Test@Example.COM",
            "Test list",
            ["Owner@example.org", "b@example.org", "owner@EXAMPLE.org"],
        )
        expected = MailingList(
            "test@example.com", "Test list", ("owner@example.org", "b@example.org")
        )
        self.assertEqual(created, expected)
        self.assertEqual(self.registry.get_list("TEST@example.com"), expected)
        self.assertIsNone(self.registry.get_list("other@example.com"))

    def test_create_duplicate(self):
        """Creating an existing list (in any case) fails, naming the address."""
        self.registry.create_list("test@example.com")
        e = self.assertRaises(RegistryError, self.registry.create_list, "TEST@example.com")
        self.assertIn("test@example.com already exists", str(e))

    def test_create_invalid(self):
        """Invalid list or owner addresses are refused by name, and nothing is created."""
        for address in ("not-an-address", "a@b@c", "te+st@example.com", "", "\u00e9t\u00e9@a.fr"):
            with self.subTest(address=address):
                e = self.assertRaises(RegistryError, self.registry.create_list, address)
                self.assertIn(repr(address), str(e))
        e = self.assertRaises(
            RegistryError, self.registry.create_list, "test@example.com", "", ["bad owner"]
        )
        self.assertIn("'bad owner'", str(e))
        self.assertEqual(self.registry.lists(), ())

    def test_lists_sorted(self):
        """lists() returns every list sorted by posting address."""
        for address in ("b@example.com", "a@example.org", "a@example.com"):
            self.registry.create_list(address)
        self.assertEqual(
            [m.posting_address for m in self.registry.lists()],
            ["a@example.com", "a@example.org", "b@example.com"],
        )

    def test_delete_list(self):
        """Deleting a list removes it and its members; re-creating it starts empty."""
        self.registry.create_list("test@example.com")
        self.registry.add_members("test@example.com", ["a@example.org"])
        self.registry.delete_list("TEST@example.com")
        self.assertIsNone(self.registry.get_list("test@example.com"))
        self.assertIsNone(self.registry.resolve("test@example.com"))
        self.registry.create_list("test@example.com")
        self.assertEqual(self.registry.members("test@example.com"), ())

    def test_delete_unknown(self):
        """Deleting a list that does not exist fails, naming it."""
        e = self.assertRaises(RegistryError, self.registry.delete_list, "nope@example.com")
        self.assertIn("nope@example.com", str(e))

    def test_add_members_reports_duplicates(self):
        """Existing members (any case) and repeats are returned; the rest are added."""
        self.registry.create_list("test@example.com")
        self.assertEqual(
            self.registry.add_members("test@example.com", [Member("a@example.org", "Anne")]), ()
        )
        duplicates = self.registry.add_members(
            "test@example.com",
            [
                Member("A@Example.org", "Other"),
                Member("b@example.org"),
                "c@example.org",
                "B@example.org",
            ],
        )
        self.assertEqual(duplicates, ("a@example.org", "b@example.org"))
        self.assertEqual(
            self.registry.members("test@example.com"),
            (Member("a@example.org", "Anne"), Member("b@example.org"), Member("c@example.org")),
        )

    def test_add_members_is_atomic(self):
        """One invalid address refuses the whole batch, naming the address."""
        self.registry.create_list("test@example.com")
        members = [f"m{i}@example.org" for i in range(100)] + ["bad address"]
        e = self.assertRaises(RegistryError, self.registry.add_members, "test@example.com", members)
        self.assertIn("'bad address'", str(e))
        self.assertEqual(self.registry.members("test@example.com"), ())

    def test_add_members_unknown_list(self):
        """Adding to a list that does not exist fails, naming it."""
        e = self.assertRaises(
            RegistryError, self.registry.add_members, "nope@example.com", ["a@example.org"]
        )
        self.assertIn("nope@example.com", str(e))

    def test_member_count(self):
        """member_count counts every member, delivery enabled or not; an unknown
        list is a RegistryError."""
        self.registry.create_list("test@example.com")
        self.assertEqual(self.registry.member_count("test@example.com"), 0)
        self.registry.add_members(
            "test@example.com", [Member("a@example.org", delivery_enabled=False), "b@example.org"]
        )
        self.assertEqual(self.registry.member_count("Test@Example.com"), 2)
        with self.assertRaises(RegistryError):
            self.registry.member_count("nolist@example.com")

    def test_members_sorted_and_filtered(self):
        """members() is sorted by address; enabled_only drops disabled deliveries."""
        self.registry.create_list("test@example.com")
        self.registry.add_members(
            "test@example.com",
            [
                Member("c@example.org"),
                Member("a@example.org", delivery_enabled=False),
                Member("b@example.org", "Bea"),
            ],
        )
        self.assertEqual(
            [m.address for m in self.registry.members("test@example.com")],
            ["a@example.org", "b@example.org", "c@example.org"],
        )
        self.assertEqual(
            self.registry.members("test@example.com", enabled_only=True),
            (Member("b@example.org", "Bea"), Member("c@example.org")),
        )
        self.assertRaises(RegistryError, self.registry.members, "nope@example.com")

    def test_remove_members(self):
        """remove_members returns the addresses that were not members."""
        self.registry.create_list("test@example.com")
        self.registry.add_members("test@example.com", ["a@example.org", "b@example.org"])
        missing = self.registry.remove_members(
            "test@example.com", ["A@example.org", "z@example.org"]
        )
        self.assertEqual(missing, ("z@example.org",))
        self.assertEqual(self.registry.members("test@example.com"), (Member("b@example.org"),))
        self.assertRaises(
            RegistryError, self.registry.remove_members, "nope@example.com", ["a@example.org"]
        )

    def test_bounces(self):
        """Bounces are kept per list, oldest first, with the address lower-cased
        and a bytes response decoded; they go when the list is deleted."""
        self.registry.create_list("test@example.com")
        self.registry.create_list("other@example.com")
        self.registry.record_bounce(
            "test@example.com", "Bart@Example.ORG", 550, b"5.1.1 No such user", 20.0
        )
        self.registry.record_bounces(
            [
                Bounce("test@example.com", "anne@example.org", 553, "5.1.3 Bad syntax", 10.0),
                Bounce("other@example.com", "cris@example.org", 550, "gone", 30.0),
            ]
        )
        self.assertEqual(
            self.registry.bounces("TEST@example.com"),
            (
                Bounce("test@example.com", "anne@example.org", 553, "5.1.3 Bad syntax", 10.0),
                Bounce("test@example.com", "bart@example.org", 550, "5.1.1 No such user", 20.0),
            ),
        )
        self.registry.delete_list("test@example.com")
        self.registry.create_list("test@example.com")
        self.assertEqual(self.registry.bounces("test@example.com"), ())
        self.assertEqual(len(self.registry.bounces("other@example.com")), 1)

    def test_bounces_errors(self):
        """Unknown lists, bad addresses and bad codes are refused, and a batch with
        one bad bounce records none."""
        self.registry.create_list("test@example.com")
        with self.assertRaises(RegistryError):
            self.registry.bounces("nope@example.com")
        with self.assertRaises(RegistryError):
            self.registry.record_bounce("nope@example.com", "a@example.org", 550, "x", 1.0)
        for bad in (
            Bounce("test@example.com", "not an address", 550, "x", 1.0),
            Bounce("test@example.com", "a@example.org", "550", "x", 1.0),
            Bounce("test@example.com", "a@example.org", 550, None, 1.0),
            ("test@example.com", "a@example.org", 550, "x", 1.0),
        ):
            with self.assertRaises(RegistryError, msg=bad):
                self.registry.record_bounces(
                    [Bounce("test@example.com", "ok@example.org", 550, "x", 1.0), bad]
                )
        self.assertEqual(self.registry.bounces("test@example.com"), ())

    def test_resolve(self):
        """resolve maps posting and sub-addresses, and list-name-wins applies."""
        self.registry.create_list("test@example.com")
        self.assertEqual(
            self.registry.resolve("Test-Bounces+x=y.org@example.com"),
            Destination("test@example.com", "bounces", "test-bounces+x=y.org@example.com"),
        )
        self.assertEqual(self.registry.resolve("test-join@example.com").subaddress, "join")
        self.registry.create_list("test-join@example.com")
        self.assertEqual(
            self.registry.resolve("test-join@example.com"),
            Destination("test-join@example.com", None, "test-join@example.com"),
        )
        self.assertIsNone(self.registry.resolve("test-admin@example.com"))
        self.assertIsNone(self.registry.resolve("notalist@example.com"))


class MemoryRegistryTests(RegistryContractMixin, SynchronousTestCase):
    """The contract, against MemoryRegistry."""

    def make_registry(self):
        return MemoryRegistry()


class SQLiteRegistryTests(RegistryContractMixin, SynchronousTestCase):
    """The contract, against SQLiteRegistry."""

    def make_registry(self):
        self.path = os.path.join(temp_dir(self), "lists", "registry.sqlite")
        return SQLiteRegistry(self.path)


class SQLiteRegistryStorageTests(SynchronousTestCase):
    """What only the SQLite store does: files, schema, sharing, errors, speed."""

    def setUp(self):
        self.path = os.path.join(temp_dir(self), "lists", "registry.sqlite")

    def open(self):
        registry = SQLiteRegistry(self.path)
        self.addCleanup(registry.close)
        return registry

    def test_creates_private_files(self):
        """The directory is created 0750 and the database 0640, with the current schema."""
        old_umask = os.umask(0o022)
        try:
            self.open()
        finally:
            os.umask(old_umask)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o750)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone(), (SCHEMA_VERSION,))
            tables = {
                name
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        self.assertEqual(tables, {"lists", "owners", "members", "bounces"})

    def test_persists(self):
        """Lists, owners and members survive closing and reopening the file."""
        registry = self.open()
        registry.create_list("test@example.com", "Test", ["owner@example.org"])
        registry.add_members("test@example.com", [Member("a@example.org", "Anne", False)])
        registry.close()
        again = self.open()
        self.assertEqual(
            again.get_list("test@example.com"),
            MailingList("test@example.com", "Test", ("owner@example.org",)),
        )
        self.assertEqual(
            again.members("test@example.com"), (Member("a@example.org", "Anne", False),)
        )

    def test_cached_reads_see_changes_from_another_connection(self):
        """get_list and members are cached, but a change committed through
        another connection (the admin CLI) is seen by the next read."""
        registry = self.open()
        registry.create_list("test@example.com", "Test", ["owner@example.org"])
        registry.add_members("test@example.com", ["a@example.org"])
        first = registry.members("test@example.com", enabled_only=True)
        self.assertIs(registry.members("test@example.com", enabled_only=True), first)
        self.assertIs(registry.get_list("test@example.com"), registry.get_list("test@example.com"))
        other = self.open()
        other.add_members("test@example.com", ["b@example.org"])
        other.create_list("new@example.com", "New")
        self.assertEqual(
            [m.address for m in registry.members("test@example.com", enabled_only=True)],
            ["a@example.org", "b@example.org"],
        )
        self.assertEqual(registry.get_list("new@example.com").display_name, "New")
        other.delete_list("new@example.com")
        self.assertIsNone(registry.get_list("new@example.com"))

    def test_large_member_lists_are_not_cached(self):
        """Member lists beyond the cache's budget are read afresh, not kept in memory."""
        registry = self.open()
        registry.create_list("big@example.com")
        registry.add_members("big@example.com", [f"m{i}@example.org" for i in range(20)])
        with patch("mailrelay.registry._CACHED_MEMBERS", 10):
            first = registry.members("big@example.com")
            again = registry.members("big@example.com")
        self.assertEqual(first, again)
        self.assertIsNot(first, again)

    def test_newer_schema_refused(self):
        """A file written by a newer schema is refused with a clear message, not misread."""
        self.open().close()
        with sqlite3.connect(self.path) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        e = self.assertRaises(RegistryError, SQLiteRegistry, self.path)
        self.assertIn("schema version", str(e))

    def test_upgrade_from_version_1(self):
        """A registry written before bounces existed is upgraded in place, keeping its lists."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with sqlite3.connect(self.path) as db:
            db.executescript(_MIGRATIONS[0])
            db.execute("PRAGMA user_version = 1")
            db.execute("INSERT INTO lists VALUES ('old@example.com', 'Old', 0)")
        registry = self.open()
        registry.record_bounce("old@example.com", "a@example.org", 550, "gone", 1.0)
        self.assertEqual(len(registry.bounces("old@example.com")), 1)
        self.assertEqual(registry.get_list("old@example.com").display_name, "Old")

    def test_sees_changes_from_another_connection(self):
        """resolve sees lists created and deleted through another connection (the CLI)."""
        server = self.open()
        cli = self.open()
        self.assertIsNone(server.resolve("new@example.com"))
        cli.create_list("new@example.com")
        self.assertEqual(server.resolve("new-request@example.com").list_address, "new@example.com")
        cli.delete_list("new@example.com")
        self.assertIsNone(server.resolve("new@example.com"))

    def test_sees_changes_from_raw_sql(self):
        """Changes committed by any SQLite client, not only mailrelay, reach resolve."""
        server = self.open()
        self.assertIsNone(server.resolve("raw@example.com"))
        with sqlite3.connect(self.path) as db:
            db.execute("INSERT INTO lists VALUES ('raw@example.com', '', 0)")
        self.assertIsNotNone(server.resolve("raw@example.com"))

    def test_resolve_answers_from_memory(self):
        """Without changes, resolve does not re-read the list table on each RCPT."""
        server = self.open()
        server.create_list("test@example.com")
        statements = []
        server._db.set_trace_callback(statements.append)
        for _ in range(100):
            server.resolve("test@example.com")
        reads = [s for s in statements if "FROM lists" in s]
        self.assertEqual(len(reads), 1)

    def test_resolve_error_is_temporary(self):
        """When SQLite fails, resolve raises RegistryUnavailable (451), never None (550)."""
        server = self.open()
        server.close()
        self.assertRaises(RegistryUnavailable, server.resolve, "test@example.com")

    def test_unopenable_is_unavailable(self):
        """A file that is not a database, or a path that cannot exist, names the path."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(b"this is not an SQLite database" * 100)
        e = self.assertRaises(RegistryUnavailable, SQLiteRegistry, self.path)
        self.assertIn(self.path, str(e))
        blocked = os.path.join(self.path, "sub", "registry.sqlite")
        e = self.assertRaises(RegistryUnavailable, SQLiteRegistry, blocked)
        self.assertIn(blocked, str(e))

    def test_hundred_thousand_members(self):
        """100,000 members are added in one call well under 2 s, and read back sorted."""
        registry = self.open()
        registry.create_list("big@example.com")
        addresses = [f"member{i:06d}@example.org" for i in range(100_000)]
        started = time.perf_counter()
        self.assertEqual(registry.add_members("big@example.com", reversed(addresses)), ())
        elapsed = time.perf_counter() - started
        self.assertLess(elapsed, 2.0)
        members = registry.members("big@example.com")
        self.assertEqual([m.address for m in members], addresses)
        # The second time every one of them is a duplicate and nothing changes.
        self.assertEqual(len(registry.add_members("big@example.com", addresses[:10])), 10)
