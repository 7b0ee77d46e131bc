"""Tests for :mod:`mailrelay.cli`: every command of ``mailrelay``, run in-process."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailrelay import __version__, cli
from mailrelay.cli import context
from mailrelay.cli.context import ThreadBridge
from mailrelay.cli.output import format_time
from mailrelay.config import describe_defaults
from mailrelay.model import Destination, EntryState, Envelope, Member
from mailrelay.postfix import transport_map
from mailrelay.registry import SQLiteRegistry
from mailrelay.spool import EntryUpdate, SQLiteSpool


class _Terminal(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class CLITestCase(SynchronousTestCase):
    """Runs ``main`` against a configuration whose var_dir is a fresh directory."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="mailrelay-test-")
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.var_dir = os.path.join(self.directory, "var")
        self.config = self.write_config(f"[paths]\nvar_dir = {self.var_dir}\n")

    def write_config(self, text: str, name: str = "mailrelay.ini") -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def run_cli(self, *argv, stdin=None, stderr=None, environ=None, config=True):
        """(exit status, stdout, stderr) of ``mailrelay -C CONFIG argv...``."""
        stdout = io.StringIO()
        stderr = io.StringIO() if stderr is None else stderr
        stdin = io.StringIO("") if stdin is None else stdin
        args = ["-C", self.config, *argv] if config else list(argv)
        code = cli.main(
            args,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            environ={} if environ is None else environ,
        )
        self.assertNotIn("Traceback", stderr.getvalue())
        return code, stdout.getvalue(), stderr.getvalue()

    def ok(self, *argv, **kwargs) -> str:
        """stdout of a command that must succeed."""
        code, out, err = self.run_cli(*argv, **kwargs)
        self.assertEqual(code, cli.EXIT_OK, err)
        return out

    def registry(self) -> SQLiteRegistry:
        registry = SQLiteRegistry(os.path.join(self.var_dir, "registry.sqlite3"))
        self.addCleanup(registry.close)
        return registry


class UsageTests(CLITestCase):
    def test_help(self):
        """--help of the program and of every command exits 0 and explains it on stdout."""
        out = self.ok("--help")
        for command in ("status", "lists", "members", "queue", "check-config", "postfix-maps"):
            self.assertIn(command, out)
        self.assertIn("3 configuration error", out)
        for argv in (
            ["lists", "create"],
            ["members", "add"],
            ["queue", "retry"],
            ["queue", "delete"],
            ["queue", "show"],
            ["queue", "posts"],
            ["members", "set"],
            ["status"],
            ["postfix-maps"],
            ["check-config"],
        ):
            with self.subTest(argv=argv):
                self.assertIn("usage: mailrelay " + " ".join(argv), self.ok(*argv, "--help"))

    def test_version(self):
        """--version prints the package version."""
        self.assertEqual(self.ok("--version"), f"mailrelay {__version__}\n")

    def test_usage_errors(self):
        """A missing command, an unknown option or a bad value exits 2 with the usage
        on stderr and nothing on stdout."""
        for argv in (
            [],
            ["lists"],
            ["lists", "frobnicate"],
            ["members", "add"],
            ["queue", "--limit", "0"],
            ["queue", "delete"],
            ["--bogus"],
        ):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli(*argv)
                self.assertEqual((code, out), (cli.EXIT_USAGE, ""))
                self.assertIn("usage: mailrelay", err)
                self.assertIn("error:", err)

    def test_config_option_after_command(self):
        """-C is accepted after the command as well as before it."""
        self.ok("lists", "create", "test@example.com")
        out = self.ok("lists", "list", "-C", self.config, config=False)
        self.assertIn("test@example.com", out)

    def test_config_from_environment(self):
        """Without -C, MAILRELAY_CONFIG names the configuration file."""
        environ = {"MAILRELAY_CONFIG": self.config}
        self.ok("lists", "create", "test@example.com", environ=environ, config=False)
        self.assertEqual(len(self.registry().lists()), 1)

    def test_defaults_without_config(self):
        """With no file at all the built-in defaults apply, and storage commands say so
        (the default var_dir is relative to the current directory)."""
        code, out, err = self.run_cli("postfix-maps", "--domains", config=False)
        self.assertEqual(code, 0)
        self.assertIn("no configuration file", err)
        self.assertIn("using the built-in defaults", err)


