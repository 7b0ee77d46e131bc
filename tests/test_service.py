"""Wiring: the twistd plugin, tap Options, makeService, and the whole loop in one process."""

from __future__ import annotations

import inspect
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

from twisted.application.service import IServiceMaker
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay import cli, tap
from mailrelay.config import Settings
from mailrelay.errors import SpoolError, StateDirectoryInUse
from mailrelay.mta.connection import Connection, SecureMode
from mailrelay.mta.tls import client_tls_options
from mailrelay.registry import MemoryRegistry
from mailrelay.service import connection_arguments, makeService, tls_arguments
from mailrelay.spool import SQLiteSpool
from mailrelay.spool.memory import MemorySpool
from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import LMTPClient, connect_lmtp
from tests.support import as_deferred, free_port

POST = b"From: anne@example.com\r\nTo: test@example.com\r\nSubject: loop\r\n\r\nHello, list.\r\n"


class PluginTests(SynchronousTestCase):
    def test_plugin_is_discovered(self):
        """twistd finds the plugin as 'mailrelay' (no __init__.py shadows twisted.plugins)."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("mailrelay", makers)
        self.assertIs(makers["mailrelay"].options, tap.Options)

    def test_import_light(self):
        """Importing the plugin, tap, CLI and policy modules installs no reactor (twistd -r asyncio works)."""
        code = (
            "import sys, twisted.plugins.mailrelay_plugin, mailrelay.tap, mailrelay.cli, mailrelay.runner, "
            "mailrelay.lmtp.policy, mailrelay.mta.errors, mailrelay.mta.bulk;"
            "sys.exit('twisted.internet.reactor' in sys.modules)"
        )
        self.assertEqual(subprocess.run([sys.executable, "-c", code], check=False).returncode, 0)

    def test_options_default_and_config(self):
        """Without -C the embedded defaults apply; -C reads the file."""
        env = os.environ.pop("MAILRELAY_CONFIG", None)
        self.addCleanup(lambda: env is not None and os.environ.__setitem__("MAILRELAY_CONFIG", env))
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["settings"].mta.lmtp_endpoint, "tcp:8024:interface=127.0.0.1")
        path = os.path.join(tempfile.mkdtemp(), "mailrelay.ini")
        with open(path, "w") as f:
            f.write("[mta]\nsmtp_port = 2525\n")
        options = tap.Options()
        options.parseOptions(["-C", path])
        self.assertEqual(options["settings"].mta.smtp_port, 2525)

    def test_bad_config_stops_with_one_line_naming_it(self):
        """A bad value stops twistd with a message naming file, section, key and value."""
        path = os.path.join(tempfile.mkdtemp(), "bad.ini")
        with open(path, "w") as f:
            f.write("[mta]\nsmtp_port = abc\n")
        e = self.assertRaises(tap.StartupFailed, tap.Options().parseOptions, ["-C", path])
        for part in (path, "[mta]", "smtp_port", "abc"):
            self.assertIn(part, str(e))


class OutboundCheckTests(SynchronousTestCase):
    def test_unusable_ca_file_stops_with_one_line(self):
        """A CA file that exists but holds no certificate stops twistd with a message naming it."""
        tmp = tempfile.mkdtemp()
        ca = os.path.join(tmp, "ca.pem")
        with open(ca, "w") as f:
            f.write("not a certificate\n")
        path = os.path.join(tmp, "mailrelay.ini")
        with open(path, "w") as f:
            f.write(f"[mta]\nsmtp_secure_mode = starttls\nsmtp_ca_file = {ca}\n")
        e = self.assertRaises(tap.StartupFailed, tap.Options().parseOptions, ["-C", path])
        self.assertIn(ca, str(e))

    def test_malformed_credentials_file_stops_with_one_line(self):
        """A malformed authinfo line stops twistd with the file and line number."""
        tmp = tempfile.mkdtemp()
        authinfo = os.path.join(tmp, "authinfo")
        with open(authinfo, "w") as f:
            f.write("machine smtp.example.com login relay\n")
        os.chmod(authinfo, 0o600)
        path = os.path.join(tmp, "mailrelay.ini")
        with open(path, "w") as f:
            f.write(f"[mta]\nsmtp_credentials_file = {authinfo}\n")
        e = self.assertRaises(tap.StartupFailed, tap.Options().parseOptions, ["-C", path])
        self.assertIn(f"{authinfo}, line 1", str(e))


class ConnectionArgumentsTests(SynchronousTestCase):
    """One mapping from [mta] and [devmode] to the smarthost connection, shared by
    makeService's pool and twistd's option check."""

    def test_connection_built_from_settings(self):
        """connection_arguments names only Connection's parameters, and a Connection
        built from them carries the configured host, port, limits, mode and devmode."""
        settings = Settings.from_mapping(
            {
                "mta": {
                    "smtp_host": "smtp.example.com",
                    "smtp_port": 587,
                    "max_sessions_per_connection": 3,
                    "smtp_secure_mode": "starttls",
                    "smtp_user": "u",
                    "smtp_pass": "p",
                    "smtp_timeout": "7s",
                    "smtp_connect_timeout": "5s",
                    "smtp_idle_timeout": "9s",
                },
                "devmode": {"enabled": True, "recipient": "dev@example.com"},
            },
            environ={},
        )
        arguments = connection_arguments(settings)
        parameters = set(inspect.signature(Connection).parameters) - {"reactor"}
        self.assertLessEqual(set(arguments), parameters)
        connection = Connection(**arguments, reactor=task.Clock())
        self.assertEqual(
            (connection.host, connection.port, connection.sessions_per_connection),
            ("smtp.example.com", 587, 3),
        )
        self.assertIs(connection.secure_mode, SecureMode.STARTTLS)
        self.assertTrue(connection.authenticates)
        self.assertEqual(connection.devmode_recipient, "dev@example.com")
        self.assertEqual(
            (connection.timeout, connection.connect_timeout, connection.idle_timeout),
            (7.0, 5.0, 9.0),
        )

    def test_unset_keys_are_none(self):
        """Empty keys reach Connection as None, and devmode off means no rewrite."""
        arguments = connection_arguments(Settings.from_mapping({}, environ={}))
        for name in ["user", "password", "ca_file", "client_cert", "client_key"]:
            with self.subTest(name=name):
                self.assertIsNone(arguments[name])
        self.assertIsNone(arguments["devmode_recipient"])
        self.assertIsNone(arguments["credentials_file"])
        self.assertIsNone(arguments["helo_name"])

    def test_tls_arguments_are_client_tls_options_keywords(self):
        """tls_arguments names only keyword parameters of client_tls_options."""
        arguments = tls_arguments(Settings.from_mapping({}, environ={}))
        self.assertLessEqual(set(arguments), set(inspect.signature(client_tls_options).parameters))


class ListenerTests(SynchronousTestCase):
    """makeService's LMTP listener, on a MemoryReactor."""

    def make(self, **mta) -> MemoryReactorClock:
        memory = MemoryReactorClock()
        settings = Settings.from_mapping(
            {"paths": {"var_dir": tempfile.mkdtemp()}, "mta": mta}, environ={}
        )
        relay = makeService(settings, memory, spool=MemorySpool(memory))
        relay.startService()
        self.addCleanup(relay.stopService)
        return memory

    def test_listen_backlog(self):
        """The LMTP listener is created with backlog 1024 by default (Twisted's is
        50, which drops connections in a burst), or lmtp_listen_backlog."""
        port, factory, backlog, interface = self.make().tcpServers[0]
        self.assertEqual((port, backlog, interface), (8024, 1024, "127.0.0.1"))
        self.assertEqual(factory.max_sessions, 100)
        socket = os.path.join(tempfile.mkdtemp(), "lmtp.sock")
        memory = self.make(lmtp_endpoint=f"unix:{socket}", lmtp_listen_backlog=2048)
        address, _, backlog, mode, _ = memory.unixServers[0]
        self.assertEqual((address, backlog, mode), (socket, 2048, 0o660))


