"""Tests for :mod:`mailrelay.spool`: one contract, two spools, plus SQLite durability."""

from __future__ import annotations

import os
import selectors
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

from twisted.internet import reactor, task
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import mailrelay
from mailrelay.errors import SpoolError
from mailrelay.interfaces import ISpool
from mailrelay.model import Destination, EntryKind, EntryState, Envelope, Outgoing, Route
from mailrelay.spool import (
    SCHEMA_VERSION,
    EntryUpdate,
    MemorySpool,
    SQLiteSpool,
)
from mailrelay.spool.schema import CLAIM_QUEUED, CLAIM_RETRY, MIGRATIONS
from tests.support import temp_dir

LIST = "test@example.com"
POST = Destination(LIST, None, "test@example.com")
JOIN = Destination("test@example.com", "join", "test-join+x@example.com")


def _envelope(*destinations: Destination, message_id: str = "<1@example.org>") -> Envelope:
    return Envelope(
        sender="anne@example.org",
        destinations=destinations or (POST,),
        received_at=1000.0,
        peer="127.0.0.1",
        message_id=message_id,
    )


class SpoolContractMixin:
    """Behaviour every ISpool must have; mixed into one TestCase per spool."""

    def make_spool(self):
        """A fresh, empty spool; closed by a cleanup."""
        raise NotImplementedError

    def setUp(self):
        self.spool = self.make_spool()

    async def enqueue_one(self, *destinations, message=b"Subject: hi\r\n\r\nbody\r\n"):
        return await self.spool.enqueue(_envelope(*destinations), message)

    def test_provides_interface(self):
        """The spool fully implements ISpool."""
        self.assertTrue(verifyObject(ISpool, self.spool))

    async def test_enqueue(self):
        """One QUEUED entry per destination, in order, sharing one stored message."""
        ids = await self.enqueue_one(POST, JOIN, POST, message=b"the message")
        self.assertEqual(len(ids), 3)
        self.assertEqual(ids, sorted(ids))
        entries = self.spool.entries()
        self.assertEqual([e.entry_id for e in entries], ids)
        self.assertEqual([e.destination for e in entries], [POST, JOIN, POST])
        self.assertEqual({e.message_key for e in entries}, {entries[0].message_key})
        first = entries[0]
        self.assertEqual(
            (
                first.state,
                first.sender,
                first.received_at,
                first.message_id,
                first.attempts,
                first.first_attempt_at,
                first.next_attempt_at,
                first.last_error,
            ),
            (EntryState.QUEUED, "anne@example.org", 1000.0, "<1@example.org>", 0, None, None, ""),
        )
        self.assertEqual(self.spool.get_message(first.message_key), b"the message")

    async def test_enqueue_null_sender(self):
        """The null reverse-path is stored as the empty string."""
        envelope = Envelope("", (POST,), 5.0)
        await self.spool.enqueue(envelope, b"x")
        self.assertEqual(self.spool.entries()[0].sender, "")

    async def test_enqueue_bad_input(self):
        """Bad envelopes and messages fail the Deferred with a specific error; nothing is stored."""
        with self.assertRaises(ValueError):
            await self.spool.enqueue(Envelope("a@example.org", (), 0.0), b"x")
        with self.assertRaises(TypeError):
            await self.spool.enqueue(_envelope(), "not bytes")
        with self.assertRaises(TypeError):
            await self.spool.enqueue(("a@example.org", [POST]), b"x")
        self.assertEqual(self.spool.entries(), [])

    def test_get_message_unknown(self):
        """An unknown message key raises KeyError."""
        self.assertRaises(KeyError, self.spool.get_message, 12345)

    async def test_claim_due(self):
        """QUEUED and due RETRY entries go INFLIGHT, oldest first, up to the limit."""
        ids = await self.enqueue_one(POST, POST, POST, POST)
        await self.spool.update(
            [
                EntryUpdate(ids[0], EntryState.RETRY, next_attempt_at=50.0),
                EntryUpdate(ids[1], EntryState.RETRY, next_attempt_at=10.0),
            ]
        )
        claimed = await self.spool.claim_due(now=20.0, limit=10)
        self.assertEqual([e.entry_id for e in claimed], ids[1:])
        self.assertEqual({e.state for e in claimed}, {EntryState.INFLIGHT})
        self.assertEqual(await self.spool.claim_due(now=20.0, limit=10), [])
        self.assertEqual(self.spool.counts()[EntryState.INFLIGHT], 3)
        self.assertEqual([e.entry_id for e in await self.spool.claim_due(50.0, 10)], ids[:1])

    async def test_claim_due_limit(self):
        """claim_due never claims more than ``limit``, and the rest stay QUEUED."""
        ids = await self.enqueue_one(POST, POST, POST)
        self.assertEqual([e.entry_id for e in await self.spool.claim_due(0.0, 2)], ids[:2])
        self.assertEqual(await self.spool.claim_due(0.0, 0), [])
        self.assertEqual([e.entry_id for e in self.spool.entries(EntryState.QUEUED)], ids[2:])
        with self.assertRaises(ValueError):
            await self.spool.claim_due(0.0, -1)

    async def test_update_attempts(self):
        """count_attempt counts attempts and sets first_attempt_at once; errors are kept."""
        (entry_id,) = await self.enqueue_one()
        changed = await self.spool.update(
            [EntryUpdate(entry_id, EntryState.RETRY, 100.0, "451 try later", True)]
        )
        self.assertEqual(changed, 1)
        (entry,) = self.spool.entries()
        self.assertEqual(
            (entry.state, entry.attempts, entry.next_attempt_at, entry.last_error),
            (EntryState.RETRY, 1, 100.0, "451 try later"),
        )
        first = entry.first_attempt_at
        self.assertIsNotNone(first)
        await self.spool.update([EntryUpdate(entry_id, EntryState.DONE, count_attempt=True)])
        (entry,) = self.spool.entries()
        self.assertEqual(
            (
                entry.state,
                entry.attempts,
                entry.first_attempt_at,
                entry.next_attempt_at,
                entry.last_error,
            ),
            (EntryState.DONE, 2, first, None, "451 try later"),
        )

    async def test_update_mixed_batch(self):
        """Each entry of a batch gets its own transition, however many share one
        (more than one statement's worth here), and an entry listed twice ends
        as its last update says."""
        ids = await self.enqueue_one(*[POST] * 1203)
        updates = [EntryUpdate(i, EntryState.DONE, count_attempt=True) for i in ids[:1200]]
        updates += [
            EntryUpdate(ids[1200], EntryState.RETRY, 50.0, "451 later", True),
            EntryUpdate(ids[1201], EntryState.FAILED, error="550 gone", count_attempt=True),
            EntryUpdate(ids[1202], EntryState.RETRY, 60.0, "451 later", True),
            EntryUpdate(ids[1202], EntryState.DONE, count_attempt=True),
        ]
        self.assertEqual(await self.spool.update(updates), 1203 + 1)
        by_id = {e.entry_id: e for e in self.spool.entries()}
        self.assertEqual(
            {(by_id[i].state, by_id[i].attempts) for i in ids[:1200]}, {(EntryState.DONE, 1)}
        )
        self.assertEqual(
            [
                (by_id[i].state, by_id[i].next_attempt_at, by_id[i].last_error, by_id[i].attempts)
                for i in ids[1200:]
            ],
            [
                (EntryState.RETRY, 50.0, "451 later", 1),
                (EntryState.FAILED, None, "550 gone", 1),
                (EntryState.DONE, None, "451 later", 2),
            ],
        )

    async def test_claim_many(self):
        """A claim of more entries than one statement's worth takes them all, in order."""
        ids = await self.enqueue_one(*[POST] * 1100)
        claimed = await self.spool.claim_due(0.0, 1050)
        self.assertEqual([e.entry_id for e in claimed], ids[:1050])
        self.assertEqual(self.spool.counts()[EntryState.INFLIGHT], 1050)
        self.assertEqual(self.spool.counts()[EntryState.QUEUED], 50)

    async def test_update_unknown_entries_skipped(self):
        """Updates for entries that no longer exist are skipped, not fatal to the batch."""
        (entry_id,) = await self.enqueue_one()
        changed = await self.spool.update(
            [EntryUpdate(entry_id + 1000, EntryState.DONE), EntryUpdate(entry_id, EntryState.DONE)]
        )
        self.assertEqual(changed, 1)
        self.assertEqual(self.spool.entries()[0].state, EntryState.DONE)

    async def test_update_bad_input(self):
        """update refuses things that are not EntryUpdates."""
        with self.assertRaises(TypeError):
            await self.spool.update([(1, "done")])

    async def test_recover(self):
        """recover returns every INFLIGHT entry to QUEUED and counts them."""
        await self.enqueue_one(POST, POST, POST)
        await self.spool.claim_due(0.0, 2)
        self.assertEqual(await self.spool.recover(), 2)
        self.assertEqual(self.spool.counts()[EntryState.QUEUED], 3)
        self.assertEqual(await self.spool.recover(), 0)

    async def test_recover_stale_claims(self):
        """recover(claimed_before, keep) returns only the INFLIGHT entries claimed
        before that time and not kept (a claim that outlived its lease)."""
        await self.enqueue_one(POST, POST, POST)
        first, second = await self.spool.claim_due(0.0, 2)
        self.assertEqual(await self.spool.recover(claimed_before=-1.0), 0)
        moved = await self.spool.recover(claimed_before=float("inf"), keep=[first.entry_id])
        self.assertEqual(moved, 1)
        states = {e.entry_id: e.state for e in self.spool.entries()}
        self.assertEqual(states[first.entry_id], EntryState.INFLIGHT)
        self.assertEqual(states[second.entry_id], EntryState.QUEUED)
        with self.assertRaises(TypeError):
            await self.spool.recover(claimed_before="soon")

    async def test_counts_and_next_due(self):
        """counts covers every state; next_due is the earliest RETRY time."""
        self.assertEqual(self.spool.counts(), dict.fromkeys(EntryState, 0))
        self.assertIsNone(self.spool.next_due())
        ids = await self.enqueue_one(POST, POST, POST, POST)
        await self.spool.update(
            [
                EntryUpdate(ids[0], EntryState.RETRY, 300.0),
                EntryUpdate(ids[1], EntryState.RETRY, 200.0),
                EntryUpdate(ids[2], EntryState.FAILED, error="550 no such user"),
            ]
        )
        counts = self.spool.counts()
        self.assertEqual(counts[EntryState.RETRY], 2)
        self.assertEqual(counts[EntryState.FAILED], 1)
        self.assertEqual(counts[EntryState.QUEUED], 1)
        self.assertEqual(counts[EntryState.HELD], 0)
        self.assertEqual(self.spool.next_due(), 200.0)

    async def test_entries_filter_and_limit(self):
        """entries() filters by state and limits, in id order; a bad state is refused."""
        ids = await self.enqueue_one(POST, POST, POST)
        await self.spool.update([EntryUpdate(ids[1], EntryState.HELD)])
        self.assertEqual([e.entry_id for e in self.spool.entries(EntryState.HELD)], [ids[1]])
        self.assertEqual([e.entry_id for e in self.spool.entries("queued")], [ids[0], ids[2]])
        self.assertEqual([e.entry_id for e in self.spool.entries(limit=2)], ids[:2])
        self.assertRaises(ValueError, self.spool.entries, "bogus")
        self.assertRaises(ValueError, self.spool.entries, None, -1)

    async def test_retry_now(self):
        """retry_now requeues RETRY and FAILED entries (all, or those named), keeping history."""
        ids = await self.enqueue_one(POST, POST, POST, POST)
        await self.spool.update(
            [
                EntryUpdate(ids[0], EntryState.RETRY, 300.0, "451 later", True),
                EntryUpdate(ids[1], EntryState.FAILED, error="550 gone"),
                EntryUpdate(ids[2], EntryState.DONE),
            ]
        )
        self.assertEqual(await self.spool.retry_now([ids[1], ids[2], ids[3]]), 1)
        self.assertEqual(await self.spool.retry_now(), 1)
        entries = self.spool.entries()
        self.assertEqual(
            [e.state for e in entries],
            [EntryState.QUEUED, EntryState.QUEUED, EntryState.DONE, EntryState.QUEUED],
        )
        self.assertEqual(
            (entries[0].attempts, entries[0].last_error, entries[0].next_attempt_at),
            (1, "451 later", None),
        )
        self.assertIsNone(self.spool.next_due())

    async def test_retry_now_gives_dead_letters_a_fresh_period(self):
        """A FAILED entry an operator retries starts a new retry period; a RETRY entry keeps its own."""
        ids = await self.enqueue_one(POST, POST)
        await self.spool.update(
            [
                EntryUpdate(ids[0], EntryState.RETRY, 300.0, "451 later", True),
                EntryUpdate(ids[1], EntryState.FAILED, error="gave up", count_attempt=True),
            ]
        )
        await self.spool.retry_now()
        retry, failed = self.spool.entries()
        self.assertEqual(retry.attempts, 1)
        self.assertIsNotNone(retry.first_attempt_at)
        self.assertEqual(
            (failed.attempts, failed.first_attempt_at, failed.last_error), (0, None, "gave up")
        )

    async def test_delete_drops_message_with_last_entry(self):
        """A message is kept while any of its entries is, and removed with the last one."""
        ids = await self.enqueue_one(POST, JOIN)
        key = self.spool.entries()[0].message_key
        self.assertEqual(await self.spool.delete([ids[0], 999999]), 1)
        self.assertEqual(self.spool.get_message(key), b"Subject: hi\r\n\r\nbody\r\n")
        self.assertEqual(await self.spool.delete([ids[1]]), 1)
        self.assertRaises(KeyError, self.spool.get_message, key)
        self.assertEqual(self.spool.entries(), [])
        with self.assertRaises(TypeError):
            await self.spool.delete(5)

    async def test_ids_never_reused(self):
        """Deleting the newest entry does not let a later entry take its id."""
        (first,) = await self.enqueue_one()
        await self.spool.delete([first])
        (second,) = await self.enqueue_one()
        self.assertGreater(second, first)

    async def test_expand(self):
        """expand replaces an INBOUND entry by QUEUED MEMBER entries (one per distinct
        recipient, same message and list) and makes it DONE, atomically."""
        (post_id,) = await self.enqueue_one(POST)
        await self.spool.claim_due(0.0, 10)
        ids = await self.spool.expand(
            post_id, ["a@example.org", "b@example.org", "a@example.org"], EntryKind.MEMBER
        )
        self.assertEqual(len(ids), 2)
        entries = {e.entry_id: e for e in self.spool.entries()}
        post = entries.pop(post_id)
        self.assertEqual((post.state, post.kind), (EntryState.DONE, EntryKind.INBOUND))
        self.assertEqual(sorted(entries), ids)
        self.assertEqual(
            [e.destination for e in entries.values()],
            [
                Destination("test@example.com", None, "a@example.org"),
                Destination("test@example.com", None, "b@example.org"),
            ],
        )
        for entry in entries.values():
            self.assertEqual(
                (entry.state, entry.kind, entry.attempts), (EntryState.QUEUED, EntryKind.MEMBER, 0)
            )
            self.assertEqual(entry.message_key, post.message_key)
            self.assertEqual(entry.message_id, "<1@example.org>")
        self.assertEqual([e.entry_id for e in await self.spool.claim_due(0.0, 10)], ids)

    async def test_expand_owner_copies(self):
        """OWNER copies keep the owner sub-address; an empty recipient list just
        makes the original DONE."""
        owner = Destination("test@example.com", "owner", "test-owner@example.com")
        first, second = await self.enqueue_one(owner, owner)
        (new_id,) = await self.spool.expand(first, ["boss@example.org"], EntryKind.OWNER)
        copy = [e for e in self.spool.entries() if e.entry_id == new_id][0]
        self.assertEqual(
            (copy.kind, copy.destination),
            (EntryKind.OWNER, Destination("test@example.com", "owner", "boss@example.org")),
        )
        self.assertEqual(await self.spool.expand(second, []), [])
        self.assertEqual(self.spool.counts()[EntryState.DONE], 2)

    async def test_store_routes(self):
        """store routes each destination's entry in the same transaction: left
        QUEUED, expanded into copies (one per distinct address, the original
        DONE), or stored HELD/FAILED with its reason."""
        owner = Destination("test@example.com", "owner", "test-owner@example.com")
        routes = [
            Route(EntryState.DONE, EntryKind.MEMBER, ("a@example.org", "b@example.org", "a@x")),
            Route(EntryState.HELD),
            Route(EntryState.DONE, EntryKind.OWNER, ("boss@example.org",)),
            Route(EntryState.FAILED, error="the list has no owners"),
            Route(),
            Route(EntryState.DONE, EntryKind.MEMBER, ("a@example.org", "a@example.org")),
        ]
        stored = await self.spool.store(
            _envelope(POST, JOIN, owner, owner, POST, POST), b"the message", routes
        )
        self.assertEqual(stored.claimed, ())
        entries = {e.entry_id: e for e in self.spool.entries()}
        originals = [entries.pop(entry_id) for entry_id in stored.entry_ids]
        self.assertEqual(
            [(e.state, e.kind, e.destination, e.last_error) for e in originals],
            [
                (EntryState.DONE, EntryKind.INBOUND, POST, ""),
                (EntryState.HELD, EntryKind.INBOUND, JOIN, ""),
                (EntryState.DONE, EntryKind.INBOUND, owner, ""),
                (EntryState.FAILED, EntryKind.INBOUND, owner, "the list has no owners"),
                (EntryState.QUEUED, EntryKind.INBOUND, POST, ""),
                (EntryState.DONE, EntryKind.INBOUND, POST, ""),
            ],
        )
        self.assertEqual(
            [(e.state, e.kind, e.destination) for e in entries.values()],
            [
                (EntryState.QUEUED, EntryKind.MEMBER, Destination(LIST, None, "a@example.org")),
                (EntryState.QUEUED, EntryKind.MEMBER, Destination(LIST, None, "b@example.org")),
                (EntryState.QUEUED, EntryKind.MEMBER, Destination(LIST, None, "a@x")),
                (
                    EntryState.QUEUED,
                    EntryKind.OWNER,
                    Destination(LIST, "owner", "boss@example.org"),
                ),
                (EntryState.QUEUED, EntryKind.MEMBER, Destination(LIST, None, "a@example.org")),
            ],
        )
        self.assertEqual({e.message_key for e in self.spool.entries()}, {originals[0].message_key})
        self.assertEqual(self.spool.get_message(originals[0].message_key), b"the message")

    async def test_store_claim(self):
        """With claim, what would be QUEUED is stored INFLIGHT and handed back,
        exactly as the spool holds it; recover makes it QUEUED again."""
        routes = [Route(EntryState.DONE, EntryKind.MEMBER, ("a@example.org", "b@example.org"))]
        routes += [Route(EntryState.HELD), Route()]
        stored = await self.spool.store(_envelope(POST, JOIN, POST), b"m", routes, claim=True)
        by_id = {e.entry_id: e for e in self.spool.entries()}
        self.assertEqual(len(stored.claimed), 3)
        for entry in stored.claimed:
            self.assertEqual(entry, by_id[entry.entry_id])
            self.assertEqual(entry.state, EntryState.INFLIGHT)
        self.assertEqual(
            [(e.kind, e.destination.address) for e in stored.claimed],
            [
                (EntryKind.MEMBER, "a@example.org"),
                (EntryKind.MEMBER, "b@example.org"),
                (EntryKind.INBOUND, "test@example.com"),
            ],
        )
        self.assertEqual(stored.claimed[2].entry_id, stored.entry_ids[2])
        self.assertEqual(await self.spool.claim_due(0.0, 10), [])
        self.assertEqual(await self.spool.recover(), 3)
        self.assertEqual(len(await self.spool.claim_due(0.0, 10)), 3)

    async def test_enqueue_is_store_without_routes(self):
        """enqueue fires with the ids of QUEUED entries, as store without routes does."""
        ids = await self.enqueue_one(POST, JOIN)
        stored = await self.spool.store(_envelope(POST, JOIN), b"m")
        self.assertEqual(len(stored.entry_ids), 2)
        self.assertEqual(stored.claimed, ())
        self.assertEqual(self.spool.counts()[EntryState.QUEUED], 4)
        self.assertEqual(ids, sorted(ids))

    async def test_store_bad_routes(self):
        """A wrong number of routes, something else than a Route or a claim that is
        not a bool fail the Deferred with a specific error; nothing is stored."""
        with self.assertRaises(ValueError):
            await self.spool.store(_envelope(POST, POST), b"m", [Route()])
        with self.assertRaises(TypeError):
            await self.spool.store(_envelope(POST), b"m", ["queued"])
        with self.assertRaises(TypeError):
            await self.spool.store(_envelope(POST), b"m", [Route()], claim="yes")
        with self.assertRaises(TypeError):
            routes = [Route(EntryState.DONE, EntryKind.MEMBER, ("",))]
            await self.spool.store(_envelope(POST), b"m", routes)
        self.assertEqual(self.spool.entries(), [])

    async def test_expand_only_once(self):
        """A DONE or deleted entry expands to nothing; a MEMBER entry is never expanded."""
        (post_id,) = await self.enqueue_one()
        (member_id,) = await self.spool.expand(post_id, ["a@example.org"])
        self.assertEqual(await self.spool.expand(post_id, ["b@example.org"]), [])
        self.assertEqual(await self.spool.expand(999999, ["b@example.org"]), [])
        with self.assertRaises(ValueError):
            await self.spool.expand(member_id, ["b@example.org"])
        self.assertEqual(len(self.spool.entries()), 2)

    async def test_expand_bad_input(self):
        """Recipients must be an iterable of strings, and the kind MEMBER or OWNER."""
        (post_id,) = await self.enqueue_one()
        with self.assertRaises(TypeError):
            await self.spool.expand(post_id, "a@example.org")
        with self.assertRaises(TypeError):
            await self.spool.expand(post_id, [None])
        with self.assertRaises(ValueError):
            await self.spool.expand(post_id, ["a@example.org"], EntryKind.INBOUND)
        with self.assertRaises(ValueError):
            await self.spool.expand(post_id, ["a@example.org"], "bogus")
        self.assertEqual(self.spool.entries()[0].state, EntryState.QUEUED)

    async def test_purge(self):
        """purge deletes DONE entries changed before the given time, and a message
        with its last entry; entries in other states, or changed later, stay."""
        post, join = await self.enqueue_one(POST, JOIN)
        (other,) = await self.enqueue_one(POST)
        await self.spool.update(
            [
                EntryUpdate(post, EntryState.DONE),
                EntryUpdate(join, EntryState.HELD),
                EntryUpdate(other, EntryState.DONE),
            ]
        )
        key, _, other_key = (e.message_key for e in self.spool.entries())
        self.assertEqual(await self.spool.purge(0.0), 0)  # all changed after time 0
        self.assertEqual(await self.spool.purge(4e9), 2)
        self.assertEqual([e.entry_id for e in self.spool.entries()], [join])
        self.spool.get_message(key)  # the held -join entry still needs it
        self.assertRaises(KeyError, self.spool.get_message, other_key)
        with self.assertRaises(TypeError):
            await self.spool.purge("yesterday")

    async def test_status(self):
        """Status texts are stored, replaced and removed by key."""
        self.assertIsNone(self.spool.get_status("circuit"))
        await self.spool.set_status("circuit", "paused: 535 bad password")
        await self.spool.set_status("other", "x")
        self.assertEqual(self.spool.get_status("circuit"), "paused: 535 bad password")
        await self.spool.set_status("circuit", "paused again")
        self.assertEqual(self.spool.get_status("circuit"), "paused again")
        await self.spool.set_status("circuit", None)
        self.assertIsNone(self.spool.get_status("circuit"))
        self.assertEqual(self.spool.get_status("other"), "x")
        with self.assertRaises(TypeError):
            await self.spool.set_status("", "x")
        with self.assertRaises(TypeError):
            await self.spool.set_status("circuit", 5)

    async def test_closed_refuses_writes(self):
        """After close, writes fail with SpoolError."""
        await self.spool.close()
        with self.assertRaises(SpoolError):
            await self.enqueue_one()


