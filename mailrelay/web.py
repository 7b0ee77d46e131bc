"""The relay's HTTP site: ``/metrics`` today, other pages mounted beside it.

Place in the flow: :func:`mailrelay.service.makeService` builds one
:class:`WebRoot` when ``[http] endpoint`` is set and listens on that endpoint
with :func:`make_site`, on the relay's own reactor.  Other parts (such as a
one-click unsubscribe page) mount their resources at other paths of the same
root with :meth:`WebRoot.mount`, so that they share the listener and stay
separable by path.

``/metrics`` renders the Prometheus text format with ``prometheus_client``'s
own :func:`~prometheus_client.generate_latest`.  Not with
``prometheus_client.twisted.MetricsResource``: that one imports the global
reactor and collects in a thread-pool thread, where the scrape-time collector
could not read the spool (SQLite connections belong to their thread).
Rendering is synchronous on the reactor thread and cheap: counters are
summed already, and the spool is read through its indexed counts.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger
from twisted.web import resource, server

__all__ = ["MetricsPage", "WebRoot", "make_site"]

_log = Logger()


class MetricsPage(resource.Resource):
    """``GET`` renders ``registry`` (a ``prometheus_client.CollectorRegistry``)."""

    isLeaf = True

    def __init__(self, registry: Any):
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - twisted.web's naming
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self._registry)


class WebRoot(resource.Resource):
    """The site's root: a short index at ``/``, resources mounted below it."""

    def __init__(self) -> None:
        super().__init__()
        self._paths: list[str] = []

    def mount(self, path: str, page: resource.Resource) -> None:
        """Serve ``page`` at ``/path`` (one path segment, such as ``metrics``);
        ``ValueError`` if the path is taken or not one segment."""
        if not path or "/" in path or not path.isascii():
            raise ValueError(f"mount path must be one ASCII path segment, not {path!r}")
        if path in self._paths:
            raise ValueError(f"/{path} is mounted already")
        self._paths.append(path)
        self.putChild(path.encode("ascii"), page)

    def render_GET(self, request: Any) -> bytes:  # noqa: N802
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        lines = ["mailrelay", *(f"/{path}" for path in self._paths)]
        return ("\n".join(lines) + "\n").encode("utf-8")

    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802
        if path == b"":
            return self
        return super().getChild(path, request)


def make_site(root: resource.Resource) -> server.Site:
    """A ``Site`` for ``root`` that does not log every request (scrapes come
    every few seconds) and keeps no sessions."""
    site = server.Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    site.noisy = False
    return site
