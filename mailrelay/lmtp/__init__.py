"""Inbound LMTP (RFC 2033): the wire protocol and the policy behind it.

:mod:`mailrelay.lmtp.protocol` speaks LMTP and knows nothing about lists or
storage; :mod:`mailrelay.lmtp.policy` decides which recipients to accept and
stores accepted messages.  The values defined here are the seam between them
(see :class:`mailrelay.interfaces.IInboundHandler`).

``LMTPFactory``, ``LMTPServer`` and ``InboundHandler`` are imported on first use:
:mod:`twisted.mail.smtp` imports the global reactor, which must not happen
before ``twistd -r`` or an embedder has installed the reactor of its choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


@dataclass(frozen=True)
class Reply:
    """One LMTP reply: basic code, RFC 3463 enhanced status code and text."""

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not (200 <= self.code <= 599) or self.code // 100 == 3:
            raise ValueError(f"not a final reply code: {self.code!r}")
        if not _STATUS.match(self.status) or self.status[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status {self.status!r} does not fit code {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError(f"reply text must be one line: {self.text!r}")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class RecipientRejected(Exception):
    """Raised by ``IInboundHandler.validate_recipient`` to refuse a RCPT with ``reply``."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class AcceptedRecipient:
    """A recipient accepted at RCPT time: the address as given (without angle
    brackets) and whatever ``validate_recipient`` returned for it."""

    address: str
    token: Any


@dataclass(frozen=True)
class Transaction:
    """A complete LMTP mail transaction, handed to ``IInboundHandler.deliver``.

    ``recipients`` holds one entry per accepted RCPT, in RCPT order, duplicates
    included.  ``message`` is the content exactly as received after removing
    the dot-stuffing, with CRLF line ends.
    """

    sender: str  # "" for the null reverse-path <>
    recipients: tuple[AcceptedRecipient, ...]
    message: bytes = field(repr=False)
    peer: str = ""
    lhlo: str = ""


_LAZY = {
    "LMTPFactory": "mailrelay.lmtp.protocol",
    "LMTPServer": "mailrelay.lmtp.protocol",
    "InboundHandler": "mailrelay.lmtp.policy",
    "prepare_message": "mailrelay.lmtp.policy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AcceptedRecipient",
    "InboundHandler",
    "LMTPFactory",
    "LMTPServer",
    "RecipientRejected",
    "Reply",
    "Transaction",
    "prepare_message",
]
