"""``mailrelay queue``: show the delivery queue; retry or delete its entries.

Works on the spool file the daemon delivers from, through
:class:`~mailrelay.cli.context.ThreadBridge`; a retried entry is picked up at
the daemon's next claim, a deleted one is never delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from mailrelay.cli import queue_show
from mailrelay.cli.context import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError, Context
from mailrelay.cli.output import (
    Progress,
    batches,
    format_time,
    one_line,
    plural,
    report,
    table,
)
from mailrelay.cli.parser import add_command, add_sub_commands, add_yes_option, positive_int
from mailrelay.cli.queue_show import entry_kind, find_posts, last_reply
from mailrelay.model import EntryState, SpoolEntry

_DEFAULT_QUEUE_LIMIT = 100
_STATE_ORDER = [state for state in EntryState if state is not EntryState.DONE]
_RETRYABLE = (EntryState.RETRY, EntryState.FAILED)


def _find_entries(spool: Any, entry_ids: Iterable[int]) -> dict[int, SpoolEntry]:
    """The spool entries with these ids, each looked up by id."""
    found: dict[int, SpoolEntry] = {}
    for entry_id in dict.fromkeys(entry_ids):
        entry = spool.get_entry(entry_id)
        if entry is not None:
            found[entry_id] = entry
    return found


def _choose(
    spool: Any,
    entry_ids: list[int],
    problems: list[str],
    refuse: Callable[[SpoolEntry], str | None] = lambda entry: None,
) -> list[SpoolEntry]:
    """The entries with ``entry_ids``, each once, in the order given.  An id not in the
    queue, or an entry for which ``refuse`` gives a reason, adds that problem to
    ``problems`` instead (in the same order, so the report follows the command line)."""
    found = _find_entries(spool, entry_ids)
    chosen = []
    for entry_id in dict.fromkeys(entry_ids):
        entry = found.get(entry_id)
        problem = f"no entry {entry_id} in the queue" if entry is None else refuse(entry)
        if problem is not None:
            problems.append(problem)
        else:
            chosen.append(entry)
    return chosen


def _show(ctx: Context) -> int:
    args = ctx.args
    if args.by_post:
        return queue_show.show_posts(
            ctx, limit=args.limit, include_done=args.state in ("done", "all")
        )
    limit = args.limit
    with ctx.spool() as (spool, bridge):
        get_status = getattr(spool, "get_status", None)
        circuit = bridge.wait(get_status("circuit")) if callable(get_status) else None
        counts = spool.counts()
        if args.state == "all":
            states = list(EntryState)
        elif args.state is None:
            states = _STATE_ORDER
        else:
            states = [EntryState(args.state)]
        entries: list[SpoolEntry] = []
        for state in states:
            entries.extend(spool.entries(state, limit))
        posts = getattr(spool, "posts", None)
        # Every refused post is counted, whatever --limit says; only the lines are capped.
        refused = [post for post in posts() if post.refusal] if callable(posts) else []
    if circuit:
        ctx.out(f"DELIVERY PAUSED: {circuit}")
        ctx.out()
    ctx.out(
        "  ".join(f"{state.value}: {counts.get(state, 0):,}" for state in EntryState)
        + f"  (total {sum(counts.values()):,})"
    )
    if refused:
        # Posts the smarthost refused as a whole, and why (issue 14).
        ctx.out()
        for post in refused[:limit]:
            lists = ", ".join(post.lists)
            ctx.out(
                f"REFUSED post {post.message_id or '-'} from {post.sender or '<>'} to {lists}: "
                f"{one_line(post.refusal)}"
            )
        if len(refused) > limit:
            ctx.out(
                f"... and {len(refused) - limit:,} more refused posts "
                f"(`mailrelay queue posts --refused` lists them)"
            )
    entries.sort(key=lambda entry: entry.entry_id)
    shown = entries[:limit]
    matching = sum(counts.get(state, 0) for state in states)
    if not shown:
        return EXIT_OK
    now = time.time()
    rows = [("ID", "STATE", "KIND", "LIST", "RECIPIENT", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR")]
    rows.extend(
        (
            str(entry.entry_id),
            entry.state.value,
            entry_kind(entry),
            entry.destination.list_address,
            entry.destination.address,
            str(entry.attempts),
            format_time(entry.next_attempt_at, now),
            last_reply(entry),
        )
        for entry in shown
    )
    ctx.out()
    for line in table(rows):
        ctx.out(line)
    if matching > len(shown):
        what = "" if args.state is None else f" {args.state}"
        ctx.err(f"showing {len(shown):,} of {matching:,}{what} entries (see --limit, --state)")
    return EXIT_OK


def _not_retryable(entry: SpoolEntry) -> str | None:
    if entry.state in _RETRYABLE:
        return None
    return (
        f"entry {entry.entry_id} is {entry.state.value}: only retry and failed "
        f"entries can be retried"
    )


def _retry(ctx: Context) -> int:
    args = ctx.args
    if bool(args.ids) == args.all:
        raise CommandError("give the entry ids to retry, or --all (not both)", EXIT_USAGE)
    problems: list[str] = []
    with ctx.spool() as (spool, bridge):
        if args.all:
            count = _retry_all(ctx, spool, bridge)
        else:
            eligible = [
                entry.entry_id for entry in _choose(spool, args.ids, problems, _not_retryable)
            ]
            count = bridge.wait(spool.retry_now(eligible)) if eligible else 0
    ctx.out(f"Queued {plural(count, 'entry', 'entries')} for delivery again.")
    report(ctx, problems, str)
    return EXIT_FAILURE if problems else EXIT_OK


def _retry_all(ctx: Context, spool: Any, bridge: Any) -> int:
    """Requeue every RETRY and FAILED entry: in one transaction, or on a terminal
    with many entries in batches of ids, with a progress line."""
    counts = spool.counts()
    total = sum(counts.get(state, 0) for state in _RETRYABLE)
    progress = Progress(ctx.stderr, total, "Retrying")
    if not progress.enabled:
        return bridge.wait(spool.retry_now(None))
    ids = [entry.entry_id for state in _RETRYABLE for entry in spool.entries(state)]
    size = batches(len(ids), progress)
    count = 0
    progress.update(0)
    try:
        for start in range(0, len(ids), size):
            count += bridge.wait(spool.retry_now(ids[start : start + size]))
            progress.update(start + len(ids[start : start + size]))
    finally:
        progress.finish()
    return count


def _delete(ctx: Context) -> int:
    # The parser lets exactly one of the ids, --message and --post through.
    if ctx.args.ids:
        return _delete_entries(ctx)
    return _cancel_posts(ctx)


def _cancel_posts(ctx: Context) -> int:
    """``queue delete --message``/``--post``: every waiting entry of the posts, in
    one spool transaction (:meth:`~mailrelay.interfaces.ISpool.cancel_messages`)."""
    args = ctx.args
    with ctx.spool() as (spool, bridge):
        if args.message is not None:
            posts = find_posts(spool, args.message, include_done=True)
            if not posts:
                raise CommandError(
                    f"no post with Message-ID {args.message} in the queue; nothing deleted"
                )
        else:
            found = {key: _post_by_key(spool, key) for key in dict.fromkeys(args.post)}
            posts = [post for post in found.values() if post is not None]
            missing = [key for key, post in found.items() if post is None]
            if missing:
                raise CommandError(
                    f"no post {', '.join(map(str, missing))} in the queue "
                    f"(see `mailrelay queue posts`); nothing deleted"
                )
        waiting = [
            post
            for post in posts
            if any(count for state, count in post.counts.items() if state is not EntryState.DONE)
        ]
        if not waiting:
            ctx.out(f"Nothing to delete: every copy of {_posts_named(posts)} is delivered already.")
            return EXIT_OK
        inflight = sum(post.counts.get(EntryState.INFLIGHT, 0) for post in waiting)
        if inflight:
            ctx.err(
                f"warning: {plural(inflight, 'copy', 'copies')} being delivered right now "
                f"may still arrive"
            )
        undelivered = sum(
            count
            for post in waiting
            for state, count in post.counts.items()
            if state is not EntryState.DONE
        )
        ctx.confirm(
            f"delete {_posts_named(waiting)} and its "
            f"{plural(undelivered, 'undelivered entry', 'undelivered entries')}"
        )
        deleted = bridge.wait(spool.cancel_messages([post.message_key for post in waiting]))
    total = sum(deleted.values())
    by_state = ", ".join(f"{n:,} {state.value}" for state, n in deleted.items() if n)
    ctx.out(
        f"Deleted {_posts_named(waiting)}: {plural(total, 'entry', 'entries')}"
        + (f" ({by_state})" if by_state else "")
        + "; delivered copies are kept until purged."
    )
    return EXIT_OK


def _post_by_key(spool: Any, key: int) -> Any:
    """The post summary of stored message ``key``, or ``None`` if it is gone (looked
    up through its entries: the spool may hold many delivered posts)."""
    entries = spool.message_entries(key)
    if not entries:
        return None
    same_id = spool.posts(message_id=entries[0].message_id, include_done=True)
    return next((post for post in same_id if post.message_key == key), None)


def _posts_named(posts: list[Any]) -> str:
    if len(posts) == 1:
        post = posts[0]
        return f"post {post.message_key} {post.message_id or '(no Message-ID)'}"
    return f"{len(posts):,} posts ({', '.join(str(post.message_key) for post in posts[:5])}" + (
        ", ...)" if len(posts) > 5 else ")"
    )


def _delete_entries(ctx: Context) -> int:
    problems: list[str] = []
    with ctx.spool() as (spool, bridge):
        chosen = _choose(spool, ctx.args.ids, problems)
        report(ctx, problems, str)
        if not chosen:
            raise CommandError("nothing deleted")
        for entry in chosen:
            if entry.state is EntryState.INFLIGHT:
                ctx.err(
                    f"warning: entry {entry.entry_id} is being delivered right now; "
                    f"deleting it does not stop that delivery"
                )
        what = ", ".join(
            f"{entry.entry_id} ({entry.state.value}, {entry.destination.address})"
            for entry in chosen[:5]
        )
        if len(chosen) > 5:
            what += f" and {len(chosen) - 5} more"
        ctx.confirm(f"delete queue {'entry' if len(chosen) == 1 else 'entries'} {what}")
        count = bridge.wait(spool.delete([entry.entry_id for entry in chosen]))
    ctx.out(f"Deleted {plural(count, 'entry', 'entries')}.")
    return EXIT_FAILURE if problems else EXIT_OK


def _add_ids_argument(parser: Any, nargs: str) -> None:
    parser.add_argument(
        "ids",
        metavar="ID",
        nargs=nargs,
        type=positive_int,
        help="entry id, as `mailrelay queue` shows it",
    )


def add_parser(commands: Any) -> None:
    """Register ``queue`` (itself a command) and its commands in ``commands``."""
    states = [state.value for state in EntryState]
    queue_parser = add_command(
        commands,
        "queue",
        _show,
        "show the delivery queue; retry or delete entries",
        description="Show the delivery queue: the number of entries in each state, then "
        "the entries (every state but done, unless --state says otherwise) "
        "with their attempts, next attempt time and last error.  A paused "
        "delivery (the smarthost refused our credentials or TLS) is shown "
        "first.",
        epilog="states: queued (waiting), inflight (being delivered), retry (failed "
        "temporarily;\nwaiting for its next attempt), done, failed (gave up), held "
        "(commands and\nbounces kept for later processing)",
    )
    queue_parser.add_argument(
        "--state", choices=[*states, "all"], help="only entries in this state ('all' includes done)"
    )
    queue_parser.add_argument(
        "--by-post",
        action="store_true",
        help="one line per post with its copies by state (as `mailrelay queue posts`)",
    )
    queue_parser.add_argument(
        "--limit",
        type=positive_int,
        default=_DEFAULT_QUEUE_LIMIT,
        metavar="N",
        help=f"show at most N entries (default {_DEFAULT_QUEUE_LIMIT})",
    )
    queue_commands = add_sub_commands(queue_parser, "queue_command", required=False)
    retry = add_command(
        queue_commands,
        "retry",
        _retry,
        "make retry and failed entries due now (a running daemon sends them within 30 s)",
    )
    _add_ids_argument(retry, "*")
    retry.add_argument("--all", action="store_true", help="every retry and failed entry")
    delete = add_command(
        queue_commands,
        "delete",
        _delete,
        "delete entries, or whole posts, from the queue (their mail is never delivered)",
        description="Delete queue entries by id, or with --message or --post a whole post: "
        "the post and every copy of it still waiting (queued, retrying, failed, held), "
        "in one transaction.  Copies already delivered stay as history until purged; "
        "a copy being delivered right now may still arrive.",
        epilog="examples:\n  mailrelay queue delete 17 18\n"
        "  mailrelay queue delete --message '<abc@example.org>'\n"
        "  mailrelay queue delete --post 5",
    )
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "ids",
        metavar="ID",
        nargs="*",
        type=positive_int,
        default=[],
        help="entry id, as `mailrelay queue` shows it",
    )
    which.add_argument(
        "--message",
        metavar="MESSAGE-ID",
        help="the post(s) with this Message-ID (angle brackets optional)",
    )
    which.add_argument(
        "--post",
        metavar="ID",
        type=positive_int,
        action="append",
        help="the post with this id, as `mailrelay queue posts` shows it (repeat for several)",
    )
    add_yes_option(delete)
    queue_show.add_parsers(queue_commands, add_command, positive_int)
