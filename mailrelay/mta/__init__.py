"""Outbound SMTP: the Connection to the smarthost and bulk (chunked) delivery."""

from mailrelay.mta.bulk import BulkDelivery
from mailrelay.mta.connection import Connection, SecureMode, as_secure_mode
from mailrelay.mta.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    ConnectionTimeout,
    DataRefused,
    DeliveryError,
    SenderRefused,
    ServerClosing,
    TLSFailed,
)
from mailrelay.mta.message import WireMessage, prepare_message

__all__ = [
    "AuthenticationFailed",
    "BulkDelivery",
    "Connection",
    "ConnectionFailed",
    "ConnectionTimeout",
    "DataRefused",
    "DeliveryError",
    "SecureMode",
    "SenderRefused",
    "ServerClosing",
    "TLSFailed",
    "WireMessage",
    "as_secure_mode",
    "prepare_message",
]