class RouteTests(SynchronousTestCase):
    def test_invalid_routes(self):
        """A Route stores an entry QUEUED, DONE, HELD or FAILED; only a DONE entry
        expands, into MEMBER or OWNER copies; recipients need a kind."""
        for bad in (
            dict(state=EntryState.INFLIGHT),
            dict(state=EntryState.RETRY),
            dict(state="done"),
            dict(state=EntryState.HELD, kind=EntryKind.MEMBER),
            dict(state=EntryState.DONE, kind=EntryKind.INBOUND),
            dict(state=EntryState.DONE, recipients=("a@example.org",)),
        ):
            with self.assertRaises(ValueError, msg=bad):
                Route(**bad)
        self.assertEqual(Route().state, EntryState.QUEUED)


class EntryUpdateTests(SynchronousTestCase):
    """EntryUpdate checks its fields when made."""

    def test_retry_needs_time(self):
        """A RETRY without next_attempt_at would never be due again: refused."""
        self.assertRaises(ValueError, EntryUpdate, 1, EntryState.RETRY)

    def test_state_coerced_and_checked(self):
        """State strings become EntryState; unknown states are refused by name."""
        self.assertIs(EntryUpdate(1, "done").state, EntryState.DONE)
        e = self.assertRaises(ValueError, EntryUpdate, 1, "delivered")
        self.assertIn("'delivered'", str(e))

    def test_entry_id_checked(self):
        """The entry id must be an int."""
        self.assertRaises(TypeError, EntryUpdate, "1", EntryState.DONE)


