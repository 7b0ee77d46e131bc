"""A full spool file system: temporary refusals, nothing half-stored, recovery once space is freed.

The spool and registry of a real ``twistd mailrelay`` live on a small tmpfs
(mounting needs root: CI runs as root; elsewhere the test skips).  Posts
accepted before the disk fills wait for the smarthost; then a filler file
takes every free byte.  A new post must get ``452 4.3.1`` for every
recipient (never 250 for what is not on disk, never 5xx), the daemon must stay
up and deliver what it already had, and once the filler is removed the
refused posts, sent again, are accepted and delivered exactly once each (no
half-stored copy of the refused attempt survives to be sent too).

Without a space reserve (``spool_reserve = 0``) the refusal comes from SQLite
running out of space; with one, the relay gives the reserve's bytes to
delivery and refuses new posts itself, so what it had is delivered while the
disk is full.
"""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import connect_lmtp
from tests.daemon import (
    PersistentPoster,
    RelayProcess,
    delivered_copies,
    record_figures,
    wait_for_copies,
)
from tests.support import as_deferred, fill_file_system, free_port, mount_tmpfs, temp_dir

LISTS = {
    "alpha@example.com": ["bart@members.example", "cate@members.example"],
    "beta@example.com": ["dave@members.example", "erin@members.example"],
}
BEFORE = 10  # posts accepted before the disk fills
REFUSED = 5  # posts sent while it is full
# [mta] spool_reserve when the test wants one: above the 4 MB SQLite's WAL
# grows to before it checkpoints and starts again from its beginning.
RESERVE = 6 * 2**20


def _post(message_id: str, body_size: int) -> bytes:
    body = (b"x" * 76 + b"\r\n") * (body_size // 78 + 1)
    return (
        f"From: anne@example.org\r\nSubject: disk {message_id}\r\nMessage-ID: {message_id}\r\n\r\n"
    ).encode() + body


class DiskFullTests(TestCase):
    slow = True  # tests/conftest.py marks it for pytest -m "not slow"
    timeout = 120

    def test_full_spool_refuses_temporarily_and_recovers(self):
        """Without a space reserve, with the spool's file system full every recipient of a
        new post gets 452 4.3.1 (SQLite's own disk-full error) and the daemon stays up;
        after space is freed the posts sent again are accepted and delivered once each."""
        return as_deferred(self.scenario(smarthost_down_until_full=False, reserve=0))

    def test_full_spool_still_delivers_what_it_has(self):
        """With a space reserve, posts accepted before the disk filled are delivered while
        it is full (the reserve's bytes are given to delivery), new posts get 452 4.3.1,
        and once space is freed the reserve is taken back and posts are accepted."""
        # Without the reserve SQLite could not claim an entry or record a result
        # with no byte free, and delivery stopped until space was freed.
        return as_deferred(self.scenario(smarthost_down_until_full=True, reserve=RESERVE))

    async def scenario(self, *, smarthost_down_until_full: bool, reserve: int) -> None:
        tmp = temp_dir(self)
        var = os.path.join(tmp, "var")
        os.mkdir(var)
        # With a reserve, room for it twice over besides the posts sent once freed.
        mount_tmpfs(self, var, "24m" if reserve else "2m")
        reserve_path = os.path.join(var, "space-reserve")
        port = free_port()
        mta = FakeMTA(reactor)
        if not smarthost_down_until_full:
            await mta.start(port=port)
            self.addCleanup(mta.stop)
        relay = RelayProcess(
            self,
            reactor,
            tmp,
            smtp_port=port,
            retry_min_backoff="1s",
            retry_max_backoff="1s",
            spool_reserve=reserve,
        )
        for address, members in LISTS.items():
            relay.cli("lists", "create", address)
            relay.cli("lists", "set", address, "posting=open")
            relay.cli("members", "add", address, *members)
        await relay.start()
        lists = sorted(LISTS)
        before = {f"<before{n}@example.org>": lists for n in range(BEFORE)}
        poster = PersistentPoster(reactor, relay.endpoint, before, sessions=2)
        await poster.run()
        had = {(m, member) for m in before for a in lists for member in LISTS[a]}
        if not smarthost_down_until_full:
            await wait_for_copies(reactor, had, mta, what="delivery", details=relay.log)

        filler = fill_file_system(var)
        replies = []
        client = await connect_lmtp(relay.endpoint())
        await client.lhlo("mx.example.org")
        for n in range(REFUSED):
            # Larger than any slack SQLite's files could still have.
            message = _post(f"<full{n}@example.org>", 256 * 1024)
            replies += await client.sendmail("anne@example.org", lists, message)
        await client.quit()
        codes = {(r.code, r.text.split()[0]) for r in replies}
        self.assertEqual(codes, {(452, "4.3.1")}, replies)
        self.assertIsNone(relay.process.poll(), "the daemon died with its disk full")
        if reserve:
            self.assertEqual(os.stat(reserve_path).st_size, 0, "reserve not given back")

        if smarthost_down_until_full:
            # What it had it still delivers, disk full or not.
            await mta.start(port=port)
            self.addCleanup(mta.stop)
            await wait_for_copies(reactor, had, mta, what="delivery while full", details=relay.log)
            self.assertIsNone(relay.process.poll(), "the daemon died with its disk full")

        os.unlink(filler)
        freed = time.monotonic()
        again = {f"<full{n}@example.org>": lists for n in range(REFUSED)}
        poster = PersistentPoster(
            reactor,
            relay.endpoint,
            again,
            sessions=2,
            message_bytes=lambda m: _post(m, 256 * 1024),
        )
        await poster.run()
        accepted_after = time.monotonic() - freed
        wanted = {(m, member) for m in again for a in lists for member in LISTS[a]}
        await wait_for_copies(
            reactor, wanted, mta, what="delivery after freeing space", details=relay.log
        )
        copies = delivered_copies(mta)
        self.assertEqual({k: copies[k] for k in wanted}, dict.fromkeys(wanted, 1))
        self.assertEqual(poster.refusals, [])
        if reserve:
            self.assertEqual(os.stat(reserve_path).st_size, reserve, "reserve not taken back")
        record_figures(
            "disk_full" + ("_delivering" if smarthost_down_until_full else ""),
            tmpfs="24 MiB" if reserve else "2 MiB",
            spool_reserve=reserve,
            posts_before=BEFORE,
            recipients_refused=len(replies),
            refusal="452 4.3.1",
            daemon_stayed_up=True,
            seconds_to_accept_after_freeing=round(accepted_after, 2),
            delivered_after_freeing=len(wanted),
            half_stored_copies=sum(copies[k] - 1 for k in wanted),
        )