class StateDirectoryLockTests(SynchronousTestCase):
    """One relay per [paths] var_dir; the command line is not locked out."""

    def settings(self, var_dir: str) -> Settings:
        return Settings.from_mapping({"paths": {"var_dir": var_dir}}, environ={})

    def start(self, settings: Settings):
        memory = MemoryReactorClock()
        relay = makeService(settings, memory, spool=MemorySpool(memory))
        relay.startService()
        return relay

    def test_second_relay_refused(self):
        """A second relay on the same var_dir refuses to start, naming the directory,
        the holder's pid and the fix; once the first stops, a new one starts."""
        var_dir = tempfile.mkdtemp()
        first = self.start(self.settings(var_dir))
        with open(os.path.join(var_dir, "mailrelay.lock")) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        error = self.assertRaises(StateDirectoryInUse, self.start, self.settings(var_dir))
        self.assertEqual(error.pid, os.getpid())
        self.assertEqual(
            str(error),
            f"{var_dir} is in use by another mailrelay daemon (pid {os.getpid()}): "
            f"stop it, or give this one another [paths] var_dir",
        )
        self.successResultOf(first.stopService())
        self.successResultOf(self.start(self.settings(var_dir)).stopService())

    def test_cli_works_while_relay_runs(self):
        """The command line reads and changes the stores of a running relay."""
        var_dir = tempfile.mkdtemp()
        config = os.path.join(var_dir, "mailrelay.ini")
        with open(config, "w") as f:
            f.write(f"[paths]\nvar_dir = {var_dir}\n")
        relay = self.start(self.settings(var_dir))
        self.addCleanup(relay.stopService)
        for argv in (["lists", "create", "test@example.com"], ["queue"]):
            with self.subTest(argv=argv):
                out, err = io.StringIO(), io.StringIO()
                self.assertEqual(cli.main(["-C", config, *argv], stdout=out, stderr=err), 0)