class MemorySpoolTests(SpoolContractMixin, TestCase):
    """The contract, against MemorySpool."""

    def make_spool(self):
        self.clock = task.Clock()
        spool = MemorySpool(self.clock)
        self.addCleanup(spool.close)
        return spool

    async def test_first_attempt_uses_clock(self):
        """first_attempt_at comes from the injected clock."""
        self.clock.advance(1234.5)
        (entry_id,) = await self.enqueue_one()
        await self.spool.update([EntryUpdate(entry_id, EntryState.DONE, count_attempt=True)])
        self.assertEqual(self.spool.entries()[0].first_attempt_at, 1234.5)


def _hold_writer(spool):
    """Keep the writer thread busy until the returned function is called, so
    that the requests made meanwhile are committed together in one batch."""
    started, gate = threading.Event(), threading.Event()

    def hold(db):
        started.set()
        gate.wait(10)

    spool._submit("wait", hold)
    started.wait(10)
    return gate.set


def _writer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("mailrelay spool writer")]


class SQLiteSpoolTests(SpoolContractMixin, TestCase):
    """The contract, against SQLiteSpool, plus what only the SQLite spool does."""

    def make_spool(self):
        self.path = os.path.join(temp_dir(self), "spool", "spool.sqlite")
        return self.open()

    def open(self, **kwargs):
        spool = SQLiteSpool(self.path, reactor, **kwargs)
        self.addCleanup(spool.close)
        return spool

    async def test_file_layout(self):
        """WAL, synchronous=FULL writes, the schema version, a 0750 dir and a 0640 file."""
        synchronous = await self.spool._submit(
            "read a setting", lambda db: db.execute("PRAGMA synchronous").fetchone()
        )
        self.assertEqual(synchronous, (2,))  # FULL
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode) & 0o027, 0)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone(), ("wal",))
            self.assertEqual(db.execute("PRAGMA user_version").fetchone(), (SCHEMA_VERSION,))

    async def test_claim_queries_need_no_sort(self):
        """Claiming reads queued entries in id order and due retries in time order straight
        from indexes, so a claim costs O(batch) however many entries are queued."""
        with sqlite3.connect(self.path) as db:
            for query, args in ((CLAIM_QUEUED, (200,)), (CLAIM_RETRY, (0.0, 200))):
                plan = " | ".join(
                    row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + query, args)
                )
                self.assertNotIn("TEMP B-TREE", plan)
                self.assertIn("USING INDEX", plan)

    async def test_newer_schema_refused(self):
        """A spool written by a newer schema is refused with a clear SpoolError."""
        await self.spool.close()
        with sqlite3.connect(self.path) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        e = self.assertRaises(SpoolError, SQLiteSpool, self.path, reactor)
        self.assertIn("schema version", str(e))

    async def test_status_seen_by_another_process(self):
        """A status set by the server is read by another connection (the CLI's)."""
        await self.spool.set_status("circuit", "paused")
        other = self.open()
        self.assertEqual(other.get_status("circuit"), "paused")

    async def test_upgrade_from_version_1(self):
        """A spool written before entry kinds existed is upgraded in place: its
        entries are INBOUND and the status table is there."""
        await self.spool.close()
        os.remove(self.path)
        with sqlite3.connect(self.path) as db:
            for statement in MIGRATIONS[0]:
                db.execute(statement)
            db.execute("PRAGMA user_version = 1")
            db.execute("INSERT INTO messages (sender, received_at, data) VALUES ('a@b.c', 1, 'x')")
            db.execute(
                "INSERT INTO entries (message_key, list_address, recipient, state,"
                " updated_at) VALUES (1, 'test@example.com', 'test@example.com',"
                " 'queued', 1)"
            )
        upgraded = self.open()
        (entry,) = upgraded.entries()
        self.assertEqual((entry.kind, entry.state), (EntryKind.INBOUND, EntryState.QUEUED))
        await upgraded.set_status("circuit", "x")
        self.assertEqual(upgraded.get_status("circuit"), "x")

    async def test_reads_do_not_wait_for_writer(self):
        """Reads answer from committed data while the writer holds a write transaction."""
        ids = await self.enqueue_one()
        release = _hold_writer(self.spool)
        pending = self.spool.enqueue(_envelope(), b"later")
        try:
            self.assertEqual([e.entry_id for e in self.spool.entries()], ids)
            self.assertEqual(self.spool.counts()[EntryState.QUEUED], 1)
        finally:
            release()
        await pending
        self.assertEqual(self.spool.counts()[EntryState.QUEUED], 2)

    async def test_survives_reopen(self):
        """Acknowledged entries and messages are there after closing and reopening."""
        ids = await self.enqueue_one(POST, JOIN, message=b"kept")
        await self.spool.close()
        again = self.open()
        entries = again.entries()
        self.assertEqual([e.entry_id for e in entries], ids)
        self.assertEqual(again.get_message(entries[0].message_key), b"kept")

    async def test_group_commit(self):
        """50 concurrent enqueues share far fewer than 50 commits."""
        before = self.spool.commit_count
        results = await gatherResults(
            [self.spool.enqueue(_envelope(), b"message %d" % n) for n in range(50)]
        )
        self.assertEqual(len({i for ids in results for i in ids}), 50)
        self.assertLessEqual(self.spool.commit_count - before, 5)

    async def test_close_drains_and_stops_thread(self):
        """close() commits writes already requested, then the writer thread is gone."""
        self.assertEqual(len(_writer_threads()), 1)
        pending = [self.spool.enqueue(_envelope(), b"m") for _ in range(20)]
        closed = self.spool.close()
        self.assertEqual(len(await gatherResults(pending)), 20)
        await closed
        self.assertEqual(_writer_threads(), [])
        self.assertRaises(SpoolError, self.spool.entries)
        await self.spool.close()  # a second close is harmless
        self.assertEqual(len(self.open().entries()), 20)

    async def test_disk_full(self):
        """Out of space fails that enqueue with disk_full; the rest of its batch is stored."""
        await self.spool.close()
        spool = self.open(max_bytes=256 * 1024)
        release = _hold_writer(spool)
        # Both land in one batch; SQLite rolls back the whole transaction
        # when it runs out of pages, so the small one must be retried.
        too_big = spool.enqueue(_envelope(), b"x" * (1024 * 1024))
        small = spool.enqueue(_envelope(), b"small")
        release()
        with self.assertRaises(SpoolError) as caught:
            await too_big
        self.assertTrue(caught.exception.disk_full)
        self.assertIn(self.path, str(caught.exception))
        (small_id,) = await small
        self.assertEqual([e.entry_id for e in spool.entries()], [small_id])
        self.assertEqual(len(await spool.enqueue(_envelope(), b"after")), 1)

    async def test_failing_request_leaves_batch_intact(self):
        """A request that fails inside SQLite rolls back only itself."""
        ids = await self.enqueue_one(POST, POST)
        release = _hold_writer(self.spool)
        # A CHECK constraint failure on one update, between two good writes.
        good = self.spool.enqueue(_envelope(), b"good")
        bad = self.spool._submit(
            "break a rule",
            lambda db: db.execute("UPDATE entries SET state = 'bogus' WHERE id = ?", (ids[0],)),
        )
        also_good = self.spool.update([EntryUpdate(ids[1], EntryState.DONE)])
        release()
        with self.assertRaises(SpoolError):
            await bad
        await good
        self.assertEqual(await also_good, 1)
        states = [e.state for e in self.spool.entries()]
        self.assertEqual(states, [EntryState.QUEUED, EntryState.DONE, EntryState.QUEUED])


