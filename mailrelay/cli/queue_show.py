"""``mailrelay queue show`` and ``queue posts``: one message and its recipients, and
the stored posts as the operator thinks of them.

``queue show ID`` takes an entry id (as ``mailrelay queue`` shows it) and
prints the whole message that entry belongs to: who sent it, when, to which
lists, and each recipient's state, attempts, last reply and next attempt.
``queue posts`` lists each stored message once, with its copies counted by
state, where ``mailrelay queue`` lists one row per recipient.

A delivered entry keeps the reply of an earlier failed attempt in the spool
(the history); it is shown as earlier, never as if it were the current reason.
"""

from __future__ import annotations

import time
from typing import Any

from mailrelay.cli.context import EXIT_OK, CommandError, Context
from mailrelay.cli.output import format_time, one_line, plural, table
from mailrelay.model import EntryState, PostSummary, SpoolEntry

# The copy states in the order an operator reads them, in `queue posts` columns.
_COLUMNS = (
    EntryState.QUEUED,
    EntryState.INFLIGHT,
    EntryState.RETRY,
    EntryState.DONE,
    EntryState.FAILED,
    EntryState.HELD,
)


def entry_kind(entry: SpoolEntry) -> str:
    """What an entry is: ``post`` or ``-bounces`` (etc.) as received over LMTP, or
    ``member``/``owner``/``notice`` for one recipient's copy made by mailrelay."""
    # getattr: spools written before entry kinds existed have none.
    kind = getattr(getattr(entry, "kind", None), "value", "inbound")
    if kind != "inbound":
        return kind
    subaddress = entry.destination.subaddress
    return "post" if subaddress is None else f"-{subaddress}"


def last_reply(entry: SpoolEntry) -> str:
    """The entry's last error as the queue shows it: ``-`` for none, and for a
    DONE entry marked as an earlier attempt's, since it no longer applies."""
    text = one_line(entry.last_error)
    if not text:
        return "-"
    if entry.state is EntryState.DONE:
        return f"(earlier attempt: {text})"
    return text


def copies_text(counts: dict[EntryState, int]) -> str:
    """``2 done, 1 retry``: the non-zero counts in reading order; ``none`` if all are 0."""
    parts = [f"{counts.get(state, 0):,} {state.value}" for state in _COLUMNS if counts.get(state)]
    return ", ".join(parts) or "none"


def _show(ctx: Context) -> int:
    entry_id = ctx.args.entry_id
    with ctx.spool() as (spool, _bridge):
        entry = spool.get_entry(entry_id)
        if entry is None:
            raise CommandError(f"no entry {entry_id} in the queue (see `mailrelay queue`)")
        entries = spool.message_entries(entry.message_key)
        posts = spool.posts(message_id=entry.message_id, include_done=True)
    summary = next((p for p in posts if p.message_key == entry.message_key), None)
    now = time.time()
    ctx.out(f"message {entry.message_id or '(no Message-ID)'}  (post {entry.message_key})")
    ctx.out(f"  from:      {entry.sender or '<>'}")
    ctx.out(f"  received:  {format_time(entry.received_at, now)}")
    lists = sorted({e.destination.list_address for e in entries})
    ctx.out(f"  lists:     {', '.join(lists)}")
    if summary is not None:
        ctx.out(f"  copies:    {copies_text(summary.counts)}")
        if summary.refusal:
            ctx.out(f"  refused:   {one_line(summary.refusal)}")
    rows = [("ID", "STATE", "KIND", "RECIPIENT", "ATTEMPTS", "NEXT ATTEMPT", "LAST REPLY")]
    rows.extend(
        (
            f"{e.entry_id}{'*' if e.entry_id == entry_id else ''}",
            e.state.value,
            entry_kind(e),
            e.destination.address,
            str(e.attempts),
            format_time(e.next_attempt_at, now),
            last_reply(e),
        )
        for e in entries
    )
    ctx.out()
    for line in table(rows):
        ctx.out(line)
    return EXIT_OK


def _posts(ctx: Context) -> int:
    args = ctx.args
    return show_posts(
        ctx,
        limit=args.limit,
        include_done=args.all,
        message_id=args.message,
        refused_only=args.refused,
    )


def show_posts(
    ctx: Context,
    *,
    limit: int,
    include_done: bool = False,
    message_id: str | None = None,
    refused_only: bool = False,
) -> int:
    """Print the posts table (``queue posts``, ``queue --by-post``); says on standard
    error how many more there are beyond ``limit``."""
    with ctx.spool() as (spool, _bridge):
        posts = find_posts(spool, message_id, include_done=include_done)
    if refused_only:
        posts = [post for post in posts if post.refusal]
    shown = posts[:limit]
    print_posts(ctx, shown)
    if len(posts) > len(shown):
        ctx.err(f"showing {len(shown):,} of {plural(len(posts), 'post')} (see --limit)")
    return EXIT_OK


def find_posts(spool: Any, message_id: str | None, include_done: bool) -> list[PostSummary]:
    """The posts with Message-ID ``message_id`` (every post when ``None``); a
    Message-ID typed without its angle brackets finds the post all the same."""
    posts = spool.posts(message_id=message_id, include_done=include_done)
    if not posts and message_id and not message_id.startswith("<"):
        posts = spool.posts(message_id=f"<{message_id}>", include_done=include_done)
    return posts


def print_posts(ctx: Context, posts: list[PostSummary]) -> None:
    """The table of ``posts``: id, time received, lists, copies by state, Message-ID."""
    if not posts:
        return
    now = time.time()
    headings = ("POST", "RECEIVED", "LISTS", *(s.value.upper() for s in _COLUMNS), "MESSAGE-ID")
    rows: list[tuple[str, ...]] = [headings]
    for post in posts:
        message_id = post.message_id or "-"
        if post.refusal:
            message_id += f"  REFUSED: {one_line(post.refusal)}"
        rows.append(
            (
                str(post.message_key),
                format_time(post.received_at, now),
                ", ".join(post.lists),
                *(f"{post.counts.get(state, 0):,}" for state in _COLUMNS),
                message_id,
            )
        )
    for line in table(rows):
        ctx.out(line)


def add_parsers(queue_commands: Any, add_command: Any, positive_int: Any) -> None:
    """Register ``queue show`` and ``queue posts`` in ``queue_commands``."""
    show = add_command(
        queue_commands,
        "show",
        _show,
        "show one message: each recipient's state, attempts, last reply, next attempt",
        description="Show the message that queue entry ID belongs to: its sender, "
        "Message-ID, time received and lists, then every entry of it (the post as "
        "received, and one copy per member) with its state, attempts, next attempt "
        "and last reply.  The entry asked for is marked with *.  A delivered copy's "
        "reply from an earlier failed attempt is shown as such.",
    )
    show.add_argument(
        "entry_id", metavar="ID", type=positive_int, help="entry id, as `mailrelay queue` shows it"
    )
    posts = add_command(
        queue_commands,
        "posts",
        _posts,
        "list the posts in the queue, each with its copies by state",
        description="List the stored messages (posts, command mail, notices), oldest "
        "first, one line each: the post id (for `queue delete --post`), when it was "
        "received, its lists, its copies counted by state, and its Message-ID (with "
        "the reason when the smarthost refused it as a whole).  Posts whose copies are "
        "all done are left out unless --all.",
    )
    posts.add_argument("--all", action="store_true", help="include posts whose copies are all done")
    posts.add_argument("--message", metavar="MESSAGE-ID", help="only posts with this Message-ID")
    posts.add_argument(
        "--refused", action="store_true", help="only posts the smarthost refused as a whole"
    )
    posts.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="show at most N posts"
    )
