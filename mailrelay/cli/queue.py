"""``mailrelay queue``: show the delivery queue; retry or delete its entries.

Works on the spool file the daemon delivers from, through
:class:`~mailrelay.cli.context.ThreadBridge`; a retried entry is picked up at
the daemon's next claim, a deleted one is never delivered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from mailrelay.cli.context import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError, Context
from mailrelay.cli.output import format_time, plural, report
from mailrelay.cli.parser import add_command, add_sub_commands, add_yes_option, positive_int
from mailrelay.model import EntryState, SpoolEntry

_DEFAULT_QUEUE_LIMIT = 100
_STATE_ORDER = [state for state in EntryState if state is not EntryState.DONE]
_RETRYABLE = (EntryState.RETRY, EntryState.FAILED)


def _kind(entry: SpoolEntry) -> str:
    """What an entry is: ``post`` or ``-bounces`` (etc.) as received over LMTP, or
    ``member``/``owner`` for one recipient's copy made by the delivery runner."""
    # getattr: spools written before entry kinds existed have none.
    kind = getattr(getattr(entry, "kind", None), "value", "inbound")
    if kind != "inbound":
        return kind
    subaddress = entry.destination.subaddress
    return "post" if subaddress is None else f"-{subaddress}"


def _find_entries(spool: Any, entry_ids: Iterable[int]) -> dict[int, SpoolEntry]:
    """The spool entries with these ids (ISpool has no lookup by id: scan by state,
    leaving DONE, the bulk of a busy spool, for last)."""
    wanted = set(entry_ids)
    found: dict[int, SpoolEntry] = {}
    for state in [*_STATE_ORDER, EntryState.DONE]:
        if not wanted - found.keys():
            break
        found.update(
            (entry.entry_id, entry) for entry in spool.entries(state) if entry.entry_id in wanted
        )
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
        refused = [post for post in posts(limit) if post.refusal] if callable(posts) else []
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
        for post in refused:
            lists = ", ".join(post.lists)
            ctx.out(
                f"REFUSED post {post.message_id or '-'} from {post.sender or '<>'} to {lists}: "
                f"{' '.join(post.refusal.split())}"
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
            _kind(entry),
            entry.destination.list_address,
            entry.destination.address,
            str(entry.attempts),
            format_time(entry.next_attempt_at, now),
            # A multi-line SMTP reply stays on its row.
            " ".join(entry.last_error.split()) or "-",
        )
        for entry in shown
    )
    # Pad every column but the last (the error, which may be long).
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    ctx.out()
    for *cells, last in rows:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        ctx.out("  ".join([*padded, last]))
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
            count = bridge.wait(spool.retry_now(None))
        else:
            eligible = [
                entry.entry_id for entry in _choose(spool, args.ids, problems, _not_retryable)
            ]
            count = bridge.wait(spool.retry_now(eligible)) if eligible else 0
    ctx.out(f"Queued {plural(count, 'entry', 'entries')} for delivery again.")
    report(ctx, problems, str)
    return EXIT_FAILURE if problems else EXIT_OK


def _delete(ctx: Context) -> int:
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
        "--limit",
        type=positive_int,
        default=_DEFAULT_QUEUE_LIMIT,
        metavar="N",
        help=f"show at most N entries (default {_DEFAULT_QUEUE_LIMIT})",
    )
    queue_commands = add_sub_commands(queue_parser, "queue_command", required=False)
    retry = add_command(
        queue_commands, "retry", _retry, "deliver retry and failed entries again now"
    )
    _add_ids_argument(retry, "*")
    retry.add_argument("--all", action="store_true", help="every retry and failed entry")
    delete = add_command(
        queue_commands,
        "delete",
        _delete,
        "delete entries from the queue (their mail is never delivered)",
    )
    _add_ids_argument(delete, "+")
    add_yes_option(delete)
