"""Tests for :mod:`mailrelay.registry`: one contract, two stores, plus SQLite specifics."""

from __future__ import annotations

import os
import sqlite3
import stat
from unittest.mock import patch

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailrelay.errors import RegistryError, RegistryUnavailable
from mailrelay.interfaces import IListProcessingStore, IListRegistry
from mailrelay.listproc.tokens import Pending, PendingAction
from mailrelay.listsettings import ListSettings, Posting
from mailrelay.model import (
    Bounce,
    Destination,
    DisabledReason,
    MailingList,
    Member,
    MemberRecord,
)
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


class SQLiteRegistryOpeningTests(SynchronousTestCase):
    """A registry made with ``open_now=False`` holds no connection until
    :meth:`~SQLiteRegistry.open`: a daemon opens it after twistd's fork."""

    def setUp(self):
        self.path = os.path.join(temp_dir(self), "lists", "registry.sqlite")

    def test_nothing_open_until_open(self):
        """Before open() no file is created and every method raises
        RegistryUnavailable saying the registry is not open; after it the
        registry works; close() makes it not open again."""
        registry = SQLiteRegistry(self.path, open_now=False)
        self.assertFalse(registry.is_open)
        self.assertFalse(os.path.exists(self.path))
        error = self.assertRaises(RegistryUnavailable, registry.lists)
        self.assertIn(f"list registry {self.path} is not open", str(error))
        self.assertRaises(RegistryUnavailable, registry.resolve, "test@example.com")
        registry.open()
        self.assertTrue(registry.is_open)
        registry.create_list("test@example.com")
        registry.close()
        self.assertFalse(registry.is_open)
        self.assertRaises(RegistryUnavailable, registry.lists)
        registry.close()  # closing again does nothing

    def test_closed_registry_opens_again(self):
        """A closed registry may be opened again and sees what was stored."""
        registry = SQLiteRegistry(self.path)
        registry.create_list("test@example.com")
        self.assertIsNotNone(registry.get_list("test@example.com"))
        registry.close()
        registry.open()
        self.addCleanup(registry.close)
        self.assertEqual([m.posting_address for m in registry.lists()], ["test@example.com"])


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
        self.assertEqual(
            tables,
            {"lists", "owners", "members", "bounces", "list_settings", "pending", "autoreplies"},
        )

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
        """100,000 members are added in one call and read back sorted (how fast is
        for bench/, not for a timed test on a shared machine)."""
        registry = self.open()
        registry.create_list("big@example.com")
        addresses = [f"member{i:06d}@example.org" for i in range(100_000)]
        self.assertEqual(registry.add_members("big@example.com", reversed(addresses)), ())
        members = registry.members("big@example.com")
        self.assertEqual([m.address for m in members], addresses)
        # The second time every one of them is a duplicate and nothing changes.
        self.assertEqual(len(registry.add_members("big@example.com", addresses[:10])), 10)


# -- list processing storage (IListProcessingStore) ---------------------------------

T0 = 1_700_000_000.0


def _pending(token="a" * 32, list_address="test@example.com", address="anne@example.org", **kw):
    values = dict(action=PendingAction.JOIN, created_at=T0, expires_at=T0 + 3 * 86400)
    values.update(kw)
    return Pending(token, list_address, address, **values)


