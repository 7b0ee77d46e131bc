"""Tests for :mod:`mailrelay.mta.pool`: dispatch, parallelism, reuse, idle close, quit."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.interfaces import IMessageSender
from mailrelay.mta.connection import Connection
from mailrelay.mta.errors import ConnectionFailed
from mailrelay.mta.pool import ConnectionPool
from mailrelay.testing.fakemta import FakeMTA

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


@implementer(IMessageSender)
class HeldConnection:
    """An IMessageSender whose transactions wait until the test fires them."""

    def __init__(self, name):
        self.name = name
        self.pending: list[tuple[tuple, defer.Deferred]] = []
        self.sent = 0
        self.quits = 0

    def sendmail(self, sender, recipients, message):
        d = defer.Deferred()
        self.pending.append(((sender, tuple(recipients), message), d))
        return d

    def finish(self, result=None):
        (_, d) = self.pending.pop(0)
        self.sent += 1
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result or {})

    def quit(self):
        self.quits += 1
        return defer.succeed(None)


class Factory:
    """Makes HeldConnections and remembers them; can be told to fail."""

    def __init__(self):
        self.made: list[HeldConnection] = []
        self.error: Exception | None = None

    def __call__(self):
        if self.error is not None:
            raise self.error
        connection = HeldConnection(len(self.made))
        self.made.append(connection)
        return connection


class MemorySmarthost:
    """A FakeMTA that real Connections reach through a MemoryReactorClock, in memory.

    Connections a client opens show up in ``reactor.tcpClients``; :meth:`run`
    joins each to a new FakeMTA server protocol with iosim and moves the bytes
    until nothing happens any more.
    """

    def __init__(self, **mta_options):
        self.reactor = MemoryReactorClock()
        self.mta = FakeMTA(self.reactor, **mta_options)
        self.pumps: list[iosim.IOPump] = []
        self._joined = 0

    def connection(self, sessions_per_connection=0, **kwargs):
        kwargs.setdefault("helo_name", "relay.example")
        return Connection("127.0.0.1", 25, sessions_per_connection, reactor=self.reactor, **kwargs)

    def run(self, seconds: float = 0.0) -> None:
        """Advance the clock by ``seconds``, then deliver everything now due."""
        self.reactor.advance(seconds)
        for _ in range(1000):
            busy = False
            while self._joined < len(self.reactor.tcpClients):
                factory = self.reactor.tcpClients[self._joined][2]
                self._joined += 1
                client = factory.buildProtocol(None)
                server = self.mta.buildProtocol(None)
                self.pumps.append(
                    iosim.connect(
                        server,
                        iosim.makeFakeServer(server),
                        client,
                        iosim.makeFakeClient(client),
                        greet=False,
                    )
                )
                busy = True
            for pump in self.pumps:
                busy = pump.pump() or busy
            due = [
                c for c in self.reactor.getDelayedCalls() if c.getTime() <= self.reactor.seconds()
            ]
            if due:
                self.reactor.advance(0)
                busy = True
            if not busy:
                return
        raise AssertionError("the in-memory smarthost never settled")

    def open_connections(self) -> int:
        return sum(1 for p in self.pumps if not p.clientIO.disconnected)


class DispatchTests(SynchronousTestCase):
    def setUp(self):
        self.factory = Factory()

    def test_provides_interface(self):
        """The pool is an IMessageSender."""
        self.assertTrue(verifyObject(IMessageSender, ConnectionPool(self.factory)))

    def test_first_connection_made_at_once(self):
        """The pool makes its first connection on creation, so a bad configuration
        (the factory raising) fails there, with the factory's error."""
        ConnectionPool(self.factory, 3)
        self.assertEqual(len(self.factory.made), 1)
        self.factory.error = ConnectionFailed(444, b"bad TLS files")
        self.assertRaises(ConnectionFailed, ConnectionPool, self.factory, 3)

    def test_parallel_up_to_max_connections(self):
        """Five messages with max_connections=3: three connections work at once,
        two messages wait and go, in order, to whichever connection frees up."""
        pool = ConnectionPool(self.factory, max_connections=3)
        results = [
            pool.sendmail("l-bounces@example.com", [f"r{i}@example.com"], MESSAGE) for i in range(5)
        ]
        self.assertEqual(len(self.factory.made), 3)
        self.assertEqual([len(c.pending) for c in self.factory.made], [1, 1, 1])
        self.assertEqual((pool.busy, pool.waiting), (3, 2))
        second = self.factory.made[1]
        second.finish({"r1@example.com": (550, b"no")})
        self.assertEqual(self.successResultOf(results[1]), {"r1@example.com": (550, b"no")})
        self.assertEqual(second.pending[0][0][1], ("r3@example.com",))
        for connection in self.factory.made:
            while connection.pending:
                connection.finish()
        for d in results:
            self.successResultOf(d)
        self.assertEqual(len(self.factory.made), 3)
        self.assertEqual((pool.busy, pool.waiting), (0, 0))

    def test_reuses_the_warmest_connection(self):
        """Messages sent one after another all go over the same connection."""
        pool = ConnectionPool(self.factory, max_connections=4)
        for _ in range(3):
            d = pool.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            self.factory.made[0].finish()
            self.successResultOf(d)
        self.assertEqual(len(self.factory.made), 1)
        self.assertEqual(self.factory.made[0].sent, 3)

    def test_failure_passed_on_and_connection_kept(self):
        """A DeliveryError reaches the caller; the connection serves the next message."""
        pool = ConnectionPool(self.factory, max_connections=1)
        d = pool.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        self.factory.made[0].finish(ConnectionFailed(444, b"lost"))
        self.failureResultOf(d, ConnectionFailed)
        d = pool.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        self.factory.made[0].finish()
        self.assertEqual(self.successResultOf(d), {})

    def test_later_factory_failure_waits_for_a_connection(self):
        """If the factory fails for an extra connection, the message waits for an
        existing one instead of failing, and the failure is logged."""
        pool = ConnectionPool(self.factory, max_connections=2)
        first = pool.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        self.factory.error = OSError("too many open files")
        second = pool.sendmail("a@example.com", ["c@example.com"], MESSAGE)
        self.assertEqual(pool.waiting, 1)
        self.factory.made[0].finish()
        self.successResultOf(first)
        self.factory.made[0].finish()
        self.successResultOf(second)

    def test_cancel_waiting(self):
        """Cancelling a waiting message takes it out of the queue."""
        pool = ConnectionPool(self.factory, max_connections=1)
        pool.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        waiting = pool.sendmail("a@example.com", ["c@example.com"], MESSAGE)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(pool.waiting, 0)
        self.factory.made[0].finish()
        self.assertEqual(self.factory.made[0].pending, [])

    def test_quit_waits_then_closes_all(self):
        """quit() lets the messages handed over finish, then quits every
        connection; the pool can be used again afterwards."""
        pool = ConnectionPool(self.factory, max_connections=2)
        sends = [pool.sendmail("a@example.com", [f"r{i}@example.com"], MESSAGE) for i in range(3)]
        closed = pool.quit()
        self.assertNoResult(closed)
        self.factory.made[0].finish()
        self.factory.made[1].finish()
        self.assertNoResult(closed)
        self.factory.made[0].finish()
        self.successResultOf(closed)
        for d in sends:
            self.successResultOf(d)
        self.assertEqual([c.quits for c in self.factory.made], [1, 1])
        again = pool.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        self.factory.made[0].finish()  # the one used last
        self.successResultOf(again)

    def test_bad_arguments(self):
        """max_connections must be a positive int and the factory callable."""
        self.assertRaises(ValueError, ConnectionPool, self.factory, 0)
        self.assertRaises(ValueError, ConnectionPool, self.factory, True)
        self.assertRaises(TypeError, ConnectionPool, "factory", 2)