class ConfigErrorTests(CLITestCase):
    def test_bad_config_exit_3(self):
        """A broken configuration stops every command with exit status 3 and the
        message naming file, section and key."""
        bad = self.write_config("[mta]\nsmtp_prot = 25\n", "bad.ini")
        for argv in (["check-config"], ["lists", "list"], ["queue"], ["postfix-maps"]):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli("-C", bad, *argv, config=False)
                self.assertEqual((code, out), (cli.EXIT_CONFIG, ""))
                self.assertIn("bad.ini: [mta] smtp_prot = '25': unknown key", err)

    def test_missing_config_from_environment(self):
        """A missing file named by MAILRELAY_CONFIG is a configuration error saying
        where the name came from."""
        code, _out, err = self.run_cli(
            "check-config", environ={"MAILRELAY_CONFIG": "/nonexistent.ini"}, config=False
        )
        self.assertEqual(code, cli.EXIT_CONFIG)
        self.assertIn("/nonexistent.ini: cannot read configuration file", err)
        self.assertIn("MAILRELAY_CONFIG", err)


class CheckConfigTests(CLITestCase):
    def test_effective_settings(self):
        """check-config prints the effective settings by section, durations and
        booleans in INI form, and the derived LMTP endpoint."""
        out = self.ok("check-config")
        self.assertIn(f"[paths]\nvar_dir = {self.var_dir}\n", out)
        self.assertIn("delivery_retry_period = 5d\n", out)
        self.assertIn("smtp_verify_cert = yes\n", out)
        self.assertIn("lmtp_endpoint = tcp:8024:interface=127.0.0.1\n", out)
        self.assertIn("[devmode]\n", out)

    def test_password_never_printed(self):
        """The SMTP password is never printed, whether it comes from the file, the
        password file or the environment; the output says one is set."""
        password_file = os.path.join(self.directory, "password")
        with open(password_file, "w") as f:
            f.write("from-the-file\n")
        os.chmod(password_file, 0o600)
        base = "[mta]\nsmtp_user = relay\nsmtp_secure_mode = starttls\n"
        cases = [
            (self.write_config(base + "smtp_pass = in-the-ini\n", "a.ini"), {}),
            (self.write_config(base + f"smtp_pass_file = {password_file}\n", "b.ini"), {}),
            (self.write_config(base, "c.ini"), {"MAILRELAY_SMTP_PASS": "from-the-env"}),
        ]
        for config, environ in cases:
            with self.subTest(config=config):
                code, out, err = self.run_cli(
                    "-C", config, "check-config", environ=environ, config=False
                )
                self.assertEqual(code, 0, err)
                for secret in ("in-the-ini", "from-the-file", "from-the-env"):
                    self.assertNotIn(secret, out + err)
                self.assertIn("# smtp_pass is set (not shown)", out)

    def test_output_loads_back(self):
        """The printed settings are themselves a valid configuration file."""
        out = self.ok("check-config")
        again = self.write_config(out, "again.ini")
        self.assertEqual(
            self.ok("-C", again, "check-config", config=False).splitlines()[1:],
            out.splitlines()[1:],
        )

    def test_defaults(self):
        """check-config --defaults prints the documented defaults, even when the
        configuration file is broken."""
        bad = self.write_config("[nope]\n", "bad.ini")
        self.assertEqual(
            self.ok("-C", bad, "check-config", "--defaults", config=False), describe_defaults()
        )


