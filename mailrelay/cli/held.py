"""``mailrelay held``: the posts held for moderation; approve, reject or discard one.

Works on the spool and registry files the daemon uses, through the same
:class:`~mailrelay.listproc.moderation.Moderation` the daemon decides owners'
replies with, so a decision here is the same decision: an approved post is
expanded into member copies (which the running daemon sends at its next
spool poll, within ``poll_interval``), a rejected post's poster gets the one
loop-safe reply, a discarded post is dropped.  The notice's token stops
working either way.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mailrelay.cli.context import EXIT_OK, EXIT_USAGE, CommandError, Context, require_list
from mailrelay.cli.output import format_time, plural
from mailrelay.cli.parser import add_command
from mailrelay.listproc.moderation import Moderation, NotHeld

_DESCRIPTION = """\
mailrelay held [LIST]                        list the held posts (of one list)
mailrelay held approve ID                    send held post ID to the list
mailrelay held reject [--reason TEXT] ID     refuse it; the poster is told (with TEXT)
mailrelay held discard ID                    drop it; nobody is told

Posts are held by the posting policy (`mailrelay lists set LIST posting=...
nonmember_action=...`, or a member's moderated flag); the owners get one
notice per post and can also decide by replying to it.  A held post is
discarded after held_post_life ([lists], default 14 days)."""

_VERBS = ("approve", "reject", "discard")


def add_parser(commands: Any) -> None:
    parser = add_command(
        commands,
        "held",
        _held,
        "list the posts held for moderation; approve, reject or discard one",
        description=_DESCRIPTION,
    )
    parser.add_argument(
        "--reason", default="", metavar="TEXT", help="for reject: the reason the poster is told"
    )
    # REMAINDER: "reject --reason TEXT ID" has the option between the words,
    # which a plain nargs="*" positional cannot take; _words reads it.
    parser.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="LIST | approve ID | reject [--reason TEXT] ID | discard ID",
        help="a list's posting address, or a decision and a held post's id",
    )


def _words(ctx: Context) -> list[str]:
    """The command's words, with a ``--reason TEXT`` among them taken out."""
    words: list[str] = []
    rest = list(ctx.args.words)
    while rest:
        word = rest.pop(0)
        if word == "--reason" or word.startswith("--reason="):
            if "=" in word:
                ctx.args.reason = word.partition("=")[2]
            elif rest:
                ctx.args.reason = rest.pop(0)
            else:
                raise CommandError("--reason needs a TEXT", EXIT_USAGE)
        elif word.startswith("-") and not word.lstrip("-").isdigit():
            raise CommandError(f"unknown option {word}", EXIT_USAGE)
        else:
            words.append(word)
    return words


def _held(ctx: Context) -> int:
    words = _words(ctx)
    if words and words[0] in _VERBS:
        if len(words) != 2:
            raise CommandError(f"usage: mailrelay held {words[0]} ID", EXIT_USAGE)
        try:
            entry_id = int(words[1])
        except ValueError:
            raise CommandError(
                f"a held post is named by its id (see `mailrelay held`), not {words[1]!r}",
                EXIT_USAGE,
            ) from None
        return _decide(ctx, words[0], entry_id)
    if ctx.args.reason:
        raise CommandError("--reason goes with `mailrelay held reject ID`", EXIT_USAGE)
    if len(words) > 1:
        raise CommandError(
            "usage: mailrelay held [LIST] | approve ID | reject [--reason TEXT] ID | discard ID",
            EXIT_USAGE,
        )
    return _list(ctx, words[0] if words else None)


def _moderation(ctx: Context, spool: Any, registry: Any, clock: Any) -> Moderation:
    from mailrelay.service import site_defaults

    return Moderation(
        spool,
        registry,
        clock=clock,
        site=site_defaults(ctx.settings),
        held_post_life=ctx.settings.lists.held_post_life,
    )


def _list(ctx: Context, list_address: str | None) -> int:
    now = time.time()
    with ctx.registry(create=False) as registry, ctx.spool() as (spool, bridge):
        if list_address is not None:
            list_address = require_list(registry, list_address).posting_address
        moderation = _moderation(ctx, spool, registry, bridge)
        held = moderation.held_posts(list_address)
    if not held:
        ctx.out("no held posts")
        return EXIT_OK
    life = moderation.held_post_life
    for post in held:
        ctx.out(
            f"{post.entry_id}  {post.list_address}  from {post.poster or '<>'}  "
            f"{post.size:,} bytes  held {format_time(post.entry.received_at, now)}, "
            f"expires {format_time(post.entry.received_at + life, now)}"
        )
        ctx.out(f"    Subject: {post.subject or '(none)'}")
        ctx.out(f"    Reason:  {post.reason}")
    ctx.out(plural(len(held), "held post"))
    return EXIT_OK


def _decide(ctx: Context, verb: str, entry_id: int) -> int:
    if ctx.args.reason and verb != "reject":
        raise CommandError("--reason goes with `mailrelay held reject ID`", EXIT_USAGE)
    with ctx.registry(create=False) as registry, ctx.spool() as (spool, bridge):
        moderation = _moderation(ctx, spool, registry, bridge)
        try:
            if verb == "approve":
                result = bridge.wait(moderation.approve(entry_id))
            elif verb == "reject":
                result = bridge.wait(moderation.reject(entry_id, ctx.args.reason))
            else:
                result = bridge.wait(moderation.discard(entry_id))
        except NotHeld as e:
            raise CommandError(str(e)) from None
    ctx.out(f"{entry_id}: {result}")
    return EXIT_OK
