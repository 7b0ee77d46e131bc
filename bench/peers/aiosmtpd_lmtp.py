"""aiosmtpd's LMTP server with a handler that writes and fsyncs each message.

The stack Mailman 3's LMTP runner uses: a message is acknowledged once it is
in a file of its own on disk (written, fsynced, renamed into place, as
Mailman's switchboard queues it).  Usage::

    python aiosmtpd_lmtp.py PORT SPOOL_DIR
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from aiosmtpd.lmtp import LMTP


class FsyncHandler:
    """Stores each message durably before answering 250."""

    def __init__(self, directory: str):
        self._directory = directory
        self._count = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self._count += 1
        final = os.path.join(self._directory, f"{self._count}.msg")
        temporary = final + ".tmp"
        with open(temporary, "wb") as f:
            f.write(envelope.original_content or envelope.content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, final)
        return "250 2.0.0 Ok"


async def main(port: int, directory: str) -> None:
    loop = asyncio.get_running_loop()
    handler = FsyncHandler(directory)
    server = await loop.create_server(
        lambda: LMTP(handler, hostname="aiosmtpd.bench", ident="bench"), "127.0.0.1", port
    )
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with server:
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
