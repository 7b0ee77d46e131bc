"""The unsubscribe URLs members see: one per list, and one per member (RFC 8058).

Place in the flow: built once by :func:`mailrelay.service.makeService` from
``[http] public_url`` and the site secret under ``var_dir``; delivery
(:mod:`mailrelay.runner.sending`) asks it for the URLs that go into
``List-Unsubscribe``, and the page (:mod:`mailrelay.unsubscribe.page`) serves
them under the same paths.  A member URL carries a token from
:func:`~mailrelay.listproc.tokens.make_unsubscribe_token` (list and member
addresses and an HMAC), so nothing is stored per message or per member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from mailrelay.listproc.tokens import make_unsubscribe_token

__all__ = ["LIST_SEGMENT", "MOUNT", "UnsubscribeURLs"]

# The site's path for these pages (``/unsubscribe/``) and the segment under it
# of the list-level pages; a token never equals it, since every token has a ".".
MOUNT = "unsubscribe"
LIST_SEGMENT = "list"
# Characters left as they are in the list address of a list-level URL.
_PATH_SAFE = "@!$'()*+,;=:"


@dataclass(frozen=True)
class UnsubscribeURLs:
    """URLs below ``public_url`` (an ``https://`` URL ending in ``/``), member
    URLs signed with ``secret`` (the site's unsubscribe key)."""

    public_url: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.public_url.startswith("https://") or not self.public_url.endswith("/"):
            raise ValueError(f"public_url must be https://... ending in /, not {self.public_url!r}")
        if len(self.secret) < 16:
            raise ValueError("the unsubscribe secret must have at least 128 bits")

    def list_url(self, list_address: str) -> str:
        """The list-level page: how to leave ``list_address`` (no one-click)."""
        path = quote(list_address.lower(), safe=_PATH_SAFE)
        return f"{self.public_url}{MOUNT}/{LIST_SEGMENT}/{path}"

    def member_url(self, list_address: str, address: str) -> str:
        """The one-click URL that unsubscribes ``address`` from ``list_address``."""
        token = make_unsubscribe_token(self.secret, list_address, address)
        return f"{self.public_url}{MOUNT}/{token}"