# The crash test's child: enqueue continuously, printing "ACK n id" once each
# enqueue's Deferred has fired (eight in flight at any time).
_CHILD = r"""
import sys
from twisted.internet import reactor
from mailrelay.model import Destination, Envelope
from mailrelay.spool import SQLiteSpool

spool = SQLiteSpool(sys.argv[1], reactor)
destination = Destination("test@example.com", None, "test@example.com")

def failed(reason):
    sys.stderr.write(reason.getTraceback())
    reactor.stop()

def send(n):
    d = spool.enqueue(Envelope("a@example.org", (destination,), float(n)), b"message %d" % n)
    d.addCallback(acked, n)
    d.addErrback(failed)

def acked(ids, n):
    sys.stdout.write("ACK %d %d\n" % (n, ids[0]))
    sys.stdout.flush()
    send(n + 8)

for n in range(8):
    send(n)
reactor.run()
"""


def _writer_threads_of(path: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"mailrelay spool writer {path}"]


def _open_descriptors(path: str) -> list[str]:
    """The files under ``path``'s name (the database, its -wal and -shm) this
    process has open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(path):
            found.append(target)
    return found


class SQLiteSpoolOpeningTests(TestCase):
    """A spool made with ``open_now=False`` holds nothing (no thread, no open
    file) until :meth:`~SQLiteSpool.open`: a daemon opens it after twistd's fork."""

    def setUp(self):
        self.path = os.path.join(temp_dir(self), "spool.sqlite3")

    async def test_nothing_open_until_open(self):
        """Before open() no writer thread runs and no file is open, and every
        operation fails with a SpoolError saying the spool is not open; after
        it the spool works; close() ends the thread and closes every file."""
        spool = SQLiteSpool(self.path, reactor, open_now=False)
        self.assertFalse(spool.is_open)
        self.assertEqual((_writer_threads_of(self.path), _open_descriptors(self.path)), ([], []))
        with self.assertRaises(SpoolError) as raised:
            await spool.enqueue(_envelope(), b"Subject: hi\r\n\r\nbody\r\n")
        self.assertIn(f"spool {self.path} is not open", str(raised.exception))
        with self.assertRaises(SpoolError):
            spool.counts()
        spool.open()
        self.assertTrue(spool.is_open)
        self.assertEqual(len(_writer_threads_of(self.path)), 1)
        (entry_id,) = await spool.enqueue(_envelope(), b"Subject: hi\r\n\r\nbody\r\n")
        self.assertEqual(spool.get_entry(entry_id).state, EntryState.QUEUED)
        await spool.close()
        self.assertFalse(spool.is_open)
        self.assertEqual((_writer_threads_of(self.path), _open_descriptors(self.path)), ([], []))
        await spool.close()  # closing again does nothing

    async def test_closed_spool_opens_again(self):
        """A closed spool may be opened again, with what it stored; commit_count
        goes on counting across the reopening."""
        spool = SQLiteSpool(self.path, reactor)
        (entry_id,) = await spool.enqueue(_envelope(), b"Subject: hi\r\n\r\nbody\r\n")
        commits = spool.commit_count
        await spool.close()
        spool.open()
        self.addCleanup(spool.close)
        self.assertEqual(spool.get_entry(entry_id).state, EntryState.QUEUED)
        self.assertEqual(spool.commit_count, commits)

    async def test_open_while_closing_is_refused(self):
        """open() while close() still waits for the writer thread raises a SpoolError."""
        spool = SQLiteSpool(self.path, reactor)
        closing = spool.close()
        self.assertFalse(spool.is_open)
        self.assertRaises(SpoolError, spool.open)
        await closing
        spool.open()
        self.addCleanup(spool.close)

    def test_check_creates_and_migrates_without_holding_anything(self):
        """check() creates and migrates the file, then keeps nothing open: no
        thread, no file descriptor."""
        SQLiteSpool.check(self.path)
        db = sqlite3.connect(self.path)
        try:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone(), (SCHEMA_VERSION,))
        finally:
            db.close()
        self.assertEqual((_writer_threads_of(self.path), _open_descriptors(self.path)), ([], []))

    def test_check_reports_an_unusable_file(self):
        """check() raises the SpoolError opening would, naming the file."""
        os.makedirs(self.path)
        error = self.assertRaises(SpoolError, SQLiteSpool.check, self.path)
        self.assertIn(f"cannot open spool {self.path}", str(error))


