"""The unsubscribe pages under ``/unsubscribe/``, on the relay's HTTP site.

Place in the flow: :func:`mailrelay.service.makeService` mounts one
:class:`UnsubscribePage` on the :class:`~mailrelay.web.WebRoot` when
``[http] public_url`` is set; the URLs it serves are the ones
:class:`~mailrelay.unsubscribe.urls.UnsubscribeURLs` put into posts.  It
reads and changes the list registry directly (one short, synchronous
``remove_members`` call, as the LMTP policy does at RCPT time).

``/unsubscribe/TOKEN`` (a member's one-click URL, RFC 8058):

* ``POST`` with the form field ``List-Unsubscribe=One-Click`` (what mail
  clients send, urlencoded or multipart) removes the member at once and
  answers 200 with a short page.  The same 200 and text when the address is
  no longer a member, or the list is gone: the answer reveals nothing.
* ``GET`` (and ``HEAD``) shows a page with a button that makes that POST, and
  never unsubscribes: link scanners and previews fetch every URL they see.
* A token that does not verify (forged, altered, from another site, or
  issued before the secret was replaced) answers 404 and changes nothing; a
  POST without the one-click field 400.

``/unsubscribe/list/LIST@DOMAIN`` (on copies shared by several members)
explains how to leave by mail (the ``-leave`` address, which asks for a
confirmation); 404 for an unknown list.  It takes no address: a form that
mails a confirmation to whatever is typed in would let anyone send mail in
the list's name.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.logger import Logger
from twisted.web import resource

from mailrelay.errors import RegistryError, RegistryUnavailable
from mailrelay.listproc.tokens import read_unsubscribe_token
from mailrelay.unsubscribe.urls import LIST_SEGMENT

__all__ = ["ONE_CLICK_FIELD", "ONE_CLICK_VALUE", "UnsubscribePage"]

_log = Logger()

ONE_CLICK_FIELD = b"List-Unsubscribe"
ONE_CLICK_VALUE = b"One-Click"
_MAX_PATH_SEGMENT = 1024

_STYLE = "body{font-family:sans-serif;max-width:36em;margin:3em auto;padding:0 1em}"
# The token is in the URL: never hand it on to another site, never let a
# search engine keep it; the page runs no script and loads nothing.
_SECURITY_HEADERS = {
    b"Cache-Control": b"no-store",
    b"Referrer-Policy": b"no-referrer",
    b"X-Robots-Tag": b"noindex, nofollow",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Content-Security-Policy": b"default-src 'none'; style-src 'unsafe-inline'; "
    b"form-action 'self'; frame-ancestors 'none'",
}


def _page(request: Any, code: int, title: str, body_html: str) -> bytes:
    """A small HTML page with status ``code``; ``body_html`` is already escaped."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    for name, value in _SECURITY_HEADERS.items():
        request.setHeader(name, value)
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width"><title>{html.escape(title)}'
        f"</title><style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
        f"{body_html}\n</body></html>\n"
    )
    return text.encode("utf-8")


def _not_found(request: Any) -> bytes:
    return _page(
        request,
        404,
        "Unknown link",
        "<p>This unsubscribe link is not valid (it may be incomplete, or older than "
        "the site's current key). Nothing was changed. To leave a list, send a "
        "message to its <em>-leave</em> address, given in the List-Unsubscribe "
        "header of its posts.</p>",
    )


class _Page(resource.Resource):
    """A leaf page answering ``methods`` (HEAD with GET), anything else 405."""

    isLeaf = True
    methods: tuple[bytes, ...] = (b"GET", b"HEAD")

    def render(self, request: Any) -> bytes:
        if request.method in self.methods:
            return super().render(request)
        # Our own page: twisted.web's default 405 page is deprecated (unescaped).
        request.setHeader(b"Allow", b", ".join(self.methods))
        return _page(request, 405, "Method not allowed", "<p>Nothing was changed.</p>")