class DaemonStatusTests(SynchronousTestCase):
    """The record `mailrelay status` tells a running daemon by."""

    def test_published_with_heartbeat_and_removed_at_stop(self):
        """A started relay publishes its pid, version, start time and heartbeat under
        "daemon", renews the heartbeat every interval, and removes the record when
        it stops."""
        from mailrelay import __version__
        from mailrelay.service import DAEMON_STATUS_KEY, HEARTBEAT_INTERVAL

        memory = MemoryReactorClock()
        memory.advance(1000)
        spool = MemorySpool(memory)
        settings = Settings.from_mapping({"paths": {"var_dir": tempfile.mkdtemp()}}, environ={})
        relay = makeService(settings, memory, spool=spool)
        relay.startService()
        record = json.loads(spool.get_status(DAEMON_STATUS_KEY))
        self.assertEqual(
            record,
            {
                "pid": os.getpid(),
                "version": __version__,
                "started_at": 1000,
                "heartbeat_at": 1000,
                "heartbeat_interval": HEARTBEAT_INTERVAL,
            },
        )
        memory.advance(HEARTBEAT_INTERVAL)
        record = json.loads(spool.get_status(DAEMON_STATUS_KEY))
        self.assertEqual((record["started_at"], record["heartbeat_at"]), (1000, 1060))
        relay.getServiceNamed("mailrelay-status").stopService()
        self.assertIsNone(spool.get_status(DAEMON_STATUS_KEY))
        memory.advance(HEARTBEAT_INTERVAL)  # no heartbeat after the stop
        self.assertIsNone(spool.get_status(DAEMON_STATUS_KEY))
        relay.stopService()


