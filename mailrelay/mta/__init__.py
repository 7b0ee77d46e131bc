"""Outbound SMTP: the Connection to the smarthost, bulk delivery and the pool.

Names are imported on first use: the client module imports
``twisted.mail.smtp``, which installs the global reactor, and that must not
happen merely because a submodule such as ``mailrelay.mta.errors`` is imported
before ``twistd -r`` (or a test runner) has chosen a reactor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailrelay.mta.bulk import BulkDelivery
    from mailrelay.mta.connection import Connection, SecureMode, as_secure_mode
    from mailrelay.mta.errors import (
        AuthenticationFailed,
        ConnectionFailed,
        ConnectionTimeout,
        DataRefused,
        DeliveryError,
        MessageTooLarge,
        SenderRefused,
        ServerClosing,
        SmarthostUnreachable,
        TLSFailed,
    )
    from mailrelay.mta.message import WireMessage, prepare_message
    from mailrelay.mta.pool import ConnectionPool

_HOMES = {
    "BulkDelivery": "bulk",
    "Connection": "connection",
    "ConnectionPool": "pool",
    "SecureMode": "connection",
    "as_secure_mode": "connection",
    "WireMessage": "message",
    "prepare_message": "message",
    **dict.fromkeys(
        [
            "AuthenticationFailed",
            "ConnectionFailed",
            "ConnectionTimeout",
            "DataRefused",
            "DeliveryError",
            "MessageTooLarge",
            "SenderRefused",
            "ServerClosing",
            "SmarthostUnreachable",
            "TLSFailed",
        ],
        "errors",
    ),
}

__all__ = [
    "AuthenticationFailed",
    "BulkDelivery",
    "Connection",
    "ConnectionFailed",
    "ConnectionPool",
    "ConnectionTimeout",
    "DataRefused",
    "DeliveryError",
    "MessageTooLarge",
    "SecureMode",
    "SenderRefused",
    "ServerClosing",
    "SmarthostUnreachable",
    "TLSFailed",
    "WireMessage",
    "as_secure_mode",
    "prepare_message",
]
assert sorted(__all__) == sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"mailrelay.mta.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
