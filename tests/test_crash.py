"""Crash safety with a real ``twistd mailrelay`` process killed with SIGKILL.

What was acknowledged with 250 over LMTP must survive a kill -9 at any moment
and be delivered after a restart: right after the 250 (smarthost down) and in
the middle of delivery (the smarthost is holding its reply to the message).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import tempfile

from twisted.internet import endpoints, reactor
from twisted.trial.unittest import TestCase

from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import connect_lmtp
from tests.daemon import RelayProcess, poll
from tests.support import as_deferred, free_port

POST = "From: anne@example.com\r\nTo: test@example.com\r\nSubject: crash {n}\r\nMessage-ID: <crash{n}@example.com>\r\n\r\nbody\r\n"
MEMBERS = ["bart@example.com", "cate@example.org", "dave@example.net"]


class CrashTests(TestCase):
    timeout = 120

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.relay = RelayProcess(
            self,
            reactor,
            self.tmp,
            smtp_port=free_port(),  # nothing listens there: the smarthost is down
            retry_min_backoff="1s",
            retry_max_backoff="1s",
            smtp_timeout="60s",
        )
        self.socket = self.relay.socket

    def use_smarthost(self, port: int):
        self.relay.mta["smtp_port"] = port
        self.relay.write_config()

    def create_list(self):
        self.relay.cli("lists", "create", "test@example.com")
        # The posts come from a non-member: open the list (the posting policy is not tested here).
        self.relay.cli("lists", "set", "test@example.com", "posting=open")
        self.relay.cli("members", "add", "test@example.com", *MEMBERS)

    async def start_twistd(self, *twistd_options: str):
        return await self.relay.start(*twistd_options)

    def twistd_log(self) -> str:
        return self.relay.log(3000)

    def kill9(self, process):
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    async def post(self, n: int):
        client = await connect_lmtp(endpoints.UNIXClientEndpoint(reactor, self.socket))
        await client.lhlo("mx.example.com")
        replies = await client.sendmail("anne@example.com", ["test@example.com"], POST.format(n=n))
        await client.quit()
        self.assertEqual([r.code for r in replies], [250])

    def spool_rows(self) -> list[tuple[str, str]]:
        """(kind, state) of every entry, read straight from the file the dead process left."""
        db = sqlite3.connect(os.path.join(self.tmp, "var", "spool.sqlite3"))
        try:
            return db.execute("SELECT kind, state FROM entries").fetchall()
        finally:
            db.close()

    async def smarthost(self) -> FakeMTA:
        mta = FakeMTA(reactor)
        await mta.start()
        self.addCleanup(mta.stop)
        return mta

    def delivered(self, mta) -> set[tuple[str, str]]:
        return {
            (m["Message-ID"], r)
            for t, m in zip(mta.transactions, mta.messages, strict=True)
            for r in t.rcpts
        }

    def test_kill_after_250_then_restart(self):
        """Messages acknowledged while the smarthost is down survive SIGKILL and are delivered after a restart."""

        async def go():
            self.create_list()
            process = await self.start_twistd()
            for n in range(5):
                await self.post(n)
            self.kill9(process)
            # Each post is either still an inbound entry or already fanned out to every member.
            rows = self.spool_rows()
            inbound = sum(1 for kind, _ in rows if kind == "inbound")
            members = sum(1 for kind, state in rows if kind == "member" and state != "done")
            self.assertEqual(inbound, 5)
            self.assertEqual(members % len(MEMBERS), 0)
            mta = await self.smarthost()
            self.use_smarthost(mta.port)
            await self.start_twistd()
            expected = {(f"<crash{n}@example.com>", m) for n in range(5) for m in MEMBERS}
            await poll(
                reactor, lambda: expected <= self.delivered(mta), "delivery after the restart"
            )

        return as_deferred(go())

    def test_kill_during_delivery_then_restart(self):
        """SIGKILL while the smarthost holds its reply: after a restart every member gets the post (at least once)."""

        async def go():
            mta = await self.smarthost()
            # Every copy is on the wire (members span two chunks, sent in parallel)
            # and no 250 comes back before the kill.
            mta.delay("eom", 300, count=100)
            self.use_smarthost(mta.port)
            self.create_list()
            process = await self.start_twistd()
            await self.post(1)
            await poll(
                reactor,
                lambda: sum(c.startswith(b"DATA") for c in mta.commands) == 2,
                "DATA at the smarthost",
            )
            self.kill9(process)
            self.assertEqual(mta.messages, [])
            mta.clear_faults()
            await self.start_twistd()
            expected = {("<crash1@example.com>", m) for m in MEMBERS}
            await poll(
                reactor, lambda: expected <= self.delivered(mta), "delivery after the restart"
            )

        return as_deferred(go())

    def test_asyncio_reactor(self):
        """``twistd -r asyncio mailrelay`` starts (the plugin installs no reactor) and accepts mail."""

        async def go():
            self.create_list()
            await self.start_twistd("-r", "asyncio")
            await self.post(1)
            self.assertIn("AsyncioSelectorReactor", self.twistd_log())

        return as_deferred(go())