class RealConnectionTests(SynchronousTestCase):
    """The pool over real Connections to an in-memory FakeMTA."""

    def setUp(self):
        self.smarthost = MemorySmarthost()

    def test_parallel_connections_to_the_smarthost(self):
        """Four messages at once with max_connections=2 open exactly two SMTP
        connections, and every message arrives."""
        pool = ConnectionPool(lambda: self.smarthost.connection(), max_connections=2)
        sends = [
            pool.sendmail("l-bounces@example.com", [f"r{i}@example.com"], MESSAGE) for i in range(4)
        ]
        self.smarthost.run()
        for d in sends:
            self.assertEqual(self.successResultOf(d), {})
        self.assertEqual(self.smarthost.mta.get_connection_count(), 2)
        self.assertEqual(
            sorted(t.rcpts[0] for t in self.smarthost.mta.transactions),
            [f"r{i}@example.com" for i in range(4)],
        )
        closed = pool.quit()
        self.smarthost.run()
        self.successResultOf(closed)
        self.assertEqual(self.smarthost.open_connections(), 0)

    def test_idle_close_on_the_clock_and_reconnect(self):
        """A connection idle for smtp_idle_timeout is closed with QUIT on the
        injected clock; the next message opens a new one."""
        pool = ConnectionPool(lambda: self.smarthost.connection(idle_timeout=10), max_connections=2)
        d = pool.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        self.smarthost.run()
        self.successResultOf(d)
        self.smarthost.run(9)
        self.assertEqual(self.smarthost.open_connections(), 1)
        self.smarthost.run(2)
        self.assertEqual(self.smarthost.open_connections(), 0)
        self.assertEqual(self.smarthost.mta.commands[-1], b"QUIT")
        d = pool.sendmail("a@example.com", ["c@example.com"], MESSAGE)
        self.smarthost.run()
        self.successResultOf(d)
        self.assertEqual(self.smarthost.mta.get_connection_count(), 2)
        closed = pool.quit()
        self.smarthost.run()
        self.successResultOf(closed)

    def test_sessions_per_connection(self):
        """With sessions_per_connection=2, five messages in sequence use three
        connections (1,1,2,2,3 as in Mailman)."""
        pool = ConnectionPool(lambda: self.smarthost.connection(2), max_connections=4)
        counts = []
        for i in range(5):
            d = pool.sendmail("a@example.com", [f"r{i}@example.com"], MESSAGE)
            self.smarthost.run()
            self.successResultOf(d)
            counts.append(self.smarthost.mta.get_connection_count())
        self.assertEqual(counts, [1, 1, 2, 2, 3])
        closed = pool.quit()
        self.smarthost.run()
        self.successResultOf(closed)
