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


class _OrderedStop(service.MultiService):
    """A MultiService whose children stop one after the other, last added first.

    Twisted's MultiService stops every child at once; here the listener must
    be gone before the runner drains, and the runner must have recorded its
    last results before the stores close.
    """

    def stopService(self):  # noqa: N802
        service.Service.stopService(self)

        async def stop_each():
            for child in reversed(list(self)):
                try:
                    await defer.maybeDeferred(child.stopService)
                except Exception:
                    _log.failure("Stopping {service} failed", service=child.name)

        return defer.Deferred.fromCoroutine(stop_each())


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


def make_list_processor(
    settings: Settings, spool: Any, registry: Any, clock: Any, *, wake: Any = None
):
    """The list processor: commands and confirmations by mail (``-request``,
    ``-join``, ``-leave``, ``-confirm``) and bounce processing (``-bounces``),
    with the ``[lists]`` defaults.

    Returns ``(processor, bounce_scorer, bounce_warnings)``: the scorer takes
    the runner's permanent refusals, the warnings service (time-driven, on
    ``clock``) warns and removes members disabled by bounces; ``wake`` is
    called after it stored messages.  A registry without the list-processing
    store (an embedder's own ``IListRegistry``) gets ``(None, None, None)``:
    its command and bounce mail stays held, as before.
    """
    from mailrelay.interfaces import IListProcessingStore
    from mailrelay.listproc.bouncing import (
        BounceHandler,
        BounceRules,
        BounceScorer,
        BounceWarnings,
        ReenableAction,
    )
    from mailrelay.listproc.membership import MembershipRequests, SiteDefaults
    from mailrelay.listproc.processor import ListProcessor
    from mailrelay.listproc.tokens import PendingAction

    if not IListProcessingStore.providedBy(registry):
        _log.warn(
            "The list registry {registry!r} has no list-processing store: mail to the "
            "command and bounce addresses is held, not processed",
            registry=registry,
        )
        return None, None, None
    lists = settings.lists
    requests = MembershipRequests(
        registry,
        site=SiteDefaults(
            pending_request_life=lists.pending_request_life,
            max_autoresponses_per_day=lists.max_autoresponses_per_day,
            template_dir=lists.template_dir,
        ),
    )
    requests.add_action(PendingAction.REENABLE, ReenableAction())
    scorer = BounceScorer(registry, BounceRules.from_site(lists))
    bounces = BounceHandler(registry, scorer, template_dir=lists.template_dir)
    handlers: dict[str, Any] = dict.fromkeys(MembershipRequests.SUBADDRESSES, requests)
    handlers.update(dict.fromkeys(BounceHandler.SUBADDRESSES, bounces))
    warnings = BounceWarnings(
        registry, spool, scorer, clock=clock, template_dir=lists.template_dir, wake=wake
    )
    return ListProcessor(spool, registry, clock=clock, handlers=handlers), scorer, warnings


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

    # The runner does not exist yet when the warnings service is built.
    runners: list[Any] = []
    processor, scorer, warnings = make_list_processor(
        settings, spool, registry, reactor, wake=lambda: [r.wake() for r in runners]
    )

    top = _OrderedStop()
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
        processor=processor,
        on_bounces=None if scorer is None else scorer.register_failures,
    )
    runners.append(runner)
    runner.setName("mailrelay-delivery")
    runner.setServiceParent(top)
    if warnings is not None:
        # Stops before the runner, so its last messages are stored while it runs.
        warnings.setServiceParent(top)
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