class ListProcessingContractMixin:
    """Behaviour every IListProcessingStore must have; mixed into one TestCase per store."""

    def setUp(self):
        self.registry = self.make_registry()
        self.addCleanup(self.registry.close)
        self.registry.create_list("test@example.com")
        self.registry.create_list("other@example.com")

    def test_provides_interface(self):
        """The store fully implements IListProcessingStore."""
        self.assertTrue(verifyObject(IListProcessingStore, self.registry))

    def test_update_list_owners_and_display_name(self):
        """update_list replaces the owners (checked, each once, in order) and/or the display
        name; a field left None stays; a bad owner or an unknown list changes nothing."""
        mlist = self.registry.update_list(
            "test@example.com", owners=["Anne@Example.org", "bart@example.org", "anne@example.org"]
        )
        self.assertEqual(mlist.owners, ("anne@example.org", "bart@example.org"))
        self.assertEqual(self.registry.get_list("test@example.com"), mlist)
        renamed = self.registry.update_list("test@example.com", display_name="Test")
        self.assertEqual((renamed.display_name, renamed.owners), ("Test", mlist.owners))
        self.assertRaises(
            RegistryError, self.registry.update_list, "test@example.com", owners=["not an address"]
        )
        self.assertRaises(
            RegistryError, self.registry.update_list, "test@example.com", owners="a@b.c"
        )
        self.assertRaises(RegistryError, self.registry.update_list, "nolist@example.com", owners=[])
        self.assertEqual(self.registry.get_list("test@example.com"), renamed)
        self.assertEqual(self.registry.update_list("test@example.com", owners=[]).owners, ())

    def test_settings_default_and_update(self):
        """A list starts with the defaults; updates are parsed like the INI file, stored
        and read back; a bad key or value changes nothing and names the key."""
        self.assertEqual(self.registry.list_settings("TEST@example.com"), ListSettings())
        new = self.registry.update_list_settings(
            "test@example.com",
            {"posting": "Open", "pending_request_life": "1d", "max_autoresponses_per_day": "3"},
        )
        self.assertEqual(
            (new.posting, new.pending_request_life, new.max_autoresponses_per_day),
            (Posting.OPEN, 86400.0, 3),
        )
        self.assertEqual(self.registry.list_settings("test@example.com"), new)
        self.assertEqual(self.registry.list_settings("other@example.com"), ListSettings())
        e = self.assertRaises(
            RegistryError,
            self.registry.update_list_settings,
            "test@example.com",
            {"language": "de", "nonmember_action": "explode"},
        )
        self.assertIn("nonmember_action", str(e))
        e = self.assertRaises(
            RegistryError, self.registry.update_list_settings, "test@example.com", {"colour": "x"}
        )
        self.assertIn("unknown list setting 'colour'", str(e))
        self.assertEqual(self.registry.list_settings("test@example.com"), new)
        reset = self.registry.update_list_settings("test@example.com", {"posting": "members"})
        self.assertEqual(reset.posting, Posting.MEMBERS)
        self.assertRaises(RegistryError, self.registry.list_settings, "nolist@example.com")

    def test_member_flags(self):
        """New members have the default flags; update_member changes the named ones,
        checked, and members() and get_member() return them."""
        self.registry.add_members("test@example.com", ["Anne@example.org"])
        self.assertEqual(
            self.registry.get_member("test@example.com", "ANNE@example.org"),
            MemberRecord("anne@example.org"),
        )
        self.assertIsNone(self.registry.get_member("test@example.com", "bart@example.org"))
        changed = self.registry.update_member(
            "test@example.com",
            "anne@example.org",
            {
                "delivery_enabled": False,
                "disabled_reason": DisabledReason.BY_BOUNCES,
                "bounce_score": 5,
                "last_bounce_at": T0,
                "warnings_sent": 1,
                "last_warning_at": T0 + 1,
                "moderated": True,
            },
        )
        expected = MemberRecord(
            "anne@example.org", "", False, True, "by_bounces", 5.0, T0, T0 + 1, 1
        )
        self.assertEqual(changed, expected)
        self.assertEqual(self.registry.member_records("test@example.com"), (expected,))
        self.assertEqual(
            self.registry.members("test@example.com"), (Member("anne@example.org", "", False),)
        )
        self.assertEqual(self.registry.members("test@example.com", enabled_only=True), ())
        self.assertEqual(self.registry.get_member("test@example.com", "anne@example.org"), expected)
        for changes in (
            {"address": "x@example.org"},
            {"moderated": 1},
            {"bounce_score": -1},
            {"disabled_reason": "tired"},
            {"last_bounce_at": "yesterday"},
            {"warnings_sent": 1.5},
        ):
            with self.subTest(changes=changes):
                self.assertRaises(
                    RegistryError,
                    self.registry.update_member,
                    "test@example.com",
                    "anne@example.org",
                    changes,
                )
        self.assertEqual(self.registry.get_member("test@example.com", "anne@example.org"), expected)
        self.assertRaises(
            RegistryError,
            self.registry.update_member,
            "test@example.com",
            "bart@example.org",
            {"moderated": True},
        )

    def test_update_members_in_one_go(self):
        """update_members changes several members of one list, returns their new
        records keyed by lower-cased address, leaves out addresses that are not
        members, and changes nothing at all when any change is bad."""
        self.registry.add_members("test@example.com", ["a@example.org", "b@example.org"])
        self.registry.add_members("other@example.com", ["a@example.org"])
        updated = self.registry.update_members(
            "TEST@example.com",
            {
                "A@example.org": {"bounce_score": 1, "last_bounce_at": T0},
                "b@example.org": {"delivery_enabled": False, "disabled_reason": "by_bounces"},
                "gone@example.org": {"bounce_score": 1},
            },
        )
        self.assertEqual(sorted(updated), ["a@example.org", "b@example.org"])
        self.assertEqual(
            updated["a@example.org"],
            MemberRecord("a@example.org", "", True, bounce_score=1.0, last_bounce_at=T0),
        )
        self.assertEqual(
            self.registry.member_records("test@example.com"),
            (updated["a@example.org"], updated["b@example.org"]),
        )
        self.assertEqual(
            [m.address for m in self.registry.members("test@example.com", enabled_only=True)],
            ["a@example.org"],
        )
        # Another list's member of the same address is untouched.
        self.assertEqual(
            self.registry.get_member("other@example.com", "a@example.org"),
            MemberRecord("a@example.org"),
        )
        self.assertEqual(self.registry.update_members("test@example.com", {}), {})
        before = self.registry.member_records("test@example.com")
        for changes in (
            {"a@example.org": {"bounce_score": 5}, "b@example.org": {"bounce_score": -1}},
            {"a@example.org": {"bounce_score": 5}, "b@example.org": {"colour": "red"}},
            [("a@example.org", {"bounce_score": 5})],
        ):
            with self.subTest(changes=changes):
                self.assertRaises(
                    RegistryError, self.registry.update_members, "test@example.com", changes
                )
        self.assertEqual(self.registry.member_records("test@example.com"), before)
        self.assertRaises(
            RegistryError,
            self.registry.update_members,
            "nolist@example.com",
            {"a@example.org": {"bounce_score": 1}},
        )

    def test_flags_go_with_the_membership(self):
        """A member removed and added again starts with the default flags."""
        self.registry.add_members("test@example.com", ["a@example.org"])
        self.registry.update_member("test@example.com", "a@example.org", {"moderated": True})
        self.registry.remove_members("test@example.com", ["a@example.org"])
        self.registry.add_members("test@example.com", ["a@example.org"])
        self.assertFalse(self.registry.get_member("test@example.com", "a@example.org").moderated)

    def test_pending_consumed_once(self):
        """A pending confirmation is returned once by consume_pending, then gone."""
        pending = _pending()
        self.registry.add_pending(pending)
        self.assertEqual(self.registry.get_pending("A" * 32), pending)
        self.assertEqual(self.registry.pending(), (pending,))
        self.assertEqual(self.registry.consume_pending("test@example.com", "a" * 32, T0), pending)
        self.assertIsNone(self.registry.consume_pending("test@example.com", "a" * 32, T0))
        self.assertEqual(self.registry.pending(), ())

    def test_pending_bound_to_its_list(self):
        """A token spent through another list's address is not consumed there, and stays
        usable through its own list."""
        self.registry.add_pending(_pending())
        self.assertIsNone(self.registry.consume_pending("other@example.com", "a" * 32, T0))
        self.assertIsNotNone(self.registry.consume_pending("test@example.com", "a" * 32, T0))

    def test_pending_expired(self):
        """An expired token confirms nothing and is removed; purge_pending removes the
        others that expired."""
        self.registry.add_pending(_pending("a" * 32, expires_at=T0 + 10))
        self.registry.add_pending(_pending("b" * 32, expires_at=T0 + 10))
        self.registry.add_pending(_pending("c" * 32, expires_at=T0 + 100))
        self.assertIsNone(self.registry.consume_pending("test@example.com", "a" * 32, T0 + 10))
        self.assertIsNone(self.registry.get_pending("a" * 32))
        self.assertEqual(self.registry.purge_pending(T0 + 50), 1)
        self.assertEqual([p.token for p in self.registry.pending()], ["c" * 32])

    def test_pending_listing_discard_and_checks(self):
        """pending(list) lists one list's, oldest first; discard_pending removes one; a
        duplicate token, an unknown list and a bad token or address are refused."""
        self.registry.add_pending(_pending("b" * 32, created_at=T0 + 1))
        self.registry.add_pending(_pending("a" * 32, created_at=T0 + 2))
        self.registry.add_pending(
            _pending("c" * 32, "other@example.com", action=PendingAction.LEAVE, reference="x")
        )
        self.assertEqual(
            [p.token for p in self.registry.pending("test@example.com")], ["b" * 32, "a" * 32]
        )
        (other,) = self.registry.pending("other@example.com")
        self.assertEqual((other.action, other.reference), (PendingAction.LEAVE, "x"))
        self.assertEqual(self.registry.discard_pending("b" * 32).token, "b" * 32)
        self.assertIsNone(self.registry.discard_pending("b" * 32))
        for bad in (
            _pending("a" * 32),
            _pending("d" * 32, "nolist@example.com"),
            _pending("bad token"),
            _pending("e" * 32, address="not an address"),
        ):
            with self.subTest(pending=bad):
                self.assertRaises(RegistryError, self.registry.add_pending, bad)
        self.assertRaises(RegistryError, self.registry.pending, "nolist@example.com")

    def test_pending_go_with_their_list(self):
        """Deleting a list deletes its pending confirmations."""
        self.registry.add_pending(_pending())
        self.registry.delete_list("test@example.com")
        self.assertIsNone(self.registry.get_pending("a" * 32))

    def test_claim_autoreply_limit_per_address_list_and_day(self):
        """At most ``limit`` replies per address, list and day; a new day starts again;
        0 means no limit."""
        claim = self.registry.claim_autoreply
        self.assertEqual(
            [claim("test@example.com", "Anne@example.org", "2024-01-01", 2) for _ in range(3)],
            [True, True, False],
        )
        self.assertTrue(claim("test@example.com", "bart@example.org", "2024-01-01", 2))
        self.assertTrue(claim("other@example.com", "anne@example.org", "2024-01-01", 2))
        self.assertTrue(claim("test@example.com", "anne@example.org", "2024-01-02", 2))
        self.assertTrue(
            all(claim("test@example.com", "c@example.org", "2024-01-02", 0) for _ in range(20))
        )
        self.assertRaises(RegistryError, claim, "test@example.com", "a@example.org", "d", -1)
        self.assertRaises(RegistryError, claim, "nolist@example.com", "a@example.org", "d", 1)


