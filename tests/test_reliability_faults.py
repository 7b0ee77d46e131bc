"""Smarthost faults, one at a time: nothing lost, nobody bounced, ``mailrelay queue`` says why.

The whole relay (:func:`mailrelay.service.makeService`: LMTP listener on a
unix socket, SQLite spool and registry, runner, SMTP pool) runs in the test
process against a :class:`~mailrelay.testing.FakeMTA` on loopback.  Time
inside the relay runs :data:`SPEED` times faster than the wall clock
(:class:`FastReactor`), so the circuit breaker's 30 s pause, ``smtp_timeout``
and the retry backoff pass in a test's few seconds while sockets, TLS and
threads stay real.

Each test posts :data:`POSTS` messages to a list of three members while the
fault is armed, waits until ``mailrelay queue`` (run as a separate process on
the same files) names the reason mail waits, clears the fault and checks that
every member got every post, that no entry failed and that no bounce was
recorded.
"""

from __future__ import annotations

import subprocess
import sys
import time

from twisted.internet import endpoints, reactor, threads
from twisted.trial.unittest import TestCase

from mailrelay.config import load_settings
from mailrelay.registry import SQLiteRegistry
from mailrelay.service import makeService
from mailrelay.testing import FakeMTA
from tests.daemon import (
    PersistentPoster,
    count_losses,
    delivered_copies,
    record_figures,
    run_cli,
    wait_for_copies,
)
from tests.support import as_deferred, free_port, temp_dir

SPEED = 20.0
POSTS = 30
LIST = "test@example.com"
MEMBERS = {LIST: ["bart@members.example", "cate@members.example", "dave@members.example"]}


class _ScaledCall:
    """A DelayedCall of :class:`FastReactor`, speaking its scaled time."""

    def __init__(self, call, clock: FastReactor):
        self._call, self._clock = call, clock

    def getTime(self):  # noqa: N802
        return self._clock.scaled(self._call.getTime())

    def reset(self, seconds):
        self._call.reset(seconds / self._clock.speed)

    def delay(self, seconds):
        self._call.delay(seconds / self._clock.speed)

    def cancel(self):
        self._call.cancel()

    def active(self):
        return self._call.active()


class FastReactor:
    """The real reactor, except that ``seconds`` and ``callLater`` run ``speed`` times faster."""

    def __init__(self, real, speed: float):
        self._real, self.speed = real, speed
        self._origin = real.seconds()

    def scaled(self, real_time: float) -> float:
        return self._origin + (real_time - self._origin) * self.speed

    def seconds(self) -> float:
        return self.scaled(self._real.seconds())

    def callLater(self, delay, f, *args, **kwargs):  # noqa: N802
        return _ScaledCall(self._real.callLater(delay / self.speed, f, *args, **kwargs), self)

    def __getattr__(self, name):
        return getattr(self._real, name)


