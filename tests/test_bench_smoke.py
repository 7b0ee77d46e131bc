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
RUN = os.path.join(ROOT, "bench", "run.py")


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, RUN, *args], cwd=ROOT, capture_output=True, timeout=timeout, check=False
    )


class BenchSmokeTests(SynchronousTestCase):
    def test_smoke_run_writes_a_table_for_every_scenario(self):
        """bench/run.py --smoke measures mailrelay in all four scenarios and writes the Markdown table and raw JSON."""
        require_program("smtp-sink")
        require_program("smtp-source")
        out = temp_dir(self)
        done = _run("--smoke", "--out", out)
        self.assertEqual(done.returncode, 0, done.stderr.decode("utf-8", "replace")[-3000:])
        with open(os.path.join(out, "latest.md"), encoding="utf-8") as f:
            table = f.read()
        for heading in (
            "## LMTP ingest",
            "## Outbound",
            "## End to end",
            "## Memory",
            "## Bounces",
            "## Member delivery alone and during a burst",
        ):
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

    def test_only_measures_the_named_configurations(self):
        """--only e2e_3x5 measures that one end-to-end configuration and no other scenario."""
        require_program("smtp-sink")
        require_program("smtp-source")
        out = temp_dir(self)
        done = _run("--smoke", "--only", "e2e_3x5", "--repeat", "1", "--out", out)
        self.assertEqual(done.returncode, 0, done.stderr.decode("utf-8", "replace")[-3000:])
        with open(os.path.join(out, "latest.md"), encoding="utf-8") as f:
            table = f.read()
        self.assertIn("| 3 posts x 5 members |", table)
        self.assertIn("bench/run --smoke --only e2e_3x5", table)
        for absent in ("## LMTP ingest", "## Outbound", "## Memory", "1 posts x 20 members"):
            self.assertNotIn(absent, table)


class BenchCommandLineTests(SynchronousTestCase):
    def test_list_names_every_configuration(self):
        """--list prints each scenario's configuration ids, the ones --only accepts."""
        done = _run("--list", timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        listing = done.stdout.decode()
        for config_id in (
            "ingest_50kb_10",
            "outbound_10",
            "e2e_200x10",
            "e2e_1x10000",
            "memory_1000",
            "bounces_10000",
            "bounceload_200x10",
        ):
            self.assertIn(config_id, listing)

    def test_an_unknown_configuration_is_refused_before_anything_runs(self):
        """--only with an id no scenario has exits 2 naming it, without starting any server."""
        done = _run("--only", "e2e_200x10,e2e_7x7", timeout=60)
        self.assertEqual(done.returncode, 2)
        self.assertIn(b"no configuration 'e2e_7x7'", done.stderr)
