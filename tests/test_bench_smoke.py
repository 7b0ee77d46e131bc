"""A short run of the benchmark harness's mailrelay side, so ``bench/`` cannot rot.

Tiny sizes, one run, no peers to install: only mailrelay (a real ``twistd``),
Postfix's ``smtp-sink``/``smtp-source`` as load and smarthost.  Nothing here
is timed or compared: the figures of a smoke run mean nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.support import require_program, temp_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchSmokeTests(SynchronousTestCase):
    def test_smoke_run_writes_a_table_for_every_scenario(self):
        """bench/run.py --smoke measures mailrelay in all four scenarios and writes the Markdown table and raw JSON."""
        require_program("smtp-sink")
        require_program("smtp-source")
        out = temp_dir(self)
        done = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--smoke", "--out", out],
            cwd=ROOT,
            capture_output=True,
            timeout=300,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr.decode("utf-8", "replace")[-3000:])
        with open(os.path.join(out, "latest.md"), encoding="utf-8") as f:
            table = f.read()
        for heading in ("## LMTP ingest", "## Outbound", "## End to end", "## Memory"):
            self.assertIn(heading, table)
        # Every configuration row has a mailrelay figure (a number, not "-").
        rows = [
            line.split("|")
            for line in table.splitlines()
            if line.startswith("| ")
            and any(kind in line for kind in ("sessions |", "recipients |", "members | recip"))
        ]
        self.assertGreaterEqual(len(rows), 4, table)
        for cells in rows:
            self.assertRegex(cells[3].strip(), r"^[0-9][0-9,.]* \(", table)
        with open(os.path.join(out, "latest.json"), encoding="utf-8") as f:
            self.assertIn('"mailrelay"', f.read())
