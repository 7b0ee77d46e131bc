"""The embedding entry point: one MultiService running mailrelay on a reactor.

``twistd mailrelay`` uses :func:`makeService` through :mod:`mailrelay.tap`;
another Twisted application can call it too and attach the result to its own
service tree, passing its own registry, spool or sender (anything providing
the interfaces in :mod:`mailrelay.interfaces`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay._files import DirectoryLock
from mailrelay.config import Settings
from mailrelay.config.endpoints import with_backlog
from mailrelay.errors import MailrelayError
from mailrelay.observer import NO_OBSERVER, ObserverFanout

_log = Logger()

# The spool status key under which a running daemon publishes its pid,
# version and start time (JSON) for ``mailrelay status``.
DAEMON_STATUS_KEY = "daemon"


class _StoreService(service.Service):
    """Opens the stores the relay made itself (``opens``) when the application
    starts, before any other part of it; closes the registry and spool when it
    stops (after the runner), then releases the lock on the state directory,
    if it holds one.

    Under twistd ``makeService`` runs before the fork into the background,
    and neither the spool's writer thread nor an SQLite connection survives
    a fork: they are made here, in the daemon.  The stores open in
    :meth:`privilegedStartService` when twistd calls it (before it gives up
    root for ``--uid``, as they were opened before), else in :meth:`startService`.
    """

    name = "mailrelay-stores"

    def __init__(
        self, registry, spool, sender, lock: DirectoryLock | None = None, opens: tuple = ()
    ):
        self._registry, self._spool, self._sender = registry, spool, sender
        self._lock = lock
        self._opens = opens

    def _open(self) -> None:
        opened = []
        try:
            for store in self._opens:
                if not store.is_open:
                    store.open()
                    opened.append(store)
        except BaseException:
            # One clear error, and nothing left half open behind it.
            for store in opened:
                store.close()
            raise

    def privilegedStartService(self):  # noqa: N802
        self._open()
        super().privilegedStartService()

    def startService(self):  # noqa: N802
        self._open()
        super().startService()
        if self._lock is not None:
            # twistd forks into the background after makeService: the pid
            # recorded then was the parent's.
            self._lock.write_pid()

    def stopService(self):  # noqa: N802
        super().stopService()

        async def close():
            try:
                await self._sender.quit()
            finally:
                try:
                    await self._spool.close()
                    self._registry.close()
                finally:
                    if self._lock is not None:
                        self._lock.release()

        return defer.Deferred.fromCoroutine(close())


# Seconds between checks of the free space on the spool's file system.
RESERVE_CHECK_INTERVAL = 2.0

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


# Seconds between the daemon's heartbeats in its status record: `mailrelay
# status` calls a daemon whose last one is three intervals old unresponsive.
HEARTBEAT_INTERVAL = 60.0


class _DaemonStatus(service.Service):
    """Publishes the running daemon's pid, version, start time and a heartbeat in
    the spool's status table (under :data:`DAEMON_STATUS_KEY`, as JSON) for
    ``mailrelay status``, every ``interval`` seconds on ``clock``, and removes
    the record when it stops."""

    name = "mailrelay-status"

    def __init__(self, spool: Any, clock: Any, interval: float = HEARTBEAT_INTERVAL):
        self._spool, self._clock, self._interval = spool, clock, interval
        self._started_at = 0.0
        self._beat: task.LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._started_at = self._clock.seconds()
        self._beat = task.LoopingCall(self._heartbeat)
        self._beat.clock = self._clock
        self._beat.start(self._interval, now=True)

    def _heartbeat(self) -> defer.Deferred[None]:
        from mailrelay import __version__

        text = json.dumps(
            {
                # The pid after twistd's fork: services start in the daemon process.
                "pid": os.getpid(),
                "version": __version__,
                "started_at": self._started_at,
                "heartbeat_at": self._clock.seconds(),
                "heartbeat_interval": self._interval,
            }
        )
        return self._publish(text)

    def stopService(self):  # noqa: N802
        super().stopService()
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        return self._publish(None)

    def _publish(self, text: str | None) -> defer.Deferred[None]:
        d = defer.maybeDeferred(self._spool.set_status, DAEMON_STATUS_KEY, text)
        return d.addErrback(
            lambda f: _log.warn(
                "Could not publish the daemon's status: {error}", error=f.getErrorMessage()
            )
        )


class _PostfixMaps(service.Service):
    """Rewrites the ``[postfix]`` maps when the daemon starts (lists may have
    changed while it was down); a failure is logged, and LMTP serves anyway."""

    name = "mailrelay-postfix-maps"

    def __init__(self, settings: Settings, registry: Any):
        self._settings, self._registry = settings, registry

    def startService(self) -> None:  # noqa: N802
        super().startService()
        from mailrelay.mapfiles import sync_settings_maps

        try:
            addresses = [mailing_list.posting_address for mailing_list in self._registry.lists()]
            sync_settings_maps(self._settings, addresses)
        except MailrelayError as e:
            _log.error("Could not update the Postfix maps: {error}", error=str(e))
        except ValueError as e:  # PostfixMapError: an endpoint Postfix cannot reach
            _log.error("Could not build the Postfix maps: {error}", error=str(e))


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


def lmtp_listen_endpoint(settings: Settings) -> str:
    """The endpoint description the LMTP listener uses: ``lmtp_endpoint`` with
    ``backlog=lmtp_listen_backlog`` added unless it gives its own."""
    return with_backlog(settings.mta.lmtp_endpoint, settings.mta.lmtp_listen_backlog)


def make_sender(settings: Settings, reactor: Any, observer: Any = None):
    """The outbound connection pool configured from ``[mta]`` and ``[devmode]``;
    ``observer`` (an ``IRelayObserver``) is told of each connection made or failed."""
    from mailrelay.mta.connection import Connection
    from mailrelay.mta.pool import ConnectionPool

    arguments = connection_arguments(settings)

    def connection() -> Connection:
        return Connection(**arguments, reactor=reactor, observer=observer)

    # The pool makes its first connection at once: a bad TLS or credentials
    # set-up fails here, before anything listens.
    return ConnectionPool(connection, max_connections=settings.mta.max_connections)


@dataclass(frozen=True)
class ListProcessing:
    """What :func:`make_list_processing` builds: the processor of the service
    addresses, the posting policy and moderation of posts, the scorer of
    bounces (it also takes the runner's permanent refusals) and the service
    that warns and removes members disabled by bounces."""

    processor: Any
    moderation: Any
    scorer: Any
    warnings: Any


def make_list_processing(
    settings: Settings,
    spool: Any,
    registry: Any,
    clock: Any,
    *,
    wake: Any = None,
    observer: Any = None,
) -> ListProcessing | None:
    """List processing with the ``[lists]`` defaults: commands and
    confirmations by mail (``-request``, ``-join``, ``-leave``, ``-confirm``),
    bounce processing (``-bounces``), and the posting policy with moderation
    (held posts decided by a reply to ``-confirm+TOKEN`` or with
    ``mailrelay held``).  ``wake`` is called after the bounce warnings stored
    messages; ``observer`` (an :class:`~mailrelay.interfaces.IRelayObserver`)
    is told of what is held.

    A registry without the list-processing store (an embedder's own
    ``IListRegistry``) gets none: its command and bounce mail stays held and
    every post is accepted, as before.
    """
    from mailrelay.interfaces import IListProcessingStore
    from mailrelay.listproc.bouncing import (
        BounceHandler,
        BounceRules,
        BounceScorer,
        BounceWarnings,
        ReenableAction,
    )
    from mailrelay.listproc.membership import MembershipRequests
    from mailrelay.listproc.moderation import Moderation
    from mailrelay.listproc.processor import ListProcessor
    from mailrelay.listproc.tokens import PendingAction

    if not IListProcessingStore.providedBy(registry):
        _log.warn(
            "The list registry {registry!r} has no list-processing store: mail to the "
            "command and bounce addresses is held, not processed, and every post is accepted",
            registry=registry,
        )
        return None
    lists = settings.lists
    site = site_defaults(settings)
    requests = MembershipRequests(registry, site=site)
    moderation = Moderation(
        spool, registry, clock=clock, site=site, held_post_life=lists.held_post_life
    )
    requests.add_action(PendingAction.MODERATE, moderation.confirm, spends_token=True)
    requests.add_action(PendingAction.REENABLE, ReenableAction())
    scorer = BounceScorer(registry, BounceRules.from_site(lists))
    bounces = BounceHandler(registry, scorer, template_dir=lists.template_dir)
    handlers: dict[str, Any] = dict.fromkeys(MembershipRequests.SUBADDRESSES, requests)
    handlers.update(dict.fromkeys(BounceHandler.SUBADDRESSES, bounces))
    warnings = BounceWarnings(
        registry, spool, scorer, clock=clock, template_dir=lists.template_dir, wake=wake
    )
    processor = ListProcessor(
        spool, registry, clock=clock, handlers=handlers, observer=observer or NO_OBSERVER
    )
    return ListProcessing(processor, moderation, scorer, warnings)


def site_defaults(settings: Settings) -> Any:
    """The ``[lists]`` values list processing works with
    (:class:`~mailrelay.listproc.membership.SiteDefaults`)."""
    from mailrelay.listproc.membership import SiteDefaults

    lists = settings.lists
    return SiteDefaults(
        pending_request_life=lists.pending_request_life,
        max_autoresponses_per_day=lists.max_autoresponses_per_day,
        template_dir=lists.template_dir,
    )


def make_unsubscribe_urls(settings: Settings):
    """The :class:`~mailrelay.unsubscribe.UnsubscribeURLs` of ``[http] public_url``,
    signed with the secret in ``<var_dir>/unsubscribe.key`` (created on first
    use), or ``None`` when no public URL is set."""
    if not settings.http.public_url:
        return None
    from mailrelay.listproc.tokens import load_or_create_secret
    from mailrelay.unsubscribe import UnsubscribeURLs

    secret = load_or_create_secret(settings.paths.var_dir)
    return UnsubscribeURLs(settings.http.public_url, secret)


def make_refusal_notices(settings: Settings, registry: Any, clock: Any):
    """What the runner tells the poster and the owners of a post the smarthost
    refused as a whole: the list's own texts (``[lists] template_dir``, its
    language), this host as the reporting MTA, no DSN to a list address."""
    from mailrelay.listproc.membership import list_templates
    from mailrelay.listproc.refusals import RefusalNotices

    def templates(mlist: Any):
        language = "en"
        try:
            language = registry.list_settings(mlist.posting_address).language
        except Exception:  # an embedder's registry without settings, or unreadable
            pass
        return list_templates(settings.lists.template_dir, mlist.posting_address, language)

    def is_list_address(address: str) -> bool:
        try:
            return registry.resolve(address) is not None
        except Exception:
            return True  # better no DSN than one to a list

    return RefusalNotices(
        templates=templates,
        is_list_address=is_list_address,
        reporting_mta=settings.mta.effective_lmtp_hostname(),
        clock=clock,
    )


def makeService(  # noqa: N802 - Twisted's naming for service factories
    settings: Settings,
    reactor: Any = None,
    *,
    registry: Any = None,
    spool: Any = None,
    sender: Any = None,
    observer: Any = None,
) -> service.MultiService:
    """Build the relay: LMTP listener, durable spool, delivery runner, SMTP pool,
    and with ``[http] endpoint`` the HTTP site serving ``/metrics``.

    Checks the stores it makes at once (so a bad path is reported before
    anything listens, and before twistd forks into the background) but opens
    them, with the spool's writer thread, only when the service starts, and
    closes them when it stops: the returned service may be started in
    another process than the one that made it.  Using the SQLite
    stores, it holds a lock on ``[paths] var_dir`` while it runs: a second
    relay on the same directory raises :class:`~mailrelay.errors.StateDirectoryInUse`.
    ``registry``, ``spool`` and ``sender`` replace the SQLite registry, SQLite
    spool and SMTP pool;
    ``observer`` (an :class:`~mailrelay.interfaces.IRelayObserver`) is told
    what the relay does, besides the metrics.  The returned service's
    ``metrics`` is the :class:`~mailrelay.metrics.RelayMetrics` (or ``None``)
    and its ``web_root`` the :class:`~mailrelay.web.WebRoot` of the HTTP site
    (or ``None``), where other pages can be mounted at their own paths before
    the service starts.  With ``[http] public_url`` posts carry unsubscribe
    URLs and the site serves them under ``/unsubscribe/``.  The daemon
    publishes its pid, version, start time and a heartbeat in the spool's
    status table under ``"daemon"`` while it runs, and rewrites the ``[postfix]`` maps at
    start when they are set.  With the SQLite spool and ``[mta] spool_reserve``
    above 0 it keeps that much space for delivery on the spool's file system
    (:mod:`mailrelay.spool.reserve`).
    """
    if reactor is None:
        from twisted.internet import reactor
    from mailrelay.lmtp.policy import InboundHandler
    from mailrelay.lmtp.protocol import LMTPFactory
    from mailrelay.registry import SQLiteRegistry
    from mailrelay.runner import DeliveryRunner
    from mailrelay.runner.limits import SizeLimits
    from mailrelay.spool import ReservedStore, SpaceReserve, SQLiteSpool

    mta = settings.mta
    lock = None
    reserve = None
    if registry is None or spool is None:
        # One daemon per state directory (raises StateDirectoryInUse); the
        # command line never takes this lock.
        lock = DirectoryLock(settings.paths.var_dir)
    # The stores made here are checked now (under twistd still in the
    # foreground, so a bad file is one line and exit status 1) and opened
    # when the service starts (in the daemon, after twistd's fork).
    opens: list[Any] = []
    try:
        if registry is None:
            SQLiteRegistry(settings.paths.registry_path).close()
            registry = SQLiteRegistry(settings.paths.registry_path, open_now=False)
            opens.append(registry)
        if spool is None:
            SQLiteSpool.check(settings.paths.spool_path)
            spool = SQLiteSpool(settings.paths.spool_path, reactor, open_now=False)
            opens.append(spool)
            # Only a spool of our own lives on the file system the reserve watches.
            if mta.spool_reserve:
                reserve = SpaceReserve(settings.paths.reserve_path, mta.spool_reserve)
        metrics = None
        if settings.http.endpoint:
            from mailrelay.metrics import RelayMetrics

            metrics = RelayMetrics(reactor)
            observer = metrics if observer is None else ObserverFanout(metrics, observer)
        sender = sender if sender is not None else make_sender(settings, reactor, observer)
        unsubscribe_urls = make_unsubscribe_urls(settings)
    except BaseException:
        if lock is not None:
            lock.release()
        raise

    # The runner does not exist yet when the warnings service is built.
    runners: list[Any] = []
    processing = make_list_processing(
        settings,
        spool,
        registry,
        reactor,
        wake=lambda: [r.wake() for r in runners],
        observer=observer,
    )

    top = _OrderedStop(reactor)
    top.metrics = metrics
    top.web_root = None
    # Children stop in reverse order, each after the previous one has finished:
    # listener first, then the runner, stores last.
    _StoreService(registry, spool, sender, lock, tuple(opens)).setServiceParent(top)
    _DaemonStatus(spool, reactor).setServiceParent(top)
    if settings.postfix.enabled:
        _PostfixMaps(settings, registry).setServiceParent(top)
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
        observer=observer,
        processor=processing.processor if processing else None,
        posting=processing.moderation if processing else None,
        on_bounces=processing.scorer.register_failures if processing else None,
        personalize=mta.personalize,
        unsubscribe_urls=unsubscribe_urls,
        notices=make_refusal_notices(settings, registry, reactor),
        processing_yield=settings.lists.processing_yield,
    )
    runners.append(runner)
    runner.setName("mailrelay-delivery")
    runner.setServiceParent(top)
    if processing is not None:
        from mailrelay.listproc.moderation import HeldPostExpiry

        # Copies of an approved post go out at once, not at the next poll.
        processing.moderation.wake = runner.wake
        # Both stop before the runner (children stop last added first), so
        # what they store is stored while it runs.
        HeldPostExpiry(processing.moderation, clock=reactor).setServiceParent(top)
        processing.warnings.setServiceParent(top)
    store: Any = runner
    if reserve is not None:
        # Checked at start (taking the reserve), then often enough that a disk
        # filled by someone else is noticed before result writes give up.
        watch = TimerService(RESERVE_CHECK_INTERVAL, reserve.check)
        watch.clock = reactor
        watch.setName("mailrelay-space-reserve")
        watch.setServiceParent(top)
        store = ReservedStore(runner, reserve)
    hostname = mta.effective_lmtp_hostname()
    # The runner stores what LMTP accepts: it routes each message in the
    # transaction that stores it and starts delivering without a claim.
    handler = InboundHandler(
        registry,
        store,
        hostname=hostname,
        clock=reactor,
        # One "accepted" event per LMTP transaction; the runner logs one
        # "queued" (or held, ...) line per list it routes the message to.
        log_accepted=True,
        observer=observer,
        # Posts larger than the smarthost or the list takes are refused at DATA.
        size_limit=SizeLimits(registry, sender),
    )
    factory = LMTPFactory(
        handler,
        hostname=hostname.encode("idna"),
        max_message_size=mta.max_message_size,
        max_line_length=mta.lmtp_max_line_length,
        idle_timeout=mta.lmtp_idle_timeout,
        store_timeout=mta.lmtp_store_timeout,
        max_sessions=mta.lmtp_max_sessions,
        clock=reactor,
        observer=observer,
    )
    if metrics is not None:
        from mailrelay.web import MetricsPage, WebRoot, make_site

        metrics.watch(
            spool=spool,
            breaker_state=runner.breaker_state,
            open_connections=lambda: getattr(sender, "open_connections", 0),
        )
        top.web_root = WebRoot()
        top.web_root.mount("metrics", MetricsPage(metrics.registry))
        if unsubscribe_urls is not None:
            from mailrelay.unsubscribe import MOUNT, UnsubscribePage

            top.web_root.mount(MOUNT, UnsubscribePage(registry, unsubscribe_urls.secret))
        web = strports.service(settings.http.endpoint, make_site(top.web_root), reactor=reactor)
        web.setName("mailrelay-http")
        web.setServiceParent(top)
    listener = strports.service(lmtp_listen_endpoint(settings), factory, reactor=reactor)
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
