"""The list headers every post gets: RFC 2369 (List-Help, -Post, -Subscribe,
-Unsubscribe, -Owner), RFC 2919 (List-Id), ``Precedence: list``, and on
personal copies RFC 8058's one-click ``List-Unsubscribe-Post``.

``List-Unsubscribe`` comes in two forms.  A copy shared by several members
(grouped) names the ``-leave`` address and, with a public URL, the list-level
page; it has no ``List-Unsubscribe-Post``, since a one-click POST could not
say who is leaving.  A copy for one member (``verp_delivery`` or
``personalize``) gets its own field, built by :func:`member_unsubscribe_fields`
and put in front of the list's shared header block at send time, so the
message is never parsed or copied field by field per member.

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

__all__ = ["add_list_headers", "list_headers", "member_unsubscribe_fields"]

# RFC 6068 lets these stand unescaped in a mailto: address; everything else
# (``?``, ``&``, ``%``, non-ASCII) is percent-encoded.
_MAILTO_SAFE = "@!$'()*+,;:"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _mailto(address: str, query: str = "") -> str:
    return f"<mailto:{quote(address, safe=_MAILTO_SAFE)}{query}>"


def _uris(*uris: str) -> str:
    # One URI per line (RFC 2369 allows folding between them): a member URL
    # may be long, and no line may pass SMTP's 998 octets.
    return ",\r\n ".join(uris)


def list_headers(
    mlist: MailingList, *, list_url: str | None = None, personal: bool = False
) -> list[tuple[str, str]]:
    """The ``(name, value)`` header fields for posts to ``mlist``, in the order sent.

    ``list_url`` (the list-level unsubscribe page) follows the ``-leave``
    address in ``List-Unsubscribe``.  With ``personal``, ``List-Unsubscribe``
    is left out: each copy gets :func:`member_unsubscribe_fields` instead.
    """
    # A display name is operator input: no line breaks may reach the header.
    name = _CONTROL.sub(" ", mlist.display_name).strip()
    list_id = formataddr((name, mlist.list_id), charset="utf-8") if name else f"<{mlist.list_id}>"
    leave = _mailto(mlist.subaddress("leave"))
    unsubscribe = [] if personal else [_uris(leave, f"<{list_url}>") if list_url else leave]
    return [
        ("List-Id", list_id),
        ("List-Help", _mailto(mlist.subaddress("request"), "?subject=help")),
        ("List-Post", _mailto(mlist.posting_address)),
        ("List-Subscribe", _mailto(mlist.subaddress("join"))),
        *(("List-Unsubscribe", value) for value in unsubscribe),
        ("List-Owner", _mailto(mlist.subaddress("owner"))),
        ("Precedence", "list"),
    ]


def member_unsubscribe_fields(mlist: MailingList, member_url: str) -> bytes:
    """The header bytes that make a member's own copy one-click unsubscribable.

    ``List-Unsubscribe`` with ``member_url`` first (the one-click URL, which
    RFC 8058 mail clients POST to) and the ``-leave`` address second, then
    ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``; CRLF line ends,
    ready to be put in front of a message.
    """
    if _CONTROL.search(member_url) or not member_url.isascii() or ">" in member_url:
        raise ValueError(f"not a URL for a header: {member_url!r}")
    value = _uris(f"<{member_url}>", _mailto(mlist.subaddress("leave")))
    return (
        f"List-Unsubscribe: {value}\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    ).encode("ascii")


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


def add_list_headers(
    message: bytes, mlist: MailingList, *, list_url: str | None = None, personal: bool = False
) -> bytes:
    """``message`` with the list headers of ``mlist`` in front and the List-* and
    Precedence fields it had removed (``list_url`` and ``personal`` as for
    :func:`list_headers`)."""
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TypeError(f"message must be bytes, not {type(message).__name__}")
    if not isinstance(mlist, MailingList):
        raise TypeError(f"mlist must be a MailingList, not {mlist!r}")
    return _header_block(mlist, list_url, personal) + _strip_replaced_fields(bytes(message))


@functools.lru_cache(maxsize=256)
def _header_block(mlist: MailingList, list_url: str | None, personal: bool) -> bytes:
    # The same for every post to the list: built once, not per message.
    fields = list_headers(mlist, list_url=list_url, personal=personal)
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in fields)
