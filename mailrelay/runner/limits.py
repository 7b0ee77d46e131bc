"""The largest message LMTP may accept for one recipient: what the smarthost
and the list allow, known before the post is acknowledged.

Place in the flow: :mod:`mailrelay.service` hands :class:`SizeLimits` to the
LMTP policy (:class:`~mailrelay.lmtp.policy.InboundHandler`'s ``size_limit``),
which refuses a larger message for that recipient with ``552 5.3.4`` at DATA,
so the sending MTA bounces it to the poster.  A limit that is not known yet
(no connection has seen the smarthost's EHLO) is no limit: the outbound
client still refuses a message over the smarthost's SIZE before MAIL, and the
runner then tells the poster (:mod:`mailrelay.listproc.refusals`).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from mailrelay.errors import RegistryError, RegistryUnavailable
from mailrelay.model import Destination

__all__ = ["SizeLimits"]

_log = Logger()


class SizeLimits:
    """``limits(destination)``: the largest message in octets for a
    :class:`~mailrelay.model.Destination`, or ``None`` for no limit.

    Posts are held to the smallest of the smarthost's advertised SIZE (the
    ``size_limit`` of ``sender``, normally the connection pool) and the list's
    ``max_message_size`` setting (KB, 0 for none; read from ``registry`` when
    it keeps list settings); ``-owner`` mail to the smarthost's SIZE alone;
    mail to the command addresses is never relayed, so it has no limit here.
    """

    def __init__(self, registry: Any, sender: Any):
        self._registry = registry
        self._sender = sender

    def __call__(self, destination: Destination) -> int | None:
        if destination.subaddress not in (None, "owner"):
            return None
        limits = []
        smarthost = getattr(self._sender, "size_limit", None)
        if isinstance(smarthost, int) and not isinstance(smarthost, bool) and smarthost > 0:
            limits.append(smarthost)
        if destination.subaddress is None:
            own = self._list_limit(destination.list_address)
            if own:
                limits.append(own * 1024)
        return min(limits) if limits else None

    def _list_limit(self, list_address: str) -> int:
        settings = getattr(self._registry, "list_settings", None)
        if settings is None:
            return 0
        try:
            return int(getattr(settings(list_address), "max_message_size", 0) or 0)
        except (RegistryError, RegistryUnavailable) as e:
            # Unknown for now: accept, as without a limit (nothing is lost;
            # the smarthost's SIZE is still checked before sending).
            _log.warn(
                "Cannot read the size limit of {list}: {error}", list=list_address, error=str(e)
            )
            return 0
