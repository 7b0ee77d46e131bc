"""The list headers every post gets: RFC 2369 (List-Help, -Post, -Subscribe,
-Unsubscribe, -Owner), RFC 2919 (List-Id) and ``Precedence: list``.

The message is handled as bytes: the header fields are prepended and the
List-* and Precedence fields it arrived with are removed, and every other byte
is left exactly as received.  (Parsing and regenerating with :mod:`email`
would refold headers and re-encode parts, which can break DKIM signatures.)
"""

from __future__ import annotations

import functools
import re
from email.utils import formataddr
from urllib.parse import quote

from mailrelay.model import MailingList

__all__ = ["add_list_headers", "list_headers"]

# RFC 6068 lets these stand unescaped in a mailto: address; everything else
# (``?``, ``&``, ``%``, non-ASCII) is percent-encoded.
_MAILTO_SAFE = "@!$'()*+,;:"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _mailto(address: str, query: str = "") -> str:
    return f"<mailto:{quote(address, safe=_MAILTO_SAFE)}{query}>"


def list_headers(mlist: MailingList) -> list[tuple[str, str]]:
    """The ``(name, value)`` header fields for posts to ``mlist``, in the order sent."""
    # A display name is operator input: no line breaks may reach the header.
    name = _CONTROL.sub(" ", mlist.display_name).strip()
    list_id = formataddr((name, mlist.list_id), charset="utf-8") if name else f"<{mlist.list_id}>"
    return [
        ("List-Id", list_id),
        ("List-Help", _mailto(mlist.subaddress("request"), "?subject=help")),
        ("List-Post", _mailto(mlist.posting_address)),
        ("List-Subscribe", _mailto(mlist.subaddress("join"))),
        ("List-Unsubscribe", _mailto(mlist.subaddress("leave"))),
        ("List-Owner", _mailto(mlist.subaddress("owner"))),
        ("Precedence", "list"),
    ]


def _replaced(name: bytes) -> bool:
    name = name.strip().lower()
    return name.startswith(b"list-") or name == b"precedence"


def _strip_replaced_fields(message: bytes) -> bytes:
    """``message`` without its List-* and Precedence fields (continuation lines
    included); only the header block is looked at."""
    kept: list[bytes] = []
    position = 0
    dropping = False
    changed = False
    while position < len(message):
        end = message.find(b"\n", position)
        end = len(message) if end < 0 else end + 1
        line = message[position:end]
        if not line.strip(b"\r\n"):
            break  # the blank line ending the header block
        if line[:1] in (b" ", b"\t"):
            keep = not dropping
        else:
            name, colon, _ = line.partition(b":")
            dropping = bool(colon) and _replaced(name)
            keep = not dropping
        if keep:
            kept.append(line)
        else:
            changed = True
        position = end
    if not changed:
        return message
    return b"".join(kept) + message[position:]


def add_list_headers(message: bytes, mlist: MailingList) -> bytes:
    """``message`` with the list headers of ``mlist`` in front and the List-* and
    Precedence fields it had removed."""
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TypeError(f"message must be bytes, not {type(message).__name__}")
    if not isinstance(mlist, MailingList):
        raise TypeError(f"mlist must be a MailingList, not {mlist!r}")
    return _header_block(mlist) + _strip_replaced_fields(bytes(message))


@functools.lru_cache(maxsize=256)
def _header_block(mlist: MailingList) -> bytes:
    # The same for every post to the list: built once, not per message.
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in list_headers(mlist))
