"""The embedding entry point: one MultiService running mailrelay on a reactor.

``twistd mailrelay`` uses :func:`makeService` through :mod:`mailrelay.tap`;
another Twisted application can call it too and attach the result to its own
service tree, passing its own registry, spool or sender (anything providing
the interfaces in :mod:`mailrelay.interfaces`).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.config import Settings

_log = Logger()


class _StoreService(service.Service):
    """Closes the registry and spool when the application stops (after the runner)."""

    name = "mailrelay-stores"

    def __init__(self, registry, spool, sender):
        self._registry, self._spool, self._sender = registry, spool, sender

    def stopService(self):  # noqa: N802
        super().stopService()

        async def close():
            try:
                await self._sender.quit()
            finally:
                await self._spool.close()
                self._registry.close()

        return defer.Deferred.fromCoroutine(close())


# How long stopping may wait for the smarthost to answer what is on the wire.
STOP_GRACE = 5.0


class _OrderedStop(service.MultiService):
    """A MultiService whose children stop one after the other, last added first.

    Twisted's MultiService stops every child at once; here the listener must
    be gone before the runner drains, and the runner must have recorded its
    last results before the stores close.

    Stopping is bounded by ``grace`` seconds on ``clock``: a smarthost that
    holds its replies (up to ``smtp_timeout`` each) must not keep a SIGTERM
    waiting.  Past the deadline the remaining children are left as they are,
    as after a crash: what was on the wire stays in flight in the spool
    (which is safe on disk) and is sent again at the next start.
    """

    def __init__(self, clock: Any, grace: float = STOP_GRACE):
        super().__init__()
        self._clock = clock
        self._grace = grace

    def stopService(self):  # noqa: N802
        service.Service.stopService(self)
        deadline = self._clock.seconds() + self._grace

        async def stop_each():
            for child in reversed(list(self)):
                stopped = defer.maybeDeferred(child.stopService)
                if not await _within(stopped, deadline - self._clock.seconds(), self._clock):
                    _log.warn(
                        "Stopping {service} took more than {grace}s; stopping now: "
                        "deliveries still on the wire are sent again at the next start",
                        service=child.name,
                        grace=self._grace,
                    )
                    return

        return defer.Deferred.fromCoroutine(stop_each())


async def _within(d: defer.Deferred, seconds: float, clock: Any) -> bool:
    """Wait for ``d`` at most ``seconds``; whether it fired (a failure is logged).

    ``d`` is never cancelled: it may still fire later, unobserved.
    """
    waited: defer.Deferred[bool] = defer.Deferred()
    timer = clock.callLater(max(0.0, seconds), lambda: waited.called or waited.callback(False))

    def fired(result):
        if isinstance(result, Failure):
            _log.failure("Stopping a service failed", result)
        if timer.active():
            timer.cancel()
        if not waited.called:
            waited.callback(True)

    d.addBoth(fired)
    return await waited


def tls_arguments(settings: Settings) -> dict[str, Any]:
    """``[mta]``'s TLS keys as the keyword arguments of
    :func:`~mailrelay.mta.tls.client_tls_options` (and of ``Connection``)."""
    mta = settings.mta
    return {
        "verify_cert": mta.smtp_verify_cert,
        "verify_hostname": mta.smtp_verify_hostname,
        "ca_file": mta.smtp_ca_file or None,
        "client_cert": mta.smtp_client_cert or None,
        "client_key": mta.smtp_client_key or None,
    }


def connection_arguments(settings: Settings) -> dict[str, Any]:
    """``[mta]`` and ``[devmode]`` as the keyword arguments of
    :class:`~mailrelay.mta.connection.Connection`, all but ``reactor``.

    The one place that maps keys to the smarthost connection: the pool's
    connections are built from it, and ``twistd``'s option check
    (:func:`mailrelay.tap.check_outbound`) loads the same files from it.
    Unset keys ("" in the settings) become ``None``, as ``Connection`` expects.
    """
    mta = settings.mta
    return {
        "host": mta.smtp_host,
        "port": mta.smtp_port,
        "sessions_per_connection": mta.max_sessions_per_connection,
        "user": mta.smtp_user or None,
        "password": mta.smtp_pass or None,
        "secure_mode": mta.smtp_secure_mode,
        **tls_arguments(settings),
        "timeout": mta.smtp_timeout,
        "connect_timeout": mta.smtp_connect_timeout,
        "idle_timeout": mta.smtp_idle_timeout,
        "devmode_recipient": settings.devmode.recipient if settings.devmode.enabled else None,
        "credentials_file": mta.smtp_credentials_file or None,
        "allow_plaintext_auth": mta.smtp_allow_plaintext_auth,
        "helo_name": mta.smtp_helo_name or None,
    }


def make_sender(settings: Settings, reactor: Any):
    """The outbound connection pool configured from ``[mta]`` and ``[devmode]``."""
    from mailrelay.mta.connection import Connection
    from mailrelay.mta.pool import ConnectionPool

    arguments = connection_arguments(settings)

    def connection() -> Connection:
        return Connection(**arguments, reactor=reactor)

    # The pool makes its first connection at once: a bad TLS or credentials
    # set-up fails here, before anything listens.
    return ConnectionPool(connection, max_connections=settings.mta.max_connections)


def makeService(  # noqa: N802 - Twisted's naming for service factories
    settings: Settings,
    reactor: Any = None,
    *,
    registry: Any = None,
    spool: Any = None,
    sender: Any = None,
) -> service.MultiService:
    """Build the relay: LMTP listener, durable spool, delivery runner, SMTP pool.

    Opens the stores at once (so a bad path is reported before anything
    listens) and closes them when the service stops.  ``registry``, ``spool``
    and ``sender`` replace the SQLite registry, SQLite spool and SMTP pool.
    """
    if reactor is None:
        from twisted.internet import reactor
    from mailrelay.lmtp.policy import InboundHandler
    from mailrelay.lmtp.protocol import LMTPFactory
    from mailrelay.registry import SQLiteRegistry
    from mailrelay.runner import DeliveryRunner
    from mailrelay.spool import SQLiteSpool

    mta = settings.mta
    if registry is None or spool is None:
        os.makedirs(settings.paths.var_dir, mode=0o750, exist_ok=True)
    registry = registry if registry is not None else SQLiteRegistry(settings.paths.registry_path)
    spool = spool if spool is not None else SQLiteSpool(settings.paths.spool_path, reactor)
    sender = sender if sender is not None else make_sender(settings, reactor)

    top = _OrderedStop(reactor)
    # Children stop in reverse order, each after the previous one has finished:
    # listener first, then the runner, stores last.
    _StoreService(registry, spool, sender).setServiceParent(top)
    runner = DeliveryRunner(
        spool,
        registry,
        sender,
        clock=reactor,
        max_recipients=mta.max_recipients,
        retry_period=mta.delivery_retry_period,
        min_backoff=mta.retry_min_backoff,
        max_backoff=mta.retry_max_backoff,
        verp=mta.verp_delivery,
        keep_done=mta.keep_delivered,
    )
    runner.setName("mailrelay-delivery")
    runner.setServiceParent(top)
    hostname = mta.effective_lmtp_hostname()
    # The runner stores what LMTP accepts: it routes each message in the
    # transaction that stores it and starts delivering without a claim.
    handler = InboundHandler(registry, runner, hostname=hostname, clock=reactor, log_accepted=False)
    factory = LMTPFactory(
        handler,
        hostname=hostname.encode("idna"),
        max_message_size=mta.max_message_size,
        max_line_length=mta.lmtp_max_line_length,
        idle_timeout=mta.lmtp_idle_timeout,
        max_sessions=mta.lmtp_max_sessions,
        clock=reactor,
    )
    listener = strports.service(mta.lmtp_endpoint, factory, reactor=reactor)
    listener.setName("mailrelay-lmtp")
    listener.setServiceParent(top)
    _log.info(
        "mailrelay: LMTP on {endpoint}, smarthost {host}:{port} ({mode}), spool {spool}",
        endpoint=mta.lmtp_endpoint,
        host=mta.smtp_host,
        port=mta.smtp_port,
        mode=mta.smtp_secure_mode,
        spool=getattr(spool, "path", spool),
    )
    return top
