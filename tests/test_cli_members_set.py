"""Tests for ``mailrelay members set`` (issue 12 section 3, CLI side): a member's
``moderated`` flag and display name, validated like ``lists set``, shown by
``members show``."""

from __future__ import annotations

from mailrelay import cli
from tests.test_cli import CLITestCase

LIST = "test@example.com"


class MembersSetTests(CLITestCase):
    def setUp(self):
        super().setUp()
        self.ok("lists", "create", LIST)
        self.ok("members", "add", LIST, "Anne <anne@example.org>")

    def shown(self) -> dict[str, str]:
        out = self.ok("members", "show", LIST, "anne@example.org")
        return dict(line.split(":", 1) for line in out.splitlines())

    def test_moderated_on_and_off(self):
        """moderated=yes sets the registry's flag (members show says so), moderated=no
        clears it; the address is matched without regard to case."""
        out = self.ok("members", "set", LIST, "ANNE@example.org", "moderated=yes")
        self.assertEqual(out, f"anne@example.org on {LIST}: moderated = yes\n")
        self.assertTrue(self.registry().get_member(LIST, "anne@example.org").moderated)
        self.assertEqual(self.shown()["moderated"].strip(), "yes")
        self.ok("members", "set", LIST, "anne@example.org", "moderated=off")
        self.assertFalse(self.registry().get_member(LIST, "anne@example.org").moderated)
        self.assertEqual(self.shown()["moderated"].strip(), "no")

    def test_display_name(self):
        """display_name=TEXT changes the member's name, leaving the flags as they were."""
        self.ok("members", "set", LIST, "anne@example.org", "display_name=Anne B.", "moderated=1")
        record = self.registry().get_member(LIST, "anne@example.org")
        self.assertEqual((record.display_name, record.moderated), ("Anne B.", True))

    def test_validation(self):
        """A bad value exits 1 naming the key and value; an unknown key, a word without
        '=' or a key given twice is a usage error naming the known keys; nothing is
        changed by a command with any bad word."""
        code, _out, err = self.run_cli(
            "members", "set", LIST, "anne@example.org", "display_name=X", "moderated=maybe"
        )
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("moderated = 'maybe': not a boolean (yes/no", err)
        self.assertEqual(self.registry().get_member(LIST, "anne@example.org").display_name, "Anne")
        for words, message in (
            (["colour=blue"], "unknown member setting 'colour' (known: moderated, display_name)"),
            (["moderated"], "not KEY=VALUE: 'moderated'"),
            (["moderated=yes", "moderated=no"], "moderated is given twice"),
        ):
            with self.subTest(words=words):
                code, _out, err = self.run_cli("members", "set", LIST, "anne@example.org", *words)
                self.assertEqual(code, cli.EXIT_USAGE)
                self.assertIn(message, err)
        self.assertFalse(self.registry().get_member(LIST, "anne@example.org").moderated)

    def test_not_a_member(self):
        """Setting a flag of an address that is not subscribed, or on an unknown list,
        exits 1 and says which."""
        code, _out, err = self.run_cli("members", "set", LIST, "bart@example.org", "moderated=yes")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn(f"bart@example.org is not a member of {LIST}", err)
        code, _out, err = self.run_cli(
            "members", "set", "nolist@example.com", "anne@example.org", "moderated=yes"
        )
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("no such list: nolist@example.com", err)
