"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
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


def missing_peer(message: str):
    """A peer a test needs is missing: skip locally, fail under ``MAILRELAY_REQUIRE_PEERS``."""
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


def mount_tmpfs(case, path: str, size: str) -> None:
    """A tmpfs of ``size`` on ``path``, unmounted after the test; skip (fail in CI) if impossible."""
    why = None
    if os.geteuid() != 0:
        why = "mounting a tmpfs needs root"
    else:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", path],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            why = f"mount -t tmpfs failed: {result.stderr.strip()}"
    if why is not None:
        missing_peer(why)
    case.addCleanup(subprocess.run, ["umount", "-l", path], check=False)


def fill_file_system(directory: str) -> str:
    """Write a file in ``directory`` until the file system has no byte left; its path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
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


def stop_process(process: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM ``process`` (a peer server) and reap it; SIGKILL past ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