class _MemberPage(_Page):
    """``/unsubscribe/TOKEN``: one member of one list (a verified token)."""

    methods = (b"GET", b"HEAD", b"POST")

    def __init__(self, registry: Any, list_address: str, address: str):
        super().__init__()
        self._registry = registry
        self._list = list_address
        self._address = address

    def _describe(self) -> str:
        return f"<b>{html.escape(self._address)}</b> from the list <b>{html.escape(self._list)}</b>"

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's naming
        # Never unsubscribes: a person must press the button.
        field = html.escape(ONE_CLICK_FIELD.decode("ascii"))
        value = html.escape(ONE_CLICK_VALUE.decode("ascii"))
        return _page(
            request,
            200,
            "Unsubscribe",
            f"<p>Unsubscribe {self._describe()}?</p>\n"
            f'<form method="post" action=""><input type="hidden" name="{field}" '
            f'value="{value}"><button type="submit">Unsubscribe</button></form>',
        )

    def render_POST(self, request: Any) -> bytes:  # noqa: N802
        # twisted.web merges the query into args; RFC 8058 puts the field in the body.
        in_query = ONE_CLICK_FIELD in parse_qs(urlsplit(request.uri).query)
        if request.args.get(ONE_CLICK_FIELD) != [ONE_CLICK_VALUE] or in_query:
            return _page(
                request,
                400,
                "Bad request",
                "<p>An unsubscribe request must send "
                "<code>List-Unsubscribe=One-Click</code> (RFC 8058). Nothing was changed.</p>",
            )
        fields = dict(list=self._list, recipient=self._address)
        try:
            missing = self._registry.remove_members(self._list, [self._address])
        except RegistryUnavailable as e:
            _log.warn(
                "One-click unsubscribe of {recipient} from {list} failed for now: {error}",
                error=str(e),
                **fields,
            )
            request.setHeader(b"Retry-After", b"60")
            return _page(
                request,
                503,
                "Try again later",
                "<p>The list's records cannot be changed just now. Nothing was "
                "changed; please try again in a few minutes.</p>",
            )
        except RegistryError as e:
            # The list was deleted: nobody is on it any more, and saying so
            # would answer differently from the member case.
            missing = (self._address,)
            _log.info("One-click unsubscribe for {list}: {error}", error=str(e), **fields)
        if missing:
            _log.info("One-click unsubscribe: {recipient} was not on {list}", **fields)
        else:
            _log.info("One-click unsubscribe: {recipient} removed from {list}", **fields)
        return _page(
            request,
            200,
            "Unsubscribed",
            f"<p>Unsubscribed {self._describe()}. No more posts from this list will "
            "be sent to this address.</p>",
        )


class _ListPage(_Page):
    """``/unsubscribe/list/LIST@DOMAIN``: how to leave a list by mail."""

    def __init__(self, registry: Any):
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        if len(request.postpath) != 1 or len(request.postpath[0]) > _MAX_PATH_SEGMENT:
            return _not_found(request)
        try:
            address = unquote(request.postpath[0].decode("ascii"), errors="strict")
            mlist = self._registry.get_list(address)
        except (UnicodeDecodeError, RegistryError, ValueError):
            mlist = None
        except RegistryUnavailable:
            request.setHeader(b"Retry-After", b"60")
            return _page(request, 503, "Try again later", "<p>Please try again later.</p>")
        if mlist is None:
            return _not_found(request)
        leave = html.escape(mlist.subaddress("leave"))
        name = html.escape(mlist.display_name or mlist.posting_address)
        return _page(
            request,
            200,
            f"Leaving {mlist.display_name or mlist.posting_address}",
            f"<p>To unsubscribe from <b>{name}</b>, send a message (any content) from the "
            f'subscribed address to <a href="mailto:{leave}">{leave}</a>. You will get a '
            "message asking you to confirm; reply to it, and you are unsubscribed.</p>",
        )


class UnsubscribePage(resource.Resource):
    """``/unsubscribe/``: member pages by token, list pages under ``list/``.

    ``registry`` is the list registry (``IListRegistry``); ``secret`` the
    site's unsubscribe key, the one the URLs in posts were signed with.
    """

    def __init__(self, registry: Any, secret: bytes):
        super().__init__()
        self._registry = registry
        self._secret = secret
        self._list_page = _ListPage(registry)

    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802
        if path == LIST_SEGMENT.encode("ascii"):
            return self._list_page
        if request.postpath or len(path) > _MAX_PATH_SEGMENT:
            return _NotFound()
        try:
            token = path.decode("ascii")
        except UnicodeDecodeError:
            return _NotFound()
        target = read_unsubscribe_token(self._secret, token)
        if target is None:
            _log.info("Unsubscribe link with an invalid token ({length} octets)", length=len(path))
            return _NotFound()
        return _MemberPage(self._registry, target.list_address, target.address)

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        return _not_found(request)


class _NotFound(resource.Resource):
    """404 for every method: an unknown or forged unsubscribe link."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return _not_found(request)
