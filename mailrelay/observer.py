"""The default :class:`~mailrelay.interfaces.IRelayObserver`: one that does nothing.

The LMTP server, the delivery runner and the SMTP connections are handed an
observer and call it at session, transaction and batch granularity; without
metrics (``[http] endpoint`` unset) they get :data:`NO_OBSERVER`, whose
methods do nothing, so that the hot paths pay one method call per batch.
:mod:`mailrelay.metrics` has the Prometheus observer.
"""

from __future__ import annotations

from zope.interface import implementer

from mailrelay.interfaces import IRelayObserver

__all__ = ["NO_OBSERVER", "NullObserver", "ObserverFanout"]


@implementer(IRelayObserver)
class NullObserver:
    """An observer that ignores everything (see :class:`IRelayObserver`)."""

    def lmtp_session_opened(self) -> None:
        pass

    def lmtp_session_closed(self) -> None:
        pass

    def message_accepted(self, recipients: int) -> None:
        pass

    def message_refused(self, reason: str, recipients: int) -> None:
        pass

    def recipients_held(self, list_address: str, count: int) -> None:
        pass

    def recipients_queued(self, list_address: str, count: int) -> None:
        pass

    def recipients_done(
        self, list_address: str, delivered: int, deferred: int, dead_lettered: int, bounced: int
    ) -> None:
        pass

    def smtp_transaction(self, seconds: float, ok: bool) -> None:
        pass

    def smtp_connection_opened(self) -> None:
        pass

    def smtp_connection_failed(self) -> None:
        pass

    def post_delivered(self, list_address: str, seconds: float, first: bool, last: bool) -> None:
        pass


NO_OBSERVER = NullObserver()


@implementer(IRelayObserver)
class ObserverFanout:
    """Tells every one of ``observers`` (for metrics and an embedder's own)."""

    def __init__(self, *observers: object):
        self._observers = tuple(observers)

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in IRelayObserver:
            raise AttributeError(name)
        methods = [getattr(observer, name) for observer in self._observers]

        def tell_all(*args: object) -> None:
            for method in methods:
                method(*args)

        setattr(self, name, tell_all)  # looked up once per name
        return tell_all
