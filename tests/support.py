"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import defer, task
from twisted.trial.unittest import SkipTest


def peers_required() -> bool:
    """In CI (MAILRELAY_REQUIRE_PEERS or CI set) a missing peer fails instead of skipping."""
    value = os.environ.get("MAILRELAY_REQUIRE_PEERS") or os.environ.get("CI") or ""
    return value.lower() not in ("", "0", "false", "no")


def require_program(name: str) -> str:
    """Path of an external program a test needs; skip (locally) or fail (CI) without it."""
    path = shutil.which(name) or next(
        (
            p
            for p in (f"/usr/sbin/{name}", f"/usr/lib/postfix/sbin/{name}")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    if path:
        return path
    message = f"{name} is not installed (Debian package postfix); scripts/test installs it"
    if peers_required():
        raise AssertionError(message)
    raise SkipTest(message)


def temp_dir(case) -> str:
    """A fresh directory removed after the test.

    Not ``TestCase.mktemp``: under pytest that path is relative to the
    checkout, so the test would leave files in the working tree.
    """
    path = tempfile.mkdtemp(prefix="mailrelay-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for external servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for_port(reactor, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (an external server starting)."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if reactor.seconds() > deadline:
                raise AssertionError(
                    f"nothing listening on 127.0.0.1:{port} after {timeout}s"
                ) from None
            await task.deferLater(reactor, 0.02, lambda: None)


def as_deferred(coro) -> defer.Deferred:
    return defer.Deferred.fromCoroutine(coro)