class SQLiteSpoolCrashTests(TestCase):
    """Killing the process loses nothing that was acknowledged."""

    timeout = 60

    def read_acks(self, child, wanted, deadline):
        """Read ACK lines from the child until ``wanted`` of them or the deadline."""
        acks = {}
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            while len(acks) < wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.fail(f"only {len(acks)} ACKs before the deadline")
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    self.fail(f"child exited after {len(acks)} ACKs: {child.stderr.read()!r}")
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    _, n, entry_id = line.split()
                    acks[int(entry_id)] = b"message %d" % int(n)
        return acks

    async def test_sigkill_loses_no_acknowledged_entry(self):
        """Every entry acknowledged before SIGKILL is in the spool after reopening."""
        path = os.path.abspath(os.path.join(temp_dir(self), "spool.sqlite"))
        root = os.path.dirname(os.path.dirname(os.path.abspath(mailrelay.__file__)))
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        )
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            acks = self.read_acks(child, 200, time.monotonic() + 30)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        self.assertEqual(child.returncode, -signal.SIGKILL)
        spool = SQLiteSpool(path, reactor)
        self.addCleanup(spool.close)
        stored = {e.entry_id: e for e in spool.entries()}
        for entry_id, message in acks.items():
            self.assertIn(entry_id, stored)
            self.assertEqual(spool.get_message(stored[entry_id].message_key), message)
        # The child was killed mid-stream, not after it had stopped writing.
        self.assertGreaterEqual(len(stored), len(acks))


