"""Tests for the post views of ``mailrelay queue`` (issue 11 section 2): ``queue show``,
``queue posts``/``--by-post``, ``queue delete --message/--post``, refused posts past
``--limit``, and the progress line of ``queue retry --all``."""

from __future__ import annotations

import io
import os
import time

from mailrelay import cli
from mailrelay.cli.context import ThreadBridge
from mailrelay.cli.output import PROGRESS_THRESHOLD
from mailrelay.model import Destination, EntryKind, EntryState, Envelope, Refusal, Route
from mailrelay.spool import EntryUpdate, SQLiteSpool
from tests.test_cli import CLITestCase, _Terminal

LIST = "test@example.com"
POST = Destination(LIST, None, LIST)


class _SpoolCase(CLITestCase):
    """A spool file with posts stored as the runner stores them (expanded into copies)."""

    def open_spool(self):
        bridge = ThreadBridge()
        spool = SQLiteSpool(os.path.join(self.var_dir, "spool.sqlite3"), bridge)
        return spool, bridge

    def store_post(self, members, message_id="<1@example.org>", received_at=None):
        """Store a post to LIST expanded into one MEMBER copy per member; (key, copies)."""
        spool, bridge = self.open_spool()
        try:
            envelope = Envelope(
                "anne@example.org",
                (POST,),
                time.time() if received_at is None else received_at,
                "",
                message_id,
            )
            stored = bridge.wait(
                spool.store(
                    envelope,
                    b"Subject: hi\r\n\r\nbody\r\n",
                    [Route(EntryState.DONE, EntryKind.MEMBER, tuple(members))],
                )
            )
            post = spool.get_entry(stored.entry_ids[0])
            copies = [
                e for e in spool.message_entries(post.message_key) if e.kind is EntryKind.MEMBER
            ]
            return post.message_key, copies
        finally:
            bridge.wait(spool.close())

    def update(self, *updates):
        spool, bridge = self.open_spool()
        try:
            bridge.wait(spool.update(list(updates)))
        finally:
            bridge.wait(spool.close())

    def entries(self):
        spool, bridge = self.open_spool()
        try:
            return {e.entry_id: e for e in spool.entries()}
        finally:
            bridge.wait(spool.close())


class QueueShowTests(_SpoolCase):
    def setUp(self):
        super().setUp()
        self.key, (self.a, self.b, self.c) = self.store_post(["a@x.org", "b@x.org", "c@x.org"])
        self.next_attempt = time.time() + 3600
        # a: failed once, then delivered; b: waiting for its second attempt.
        self.update(
            EntryUpdate(self.a.entry_id, EntryState.RETRY, 1.0, "451 4.7.1 greylisted", True),
            EntryUpdate(self.b.entry_id, EntryState.RETRY, self.next_attempt, "452 full", True),
        )
        self.update(EntryUpdate(self.a.entry_id, EntryState.DONE, count_attempt=True))

    def test_show_message(self):
        """queue show ID prints the entry's message (sender, Message-ID, lists, copies by
        state) and each recipient's state, attempts, next attempt and last reply, with
        the entry asked for marked."""
        out = self.ok("queue", "show", str(self.b.entry_id))
        lines = out.splitlines()
        self.assertEqual(lines[0], f"message <1@example.org>  (post {self.key})")
        self.assertIn("  from:      anne@example.org", lines)
        self.assertIn(f"  lists:     {LIST}", lines)
        self.assertIn("  copies:    1 queued, 1 retry, 1 done", lines)
        rows = {line.split()[0]: line for line in lines if line[:1].isdigit()}
        self.assertEqual(
            rows[f"{self.b.entry_id}*"].split()[:5],
            [f"{self.b.entry_id}*", "retry", "member", "b@x.org", "1"],
        )
        self.assertIn("(in 1h)", rows[f"{self.b.entry_id}*"])
        self.assertTrue(rows[f"{self.b.entry_id}*"].endswith("452 full"))
        self.assertTrue(rows[str(self.c.entry_id)].endswith(" -"))
        self.assertEqual(len(rows), 4)  # the post as received, and three copies

    def test_delivered_entry_shows_earlier_error_as_earlier(self):
        """A copy delivered after a failed attempt does not show that attempt's reply
        as its last error, neither in queue show nor in the queue table."""
        row = next(
            line
            for line in self.ok("queue", "show", str(self.a.entry_id)).splitlines()
            if line.startswith(f"{self.a.entry_id}*")
        )
        self.assertEqual(row.split()[:5], [f"{self.a.entry_id}*", "done", "member", "a@x.org", "2"])
        self.assertTrue(row.endswith("(earlier attempt: 451 4.7.1 greylisted)"), row)
        table_row = next(
            line
            for line in self.ok("queue", "--state", "done").splitlines()
            if line.startswith(f"{self.a.entry_id} ")
        )
        self.assertTrue(table_row.endswith("(earlier attempt: 451 4.7.1 greylisted)"), table_row)

    def test_show_unknown(self):
        """queue show of an id not in the spool exits 1 and says so."""
        code, out, err = self.run_cli("queue", "show", "9999")
        self.assertEqual((code, out), (cli.EXIT_FAILURE, ""))
        self.assertIn("no entry 9999 in the queue", err)