class ListsTests(CLITestCase):
    def test_create_list_show(self):
        """lists create stores the list with its owners and name; lists list and lists
        show display it with its members count and all nine addresses."""
        out = self.ok(
            "lists",
            "create",
            "Test@Example.com",
            "--display-name",
            "Test list",
            "--owner",
            "anne@example.org",
            "--owner",
            "bart@example.org",
        )
        self.assertEqual(out, "Created list test@example.com.\n")
        self.ok("lists", "create", "other@example.com")
        self.ok("members", "add", "test@example.com", "a@example.org", "b@example.org")
        self.assertEqual(
            self.ok("lists", "list"),
            "other@example.com  0 members\ntest@example.com   2 members  Test list\n",
        )
        shown = self.ok("lists", "show", "TEST@example.com")
        self.assertIn("display name:  Test list", shown)
        self.assertIn("owners:        anne@example.org, bart@example.org", shown)
        self.assertIn("members:       2 (2 with delivery enabled)", shown)
        for name in (
            "bounces",
            "confirm",
            "join",
            "leave",
            "owner",
            "request",
            "subscribe",
            "unsubscribe",
        ):
            self.assertIn(f"test-{name}@example.com\n", shown)

    def test_create_errors(self):
        """A duplicate list, an invalid (or non-ASCII) list address or owner exit 1
        naming it; nothing is created, so the Postfix map never holds it."""
        self.ok("lists", "create", "test@example.com")
        for argv, message in (
            (["test@example.com"], "list test@example.com already exists"),
            (["not-an-address"], "'not-an-address'"),
            (["a+b@example.com"], "VERP delimiter"),
            (["liste-\u00e9t\u00e9@example.fr"], "a list address must be ASCII"),
            (["new@example.com", "--owner", "bad owner"], "'bad owner'"),
        ):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli("lists", "create", *argv)
                self.assertEqual((code, out), (cli.EXIT_FAILURE, ""))
                self.assertIn(message, err)
        self.assertEqual(len(self.registry().lists()), 1)

    def test_create_warns_about_shared_addresses(self):
        """Creating test-join@ next to test@ warns that it takes test's join address
        (and lists show marks it); creating x@ next to x-owner@ warns the other way."""
        self.ok("lists", "create", "test@example.com")
        code, _out, err = self.run_cli("lists", "create", "test-join@example.com")
        self.assertEqual(code, 0)
        self.assertIn("was the join address of test@example.com", err)
        self.assertIn(
            "test-join@example.com  (taken by the list of that name)",
            self.ok("lists", "show", "test@example.com"),
        )
        self.ok("lists", "create", "x-owner@example.com")
        code, _out, err = self.run_cli("lists", "create", "x@example.com")
        self.assertEqual(code, 0)
        self.assertIn(
            "x-owner@example.com is the list x-owner@example.com, so it is not "
            "x@example.com's sub-address",
            err,
        )
        code, _out, err = self.run_cli("lists", "create", "y@example.com")
        self.assertNotIn("warning", err)

    def test_unknown_list(self):
        """show, delete and the members commands name an unknown list and exit 1,
        also before any registry exists."""
        for argv in (
            ["lists", "show", "nope@example.com"],
            ["lists", "delete", "nope@example.com", "--yes"],
            ["members", "list", "nope@example.com"],
            ["members", "add", "nope@example.com", "a@example.org"],
            ["members", "remove", "nope@example.com", "a@example.org"],
        ):
            with self.subTest(argv=argv):
                code, out, err = self.run_cli(*argv)
                self.assertEqual((code, out), (cli.EXIT_FAILURE, ""))
                self.assertIn("no such list: nope@example.com", err)
        self.assertFalse(os.path.exists(self.var_dir), "a read created the registry")

    def test_delete_needs_confirmation(self):
        """lists delete without --yes and without a terminal refuses; on a terminal it
        asks, and only 'y' deletes; --yes deletes the list and its members."""
        self.ok("lists", "create", "test@example.com")
        self.ok("members", "add", "test@example.com", "a@example.org")
        code, _out, err = self.run_cli("lists", "delete", "test@example.com")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("not confirmed: delete list test@example.com and its 1 member", err)
        self.assertIn("--yes", err)

        code, _out, err = self.run_cli(
            "lists", "delete", "test@example.com", stdin=_Terminal("n\n")
        )
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("Delete list test@example.com and its 1 member? [y/N]", err)
        self.assertIn("cancelled", err)
        self.assertIsNotNone(self.registry().get_list("test@example.com"))

        out = self.ok("lists", "delete", "test@example.com", stdin=_Terminal("y\n"))
        self.assertEqual(out, "Deleted list test@example.com and its 1 member.\n")
        self.assertEqual(self.registry().lists(), ())

        self.ok("lists", "create", "test@example.com")
        self.ok("lists", "delete", "test@example.com", "--yes")
        self.assertEqual(self.registry().lists(), ())

    def test_registry_unreadable(self):
        """A registry file that is not a database is reported in one line, exit 1."""
        os.makedirs(self.var_dir)
        with open(os.path.join(self.var_dir, "registry.sqlite3"), "wb") as f:
            f.write(b"this is not an SQLite database" * 100)
        code, _out, err = self.run_cli("lists", "list")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("cannot open list registry", err)