# -- messages mailrelay writes, and held mail released (list processing) -------------


def _notice(*recipients: str, sender: str = "test-bounces@example.com", body=b"reply"):
    return Outgoing(
        sender,
        recipients or ("anne@example.org",),
        b"Auto-Submitted: auto-replied\r\n\r\n" + body,
        LIST,
        message_id="<n@example.com>",
    )


class OutgoingContractMixin:
    """store_outgoing and release_held, which every ISpool must have."""

    async def test_store_outgoing(self):
        """Each message is stored as written with one QUEUED NOTICE entry per recipient
        (duplicates once), its envelope sender and list; the finishing updates apply."""
        (request,) = await self.spool.enqueue(_envelope(JOIN), b"join me")
        first, second = (
            _notice("a@example.org", "b@example.org", "a@example.org"),
            _notice("c@example.org", sender="", body=b"dsn"),
        )
        ids = await self.spool.store_outgoing(
            [first, second], [EntryUpdate(request, EntryState.DONE, error="answered")]
        )
        self.assertEqual(len(ids), 3)
        notices = [e for e in self.spool.entries() if e.kind is EntryKind.NOTICE]
        self.assertEqual([e.entry_id for e in notices], ids)
        self.assertEqual(
            [(e.destination, e.sender, e.state, e.message_id) for e in notices],
            [
                (
                    Destination(LIST, None, "a@example.org"),
                    first.sender,
                    EntryState.QUEUED,
                    "<n@example.com>",
                ),
                (
                    Destination(LIST, None, "b@example.org"),
                    first.sender,
                    EntryState.QUEUED,
                    "<n@example.com>",
                ),
                (
                    Destination(LIST, None, "c@example.org"),
                    "",
                    EntryState.QUEUED,
                    "<n@example.com>",
                ),
            ],
        )
        self.assertEqual(self.spool.get_message(notices[0].message_key), first.message)
        self.assertEqual(self.spool.get_message(notices[2].message_key), second.message)
        (original,) = [e for e in self.spool.entries() if e.entry_id == request]
        self.assertEqual((original.state, original.last_error), (EntryState.DONE, "answered"))
        claimed = await self.spool.claim_due(now=1e12, limit=10)
        self.assertEqual({e.entry_id for e in claimed}, set(ids))

    async def test_store_outgoing_bad_input(self):
        """A value that is not an Outgoing fails the Deferred with TypeError; nothing is stored."""
        with self.assertRaises(TypeError):
            await self.spool.store_outgoing([b"not a message"])
        with self.assertRaises(TypeError):
            await self.spool.store_outgoing([_notice()], ["not an update"])
        self.assertEqual(self.spool.entries(), [])

    def test_outgoing_values_checked(self):
        """An Outgoing needs recipients, bytes and a list address."""
        self.assertRaises(ValueError, Outgoing, "", (), b"x", LIST)
        self.assertRaises(TypeError, Outgoing, "", "a@example.org", b"x", LIST)
        self.assertRaises(TypeError, Outgoing, "", ("a@example.org",), "text", LIST)
        self.assertRaises(TypeError, Outgoing, "", ("a@example.org",), b"x", "")

    async def test_release_held(self):
        """HELD inbound entries to the named sub-addresses (or of the named ids) become
        QUEUED; others stay as they are."""
        bounces = Destination(LIST, "bounces", "test-bounces@example.com")
        ids = await self.spool.enqueue(_envelope(JOIN, bounces, POST, JOIN), b"x")
        await self.spool.update(
            [EntryUpdate(i, EntryState.HELD) for i in ids[:3]]
            + [EntryUpdate(ids[3], EntryState.DONE)]
        )
        self.assertEqual(await self.spool.release_held(["join", "request"]), 1)
        states = {e.entry_id: e.state for e in self.spool.entries()}
        self.assertEqual(
            [states[i] for i in ids],
            [EntryState.QUEUED, EntryState.HELD, EntryState.HELD, EntryState.DONE],
        )
        self.assertEqual(await self.spool.release_held(entry_ids=[ids[2]]), 1)
        self.assertEqual(await self.spool.release_held(), 1)  # the -bounces entry
        self.assertEqual(self.spool.counts()[EntryState.HELD], 0)

    async def test_release_held_bad_input(self):
        """A bare string of sub-addresses is refused (it would match letters)."""
        with self.assertRaises(TypeError):
            await self.spool.release_held("join")


