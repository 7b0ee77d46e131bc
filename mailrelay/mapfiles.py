"""Postfix maps on disk that follow the lists: rewritten atomically, then postmap.

Place in the flow: beside the registry.  ``mailrelay lists create`` and
``lists delete`` (:mod:`mailrelay.cli.lists`) and the daemon at start
(:func:`mailrelay.service.makeService`) call :func:`sync_maps` when
``[postfix] transport_file`` or ``domains_file`` is set, so that Postfix
routes a new list's addresses without a manual step, as Mailman does.  The
texts come from the pure builders in :mod:`mailrelay.postfix`.

Each map is written to a temporary file beside it, synced and renamed over
the old one, so that Postfix and postmap never read half a file; then the
configured postmap command runs on it.  A failing postmap raises
:class:`PostmapError` with its output.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from mailrelay.errors import MailrelayError
from mailrelay.postfix import domains_map, lmtp_nexthop, transport_map

__all__ = ["MapFileError", "PostmapError", "SyncedMaps", "sync_maps", "write_atomically"]

_log = Logger()

_POSTMAP_TIMEOUT = 60.0


class MapFileError(MailrelayError):
    """A Postfix map could not be written."""


class PostmapError(MapFileError):
    """postmap could not be run, or failed, on a map that was written."""


@dataclass(frozen=True)
class SyncedMaps:
    """What :func:`sync_maps` wrote: the map files, and the number of lists."""

    files: tuple[str, ...]
    lists: int


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (mode 0644) so that Postfix or postmap never
    read half a file; :class:`MapFileError` naming the path if it cannot."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
                # mkstemp makes it 0600; Postfix's postmap and daemons must read it.
                os.fchmod(f.fileno(), 0o644)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as e:
        raise MapFileError(f"cannot write {path}: {e.strerror or e}") from None


def run_postmap(command: Sequence[str], path: str) -> None:
    """Run ``command`` (postmap and its options) on ``path``; :class:`PostmapError`
    with postmap's own words when it cannot run or fails."""
    argv = [*command, path]
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=_POSTMAP_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise PostmapError(
            f"cannot run {command[0]!r} on {path}: no such program "
            f"(install Postfix, or set [postfix] postmap_command)"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PostmapError(f"cannot run {' '.join(argv)}: {e}") from None
    if done.returncode != 0:
        output = " ".join(done.stdout.decode("utf-8", "replace").split())
        raise PostmapError(
            f"{' '.join(argv)} failed (exit status {done.returncode}): {output or 'no output'}; "
            f"{path} is written but Postfix does not see the change"
        )


def sync_maps(
    posting_addresses: Sequence[str],
    *,
    transport_file: str = "",
    domains_file: str = "",
    lmtp_endpoint: str = "",
    postmap_command: Sequence[str] = ("postmap",),
) -> SyncedMaps:
    """Rewrite the maps that are set ("" = not kept) for these lists and run
    postmap on each.  The transport map routes every list address to the
    server on ``lmtp_endpoint``.  Raises :class:`MapFileError` or
    :class:`PostmapError` (the first map that fails stops the others), or
    :class:`~mailrelay.postfix.PostfixMapError` for an endpoint Postfix cannot reach.
    """
    addresses = list(posting_addresses)
    written = []
    if transport_file:
        text = transport_map(addresses, lmtp_nexthop(lmtp_endpoint))
        write_atomically(transport_file, text)
        run_postmap(postmap_command, transport_file)
        written.append(transport_file)
    if domains_file:
        write_atomically(domains_file, domains_map(addresses))
        run_postmap(postmap_command, domains_file)
        written.append(domains_file)
    if written:
        _log.info(
            "Postfix maps {files} rewritten for {count} lists",
            files=", ".join(written),
            count=len(addresses),
        )
    return SyncedMaps(tuple(written), len(addresses))


def sync_settings_maps(settings: object, posting_addresses: Sequence[str]) -> SyncedMaps:
    """:func:`sync_maps` with ``[postfix]`` and ``[mta] lmtp_endpoint`` of ``settings``."""
    postfix = settings.postfix  # type: ignore[attr-defined]
    return sync_maps(
        posting_addresses,
        transport_file=postfix.transport_file,
        domains_file=postfix.domains_file,
        lmtp_endpoint=settings.mta.lmtp_endpoint,  # type: ignore[attr-defined]
        postmap_command=postfix.postmap_command,
    )