class MemoryListProcessingTests(ListProcessingContractMixin, SynchronousTestCase):
    """The list processing contract, against MemoryRegistry."""

    def make_registry(self):
        return MemoryRegistry()


class SQLiteListProcessingTests(ListProcessingContractMixin, SynchronousTestCase):
    """The list processing contract, against SQLiteRegistry, plus sharing and upgrade."""

    def make_registry(self):
        self.path = os.path.join(temp_dir(self), "registry.sqlite")
        return SQLiteRegistry(self.path)

    def test_pending_seen_by_another_connection(self):
        """A confirmation stored by the daemon is listed and spent by the CLI's connection,
        and settings changed by the CLI are seen by the daemon's."""
        self.registry.add_pending(_pending())
        cli = SQLiteRegistry(self.path)
        self.addCleanup(cli.close)
        self.assertEqual(len(cli.pending()), 1)
        self.assertIsNotNone(cli.consume_pending("test@example.com", "a" * 32, T0))
        self.assertIsNone(self.registry.consume_pending("test@example.com", "a" * 32, T0))
        self.assertEqual(self.registry.list_settings("test@example.com").language, "en")
        cli.update_list_settings("test@example.com", {"language": "de"})
        self.assertEqual(self.registry.list_settings("test@example.com").language, "de")
        cli.update_list("test@example.com", owners=["owner@example.org"])
        self.assertEqual(self.registry.get_list("test@example.com").owners, ("owner@example.org",))

    def test_own_writes_keep_unrelated_cache(self):
        """The registry's own writes drop only the cached reads they change:
        scoring a member keeps the list, its settings and its member lists;
        disabling one drops that list's member lists only; a settings change
        drops the settings only (a kept read is the very object read before)."""
        registry = self.registry
        registry.add_members("test@example.com", ["a@example.org", "b@example.org"])
        registry.add_members("other@example.com", ["a@example.org"])
        mlist = registry.get_list("test@example.com")
        settings = registry.list_settings("test@example.com")
        enabled = registry.members("test@example.com", enabled_only=True)
        others = registry.members("other@example.com")
        registry.update_members("test@example.com", {"a@example.org": {"bounce_score": 1}})
        registry.update_member("test@example.com", "b@example.org", {"last_bounce_at": T0})
        registry.record_bounce("test@example.com", "a@example.org", 550, "no", T0)
        self.assertIs(registry.get_list("test@example.com"), mlist)
        self.assertIs(registry.list_settings("test@example.com"), settings)
        self.assertIs(registry.members("test@example.com", enabled_only=True), enabled)
        registry.update_members("test@example.com", {"a@example.org": {"delivery_enabled": False}})
        self.assertEqual(
            [m.address for m in registry.members("test@example.com", enabled_only=True)],
            ["b@example.org"],
        )
        self.assertIs(registry.members("other@example.com"), others)
        self.assertIs(registry.list_settings("test@example.com"), settings)
        registry.update_member("test@example.com", "b@example.org", {"display_name": "Bart"})
        self.assertEqual(registry.members("test@example.com")[1].display_name, "Bart")
        new = registry.update_list_settings("test@example.com", {"language": "de"})
        self.assertEqual(registry.list_settings("test@example.com"), new)
        self.assertIs(registry.get_list("test@example.com"), mlist)
        renamed = registry.update_list("test@example.com", display_name="Renamed")
        self.assertEqual(registry.get_list("test@example.com"), renamed)
        self.assertIs(registry.members("other@example.com"), others)

    def test_own_writes_then_another_connection(self):
        """After an own write that keeps the cache, a change committed by another
        connection is still seen by the next read."""
        self.registry.add_members("test@example.com", ["a@example.org"])
        self.registry.list_settings("test@example.com")
        self.registry.members("test@example.com")
        cli = SQLiteRegistry(self.path)
        self.addCleanup(cli.close)
        cli.update_list_settings("test@example.com", {"language": "de"})
        cli.add_members("test@example.com", ["b@example.org"])
        self.registry.update_members("test@example.com", {"a@example.org": {"bounce_score": 1}})
        self.assertEqual(self.registry.list_settings("test@example.com").language, "de")
        self.assertEqual(len(self.registry.members("test@example.com")), 2)

    def test_upgrade_from_version_2_keeps_members(self):
        """A version 2 registry is upgraded in place: members keep their delivery flag
        and get the default list-processing flags."""
        self.registry.close()
        os.remove(self.path)
        with sqlite3.connect(self.path) as db:
            db.executescript(_MIGRATIONS[0])
            db.executescript(_MIGRATIONS[1])
            db.execute("PRAGMA user_version = 2")
            db.execute("INSERT INTO lists VALUES ('old@example.com', 'Old', 0)")
            db.execute(
                "INSERT INTO members (list_address, address, display_name, delivery_enabled)"
                " VALUES ('old@example.com', 'a@example.org', 'A', 0)"
            )
        self.registry = SQLiteRegistry(self.path)
        self.assertEqual(
            self.registry.members("old@example.com"), (Member("a@example.org", "A", False),)
        )
        self.assertEqual(self.registry.list_settings("old@example.com"), ListSettings())