class StoreOpeningTests(TestCase):
    """twistd forks into the background between makeService and starting the
    service: what does not survive a fork (the spool's writer thread, SQLite
    connections) is made when the service starts, not before."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.var_dir = os.path.join(self.tmp, "var")
        self.settings = Settings.from_mapping(
            {
                "paths": {"var_dir": self.var_dir},
                "mta": {"lmtp_endpoint": f"unix:{os.path.join(self.tmp, 'lmtp.sock')}"},
            },
            environ={},
        )

    def held(self) -> tuple[list[str], list[str]]:
        """(the spool writer threads running, the state directory's SQLite files open)."""
        threads = [t.name for t in threading.enumerate() if t.name.startswith("mailrelay spool")]
        files = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(self.var_dir) and ".sqlite3" in target:
                files.append(target)
        return threads, files

    async def test_nothing_opened_before_start(self):
        """makeService checks the stores (it creates and migrates both files) but
        leaves no SQLite file open and starts no thread; privilegedStartService
        (twistd calls it in the daemon, after the fork) opens them, before the
        LMTP listener binds; stopService closes them all again."""
        relay = makeService(self.settings, reactor)
        stores = relay.getServiceNamed("mailrelay-stores")
        self.assertTrue(os.path.exists(self.settings.paths.spool_path))
        self.assertTrue(os.path.exists(self.settings.paths.registry_path))
        self.assertEqual(self.held(), ([], []))
        self.assertEqual((stores._spool.is_open, stores._registry.is_open), (False, False))
        self.addCleanup(lambda: relay.running or relay.stopService())

        relay.privilegedStartService()
        self.assertEqual((stores._spool.is_open, stores._registry.is_open), (True, True))
        threads, files = self.held()
        self.assertEqual(len(threads), 1)
        self.assertIn(self.settings.paths.spool_path, files)
        self.assertIn(self.settings.paths.registry_path, files)
        relay.startService()
        await relay.stopService()
        self.assertEqual((stores._spool.is_open, stores._registry.is_open), (False, False))
        self.assertEqual(self.held(), ([], []))

    async def test_start_without_privileged_start(self):
        """An embedder that only calls startService gets open stores too: the
        daemon's status record is written through the spool at once."""
        from mailrelay.service import DAEMON_STATUS_KEY

        relay = makeService(self.settings, reactor)
        relay.startService()
        spool = relay.getServiceNamed("mailrelay-stores")._spool
        try:
            self.assertTrue(spool.is_open)
            # The writer commits in order: once this write is done, so is the record.
            await spool.set_status("probe", "x")
            self.assertEqual(json.loads(spool.get_status(DAEMON_STATUS_KEY))["pid"], os.getpid())
        finally:
            await relay.stopService()

    def test_stores_of_the_embedder_are_left_alone(self):
        """A spool and registry handed to makeService are used as they are: the
        service does not open them, only closes them when it stops."""
        memory = MemoryReactorClock()
        spool = MemorySpool(memory)
        registry = MemoryRegistry()
        relay = makeService(self.settings, memory, spool=spool, registry=registry)
        relay.startService()
        self.assertEqual(relay.getServiceNamed("mailrelay-stores")._opens, ())
        self.successResultOf(relay.stopService())

    def test_failed_open_closes_what_opened(self):
        """When one store cannot be opened at start, the error is raised and the
        stores already opened are closed again: nothing is left half open."""
        from mailrelay.service import _StoreService

        events = []

        class Store:
            def __init__(self, name, fails=False):
                self.name, self.fails, self.is_open = name, fails, False

            def open(self):
                if self.fails:
                    raise SpoolError(f"cannot open {self.name}")
                self.is_open = True
                events.append(f"open {self.name}")

            def close(self):
                self.is_open = False
                events.append(f"close {self.name}")

        stores = _StoreService(None, None, None, opens=(Store("registry"), Store("spool", True)))
        error = self.assertRaises(SpoolError, stores.privilegedStartService)
        self.assertEqual(str(error), "cannot open spool")
        self.assertEqual(events, ["open registry", "close registry"])
        self.assertFalse(stores.running)


class RelayCase(TestCase):
    """The whole relay on the test's reactor, LMTP on a unix socket; subclasses pick the smarthost."""

    async def start_relay(self, smtp_port: int, *, sender=None, spool=None, **mta):
        self.tmp = getattr(self, "tmp", None) or tempfile.mkdtemp()
        self.socket = os.path.join(self.tmp, "lmtp.sock")
        self.config = os.path.join(self.tmp, "mailrelay.ini")
        lists = mta.pop("lists", {})
        values = {
            "lmtp_endpoint": f"unix:{self.socket}",
            "smtp_host": "127.0.0.1",
            "smtp_port": str(smtp_port),
            **mta,
        }
        with open(self.config, "w") as f:
            f.write(
                "[paths]\nvar_dir = var\n[mta]\n"
                + "".join(f"{k} = {v}\n" for k, v in values.items())
                + "[lists]\n"
                + "".join(f"{k} = {v}\n" for k, v in lists.items())
            )
        from mailrelay.config import load_settings

        self.settings: Settings = load_settings(self.config)
        self.service = makeService(self.settings, reactor, sender=sender, spool=spool)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def admin(self, *argv: str) -> int:
        return cli.main(["-C", self.config, *argv], stdout=io.StringIO(), stderr=io.StringIO())

    async def lmtp(self) -> LMTPClient:
        client = await connect_lmtp(endpoints.UNIXClientEndpoint(reactor, self.socket))
        await client.lhlo("mx.example.com")
        self.addCleanup(client.quit)
        return client

    async def wait_for(self, predicate, what: str):
        """Wait (bounded) until the runner is idle and ``predicate()`` holds."""
        runner = self.service.getServiceNamed("mailrelay-delivery")
        for _ in range(500):
            await runner.when_idle()
            if predicate():
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")


class LoopTests(RelayCase):
    """The loop with the FakeMTA as smarthost."""

    async def start_relay(self, **mta):
        self.smarthost = FakeMTA(reactor, pipelining=True)
        await self.smarthost.start()
        self.addCleanup(self.smarthost.stop)
        await super().start_relay(self.smarthost.port, **mta)

    async def delivered(self, count: int):
        await self.wait_for(lambda: len(self.smarthost.messages) >= count, f"{count} messages")

    def test_post_reaches_members(self):
        """A post accepted over LMTP reaches each member through the smarthost with list headers,
        envelope sender list-bounces; the unix socket is mode 660."""

        async def go():
            await self.start_relay()
            self.assertEqual(stat.S_IMODE(os.stat(self.socket).st_mode), 0o660)
            self.assertEqual(self.admin("lists", "create", "test@example.com"), 0)
            # anne is not a member: these posts test delivery, not the posting policy.
            self.assertEqual(self.admin("lists", "set", "test@example.com", "posting=open"), 0)
            self.assertEqual(
                self.admin(
                    "members", "add", "test@example.com", "bart@example.com", "cate@example.org"
                ),
                0,
            )
            client = await self.lmtp()
            replies = await client.sendmail(
                "anne@example.com", ["test@example.com", "nolist@example.com"], POST
            )
            self.assertEqual([r.code for r in replies], [250, 550])
            await self.delivered(1)
            txns = self.smarthost.transactions
            self.assertEqual({t.mail_from for t in txns}, {"test-bounces@example.com"})
            self.assertEqual(
                sorted(r for t in txns for r in t.rcpts), ["bart@example.com", "cate@example.org"]
            )
            msg = self.smarthost.messages[0]
            self.assertEqual(msg["List-Id"].strip("<>").split(".")[0], "test")
            self.assertEqual(msg["Precedence"], "list")
            # mailrelay records the LMTP sender; the smarthost saw the list's bounces address.
            self.assertEqual(
                msg.get_all("X-MailFrom"), ["anne@example.com", "test-bounces@example.com"]
            )

        return as_deferred(go())

    def test_disk_full(self):
        """With the spool out of space, every recipient of a new message gets 452 4.3.1
        (never 250, never 5xx); the relay stays up and a message that fits is then
        accepted and delivered."""

        async def go():
            self.tmp = tempfile.mkdtemp()
            spool = SQLiteSpool(os.path.join(self.tmp, "small.sqlite3"), reactor, max_bytes=2**18)
            await self.start_relay(spool=spool)
            for address in ("test@example.com", "other@example.com"):
                self.assertEqual(self.admin("lists", "create", address), 0)
                self.assertEqual(self.admin("lists", "set", address, "posting=open"), 0)
                self.assertEqual(self.admin("members", "add", address, "bart@example.com"), 0)
            client = await self.lmtp()
            big = POST + (b"x" * 76 + b"\r\n") * (2**20 // 78)
            recipients = ["test@example.com", "other@example.com"]
            replies = await client.sendmail("anne@example.com", recipients, big)
            self.assertEqual(
                [(r.code, r.text) for r in replies],
                [(452, "4.3.1 Requested action not taken: insufficient system storage")] * 2,
            )
            replies = await client.sendmail("anne@example.com", recipients, POST)
            self.assertEqual([r.code for r in replies], [250, 250])
            await self.delivered(2)
            self.assertEqual(len(self.smarthost.messages), 2)

        return as_deferred(go())

    def test_space_reserve(self):
        """The relay holds [mta] spool_reserve bytes in var_dir/space-reserve; with a
        reserve the file system cannot hold twice, every recipient of a post gets
        452 4.3.1 and nothing is stored; 0 turns the reserve off."""

        async def go():
            await self.start_relay()
            path = self.settings.paths.reserve_path
            self.assertEqual(os.path.dirname(path), self.settings.paths.var_dir)
            self.assertEqual(os.stat(path).st_size, 8 * 2**20)
            await self.service.stopService()

            os.unlink(path)
            await self.start_relay(spool_reserve="100000TiB")
            self.assertFalse(os.path.exists(path))
            self.assertEqual(self.admin("lists", "create", "test@example.com"), 0)
            self.assertEqual(self.admin("members", "add", "test@example.com", "b@example.com"), 0)
            client = await connect_lmtp(endpoints.UNIXClientEndpoint(reactor, self.socket))
            await client.lhlo("mx.example.com")
            replies = await client.sendmail("anne@example.com", ["test@example.com"], POST)
            self.assertEqual([(r.code, r.text.split()[0]) for r in replies], [(452, "4.3.1")])
            spool = SQLiteSpool(self.settings.paths.spool_path, reactor)
            self.addCleanup(spool.close)
            self.assertEqual(spool.entries(), [])
            await client.quit()
            await self.service.stopService()

            await self.start_relay(spool_reserve="0")
            self.assertFalse(os.path.exists(path))

        return as_deferred(go())

    def test_settings_reach_the_runner(self):
        """[mta] keep_delivered and the delivery settings are the runner's."""

        async def go():
            await self.start_relay(keep_delivered="2h", verp_delivery="yes")
            runner = self.service.getServiceNamed("mailrelay-delivery")
            self.assertEqual((runner._keep_done, runner._verp), (7200.0, True))

        return as_deferred(go())

    def test_processing_yield_reaches_the_runner(self):
        """[lists] processing_yield is how long list-processing mail waits for delivery."""

        async def go():
            await self.start_relay(lists={"processing_yield": "0"})
            runner = self.service.getServiceNamed("mailrelay-delivery")
            self.assertEqual(runner._router._processing_yield, 0.0)

        return as_deferred(go())

    def test_cli_changes_seen_by_running_service(self):
        """A list created with the CLI (another SQLite connection) is accepted at the next RCPT,
        and a deleted one is refused, without a restart."""

        async def go():
            await self.start_relay()
            client = await self.lmtp()
            self.assertEqual((await client.command("MAIL FROM:<anne@example.com>")).code, 250)
            self.assertEqual((await client.command("RCPT TO:<late@example.com>")).code, 550)
            self.admin("lists", "create", "late@example.com")
            self.assertEqual((await client.command("RCPT TO:<late@example.com>")).code, 250)
            self.assertEqual((await client.command("RCPT TO:<late-join@example.com>")).code, 250)
            self.admin("lists", "delete", "late@example.com", "--yes")
            self.assertEqual((await client.command("RCPT TO:<late@example.com>")).code, 550)

        return as_deferred(go())

    def test_commands_processed_not_delivered(self):
        """Mail to a command address is processed (a -join is answered with a confirmation
        request to the sender), never sent to members; -bounces mail is kept HELD."""

        async def go():
            await self.start_relay()
            self.admin("lists", "create", "test@example.com")
            self.admin("members", "add", "test@example.com", "bart@example.com")
            client = await self.lmtp()
            replies = await client.sendmail(
                "anne@example.com", ["test-join@example.com", "test-bounces@example.com"], POST
            )
            self.assertEqual([r.code for r in replies], [250, 250])
            await self.delivered(1)
            spool = self.service.getServiceNamed("mailrelay-stores")._spool
            states = {e.destination.subaddress: e.state.value for e in spool.entries()}
            self.assertEqual((states["join"], states["bounces"]), ("done", "held"))
            self.assertEqual(
                [tuple(t.rcpts) for t in self.smarthost.transactions], [("anne@example.com",)]
            )

        return as_deferred(go())


class HeldSender:
    """An embedder's IMessageSender whose sends complete when the test says, and
    whose quit() does not wait for them (nothing obliges a sender to)."""

    max_connections = 4

    def __init__(self):
        self.pending: list[tuple[tuple[str, ...], defer.Deferred]] = []

    def sendmail(self, sender, recipients, message):
        d: defer.Deferred = defer.Deferred()
        self.pending.append((tuple(recipients), d))
        return d

    def quit(self):
        return defer.succeed(None)


class ShutdownTests(RelayCase):
    def test_stop_waits_for_delivery_then_closes_stores(self):
        """Stopping while a transaction is in flight: the runner waits for its result and records it
        before the stores close, so no copy is left in flight to be sent again after a restart."""

        async def go():
            held = HeldSender()
            await self.start_relay(free_port(), sender=held)
            self.admin("lists", "create", "test@example.com")
            self.admin("lists", "set", "test@example.com", "posting=open")
            self.admin("members", "add", "test@example.com", "bart@example.com")
            client = await self.lmtp()
            await client.sendmail("anne@example.com", ["test@example.com"], POST)
            for _ in range(500):  # not wait_for: the runner is busy, never idle, until released
                if held.pending:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            self.assertTrue(held.pending)
            stopped = self.service.stopService()
            self.assertNoResult(stopped)
            for _, d in held.pending:
                d.callback({})
            await stopped
            import sqlite3

            db = sqlite3.connect(self.settings.paths.spool_path)
            try:
                states = db.execute("SELECT kind, state FROM entries ORDER BY id").fetchall()
            finally:
                db.close()
            self.assertEqual(states, [("inbound", "done"), ("member", "done")])

        return as_deferred(go())


class IndependentSmarthostTests(RelayCase):
    """The same loop with aiosmtpd (an independent implementation) as the smarthost."""

    async def start_relay(self, **mta):
        try:
            from aiosmtpd.controller import Controller
        except ImportError as e:  # pragma: no cover - a test dependency
            raise AssertionError("aiosmtpd missing: install the test extras") from e

        class Handler:
            def __init__(self):
                self.envelopes = []

            async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: N802
                if address.startswith("gone@"):
                    return "550 5.1.1 <gone@example.com>: no such user"
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                self.envelopes.append(
                    (envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
                )
                return "250 2.0.0 OK"

        self.handler = Handler()
        controller = Controller(self.handler, hostname="127.0.0.1", port=free_port())
        controller.start()
        self.addCleanup(controller.stop)
        await super().start_relay(controller.port, **mta)

    def test_members_receive_post_and_refusal_bounces(self):
        """aiosmtpd receives the post for each member from list-bounces with the list headers; a member it
        refuses permanently is dead-lettered and recorded as a bounce, the others are delivered."""

        async def go():
            await self.start_relay()
            self.admin("lists", "create", "test@example.com")
            self.admin("lists", "set", "test@example.com", "posting=open")
            self.admin("members", "add", "test@example.com", "bart@example.com", "gone@example.com")
            client = await self.lmtp()
            replies = await client.sendmail("anne@example.com", ["test@example.com"], POST)
            self.assertEqual([r.code for r in replies], [250])
            stores = self.service.getServiceNamed("mailrelay-stores")
            await self.wait_for(
                lambda: self.handler.envelopes and stores._registry.bounces("test@example.com"),
                "delivery and the bounce",
            )
            ((mail_from, rcpts, content),) = self.handler.envelopes
            self.assertEqual((mail_from, rcpts), ("test-bounces@example.com", ["bart@example.com"]))
            for header in (
                b"List-Id: <test.example.com>",
                b"List-Post: <mailto:test@example.com>",
                b"Precedence: list",
                b"Subject: loop",
            ):
                self.assertIn(header, content)
            (bounce,) = stores._registry.bounces("test@example.com")
            self.assertEqual((bounce.address, bounce.code), ("gone@example.com", 550))
            states = {
                e.destination.address: e.state.value
                for e in stores._spool.entries()
                if e.kind.value == "member"
            }
            self.assertEqual(states, {"bart@example.com": "done", "gone@example.com": "failed"})

        return as_deferred(go())
