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

Every post also carries ``X-BeenThere: LIST@DOMAIN``, as Mailman's do (the
ones it arrived with, from other lists, are kept): a post that comes back,
through another list or a member's forwarding, is recognised by it and
discarded by the posting policy (:func:`~mailrelay.listproc.posting.loop_reason`)
even after another list replaced the ``List-Id``.

With a subject prefix (the list setting ``subject_prefix``, Mailman's; off by
default) the ``Subject`` becomes ``PREFIX SUBJECT``, once:
:func:`prefixed_subject` decodes the field (RFC 2047 encoded words, raw
UTF-8), takes out the prefix where it already is and a leading ``Re:``
chain, and writes ``PREFIX Re: SUBJECT`` back with :class:`email.header.Header`,
so encoded words are re-encoded, never pasted into.

The message is handled as bytes: the header fields are prepended, the List-*
and Precedence fields it arrived with are removed (and the Subject replaced,
with a prefix), in one pass over the header block; every other byte is left
exactly as received, and the body is copied once, into the result.  (Parsing
and regenerating with :mod:`email` would refold headers and re-encode parts,
which can break DKIM signatures.)
"""

from __future__ import annotations

import functools
import re
from email.errors import MessageError
from email.header import Header, decode_header, make_header
from email.utils import formataddr
from urllib.parse import quote

from mailrelay.model import MailingList

__all__ = [
    "add_list_headers",
    "list_headers",
    "member_unsubscribe_fields",
    "prefixed_subject",
]

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
        ("X-BeenThere", mlist.posting_address),
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


# Mailman's RE_PATTERN: the reply markers of several languages, repeated.
_REPLY_MARKERS = re.compile(r"\s*((RE|AW|SV|VS)(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_NO_SUBJECT = "(no subject)"


def _replaced(name: bytes) -> bool:
    name = name.strip().lower()
    return name.startswith(b"list-") or name == b"precedence"


def _decoded_subject(value: bytes) -> str | None:
    """The text of a raw Subject value (continuation lines included): RFC 2047
    encoded words decoded, raw 8-bit bytes read as UTF-8; ``None`` when it
    cannot be read (bytes that are not UTF-8, an unknown charset, a broken
    encoded word)."""
    try:
        text = value.decode("utf-8")
        # Unfolding (RFC 5322 2.2.3): a line break before white space is removed.
        text = re.sub(r"\r?\n(?=[ \t])", "", text).strip("\r\n")
        return str(make_header(decode_header(text)))
    except (UnicodeError, LookupError, MessageError, ValueError):
        return None
    except Exception:  # a corner of the email package: never block a post for its Subject
        return None


def _encoded(*parts: str) -> bytes:
    """``parts`` as one header value, a space between each: each in US-ASCII
    when it is ASCII (so the prefix stays readable), else RFC 2047 UTF-8
    encoded words; folded."""
    header = Header(header_name="Subject")
    for part in parts:
        header.append(part, "us-ascii" if part.isascii() else "utf-8")
    return header.encode(linesep="\r\n").encode("ascii")


def prefixed_subject(value: bytes | None, prefix: str) -> bytes:
    """The ``Subject`` field (name, value and CRLF, as bytes) of a post whose
    Subject value was ``value`` (raw bytes, ``None`` for none), with ``prefix``
    in front once.

    As Mailman's ``subject_prefix`` handler: the prefix is taken out where it
    already is (a reply, ``Re: [mylist] hello``), and a leading ``Re:`` chain
    (also ``AW:``, ``SV:``, ``VS:``) becomes one ``Re:`` after the prefix:
    ``[mylist] Re: hello``.  An empty subject becomes ``(no subject)``.  A value
    that cannot be decoded is kept as it is, behind the encoded prefix.
    """
    prefix = prefix.strip()
    text = "" if value is None else _decoded_subject(value)
    if text is None:
        # Nothing to take apart: the prefix and a space go in front of the
        # raw value, which stays one header field (its own folding kept).
        raw = bytes(value or b"").lstrip(b" \t")
        if not raw.endswith(b"\n"):
            raw += b"\r\n"
        if prefix.lower().encode("utf-8") in raw.lower():
            return b"Subject: " + raw
        return b"Subject: " + _encoded(prefix) + b" " + raw
    if prefix:
        text = re.sub(r"\s*" + re.escape(prefix) + r"\s*", " ", text, flags=re.IGNORECASE)
    text = text.strip()
    reply = _REPLY_MARKERS.match(text)
    if reply is not None:
        text = text[reply.end() :]
    parts = [prefix, "Re:"] if reply is not None else [prefix]
    return b"Subject: " + _encoded(*parts, text or _NO_SUBJECT) + b"\r\n"


def _rewrite(message: bytes, block: bytes, subject_prefix: str) -> bytes:
    """``block`` then ``message`` without its List-* and Precedence fields
    (continuation lines included), its Subject rewritten by
    :func:`prefixed_subject` when ``subject_prefix`` is set.  Only the header
    block is looked at, in one pass, and the body is copied once."""
    kept: list[bytes] = []
    position = 0
    dropping = False
    changed = False
    subject: list[bytes] | None = None  # the first Subject field's lines
    subject_at = -1  # where in ``kept`` the new Subject goes
    in_subject = False
    while position < len(message):
        end = message.find(b"\n", position)
        end = len(message) if end < 0 else end + 1
        line = message[position:end]
        if not line.strip(b"\r\n"):
            break  # the blank line ending the header block
        if line[:1] in (b" ", b"\t"):
            keep = not dropping
            if in_subject and subject is not None:
                subject.append(line)
                keep = False
        else:
            name, colon, rest = line.partition(b":")
            dropping = bool(colon) and _replaced(name)
            keep = not dropping
            in_subject = False
            if subject_prefix and colon and subject is None and name.strip().lower() == b"subject":
                subject, in_subject, keep = [rest], True, False
                subject_at = len(kept)
        if keep:
            kept.append(line)
        else:
            changed = True
        position = end
    if subject_prefix:
        field = prefixed_subject(None if subject is None else b"".join(subject), subject_prefix)
        if subject is None:
            kept.insert(0, field)  # no Subject at all: one is added, after the list's
        else:
            kept.insert(subject_at, field)
        changed = True
    if not changed:
        return block + message
    return b"".join([block, *kept, memoryview(message)[position:]])


def add_list_headers(
    message: bytes,
    mlist: MailingList,
    *,
    list_url: str | None = None,
    personal: bool = False,
    subject_prefix: str = "",
) -> bytes:
    """``message`` with the list headers of ``mlist`` in front, the List-* and
    Precedence fields it had removed (``list_url`` and ``personal`` as for
    :func:`list_headers`), and with ``subject_prefix`` (empty: none) in front
    of its Subject once (:func:`prefixed_subject`)."""
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TypeError(f"message must be bytes, not {type(message).__name__}")
    if not isinstance(mlist, MailingList):
        raise TypeError(f"mlist must be a MailingList, not {mlist!r}")
    if not isinstance(subject_prefix, str):
        raise TypeError(f"subject_prefix must be text, not {subject_prefix!r}")
    block = _header_block(mlist, list_url, personal)
    return _rewrite(bytes(message), block, subject_prefix.strip())


@functools.lru_cache(maxsize=256)
def _header_block(mlist: MailingList, list_url: str | None, personal: bool) -> bytes:
    # The same for every post to the list: built once, not per message.
    fields = list_headers(mlist, list_url=list_url, personal=personal)
    return b"".join(f"{name}: {value}\r\n".encode() for name, value in fields)