class SmarthostFaultTests(TestCase):
    slow = True  # tests/conftest.py marks it for pytest -m "not slow"
    timeout = 120

    def setUp(self):
        self.tmp = temp_dir(self)
        self.socket = f"{self.tmp}/lmtp.sock"
        self.config = f"{self.tmp}/mailrelay.ini"
        self.port = free_port()
        self.mtas: list[FakeMTA] = []

    def write_config(self, **mta):
        keys = {
            "lmtp_endpoint": f"unix:{self.socket}",
            "smtp_host": "127.0.0.1",
            "smtp_port": self.port,
            # In the relay's (fast) time: 1 s and 2 s of wall clock.
            "retry_min_backoff": "20s",
            "retry_max_backoff": "40s",
            **mta,
        }
        with open(self.config, "w") as f:
            f.write("[paths]\nvar_dir = var\n[mta]\n")
            f.writelines(f"{key} = {value}\n" for key, value in keys.items())
        for argv in (
            ["lists", "create", LIST],
            ["lists", "set", LIST, "posting=open"],
            ["members", "add", LIST, *MEMBERS[LIST]],
        ):
            code, out = run_cli(self.config, *argv)
            self.assertEqual(code, 0, out)

    async def smarthost(self, **options) -> FakeMTA:
        """A fake smarthost on ``self.port`` (the one the relay is configured for)."""
        mta = FakeMTA(reactor, **options)
        await mta.start(port=self.port)
        self.mtas.append(mta)
        self.addCleanup(mta.stop)
        return mta

    def start_relay(self):
        relay = makeService(load_settings(self.config), FastReactor(reactor, SPEED))
        relay.startService()
        self.addCleanup(relay.stopService)

    async def queue(self) -> str:
        """``mailrelay queue`` run as its own process, as an operator would."""
        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-m", "mailrelay.cli", "-C", self.config, "queue"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout + result.stderr

    async def queue_says(self, *fragments: str) -> str:
        """Poll ``mailrelay queue`` until its output holds every fragment; that output."""
        deadline = time.monotonic() + 30
        while True:
            out = await self.queue()
            if all(f in out for f in fragments):
                return out
            if time.monotonic() > deadline:
                self.fail(f"mailrelay queue never said {fragments}:\n{out}")

    async def run_fault(self, name: str, *why: str, clear, **config) -> None:
        """Post while the fault is armed, see ``queue`` name ``why``, ``clear()`` it, count."""
        self.write_config(**config)
        self.start_relay()
        started = time.monotonic()
        messages = {f"<{name}{n}@example.org>": [LIST] for n in range(POSTS)}
        poster = PersistentPoster(reactor, self.endpoint, messages, sessions=2)
        await poster.run()
        self.assertEqual(len(poster.acknowledged), POSTS)
        out = await self.queue_says(*why)
        cleared = time.monotonic()
        await clear()
        expected = {(m, member) for m, _ in poster.acknowledged for member in MEMBERS[LIST]}
        try:
            await wait_for_copies(
                reactor, expected, *self.mtas, what=f"delivery once {name} cleared"
            )
        except AssertionError as e:
            got = len(expected & self.copies().keys())
            self.fail(f"{e}: {got} of {len(expected)} copies; queue:\n{await self.queue()}")
        delivered = time.monotonic()
        missing, duplicates = count_losses(poster.acknowledged, MEMBERS, self.copies())
        self.assertEqual(missing, [])
        final = await self.queue()
        self.assertRegex(final, r"\bfailed: 0\b")
        registry = SQLiteRegistry(f"{self.tmp}/var/registry.sqlite3")
        try:
            self.assertEqual(registry.bounces(LIST), ())
        finally:
            registry.close()
        reason = next(line for line in out.splitlines() if why[-1] in line)
        record_figures(
            f"smarthost_{name}",
            posts=POSTS,
            member_copies=len(expected),
            lost=len(missing),
            duplicates=duplicates,
            bounces=0,
            queue_said=" ".join(reason.split())[:200],
            seconds_to_deliver_after_clearing=round(delivered - cleared, 2),
            seconds_total=round(delivered - started, 2),
        )

    def endpoint(self):
        return endpoints.UNIXClientEndpoint(reactor, self.socket, timeout=5)

    def copies(self):
        return delivered_copies(*self.mtas)

    # -- the faults -------------------------------------------------------------

    def test_smarthost_down_at_start(self):
        """Connection refused until the smarthost starts: mail waits, then all is delivered."""

        async def go():
            async def clear():
                await self.smarthost()

            await self.run_fault("down", "retry", "refused", clear=clear)

        return as_deferred(go())

    def test_421_to_every_mail(self):
        """421 to every MAIL for a while: nothing bounces, all is delivered afterwards."""

        async def go():
            mta = await self.smarthost()
            mta.reject("mail", 421, "4.3.2 Service shutting down, try later", count=10**6)

            async def clear():
                mta.clear_faults()

            await self.run_fault("mail421", "retry", "421", clear=clear)

        return as_deferred(go())

    def test_reset_in_the_middle_of_data(self):
        """The connection drops halfway through DATA: those copies are sent again."""

        async def go():
            mta = await self.smarthost()
            mta.drop_during_data(after_bytes=40, count=10**6)

            async def clear():
                mta.clear_faults()

            await self.run_fault("reset", "retry", "Connection closed by the server", clear=clear)

        return as_deferred(go())

    def test_replies_slower_than_smtp_timeout(self):
        """The smarthost answers the end of data after smtp_timeout: the copies wait and are
        delivered once it answers in time."""

        async def go():
            mta = await self.smarthost()
            # 6 s of wall clock is 120 s in the relay, twice its smtp_timeout.
            mta.delay("eom", 6, count=10**6)

            async def clear():
                mta.clear_faults()

            await self.run_fault("slow", "retry", "Timed out", clear=clear, smtp_timeout="60s")

        return as_deferred(go())

    def test_tls_handshake_failure_with_starttls_required(self):
        """The TLS handshake fails (the smarthost wants a client certificate): delivery
        pauses, no member is blamed, and it resumes when the handshake works."""

        async def go():
            mta = await self.smarthost(tls="starttls", require_client_cert=True)
            ca_file = mta.ca.write_ca_file(self.tmp)

            async def clear():
                await mta.stop()
                await self.smarthost(tls="starttls", ca=mta.ca)

            await self.run_fault(
                "tls_handshake",
                "DELIVERY PAUSED",
                clear=clear,
                smtp_secure_mode="starttls",
                smtp_ca_file=ca_file,
            )

        return as_deferred(go())

    def test_certificate_for_the_wrong_host_name(self):
        """The smarthost's certificate names another host: delivery pauses, no member is
        blamed, and it resumes with a certificate for the right name."""

        async def go():
            mta = await self.smarthost(tls="starttls", hostnames=("wrong.example",))
            ca_file = mta.ca.write_ca_file(self.tmp)

            async def clear():
                await mta.stop()
                await self.smarthost(tls="starttls", ca=mta.ca)

            await self.run_fault(
                "wrong_hostname",
                "DELIVERY PAUSED",
                clear=clear,
                smtp_secure_mode="starttls",
                smtp_ca_file=ca_file,
            )

        return as_deferred(go())
