"""Tests for ``mailrelay status`` (issue 11 section 2): the daemon's state told from
its published record, the spool's figures, the breaker, and per-list counts, as text
and as the documented JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from twisted.internet import task

from mailrelay import __version__
from mailrelay.cli.status import daemon_state
from mailrelay.model import EntryState
from mailrelay.service import DAEMON_STATUS_KEY, _DaemonStatus
from mailrelay.spool import EntryUpdate
from tests.test_cli_queue import LIST, _SpoolCase

# The keys README.rst documents for `mailrelay status --json`.
_TOP_KEYS = {
    "version",
    "generated_at",
    "daemon",
    "spool",
    "oldest_deferred",
    "breaker",
    "deliveries",
    "lists",
}
_DAEMON_KEYS = {
    "running",
    "responding",
    "pid",
    "version",
    "started_at",
    "uptime_seconds",
    "heartbeat_at",
    "stale_pid",
}


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


class StatusTests(_SpoolCase):
    def status(self) -> dict:
        return json.loads(self.ok("status", "--json"))

    def set_status(self, key, text):
        spool, bridge = self.open_spool()
        try:
            bridge.wait(spool.set_status(key, text))
        finally:
            bridge.wait(spool.close())

    def test_nothing_there_yet(self):
        """Before any list or message exists, status --json prints one object with every
        documented key, the daemon not running, zero counts and no lists."""
        status = self.status()
        self.assertEqual(set(status), _TOP_KEYS)
        self.assertEqual(set(status["daemon"]), _DAEMON_KEYS)
        self.assertFalse(status["daemon"]["running"])
        self.assertEqual(status["spool"]["total"], 0)
        self.assertIsNone(status["oldest_deferred"])
        self.assertEqual(status["breaker"], {"state": "closed", "reason": None})
        self.assertEqual(status["lists"], [])
        self.assertEqual(status["version"], __version__)
        self.assertIn("daemon:      not running", self.ok("status"))

    def test_running_daemon(self):
        """The record the daemon's status service publishes makes status report it
        running, with its pid, version and uptime."""
        spool, bridge = self.open_spool()
        clock = task.Clock()
        clock.advance(time.time() - 7200)  # started two hours ago
        service = _DaemonStatus(spool, clock)
        service.startService()
        bridge.wait(spool.set_status("unrelated", None))  # the first record is written
        clock.advance(7200)  # a heartbeat now
        bridge.wait(spool.close())  # flushes it
        daemon = self.status()["daemon"]
        self.assertTrue(daemon["running"])
        self.assertTrue(daemon["responding"])
        self.assertEqual(daemon["pid"], os.getpid())
        self.assertEqual(daemon["version"], __version__)
        self.assertTrue(7200 <= daemon["uptime_seconds"] < 7260, daemon)
        self.assertIn(
            f"running, pid {daemon['pid']}, version {__version__}, up 2h", self.ok("status")
        )

    def test_killed_daemon_is_not_running(self):
        """A record left by a daemon that died without stopping (its pid is gone) is
        reported as not running, naming the old pid."""
        pid = _dead_pid()
        self.set_status(
            DAEMON_STATUS_KEY, json.dumps({"pid": pid, "version": "0", "started_at": 1})
        )
        daemon = self.status()["daemon"]
        self.assertEqual((daemon["running"], daemon["stale_pid"]), (False, pid))
        self.assertIn(f"its last run, pid {pid}, ended without stopping", self.ok("status"))

    def test_missed_heartbeats(self):
        """A live daemon whose heartbeat is more than three intervals old is reported
        as not responding."""
        now = 10_000.0
        record = {"pid": os.getpid(), "started_at": 0.0, "heartbeat_interval": 60}
        fresh = daemon_state(json.dumps({**record, "heartbeat_at": now - 170}), now)
        late = daemon_state(json.dumps({**record, "heartbeat_at": now - 190}), now)
        self.assertEqual((fresh["running"], fresh["responding"]), (True, True))
        self.assertEqual((late["running"], late["responding"]), (True, False))
        self.assertIsNone(daemon_state("not json", now)["pid"])

    def test_figures(self):
        """Spool counts by state, the oldest deferred entry with its last reply, the
        breaker's state and reason, deliveries in the last minute and hour, and per
        list its members, posts today and bounces."""
        self.ok("lists", "create", LIST)
        self.ok("lists", "create", "quiet@example.com")
        self.ok("members", "add", LIST, "a@x.org", "b@x.org", "c@x.org")
        _old_key, old_copies = self.store_post(["a@x.org", "b@x.org"], received_at=1000.0)
        _key, copies = self.store_post(["a@x.org", "b@x.org", "c@x.org"], message_id="<2@x>")
        next_attempt = time.time() + 600
        self.update(
            EntryUpdate(
                old_copies[1].entry_id, EntryState.RETRY, next_attempt, "451 4.2.2 full", True
            ),
            EntryUpdate(copies[2].entry_id, EntryState.RETRY, next_attempt, "421 later", True),
            EntryUpdate(old_copies[0].entry_id, EntryState.DONE),
            EntryUpdate(copies[0].entry_id, EntryState.DONE),
            EntryUpdate(copies[1].entry_id, EntryState.DONE),
        )
        registry = self.registry()
        registry.record_bounce(LIST, "c@x.org", 550, "no such user", time.time())
        registry.record_bounce(LIST, "c@x.org", 550, "no such user", 1000.0)
        self.set_status("circuit", "since 2026-01-01, site problem: 535 auth failed")

        status = self.status()
        self.assertEqual(
            status["spool"],
            {"queued": 0, "inflight": 0, "retry": 2, "done": 5, "failed": 0, "held": 0, "total": 7},
        )
        deferred = status["oldest_deferred"]
        self.assertEqual(
            (deferred["entry_id"], deferred["recipient"], deferred["list"], deferred["attempts"]),
            (old_copies[1].entry_id, "b@x.org", LIST, 1),
        )
        self.assertEqual(deferred["last_reply"], "451 4.2.2 full")
        self.assertEqual(deferred["next_attempt_at"], next_attempt)
        self.assertEqual(status["breaker"]["state"], "open")
        self.assertIn("535 auth failed", status["breaker"]["reason"])
        self.assertEqual(status["deliveries"], {"last_minute": 3, "last_hour": 3})
        self.assertEqual(
            status["lists"],
            [
                {
                    "address": "quiet@example.com",
                    "members": 0,
                    "posts_today": 0,
                    "bounces": 0,
                    "bounces_today": 0,
                },
                {"address": LIST, "members": 3, "posts_today": 1, "bounces": 2, "bounces_today": 1},
            ],
        )
        text = self.ok("status")
        self.assertIn(f"deferred:    oldest is entry {old_copies[1].entry_id} to b@x.org", text)
        self.assertIn("last reply: 451 4.2.2 full", text)
        self.assertIn("delivery:    PAUSED (circuit breaker open): since 2026-01-01", text)
        self.assertIn("delivered:   3 in the last minute, 3 in the last hour", text)
        row = next(line for line in text.splitlines() if line.startswith(LIST))
        self.assertEqual(row.split(), [LIST, "3", "1", "1", "2"])


class StatusDocumentationTests(_SpoolCase):
    def test_readme_documents_every_key(self):
        """README.rst's `mailrelay status --json` section names every key the
        command prints, nested ones included."""
        import mailrelay

        readme = os.path.join(os.path.dirname(os.path.dirname(mailrelay.__file__)), "README.rst")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        section = text.split("``mailrelay status --json``\n---", 1)[1].split("\nList processing\n")[
            0
        ]
        self.ok("lists", "create", LIST)
        _key, copies = self.store_post(["a@x.org"])
        self.update(EntryUpdate(copies[0].entry_id, EntryState.RETRY, 1.0, "451", True))
        status = json.loads(self.ok("status", "--json"))
        keys = set(status)
        for value in status.values():
            if isinstance(value, dict):
                keys |= set(value)
        keys |= set(status["lists"][0])
        for key in sorted(keys):
            with self.subTest(key=key):
                self.assertIn(f"``{key}``", section)
