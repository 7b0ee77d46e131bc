"""Tests for :mod:`mailrelay.cli.output`'s progress line: drawn on a terminal for
long work, never when piped."""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.cli.output import PROGRESS_THRESHOLD, Progress, batches, table
from tests.test_cli import CLITestCase, _Terminal


class ProgressTests(SynchronousTestCase):
    def test_drawn_on_a_terminal(self):
        """On a terminal, work of PROGRESS_THRESHOLD items or more redraws one line in
        place with \\r and ends it with one newline."""
        terminal = _Terminal()
        progress = Progress(terminal, 100_000, "Adding")
        self.assertTrue(progress.enabled)
        progress.update(0)
        progress.update(50_000)
        progress.update(100_000)
        progress.finish()
        progress.finish()
        text = terminal.getvalue()
        self.assertEqual(text.count("\r"), 3)
        self.assertIn("\rAdding [###############...............] 50,000/100,000  50%", text)
        self.assertTrue(text.endswith("100,000/100,000 100%\n"))
        self.assertEqual(text.count("\n"), 1)

    def test_silent_when_piped_or_small(self):
        """A stream that is no terminal, or work below the threshold, gets nothing."""
        for stream, total in ((io.StringIO(), 100_000), (_Terminal(), PROGRESS_THRESHOLD - 1)):
            progress = Progress(stream, total, "Adding")
            self.assertFalse(progress.enabled)
            progress.update(total)
            progress.finish()
            self.assertEqual(stream.getvalue(), "")

    def test_batches(self):
        """Shown progress splits the work into about ten batches; otherwise one."""
        self.assertEqual(batches(100_000, Progress(_Terminal(), 100_000, "x")), 10_000)
        self.assertEqual(batches(100_000, Progress(io.StringIO(), 100_000, "x")), 100_000)
        self.assertEqual(batches(0, Progress(io.StringIO(), 0, "x")), 1)


class MembersRemoveProgressTests(CLITestCase):
    def test_remove_file_progress_on_terminal_only(self):
        """members remove --file of many addresses draws a progress line on a terminal
        (and removes them all), and none when piped."""
        self.ok("lists", "create", "test@example.com")
        lines = "".join(f"user{n}@example.org\n" for n in range(PROGRESS_THRESHOLD))
        self.ok("members", "add", "test@example.com", "-f", "-", stdin=io.StringIO(lines))
        terminal = _Terminal()
        out = self.ok(
            "members",
            "remove",
            "test@example.com",
            "-f",
            "-",
            stdin=io.StringIO(lines),
            stderr=terminal,
        )
        self.assertEqual(out, f"Removed {PROGRESS_THRESHOLD:,} members from test@example.com.\n")
        self.assertIn("\rRemoving from test@example.com [", terminal.getvalue())
        self.assertEqual(self.registry().member_count("test@example.com"), 0)
        self.ok("members", "add", "test@example.com", "-f", "-", stdin=io.StringIO(lines))
        code, _out, err = self.run_cli(
            "members", "remove", "test@example.com", "-f", "-", stdin=io.StringIO(lines)
        )
        self.assertEqual(code, 0)
        self.assertNotIn("\r", err)


class TableTests(SynchronousTestCase):
    def test_aligned_but_last_column(self):
        """Every column but the last is padded to its widest cell."""
        self.assertEqual(
            table([("ID", "STATE", "REPLY"), ("10", "retry", "451 later")]),
            ["ID  STATE  REPLY", "10  retry  451 later"],
        )
