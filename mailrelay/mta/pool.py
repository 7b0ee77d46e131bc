"""A pool of connections to the smarthost, shared by all deliveries.

Each :class:`~mailrelay.mta.connection.Connection` runs one transaction at a
time, reconnects after its ``sessions_per_connection`` and closes its socket
after ``idle_timeout`` on its own; the pool only decides which connection a
message goes to.  It keeps at most ``max_connections`` of them, made on demand
by a factory, and prefers the one used most recently, so that under light
load one warm connection does the work and the others are left to time out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay._checks import check_count
from mailrelay.interfaces import IMessageSender

__all__ = ["ConnectionPool"]

_log = Logger()


@implementer(IMessageSender)
class ConnectionPool:
    """An :class:`IMessageSender` spreading messages over up to ``max_connections``
    senders made by ``factory`` (a callable with no arguments, typically making a
    :class:`~mailrelay.mta.connection.Connection`).

    A message goes to an idle connection, or to a new one while fewer than
    ``max_connections`` exist; otherwise it waits, first come first served.
    The first connection is made at once, so that a configuration error
    surfaces (raised by the factory) when the pool is created; should the
    factory fail later, the message waits for a connection that exists.
    """

    def __init__(self, factory: Callable[[], Any], max_connections: int = 4):
        if not callable(factory):
            raise TypeError(f"factory must be callable, not {factory!r}")
        self.max_connections = check_count("max_connections", max_connections)
        self._factory = factory
        self._connections: list[Any] = [factory()]
        # Most recently used last: pop() takes the warmest connection.
        self._idle: list[Any] = list(self._connections)
        self._waiting: deque[tuple[tuple[Any, Any, Any], defer.Deferred[dict]]] = deque()
        self._busy = 0
        self._drained: list[defer.Deferred[None]] = []

    def __repr__(self) -> str:
        return (
            f"<ConnectionPool {len(self._connections)}/{self.max_connections} connections, "
            f"{self._busy} busy, {len(self._waiting)} waiting>"
        )

    @property
    def connection_count(self) -> int:
        """How many connection objects the pool holds (open or not)."""
        return len(self._connections)

    @property
    def open_connections(self) -> int:
        """How many of the pool's connections are open now (for metrics)."""
        return sum(bool(getattr(c, "connected", False)) for c in self._connections)

    @property
    def busy(self) -> int:
        """How many messages are being sent right now."""
        return self._busy

    @property
    def waiting(self) -> int:
        """How many messages wait for a free connection."""
        return len(self._waiting)

    def sendmail(self, sender: str, recipients: Any, message: Any) -> defer.Deferred[dict]:
        """Send through a free connection (see :meth:`IMessageSender.sendmail`);
        fires with the refused recipients or fails with a ``DeliveryError``."""
        args = (sender, recipients, message)
        connection = self._take_connection()
        if connection is None:
            d: defer.Deferred[dict] = defer.Deferred(self._cancel_waiting)
            self._waiting.append((args, d))
            return d
        return self._run(connection, args)

    def quit(self) -> defer.Deferred[None]:
        """Wait for the messages already handed over, then close every connection.

        The pool stays usable: a later :meth:`sendmail` connects again.
        """
        return defer.Deferred.fromCoroutine(self._quit())

    async def _quit(self) -> None:
        if self._busy or self._waiting:
            d: defer.Deferred[None] = defer.Deferred()
            self._drained.append(d)
            await d
        await defer.gatherResults(
            [defer.maybeDeferred(c.quit) for c in self._connections], consumeErrors=True
        )

    # -- internals --------------------------------------------------------

    def _take_connection(self) -> Any:
        if self._idle:
            return self._idle.pop()
        if len(self._connections) < self.max_connections:
            try:
                connection = self._factory()
            except Exception as e:
                _log.error(
                    "Cannot set up another connection to the smarthost: {error}", error=str(e)
                )
                return None
            self._connections.append(connection)
            return connection
        return None

    def _run(self, connection: Any, args: tuple[Any, Any, Any]) -> defer.Deferred[dict]:
        self._busy += 1
        d = defer.maybeDeferred(connection.sendmail, *args)
        d.addBoth(self._release, connection)
        return d

    def _release(self, result: Any, connection: Any) -> Any:
        self._busy -= 1
        if self._waiting:
            args, waiter = self._waiting.popleft()
            self._run(connection, args).chainDeferred(waiter)
        else:
            self._idle.append(connection)
            if not self._busy:
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)
        return result

    def _cancel_waiting(self, d: defer.Deferred[dict]) -> None:
        for item in self._waiting:
            if item[1] is d:
                self._waiting.remove(item)
                break