class MembersTests(CLITestCase):
    def setUp(self):
        super().setUp()
        self.ok("lists", "create", "test@example.com")

    def test_add_list_remove(self):
        """members add takes plain and named addresses, members list prints them
        sorted with their names, members remove unsubscribes."""
        out = self.ok(
            "members",
            "add",
            "test@example.com",
            "Bart@Example.org",
            "Anne Person <anne@example.org>",
            "carl@example.org Carl C",
        )
        self.assertEqual(out, "Added 3 members to test@example.com.\n")
        self.assertEqual(
            self.ok("members", "list", "test@example.com"),
            "anne@example.org  Anne Person\nbart@example.org\ncarl@example.org  Carl C\n",
        )
        out = self.ok("members", "remove", "test@example.com", "BART@example.org")
        self.assertEqual(out, "Removed 1 member from test@example.com.\n")
        self.assertEqual(
            [m.address for m in self.registry().members("test@example.com")],
            ["anne@example.org", "carl@example.org"],
        )

    def test_add_duplicates(self):
        """Duplicates (existing or repeated) are reported by address and left alone, the
        others are added, and the exit status is 1."""
        self.ok("members", "add", "test@example.com", "anne@example.org")
        code, out, err = self.run_cli(
            "members",
            "add",
            "test@example.com",
            "ANNE@example.org",
            "bart@example.org",
            "bart@example.org",
        )
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertEqual(out, "Added 1 member to test@example.com.\n")
        self.assertIn(
            "already a member of test@example.com (left as it was): anne@example.org", err
        )
        self.assertIn(
            "already a member of test@example.com (left as it was): bart@example.org", err
        )
        self.assertEqual(len(self.registry().members("test@example.com")), 2)

    def test_add_invalid_adds_nothing(self):
        """One invalid address adds nothing and names every bad argument."""
        code, out, err = self.run_cli(
            "members", "add", "test@example.com", "good@example.org", "no-domain", "a@b@c"
        )
        self.assertEqual((code, out), (cli.EXIT_FAILURE, ""))
        self.assertIn("argument 'no-domain': invalid address 'no-domain'", err)
        self.assertIn("argument 'a@b@c'", err)
        self.assertIn("no member was added", err)
        self.assertEqual(self.registry().members("test@example.com"), ())

    def test_add_list_address_refused(self):
        """A list's own address (or a sub-address, VERP suffix or not) cannot be
        subscribed: it would loop mail."""
        self.ok("lists", "create", "other@example.com")
        for address in ("test@example.com", "other-bounces+x=y@example.com", "OTHER@example.com"):
            with self.subTest(address=address):
                code, _out, err = self.run_cli("members", "add", "test@example.com", address)
                self.assertEqual(code, cli.EXIT_FAILURE)
                self.assertIn("would loop mail", err)
        self.ok("members", "add", "test@example.com", "test-other@example.com")

    def test_add_needs_addresses(self):
        """members add or remove with neither addresses nor --file is a usage error."""
        for command in ("add", "remove"):
            code, _out, err = self.run_cli("members", command, "test@example.com")
            self.assertEqual(code, cli.EXIT_USAGE)
            self.assertIn("--file", err)

    def test_add_from_file(self):
        """--file reads one member per line in all three forms, skipping comments and
        blank lines, with a byte order mark and CRLF line ends tolerated."""
        path = os.path.join(self.directory, "members.txt")
        with open(path, "wb") as f:
            f.write(
                "\ufeff# our members\r\n\r\nanne@example.org\r\n"
                "Bart Simpson <bart@example.org>\r\n"
                '"Person, Carl" <carl@example.org>\n'
                "dora@example.org\tDora Δ\n   \n".encode()
            )
        out = self.ok("members", "add", "test@example.com", "--file", path)
        self.assertEqual(out, "Added 4 members to test@example.com.\n")
        self.assertEqual(
            self.registry().members("test@example.com"),
            (
                Member("anne@example.org"),
                Member("bart@example.org", "Bart Simpson"),
                Member("carl@example.org", "Person, Carl"),
                Member("dora@example.org", "Dora Δ"),
            ),
        )

    def test_add_from_stdin(self):
        """--file - reads standard input, binary or text."""
        stdin = io.TextIOWrapper(io.BytesIO(b"anne@example.org\n"), encoding="utf-8")
        self.ok("members", "add", "test@example.com", "--file", "-", stdin=stdin)
        self.ok(
            "members", "add", "test@example.com", "-f", "-", stdin=io.StringIO("bart@example.org\n")
        )
        self.assertEqual(len(self.registry().members("test@example.com")), 2)

    def test_file_errors(self):
        """Bad lines are reported with file name and line number and add nothing; an
        unreadable or non-UTF-8 file is named."""
        path = os.path.join(self.directory, "members.txt")
        with open(path, "w") as f:
            f.write("anne@example.org\nnot an address\nBart <bart@>\n")
        code, _out, err = self.run_cli("members", "add", "test@example.com", "--file", path)
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn(f"{path}, line 2: invalid address 'not'", err)
        self.assertIn(f"{path}, line 3:", err)
        self.assertIn("2 invalid lines; no member was added", err)
        self.assertEqual(self.registry().members("test@example.com"), ())

        with open(path, "wb") as f:
            f.write(b"anne@example.org\nb\xe4rbel@example.org\n")
        code, _out, err = self.run_cli("members", "add", "test@example.com", "--file", path)
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn(f"{path}, line 2: not UTF-8 text", err)

        missing = os.path.join(self.directory, "missing.txt")
        code, _out, err = self.run_cli("members", "add", "test@example.com", "--file", missing)
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn(f"cannot read {missing}: No such file or directory", err)

    def test_many_problems_summarised(self):
        """Past twenty problems the rest are counted, not listed."""
        path = os.path.join(self.directory, "members.txt")
        with open(path, "w") as f:
            f.writelines(f"bad{n}\n" for n in range(25))
        code, _out, err = self.run_cli("members", "add", "test@example.com", "--file", path)
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("... and 5 more", err)
        self.assertNotIn("line 21:", err)

    def test_list_round_trip(self):
        """members list prints what members add --file reads back, including members
        with delivery disabled; --enabled-only leaves those out."""
        self.registry().add_members(
            "test@example.com",
            [
                Member("anne@example.org", "Anne"),
                Member("bart@example.org", "", delivery_enabled=False),
                Member("carl@example.org", "Carl Person", delivery_enabled=False),
            ],
        )
        listed = self.ok("members", "list", "test@example.com")
        self.assertIn("bart@example.org  (delivery disabled)\n", listed)
        self.ok("lists", "create", "copy@example.com")
        self.ok("members", "add", "copy@example.com", "--file", "-", stdin=io.StringIO(listed))
        registry = self.registry()
        self.assertEqual(registry.members("copy@example.com"), registry.members("test@example.com"))
        self.assertEqual(
            self.ok("members", "list", "test@example.com", "--enabled-only"),
            "anne@example.org  Anne\n",
        )

    def test_remove_not_members(self):
        """Addresses that are not members are reported; the others are removed; exit 1."""
        self.ok("members", "add", "test@example.com", "anne@example.org")
        code, out, err = self.run_cli(
            "members", "remove", "test@example.com", "nobody@example.org", "anne@example.org"
        )
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertEqual(out, "Removed 1 member from test@example.com.\n")
        self.assertIn("not a member of test@example.com: nobody@example.org", err)

    def test_remove_from_file(self):
        """members remove --file takes the add format."""
        self.ok("members", "add", "test@example.com", "anne@example.org", "bart@example.org")
        self.ok(
            "members",
            "remove",
            "test@example.com",
            "-f",
            "-",
            stdin=io.StringIO("# leaving\nAnne <anne@example.org>\n"),
        )
        self.assertEqual(
            [m.address for m in self.registry().members("test@example.com")], ["bart@example.org"]
        )

    def test_import_100000(self):
        """100,000 addresses from a file are imported in well under ten seconds."""
        path = os.path.join(self.directory, "members.txt")
        with open(path, "w") as f:
            f.writelines(f"user{n}@example{n % 97}.org  User {n}\n" for n in range(100_000))
        started = time.monotonic()
        out = self.ok("members", "add", "test@example.com", "--file", path)
        elapsed = time.monotonic() - started
        self.assertEqual(out, "Added 100,000 members to test@example.com.\n")
        self.assertLess(elapsed, 10)
        self.assertEqual(len(self.registry().members("test@example.com")), 100_000)

    def test_progress_on_terminal(self):
        """A large import shows a progress bar when stderr is a terminal, and none
        otherwise."""
        lines = "".join(f"user{n}@example.org\n" for n in range(1500))
        terminal = _Terminal()
        self.ok(
            "members",
            "add",
            "test@example.com",
            "-f",
            "-",
            stdin=io.StringIO(lines),
            stderr=terminal,
        )
        self.assertIn("\rAdding to test@example.com [", terminal.getvalue())
        self.assertIn("1,500/1,500 100%", terminal.getvalue())
        self.ok("lists", "create", "quiet@example.com")
        code, _out, err = self.run_cli(
            "members", "add", "quiet@example.com", "-f", "-", stdin=io.StringIO(lines)
        )
        self.assertEqual(code, 0)
        self.assertNotIn("\r", err)


