"""Public test doubles for code that embeds or talks to mailrelay.

* :class:`FakeMTA` - an SMTP server for tests (``mailrelay.testing.fakemta``):
  counts connections, records messages, transactions and AUTH attempts, offers
  STARTTLS or implicit TLS, and injects rejections, disconnects and delays.
* :class:`Transaction` - one message the fake MTA accepted.
* :class:`ThrowawayCA` - a trustme certificate authority with the Twisted
  objects and PEM files TLS tests need (``mailrelay.testing.tls``; needs the
  ``mailrelay[testing]`` extra).

Names are imported on first use: ``twisted.mail.smtp`` installs the global
reactor when imported, which must not happen before a test runner has chosen
one, and trustme is only needed for TLS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailrelay.testing.fakemta import FakeMTA, Transaction
    from mailrelay.testing.tls import ThrowawayCA

__all__ = ["FakeMTA", "ThrowawayCA", "Transaction"]

_HOMES = {
    "FakeMTA": "mailrelay.testing.fakemta",
    "Transaction": "mailrelay.testing.fakemta",
    "ThrowawayCA": "mailrelay.testing.tls",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
