"""Tests for the spool's operator views (issue 11): one post and its copies,
cancelling a post, recent deliveries; one contract, both spools."""

from __future__ import annotations

import os

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from mailrelay.model import Destination, EntryKind, EntryState, Envelope, Route
from mailrelay.spool import EntryUpdate, MemorySpool, SQLiteSpool
from tests.support import temp_dir

LIST = "test@example.com"
OTHER = "other@example.com"
POST = Destination(LIST, None, LIST)
OTHER_POST = Destination(OTHER, None, OTHER)
JOIN = Destination(LIST, "join", "test-join@example.com")


def _envelope(*destinations, message_id="<1@example.org>", received_at=1000.0):
    return Envelope("anne@example.org", destinations or (POST,), received_at, "", message_id)


class PostViewContractMixin:
    """The operator views every ISpool offers, mixed into one TestCase per spool."""

    def make_spool(self):
        raise NotImplementedError

    def setUp(self):
        self.spool = self.make_spool()

    async def post(self, members=("a@x.org", "b@x.org"), **kwargs):
        """Store a post to LIST expanded into MEMBER copies; its message key."""
        envelope = _envelope(**kwargs)
        stored = await self.spool.store(
            envelope,
            b"Subject: hi\r\n\r\nbody\r\n",
            [Route(EntryState.DONE, EntryKind.MEMBER, members)],
        )
        return self._key(stored)

    def _key(self, stored):
        (entry_id,) = stored.entry_ids
        (entry,) = [e for e in self.spool.entries() if e.entry_id == entry_id]
        return entry.message_key

    def copies(self, key):
        return [e for e in self.spool.message_entries(key) if e.kind is EntryKind.MEMBER]

    async def test_message_entries(self):
        """A message's entries, by id: the post (DONE once expanded) and one copy per member."""
        key = await self.post()
        other = await self.post(members=("c@x.org",), message_id="<2@example.org>")
        entries = self.spool.message_entries(key)
        self.assertEqual([e.entry_id for e in entries], sorted(e.entry_id for e in entries))
        self.assertEqual(
            [(e.kind, e.state, e.destination.address) for e in entries],
            [
                (EntryKind.INBOUND, EntryState.DONE, LIST),
                (EntryKind.MEMBER, EntryState.QUEUED, "a@x.org"),
                (EntryKind.MEMBER, EntryState.QUEUED, "b@x.org"),
            ],
        )
        self.assertEqual(len(self.spool.message_entries(other)), 2)
        self.assertEqual(self.spool.message_entries(9999), [])

    async def test_copy_counts(self):
        """Copies by state, not counting the post's own entry."""
        key = await self.post(members=("a@x.org", "b@x.org", "c@x.org"))
        a, b, _c = self.copies(key)
        await self.spool.update(
            [
                EntryUpdate(a.entry_id, EntryState.DONE, count_attempt=True),
                EntryUpdate(b.entry_id, EntryState.RETRY, next_attempt_at=5.0, error="451 busy"),
            ]
        )
        counts = self.spool.copy_counts(key)
        self.assertEqual(
            (counts[EntryState.DONE], counts[EntryState.RETRY], counts[EntryState.QUEUED]),
            (1, 1, 1),
        )
        self.assertEqual(sum(counts.values()), 3)

    async def test_get_entry(self):
        """One entry by id in any state (DONE included); None for an unknown id,
        TypeError for a value that is no id."""
        key = await self.post(members=("a@x.org",))
        post, copy = self.spool.message_entries(key)
        self.assertEqual(self.spool.get_entry(post.entry_id), post)
        self.assertEqual(self.spool.get_entry(copy.entry_id), copy)
        self.assertEqual(post.state, EntryState.DONE)
        self.assertIsNone(self.spool.get_entry(9999))
        with self.assertRaises(TypeError):
            self.spool.get_entry("1")

    async def test_delivery_progress(self):
        """(first, last) for copies just delivered: first while no other copy was
        DONE before them, last once no copy waits (QUEUED, INFLIGHT, RETRY);
        FAILED and DONE copies do not wait, and the post's own entry never counts."""
        key = await self.post(members=("a@x.org", "b@x.org", "c@x.org"))
        a, b, c = self.copies(key)
        await self.spool.update([EntryUpdate(a.entry_id, EntryState.DONE, count_attempt=True)])
        self.assertEqual(self.spool.delivery_progress(key, 1), (True, False))
        await self.spool.update(
            [
                EntryUpdate(b.entry_id, EntryState.DONE, count_attempt=True),
                EntryUpdate(c.entry_id, EntryState.RETRY, next_attempt_at=5.0, error="451"),
            ]
        )
        self.assertEqual(self.spool.delivery_progress(key, 1), (False, False))
        await self.spool.update([EntryUpdate(c.entry_id, EntryState.FAILED, error="550")])
        self.assertEqual(self.spool.delivery_progress(key, 1), (False, True))
        self.assertEqual(self.spool.delivery_progress(key, 2), (True, True))

    async def test_oldest_entry(self):
        """The entry in a state received first; None when there is none."""
        self.assertIsNone(self.spool.oldest_entry(EntryState.RETRY))
        first = await self.post(members=("a@x.org",))
        second = await self.post(members=("b@x.org",), message_id="<2@example.org>")
        for key in (second, first):
            (copy,) = self.copies(key)
            await self.spool.update(
                [EntryUpdate(copy.entry_id, EntryState.RETRY, next_attempt_at=1.0, error="451")]
            )
        oldest = self.spool.oldest_entry(EntryState.RETRY)
        self.assertEqual((oldest.message_key, oldest.last_error), (first, "451"))
        with self.assertRaises(ValueError):
            self.spool.oldest_entry(None)

    async def test_posts(self):
        """Posts with their lists and copies by state; finished posts only on request."""
        done = await self.post(members=("a@x.org",), message_id="<done@x>")
        (copy,) = self.copies(done)
        await self.spool.update([EntryUpdate(copy.entry_id, EntryState.DONE)])
        waiting = await self.post(message_id="<waiting@x>", received_at=2000.0)
        stored = await self.spool.store(
            _envelope(POST, OTHER_POST, JOIN, message_id="<two@x>"),
            b"x",
            [
                Route(),
                Route(EntryState.DONE, EntryKind.MEMBER, ("z@x.org",)),
                Route(EntryState.HELD),
            ],
        )
        two = self._key(type(stored)(stored.entry_ids[:1]))
        posts = self.spool.posts()
        self.assertEqual([p.message_key for p in posts], [waiting, two])
        first = posts[0]
        self.assertEqual(
            (first.message_id, first.sender, first.received_at, first.lists),
            ("<waiting@x>", "anne@example.org", 2000.0, (LIST,)),
        )
        self.assertEqual((first.counts[EntryState.QUEUED], first.counts[EntryState.DONE]), (2, 0))
        self.assertEqual(first.waiting, 2)
        self.assertEqual(posts[1].lists, (OTHER, LIST))
        self.assertEqual(
            (posts[1].counts[EntryState.QUEUED], posts[1].counts[EntryState.HELD]), (2, 1)
        )
        everything = self.spool.posts(include_done=True)
        self.assertEqual([p.message_key for p in everything], [done, waiting, two])
        self.assertEqual(everything[0].counts[EntryState.DONE], 1)
        self.assertEqual([p.message_key for p in self.spool.posts(limit=1)], [waiting])
        by_id = self.spool.posts(message_id="<done@x>", include_done=True)
        self.assertEqual([p.message_key for p in by_id], [done])
        self.assertEqual(self.spool.posts(message_id="<done@x>"), [])

    async def test_cancel_messages(self):
        """Every entry not DONE goes in one call; DONE history stays; other posts are untouched."""
        key = await self.post(members=("a@x.org", "b@x.org", "c@x.org"))
        keep = await self.post(members=("d@x.org",), message_id="<2@example.org>")
        a, b, _c = self.copies(key)
        await self.spool.update(
            [
                EntryUpdate(a.entry_id, EntryState.DONE),
                EntryUpdate(b.entry_id, EntryState.RETRY, next_attempt_at=1.0),
            ]
        )
        deleted = await self.spool.cancel_messages([key])
        self.assertEqual(
            (deleted[EntryState.QUEUED], deleted[EntryState.RETRY], deleted[EntryState.DONE]),
            (1, 1, 0),
        )
        self.assertEqual(
            [(e.kind, e.state) for e in self.spool.message_entries(key)],
            [(EntryKind.INBOUND, EntryState.DONE), (EntryKind.MEMBER, EntryState.DONE)],
        )
        self.assertEqual(len(self.copies(keep)), 1)
        claimed = await self.spool.claim_due(10**9, 100)
        self.assertEqual([e.message_key for e in claimed], [keep])

    async def test_cancel_drops_message_without_history(self):
        """A post cancelled before anything was delivered leaves nothing behind."""
        (entry_id,) = await self.spool.enqueue(_envelope(), b"x")
        (entry,) = self.spool.entries()
        deleted = await self.spool.cancel_messages([entry.message_key])
        self.assertEqual(deleted[EntryState.QUEUED], 1)
        self.assertEqual(self.spool.entries(), [])
        self.assertRaises(KeyError, self.spool.get_message, entry.message_key)

    async def test_cancel_bad_input(self):
        """Message keys must be ints: a specific error, nothing deleted."""
        await self.post()
        with self.assertRaises(TypeError):
            await self.spool.cancel_messages("12")
        self.assertEqual(len(self.spool.entries()), 3)

    async def test_delivered_since_and_posts_since(self):
        """Copies delivered since a time (not routing's DONE), and posts per list since a time."""
        key = await self.post(members=("a@x.org", "b@x.org"), received_at=500.0)
        await self.post(members=("c@x.org",), message_id="<2@x>", received_at=1500.0)
        a, b = self.copies(key)
        self.assertEqual(self.spool.delivered_since(0), 0)
        await self.spool.update([EntryUpdate(a.entry_id, EntryState.DONE)])
        self.assertEqual(self.spool.delivered_since(0), 1)
        self.assertEqual(self.spool.delivered_since(self.now() + 10), 0)
        self.assertEqual(self.spool.posts_since(0), {LIST: 2})
        self.assertEqual(self.spool.posts_since(1000), {LIST: 1})
        self.assertEqual(self.spool.posts_since(2000), {})


class MemoryPostViewTests(PostViewContractMixin, TestCase):
    """The operator views of MemorySpool."""

    def make_spool(self):
        self.clock = task.Clock()
        self.clock.advance(100)
        spool = MemorySpool(self.clock)
        self.addCleanup(spool.close)
        return spool

    def now(self):
        return self.clock.seconds()


class SQLitePostViewTests(PostViewContractMixin, TestCase):
    """The operator views of SQLiteSpool."""

    def make_spool(self):
        path = os.path.join(temp_dir(self), "spool.sqlite3")
        spool = SQLiteSpool(path, reactor)
        self.addCleanup(spool.close)
        return spool

    def now(self):
        return reactor.seconds()