class QueueTests(CLITestCase):
    def setUp(self):
        super().setUp()
        spool_path = os.path.join(self.var_dir, "spool.sqlite3")
        bridge = ThreadBridge()
        spool = SQLiteSpool(spool_path, bridge)
        post = Destination("test@example.com", None, "test@example.com")
        owner = Destination("test@example.com", "owner", "test-owner@example.com")
        bounce = Destination("test@example.com", "bounces", "test-bounces+a=b@example.com")
        envelope = Envelope("anne@example.org", (post, owner, bounce, post), time.time())
        self.ids = bridge.wait(spool.enqueue(envelope, b"Subject: hi\r\n\r\nhello\r\n"))
        self.next_attempt = time.time() + 7800
        bridge.wait(
            spool.update(
                [
                    EntryUpdate(
                        self.ids[0],
                        EntryState.RETRY,
                        self.next_attempt,
                        "451 4.3.0 try again later",
                        count_attempt=True,
                    ),
                    EntryUpdate(
                        self.ids[1],
                        EntryState.FAILED,
                        None,
                        "550 5.1.1 no such user",
                        count_attempt=True,
                    ),
                    EntryUpdate(self.ids[2], EntryState.HELD),
                    EntryUpdate(self.ids[3], EntryState.DONE),
                ]
            )
        )
        bridge.wait(spool.close())

    def states(self) -> dict[int, EntryState]:
        bridge = ThreadBridge()
        spool = SQLiteSpool(os.path.join(self.var_dir, "spool.sqlite3"), bridge)
        try:
            return {entry.entry_id: entry.state for entry in spool.entries()}
        finally:
            bridge.wait(spool.close())

    def test_show(self):
        """queue prints the counts by state, then every entry but the done ones with
        list, recipient, attempts, next attempt time and last error."""
        out = self.ok("queue")
        lines = out.splitlines()
        self.assertEqual(
            lines[0], "queued: 0  inflight: 0  retry: 1  done: 1  failed: 1  held: 1  (total 4)"
        )
        self.assertEqual(
            lines[2].split(),
            [
                "ID",
                "STATE",
                "KIND",
                "LIST",
                "RECIPIENT",
                "ATTEMPTS",
                "NEXT",
                "ATTEMPT",
                "LAST",
                "ERROR",
            ],
        )
        retry, failed, held = lines[3:]
        self.assertEqual(
            retry.split()[:6],
            [str(self.ids[0]), "retry", "post", "test@example.com", "test@example.com", "1"],
        )
        self.assertIn(format_time(self.next_attempt, time.time()).split(" (")[0], retry)
        self.assertIn("(in 2h)", retry)
        self.assertTrue(retry.endswith("451 4.3.0 try again later"))
        self.assertEqual(
            failed.split()[2:5], ["-owner", "test@example.com", "test-owner@example.com"]
        )
        self.assertTrue(failed.endswith("550 5.1.1 no such user"))
        self.assertEqual(
            held.split()[2:5], ["-bounces", "test@example.com", "test-bounces+a=b@example.com"]
        )

    def test_show_member_copies(self):
        """A post expanded by the delivery runner shows one ``member`` entry per member."""
        if not hasattr(SQLiteSpool, "expand"):
            raise SkipTest("this spool has no entry kinds")
        from mailrelay.model import EntryKind

        bridge = ThreadBridge()
        spool = SQLiteSpool(os.path.join(self.var_dir, "spool.sqlite3"), bridge)
        bridge.wait(spool.update([EntryUpdate(self.ids[0], EntryState.INFLIGHT)]))
        new = bridge.wait(spool.expand(self.ids[0], ["anne@example.org"], EntryKind.MEMBER))
        bridge.wait(spool.close())
        row = next(line for line in self.ok("queue").splitlines() if line.startswith(f"{new[0]} "))
        self.assertEqual(
            row.split()[:5],
            [str(new[0]), "queued", "member", "test@example.com", "anne@example.org"],
        )

    def test_show_state_and_limit(self):
        """--state picks one state ('all' includes done); --limit caps the rows and
        says how many there are."""
        out = self.ok("queue", "--state", "done")
        self.assertEqual(len(out.splitlines()), 4)
        self.assertIn(" done ", out)
        self.assertEqual(len(self.ok("queue", "--state", "all").splitlines()), 7)
        code, out, err = self.run_cli("queue", "--limit", "1")
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 4)
        self.assertIn("showing 1 of 3 entries", err)

    def test_show_circuit_breaker(self):
        """A paused delivery (the spool's "circuit" status) is shown first."""

        class PausedSpool(SQLiteSpool):
            def get_status(self, key):
                return {"circuit": "smarthost refused authentication (535)"}.get(key)

        self.patch(context, "SQLiteSpool", PausedSpool)
        out = self.ok("queue")
        self.assertTrue(out.startswith("DELIVERY PAUSED: smarthost refused authentication (535)\n"))

    def test_show_published_circuit_state(self):
        """The circuit state the daemon publishes with set_status is shown, and gone
        once cleared."""
        if not hasattr(SQLiteSpool, "set_status"):
            raise SkipTest("this spool has no status table")
        bridge = ThreadBridge()
        spool = SQLiteSpool(os.path.join(self.var_dir, "spool.sqlite3"), bridge)
        bridge.wait(spool.set_status("circuit", "open: 535 authentication failed"))
        self.assertTrue(
            self.ok("queue").startswith("DELIVERY PAUSED: open: 535 authentication failed\n")
        )
        bridge.wait(spool.set_status("circuit", None))
        bridge.wait(spool.close())
        self.assertNotIn("PAUSED", self.ok("queue"))

    def test_no_spool_yet(self):
        """Before any message arrived, queue shows zero counts and creates nothing."""
        shutil.rmtree(self.var_dir)
        code, out, err = self.run_cli("queue")
        self.assertEqual(code, 0)
        self.assertIn("(total 0)", out)
        self.assertIn("no spool at", err)
        self.assertFalse(os.path.exists(self.var_dir))

    def test_retry(self):
        """queue retry requeues retry and failed entries by id; others are refused by
        id and state, unknown ids named; exit 1 when anything was refused."""
        code, out, err = self.run_cli("queue", "retry", str(self.ids[0]), str(self.ids[2]), "999")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertEqual(out, "Queued 1 entry for delivery again.\n")
        self.assertIn(f"entry {self.ids[2]} is held: only retry and failed entries", err)
        self.assertIn("no entry 999 in the queue", err)
        self.assertEqual(self.states()[self.ids[0]], EntryState.QUEUED)
        self.assertEqual(self.states()[self.ids[1]], EntryState.FAILED)

    def test_retry_all(self):
        """queue retry --all requeues every retry and failed entry."""
        self.assertEqual(
            self.ok("queue", "retry", "--all"), "Queued 2 entries for delivery again.\n"
        )
        states = self.states()
        self.assertEqual(
            [states[i] for i in self.ids],
            [EntryState.QUEUED, EntryState.QUEUED, EntryState.HELD, EntryState.DONE],
        )

    def test_retry_arguments(self):
        """queue retry needs ids or --all, not both (usage error)."""
        for argv in ([], ["--all", "1"]):
            code, _out, err = self.run_cli("queue", "retry", *argv)
            self.assertEqual(code, cli.EXIT_USAGE)
            self.assertIn("--all", err)

    def test_delete(self):
        """queue delete needs --yes (or a terminal answer) and removes the entries;
        unknown ids are named and make the exit status 1."""
        code, _out, err = self.run_cli("queue", "delete", str(self.ids[1]))
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("not confirmed: delete queue entry", err)
        self.assertIn(self.ids[1], self.states())

        out = self.ok("queue", "delete", str(self.ids[1]), stdin=_Terminal("yes\n"))
        self.assertEqual(out, "Deleted 1 entry.\n")
        self.assertNotIn(self.ids[1], self.states())

        code, out, err = self.run_cli("queue", "delete", str(self.ids[2]), "999", "--yes")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertEqual(out, "Deleted 1 entry.\n")
        self.assertIn("no entry 999 in the queue", err)

        code, out, err = self.run_cli("queue", "delete", "999", "--yes")
        self.assertEqual((code, out), (cli.EXIT_FAILURE, ""))
        self.assertIn("nothing deleted", err)

    def test_delete_inflight_warns(self):
        """Deleting an entry being delivered warns that it does not stop the delivery."""
        bridge = ThreadBridge()
        spool = SQLiteSpool(os.path.join(self.var_dir, "spool.sqlite3"), bridge)
        bridge.wait(spool.update([EntryUpdate(self.ids[0], EntryState.INFLIGHT)]))
        bridge.wait(spool.close())
        code, _out, err = self.run_cli("queue", "delete", str(self.ids[0]), "--yes")
        self.assertEqual(code, 0)
        self.assertIn("is being delivered right now", err)


