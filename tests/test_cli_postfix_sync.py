"""Tests for the Postfix maps that follow the lists (issue 11 section 4, CLI side):
``lists create`` and ``lists delete`` rewrite ``[postfix]`` maps and run postmap,
checked with a fake postmap and with Postfix's real one."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from mailrelay import cli
from tests.support import require_program
from tests.test_cli import CLITestCase

# A postmap stand-in that records the file it was run on, beside the map.
_RECORDING_POSTMAP = (
    "import sys; open(sys.argv[1] + '.postmapped', 'a').write(open(sys.argv[1]).read() + '--\\n')"
)
_FAILING_POSTMAP = (
    "import sys; print('postmap: fatal: open database ' + sys.argv[1] + '.db: Permission denied');"
    " sys.exit(3)"
)


class MapsFollowListsTests(CLITestCase):
    def configure(self, command: list[str], domains: bool = True) -> None:
        self.transport = os.path.join(self.directory, "transport")
        self.domains = os.path.join(self.directory, "domains")
        self.config = self.write_config(
            f"[paths]\nvar_dir = {self.var_dir}\n"
            "[mta]\nlmtp_endpoint = tcp:8024:interface=127.0.0.1\n"
            f"[postfix]\ntransport_file = {self.transport}\n"
            + (f"domains_file = {self.domains}\n" if domains else "")
            + f"postmap_command = {shlex.join(command)}\n"
        )

    def read(self, path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    def test_create_and_delete_rewrite_maps_and_run_postmap(self):
        """lists create and delete rewrite both maps and run postmap_command on each,
        naming the files; the maps hold exactly the lists that exist."""
        self.configure([sys.executable, "-c", _RECORDING_POSTMAP])
        code, out, err = self.run_cli("lists", "create", "test@example.com")
        self.assertEqual((code, out), (0, "Created list test@example.com.\n"))
        self.assertIn(f"updated the Postfix maps: {self.transport}, {self.domains}", err)
        self.assertIn("test-bounces@example.com", self.read(self.transport))
        self.assertIn("example.com", self.read(self.domains))
        # postmap ran on the new file, not an older one.
        self.assertIn("test-bounces@example.com", self.read(self.transport + ".postmapped"))
        self.ok("lists", "create", "other@example.net")
        self.ok("lists", "delete", "test@example.com", "--yes")
        transport = self.read(self.transport)
        self.assertNotIn("test@example.com", transport)
        self.assertIn("other-request@example.net", transport)
        self.assertEqual(self.read(self.transport + ".postmapped").count("--\n"), 3)
        self.assertNotIn("example.com", self.read(self.domains))

    def test_failing_postmap_keeps_the_list_and_says_so(self):
        """A failing postmap makes lists create exit 1 with the command, its exit
        status and its output, while the list itself stays created; --sync retries."""
        self.configure([sys.executable, "-c", _FAILING_POSTMAP], domains=False)
        code, out, err = self.run_cli("lists", "create", "test@example.com")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertEqual(out, "Created list test@example.com.\n")
        self.assertIn(
            "list test@example.com was created, but the Postfix maps are not up to date", err
        )
        self.assertIn(f"{sys.executable} -c", err)
        self.assertIn("failed (exit status 3)", err)
        self.assertIn(f"open database {self.transport}.db: Permission denied", err)
        self.assertIn("mailrelay postfix-maps --sync", err)
        self.assertEqual([m.posting_address for m in self.registry().lists()], ["test@example.com"])
        self.assertIn("test@example.com", self.read(self.transport))

        code, _out, err = self.run_cli("postfix-maps", "--sync")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("failed (exit status 3)", err)
        self.configure([sys.executable, "-c", _RECORDING_POSTMAP], domains=False)
        out = self.ok("postfix-maps", "--sync")
        self.assertEqual(out, f"Updated {self.transport} for 1 list.\n")

    def test_missing_postmap(self):
        """A postmap_command that does not exist is named, with the fix."""
        self.configure([os.path.join(self.directory, "no-such-postmap")])
        code, _out, err = self.run_cli("lists", "create", "test@example.com")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("no such program", err)

    def test_without_maps_configured(self):
        """Without [postfix] maps, lists create only reminds the operator, and
        postfix-maps --sync is a usage error naming the keys."""
        code, _out, err = self.run_cli("lists", "create", "test@example.com")
        self.assertEqual(code, 0)
        self.assertIn("set [postfix] transport_file", err)
        code, _out, err = self.run_cli("postfix-maps", "--sync")
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertIn("[postfix] transport_file or domains_file", err)


class RealPostmapTests(CLITestCase):
    def test_new_list_routed_without_a_manual_step(self):
        """With Postfix's own postmap (private configuration directory), a list made
        by lists create is found in the transport and relay-domains maps at once, its
        sub-addresses included, and gone after lists delete."""
        postmap = require_program("postmap")
        conf = os.path.join(self.directory, "postfix")
        os.mkdir(conf)
        with open(os.path.join(conf, "main.cf"), "w", encoding="utf-8") as f:
            f.write("compatibility_level = 3.6\n")
        transport = os.path.join(self.directory, "transport")
        domains = os.path.join(self.directory, "domains")
        self.config = self.write_config(
            f"[paths]\nvar_dir = {self.var_dir}\n"
            "[mta]\nlmtp_endpoint = tcp:8024:interface=127.0.0.1\n"
            f"[postfix]\ntransport_file = {transport}\ndomains_file = {domains}\n"
            f"postmap_command = {shlex.join([postmap, '-c', conf])}\n"
        )

        def query(key: str, path: str) -> str:
            found = subprocess.run(
                [postmap, "-c", conf, "-q", key, path],
                capture_output=True,
                text=True,
                timeout=30,
            )
            self.assertEqual(found.stderr, "")
            return found.stdout.strip()

        self.assertEqual(
            query("test@example.com", transport) if os.path.exists(transport) else "", ""
        )
        self.ok("lists", "create", "test@example.com")
        self.assertEqual(query("test@example.com", transport), "lmtp:[127.0.0.1]:8024")
        self.assertEqual(query("test-join@example.com", transport), "lmtp:[127.0.0.1]:8024")
        self.assertEqual(query("example.com", domains), "example.com")
        self.ok("lists", "delete", "test@example.com", "--yes")
        self.assertEqual(query("test@example.com", transport), "")
        self.assertEqual(query("example.com", domains), "")
