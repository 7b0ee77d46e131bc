"""``mailrelay pending``: the confirmations waiting for their token; confirm or discard one.

Works on the registry file the daemon keeps its pending confirmations in
(:class:`~mailrelay.interfaces.IListProcessingStore`); a token confirmed or
discarded here is spent, and the daemon treats it as used.  Confirming here is
the operator's decision: it is carried out at once and sends no mail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mailrelay.cli.context import EXIT_OK, EXIT_USAGE, CommandError, Context, require_list
from mailrelay.cli.output import format_time, plural
from mailrelay.cli.parser import add_command
from mailrelay.model import Member, Pending, PendingAction

_DESCRIPTION = """\
mailrelay pending [LIST]          list pending confirmations (of one list)
mailrelay pending confirm TOKEN   carry one out now (join: subscribe; leave: unsubscribe)
mailrelay pending discard TOKEN   drop one; its token no longer confirms anything

Confirmations are created by join and leave requests sent by mail and expire
after pending_request_life ([lists], default 3 days)."""


def _join(registry: Any, pending: Pending) -> str:
    if registry.add_members(pending.list_address, [Member(pending.address)]):
        return f"{pending.address} was already a member of {pending.list_address}"
    return f"subscribed {pending.address} to {pending.list_address}"


def _leave(registry: Any, pending: Pending) -> str:
    if registry.remove_members(pending.list_address, [pending.address]):
        return f"{pending.address} was not a member of {pending.list_address}"
    return f"unsubscribed {pending.address} from {pending.list_address}"


# What `pending confirm` does for each action; a feature whose tokens an
# operator may confirm from the command line adds its own here.
CONFIRM_ACTIONS: dict[PendingAction, Callable[[Any, Pending], str]] = {
    PendingAction.JOIN: _join,
    PendingAction.LEAVE: _leave,
}


def add_parser(commands: Any) -> None:
    parser = add_command(
        commands,
        "pending",
        _pending,
        "list, confirm or discard pending confirmations",
        description=_DESCRIPTION,
    )
    parser.add_argument(
        "words",
        nargs="*",
        metavar="LIST | confirm TOKEN | discard TOKEN",
        help="a list's posting address, or confirm/discard and a token",
    )


def _pending(ctx: Context) -> int:
    words = ctx.args.words
    if words and words[0] in ("confirm", "discard"):
        if len(words) != 2:
            raise CommandError(f"usage: mailrelay pending {words[0]} TOKEN", EXIT_USAGE)
        return _decide(ctx, words[0], words[1])
    if len(words) > 1:
        raise CommandError(
            "usage: mailrelay pending [LIST] | confirm TOKEN | discard TOKEN", EXIT_USAGE
        )
    return _list(ctx, words[0] if words else None)


def _list(ctx: Context, list_address: str | None) -> int:
    now = time.time()
    with ctx.registry(create=False) as registry:
        if list_address is not None:
            list_address = require_list(registry, list_address).posting_address
        pending = registry.pending(list_address) if hasattr(registry, "pending") else ()
    if not pending:
        ctx.out("no pending confirmations")
        return EXIT_OK
    for p in pending:
        state = "expired" if p.expired(now) else "expires"
        ctx.out(
            f"{p.token}  {p.action.value:<8} {p.address}  {p.list_address}  "
            f"{state} {format_time(p.expires_at, now)}"
        )
    ctx.out(plural(len(pending), "pending confirmation"))
    return EXIT_OK


def _decide(ctx: Context, verb: str, token: str) -> int:
    now = time.time()
    with ctx.registry(create=False) as registry:
        pending = registry.get_pending(token) if hasattr(registry, "get_pending") else None
        if pending is None:
            raise CommandError(f"no pending confirmation with token {token}")
        if verb == "discard":
            registry.discard_pending(pending.token)
            ctx.out(f"discarded the {pending.action.value} request of {pending.address}")
            return EXIT_OK
        action = CONFIRM_ACTIONS.get(pending.action)
        if action is None:
            raise CommandError(
                f"a {pending.action.value} request cannot be confirmed from the command line"
            )
        if registry.consume_pending(pending.list_address, pending.token, now) is None:
            raise CommandError(f"the token {token} has expired (or was just used)")
        ctx.out(action(registry, pending))
    return EXIT_OK