class PostfixMapsTests(CLITestCase):
    def setUp(self):
        super().setUp()
        self.ok("lists", "create", "test@example.com")
        self.ok("lists", "create", "other@example.net")

    def test_stdout(self):
        """postfix-maps prints the transport map for every list to the configured LMTP
        endpoint, and the domains Postfix must relay for on stderr."""
        code, out, err = self.run_cli("postfix-maps")
        self.assertEqual(code, 0)
        self.assertEqual(
            out, transport_map(["test@example.com", "other@example.net"], "lmtp:[127.0.0.1]:8024")
        )
        self.assertIn("Postfix must relay for: example.com example.net", err)

    def test_endpoint_from_config(self):
        """The nexthop follows [mta] lmtp_host/lmtp_port or lmtp_endpoint; --nexthop
        overrides it."""
        self.config = self.write_config(
            f"[paths]\nvar_dir = {self.var_dir}\n[mta]\nlmtp_host = 192.0.2.1\nlmtp_port = 24\n",
            "port.ini",
        )
        self.assertRegex(
            self.ok("postfix-maps"), r"\ntest@example\.com +lmtp:\[192\.0\.2\.1\]:24\n"
        )
        self.config = self.write_config(
            f"[paths]\nvar_dir = {self.var_dir}\n[mta]\n"
            f"lmtp_endpoint = unix:/run/mailrelay/lmtp.sock\n",
            "unix.ini",
        )
        code, out, err = self.run_cli("postfix-maps")
        self.assertRegex(out, r"\ntest@example\.com +lmtp:unix:/run/mailrelay/lmtp\.sock\n")
        self.assertIn("chroot", err)
        out = self.ok("postfix-maps", "--nexthop", "lmtp:unix:private/mailrelay")
        self.assertRegex(out, r"\ntest-owner@example\.com +lmtp:unix:private/mailrelay\n")

    def test_endpoint_not_derivable(self):
        """A systemd endpoint cannot be turned into a nexthop: exit 1 with a hint."""
        self.config = self.write_config(
            f"[paths]\nvar_dir = {self.var_dir}\n[mta]\n"
            f"lmtp_endpoint = systemd:domain=UNIX:index=0\n",
            "systemd.ini",
        )
        code, out, err = self.run_cli("postfix-maps")
        self.assertEqual((code, out), (cli.EXIT_FAILURE, ""))
        self.assertIn("--nexthop", err)
        code, _out, err = self.run_cli("postfix-maps", "--nexthop", "no nexthop")
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn("not a Postfix transport:nexthop", err)

    def test_output_file(self):
        """-o replaces the file atomically, readable by Postfix (0644), and --domains
        writes the relay domains map."""
        path = os.path.join(self.directory, "transport")
        with open(path, "w") as f:
            f.write("old content\n")
        code, out, err = self.run_cli("postfix-maps", "-o", path)
        self.assertEqual((code, out), (0, ""))
        self.assertIn(f"now run: postmap {path}", err)
        with open(path) as f:
            self.assertIn("other-bounces@example.net  ", f.read())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        self.assertEqual(sorted(os.listdir(self.directory)), ["mailrelay.ini", "transport", "var"])
        domains = os.path.join(self.directory, "domains")
        self.ok("postfix-maps", "--domains", "--output", domains)
        with open(domains) as f:
            self.assertTrue(
                f.read().endswith("\nexample.com example.com\nexample.net example.net\n")
            )

    def test_output_file_error(self):
        """An unwritable output path is named, exit 1."""
        path = os.path.join(self.directory, "no", "such", "dir", "transport")
        code, _out, err = self.run_cli("postfix-maps", "-o", path)
        self.assertEqual(code, cli.EXIT_FAILURE)
        self.assertIn(f"cannot write {path}", err)


