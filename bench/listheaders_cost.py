"""What adding the list headers (and a subject prefix) costs one post: the peak
memory allocated, as a multiple of the message's size (tracemalloc), and the
time per message.  Run it on two checkouts to compare:

    PYTHONPATH=CHECKOUT python bench/listheaders_cost.py LABEL

(``bench/results/listheaders.md`` has the figures.)  The headers are added
once per message, not per recipient.
"""

import functools
import inspect
import sys
import timeit
import tracemalloc

from mailrelay.listheaders import add_list_headers
from mailrelay.model import MailingList

LIST = MailingList("test@example.com", "Test", ("owner@example.com",))
HEAD = b"From: a@example.org\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
OLD_LIST_ID = b"List-Id: <x.example.net>\r\n"
LINE = b"x" * 76 + b"\r\n"


def cases() -> list[tuple[str, dict]]:
    found = [("no prefix", {})]
    if "subject_prefix" in inspect.signature(add_list_headers).parameters:
        found.append(("prefix", {"subject_prefix": "[test]"}))
    return found


def peak_ratio(message: bytes, options: dict) -> float:
    add_list_headers(message, LIST, **options)  # warm the header block cache
    tracemalloc.start()
    try:
        out = add_list_headers(message, LIST, **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del out
    return peak / len(message)


def main(label: str) -> None:
    body = LINE * (10_000_000 // len(LINE))
    for name, message in (("plain", HEAD), ("List-Id in", HEAD + OLD_LIST_ID)):
        for case, options in cases():
            ratio = peak_ratio(message + b"\r\n" + body, options)
            print(f"{label:7} 10 MB {name:10} {case:10} peak {ratio:.2f} x the message")
    small = HEAD + OLD_LIST_ID + b"\r\n" + LINE * 25
    for case, options in cases():
        run = functools.partial(add_list_headers, small, LIST, **options)
        seconds = min(timeit.repeat(run, number=2000, repeat=5)) / 2000
        print(f"{label:7} 2 KB  {case:10} {seconds * 1e6:7.1f} us per message")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