class MemorySpoolOutgoingTests(OutgoingContractMixin, TestCase):
    """Outgoing messages, against MemorySpool."""

    def setUp(self):
        self.spool = MemorySpool(task.Clock())


class SQLiteSpoolOutgoingTests(OutgoingContractMixin, TestCase):
    """Outgoing messages, against SQLiteSpool, plus the upgrade of an older file."""

    def setUp(self):
        self.path = os.path.join(temp_dir(self), "spool.sqlite")
        self.spool = SQLiteSpool(self.path, reactor)
        self.addCleanup(lambda: self.spool.close())

    async def test_store_outgoing_is_durable_and_seen_by_another_connection(self):
        """Stored notices are committed: another connection (the CLI's) reads them."""
        await self.spool.store_outgoing([_notice("a@example.org")])
        other = SQLiteSpool(self.path, reactor)
        self.addCleanup(other.close)
        self.assertEqual([e.kind for e in other.entries()], [EntryKind.NOTICE])

    async def test_upgrade_from_version_3_keeps_entries_and_allows_notices(self):
        """A version 3 spool (before NOTICE entries) is upgraded in place: its HELD
        command mail is kept, other columns untouched, and NOTICE entries can be stored."""
        await self.spool.close()
        os.remove(self.path)
        with sqlite3.connect(self.path) as db:
            for migration in MIGRATIONS[:3]:
                for statement in migration:
                    db.execute(statement)
            db.execute("PRAGMA user_version = 3")
            db.execute("INSERT INTO messages (sender, received_at, data) VALUES ('a@b.c', 1, 'x')")
            db.execute(
                "INSERT INTO entries (message_key, list_address, subaddress, recipient, state,"
                " updated_at) VALUES (1, 'test@example.com', 'join', 'test-join@example.com',"
                " 'held', 1)"
            )
        self.spool = SQLiteSpool(self.path, reactor)
        (held,) = self.spool.entries()
        self.assertEqual(
            (held.kind, held.state, held.destination),
            (
                EntryKind.INBOUND,
                EntryState.HELD,
                Destination(LIST, "join", "test-join@example.com"),
            ),
        )
        await self.spool.store_outgoing([_notice()])
        self.assertEqual(len(self.spool.entries()), 2)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA user_version").fetchone(), (SCHEMA_VERSION,))
            self.assertEqual(db.execute("PRAGMA integrity_check").fetchone(), ("ok",))
            with self.assertRaises(sqlite3.IntegrityError):
                db.execute(
                    "INSERT INTO entries (message_key, list_address, recipient, state, kind,"
                    " updated_at) VALUES (1, 'l@x.y', 'r@x.y', 'queued', 'bogus', 1)"
                )