class UnreachableStoreTests(CLITestCase):
    """Run by a user who may not read the spool or the registry, the CLI says so
    and fails; it never reports an empty store (CI runs as root: the commands
    run in a child process that becomes nobody)."""

    NOBODY = 65534

    def setUp(self):
        super().setUp()
        if os.getuid() != 0:
            raise SkipTest("needs root to become nobody")
        os.chmod(self.directory, 0o755)
        self.ok("lists", "create", "test@example.com")
        bridge = ThreadBridge()
        bridge.wait(SQLiteSpool(os.path.join(self.var_dir, "spool.sqlite3"), bridge).close())
        os.chmod(self.config, 0o644)

    def run_as_nobody(self, *argv: str) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of ``main`` in a forked child run as nobody
        (a fork, not a new interpreter: the interpreter's own files may be out of
        nobody's reach)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the test runner
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(self.NOBODY)
                os.setuid(self.NOBODY)
                out, err = io.StringIO(), io.StringIO()
                code = cli.main(["-C", self.config, *argv], stdout=out, stderr=err, environ={})
                report = f"{code}\0{out.getvalue()}\0{err.getvalue()}"
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                report = f"99\0\0{type(e).__name__}: {e}"
            os.write(write_end, report.encode("utf-8", "replace"))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            report = f.read().decode("utf-8")
        os.waitpid(pid, 0)
        code, out, err = report.split("\0")
        return int(code), out, err

    def assert_unreachable(self, argv: list[str], path: str) -> None:
        code, out, err = self.run_as_nobody(*argv)
        self.assertEqual((code, out), (cli.EXIT_FAILURE, ""), err)
        self.assertIn(f"cannot open {path}: Permission denied", err)
        self.assertNotIn("yet", err)

    def test_directory_out_of_reach(self):
        """A var_dir nobody may not enter: lists and queue fail naming the file."""
        os.chmod(self.var_dir, 0o700)
        self.assert_unreachable(["lists", "list"], os.path.join(self.var_dir, "registry.sqlite3"))
        self.assert_unreachable(["queue"], os.path.join(self.var_dir, "spool.sqlite3"))

    def test_files_unreadable(self):
        """Files nobody may not read, in a directory nobody may enter: the same."""
        os.chmod(self.var_dir, 0o755)
        for name in os.listdir(self.var_dir):
            os.chmod(os.path.join(self.var_dir, name), 0o600)
        self.assert_unreachable(["lists", "list"], os.path.join(self.var_dir, "registry.sqlite3"))
        self.assert_unreachable(["queue"], os.path.join(self.var_dir, "spool.sqlite3"))

    def test_nothing_there_yet(self):
        """A var_dir that does not exist is still "nothing yet", exit status 0."""
        shutil.rmtree(self.var_dir)
        code, _, err = self.run_as_nobody("lists", "list")
        self.assertEqual(code, cli.EXIT_OK, err)
        self.assertIn("no list was ever created", err)


class PackageTests(SynchronousTestCase):
    """The public names of ``mailrelay.cli`` and its two ways of running."""

    def test_public_names_import(self):
        """Every name in ``mailrelay.cli.__all__`` imports from the package, ``main`` among them
        (the console script is ``mailrelay.cli:main``)."""
        for name in cli.__all__:
            self.assertIsNotNone(getattr(cli, name), name)
        self.assertTrue(callable(cli.main))

    def test_python_m(self):
        """``python -m mailrelay.cli --version`` runs the command line and exits 0."""
        done = subprocess.run(
            [sys.executable, "-m", "mailrelay.cli", "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual((done.returncode, done.stdout), (0, f"mailrelay {__version__}\n"))