class QueuePostsTests(_SpoolCase):
    def setUp(self):
        super().setUp()
        self.first, self.first_copies = self.store_post(["a@x.org", "b@x.org"])
        self.second, _ = self.store_post(["c@x.org"], message_id="<2@example.org>")
        self.done, done_copies = self.store_post(["d@x.org"], message_id="<3@example.org>")
        self.update(EntryUpdate(done_copies[0].entry_id, EntryState.DONE))
        self.update(EntryUpdate(self.first_copies[0].entry_id, EntryState.DONE))

    def posts_rows(self, *argv):
        lines = self.ok("queue", *argv).splitlines()
        self.assertEqual(
            lines[0].split(),
            [
                "POST",
                "RECEIVED",
                "LISTS",
                "QUEUED",
                "INFLIGHT",
                "RETRY",
                "DONE",
                "FAILED",
                "HELD",
                "MESSAGE-ID",
            ],
        )
        return {int(line.split()[0]): line for line in lines[1:]}

    def test_posts(self):
        """queue posts lists each waiting post once: id, time received, list, copies by
        state and Message-ID; a post whose copies are all done only with --all."""
        rows = self.posts_rows("posts")
        self.assertEqual(sorted(rows), [self.first, self.second])
        cells = rows[self.first].split()
        self.assertEqual(cells[-7:], ["1", "0", "0", "1", "0", "0", "<1@example.org>"])
        self.assertIn(LIST, rows[self.first])
        self.assertIn(self.done, self.posts_rows("posts", "--all"))
        self.assertEqual(
            sorted(self.posts_rows("posts", "--message", "2@example.org")), [self.second]
        )

    def test_by_post(self):
        """queue --by-post prints the same table as queue posts."""
        self.assertEqual(self.posts_rows("--by-post"), self.posts_rows("posts"))

    def test_posts_limit(self):
        """--limit caps the posts listed and says how many there are."""
        code, out, err = self.run_cli("queue", "posts", "--limit", "1")
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 2)
        self.assertIn("showing 1 of 2 posts", err)

    def test_delete_by_message_id(self):
        """queue delete --message cancels the post and every copy still waiting, in one
        step; the delivered copy stays as history; other posts are untouched."""
        code, _out, err = self.run_cli("queue", "delete", "--message", "<1@example.org>")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("not confirmed: delete post", err)
        out = self.ok("queue", "delete", "--message", "<1@example.org>", "--yes")
        self.assertIn("1 entry (1 queued)", out)
        left = {e.entry_id: e.state for e in self.entries().values() if e.message_key == self.first}
        self.assertEqual(
            sorted(left.values()), [EntryState.DONE, EntryState.DONE]
        )  # the post as received, and the delivered copy
        self.assertIn(self.second, {e.message_key for e in self.entries().values()})

    def test_delete_by_post_id(self):
        """queue delete --post ID does the same by the id queue posts shows."""
        out = self.ok("queue", "delete", "--post", str(self.second), "--yes")
        self.assertIn(f"post {self.second} <2@example.org>", out)
        left = [e for e in self.entries().values() if e.message_key == self.second]
        self.assertEqual([(e.kind, e.state) for e in left], [(EntryKind.INBOUND, EntryState.DONE)])

    def test_delete_post_errors(self):
        """An unknown Message-ID or post id deletes nothing and exits 1; ids, --message
        and --post are exclusive (usage error); a post all delivered has nothing to go."""
        code, _out, err = self.run_cli("queue", "delete", "--message", "<nope@x>", "--yes")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("no post with Message-ID <nope@x>", err)
        code, _out, err = self.run_cli("queue", "delete", "--post", "999", "--yes")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("no post 999", err)
        code, _out, err = self.run_cli("queue", "delete", "1", "--message", "<1@example.org>")
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertIn("not allowed with", err)
        out = self.ok("queue", "delete", "--message", "<3@example.org>", "--yes")
        self.assertIn("Nothing to delete", out)

    def test_refused_posts_not_cut_silently(self):
        """Refused posts beyond --limit are counted: the queue says how many more."""
        spool, bridge = self.open_spool()
        try:
            bridge.wait(
                spool.store_outgoing(
                    [],
                    refusals=[
                        Refusal(self.first, "552 5.3.4 too big"),
                        Refusal(self.second, "554 5.7.1 spam"),
                    ],
                )
            )
        finally:
            bridge.wait(spool.close())
        out = self.ok("queue", "--limit", "1")
        self.assertEqual(out.count("REFUSED post"), 1)
        self.assertIn("... and 1 more refused posts (`mailrelay queue posts --refused`", out)
        self.assertEqual(len(self.posts_rows("posts", "--refused")), 2)


class RetryProgressTests(_SpoolCase):
    def setUp(self):
        super().setUp()
        _key, copies = self.store_post([f"m{n}@x.org" for n in range(PROGRESS_THRESHOLD)])
        self.update(*(EntryUpdate(c.entry_id, EntryState.FAILED, error="gave up") for c in copies))

    def test_retry_all_progress_on_terminal(self):
        """queue retry --all on many entries draws a progress line on a terminal and
        still requeues every one."""
        terminal = _Terminal()
        out = self.ok("queue", "retry", "--all", stderr=terminal)
        self.assertEqual(out, f"Queued {PROGRESS_THRESHOLD:,} entries for delivery again.\n")
        self.assertIn("\rRetrying [", terminal.getvalue())
        self.assertIn(f"{PROGRESS_THRESHOLD:,}/{PROGRESS_THRESHOLD:,} 100%", terminal.getvalue())
        states = [e.state for e in self.entries().values() if e.kind is EntryKind.MEMBER]
        self.assertEqual(set(states), {EntryState.QUEUED})

    def test_retry_all_quiet_when_piped(self):
        """Piped, queue retry --all prints no progress line."""
        stderr = io.StringIO()
        self.ok("queue", "retry", "--all", stderr=stderr)
        self.assertNotIn("\r", stderr.getvalue())
