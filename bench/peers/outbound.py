"""Outbound peers: send N messages to a smarthost and print the elapsed time.

``smtplib`` sends them one after the other over one connection (what Mailman
3's ``Connection`` does); ``aiosmtplib`` over ``--connections`` concurrent
connections.  Prints one JSON object: ``{"seconds": ..., "messages": ...,
"recipients": ...}``, timed from before the first connection to the last reply.
Usage::

    python outbound.py smtplib|aiosmtplib PORT COUNT RECIPIENTS [--connections 10]
"""

from __future__ import annotations

import argparse
import json
import time


def make_message(index: int, size: int = 1024) -> bytes:
    """A plain message of ``size`` body bytes (as the other scenarios send)."""
    line = b"La la la la la la la la la la la la la la la la la la la la la la la la la la\r\n"
    body = (line * (size // len(line) + 1))[:size]
    head = (
        f"From: poster@outside.example\r\nTo: list@bench.example\r\n"
        f"Subject: bench {index}\r\nMessage-ID: <bench{index}@outside.example>\r\n\r\n"
    ).encode("ascii")
    return head + body + b"\r\n"


def recipients_for(index: int, count: int) -> list[str]:
    return [f"m{index}-{i}@members.example" for i in range(count)]


def run_smtplib(port: int, count: int, rcpts: int) -> float:
    import smtplib

    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for i in range(count):
            smtp.sendmail("list-bounces@bench.example", recipients_for(i, rcpts), make_message(i))
    return time.perf_counter() - start


def run_aiosmtplib(port: int, count: int, rcpts: int, connections: int) -> float:
    import asyncio

    import aiosmtplib

    async def worker(queue: asyncio.Queue) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False)
        await smtp.connect()
        try:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await smtp.sendmail(
                    "list-bounces@bench.example", recipients_for(i, rcpts), make_message(i)
                )
        finally:
            await smtp.quit()

    async def main() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)
        start = time.perf_counter()
        await asyncio.gather(*(worker(queue) for _ in range(connections)))
        return time.perf_counter() - start

    return asyncio.run(main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("client", choices=["smtplib", "aiosmtplib"])
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("recipients", type=int)
    parser.add_argument("--connections", type=int, default=10)
    args = parser.parse_args()
    if args.client == "smtplib":
        seconds = run_smtplib(args.port, args.count, args.recipients)
    else:
        seconds = run_aiosmtplib(args.port, args.count, args.recipients, args.connections)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "messages": args.count,
                "recipients": args.count * args.recipients,
            }
        )
    )
