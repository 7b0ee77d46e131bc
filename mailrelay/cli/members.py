"""``mailrelay members``: add, remove, list, show, change and re-enable the members of a list.

Reads members from the command line and from files (``members list`` prints
the format ``members add --file`` reads back), checks every line before
changing anything, and writes a large import in a few registry transactions
with a progress bar on a terminal.  ``members show`` prints one member's
record (delivery, moderation, bounce score, warnings); ``members set`` changes
its ``moderated`` flag and display name; ``members enable`` turns delivery back
on after bounce processing disabled it.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from typing import Any

from mailrelay.addresses import check_mailbox, resolve_recipient
from mailrelay.cli.context import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Context,
    require_list,
)
from mailrelay.cli.output import Progress, batches, format_time, plural, report
from mailrelay.cli.parser import add_command, add_group, add_list_argument
from mailrelay.config.values import parse_bool
from mailrelay.errors import InvalidAddress, MailrelayError
from mailrelay.model import Member, MemberRecord

_DISABLED_MARK = "(delivery disabled)"

_MEMBERS_FILE_HELP = """\
one member per line: 'address', 'address Display Name' or
'Display Name <address>'; blank lines and lines starting with # are
ignored; '-' reads standard input"""


def _parse_member(line: str) -> Member | None:
    """A member from ``addr``, ``addr Name`` or ``Name <addr>``; ``None`` for blanks and
    ``#`` comments.  A trailing ``(delivery disabled)``, as ``members list`` prints it,
    adds the member with delivery disabled.  Raises ``ValueError`` with a reason."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    enabled = not line.endswith(_DISABLED_MARK)
    if not enabled:
        line = line.removesuffix(_DISABLED_MARK).rstrip()
    if line.endswith(">"):
        name, address = email.utils.parseaddr(line)
        if not address:
            raise ValueError(f"cannot read {line!r} as 'Display Name <address>'")
    else:
        address, *rest = line.split(None, 1)
        name = rest[0] if rest else ""
    try:
        address = check_mailbox(address)
    except InvalidAddress as e:
        raise ValueError(str(e)) from None
    return Member(address.lower(), name.strip(), enabled)


def _open_input(ctx: Context, name: str) -> Iterator[bytes | str]:
    if name == "-":
        yield from getattr(ctx.stdin, "buffer", ctx.stdin)
        return
    try:
        with open(name, "rb") as f:
            yield from f
    except OSError as e:
        raise CommandError(f"cannot read {name}: {e.strerror or e}") from None


def _read_members(ctx: Context, name: str) -> Iterator[tuple[str, str]]:
    """(where, text) of each line of file ``name`` (``-``: standard input)."""
    label = "standard input" if name == "-" else name
    for number, line in enumerate(_open_input(ctx, name), start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise CommandError(f"{label}, line {number}: not UTF-8 text") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte order mark from Windows editors
        yield f"{label}, line {number}", line


def _require_addresses(ctx: Context, verb: str) -> None:
    """A usage error unless the command line names addresses or ``--file``."""
    if not ctx.args.addresses and ctx.args.file is None:
        raise CommandError(
            f"give the addresses to {verb}, or --file FILE (- for standard input)", EXIT_USAGE
        )


def _collect_members(ctx: Context, registry: Any) -> list[Member]:
    """The members named on the command line and in ``--file``; all checked first, so
    that a bad line adds nothing (fix the file and run the same command again)."""
    sources: list[tuple[str, str]] = [(f"argument {text!r}", text) for text in ctx.args.addresses]
    members: list[Member] = []
    problems: list[str] = []
    # Asking the registry about every address costs a query each; a member
    # outside the lists' domains cannot be a list address anyway.
    lists = registry.lists()
    postings = {mailing_list.posting_address for mailing_list in lists}
    domains = {mailing_list.domain for mailing_list in lists}

    def check(where: str, text: str) -> None:
        try:
            member = _parse_member(text)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            return
        if member is None:
            return
        destination = (
            resolve_recipient(member.address, postings.__contains__)
            if member.address.rpartition("@")[2] in domains
            else None
        )
        if destination is not None:
            problems.append(
                f"{where}: {member.address} is an address of the list "
                f"{destination.list_address}; subscribing it would loop mail"
            )
            return
        members.append(member)

    for where, text in sources:
        check(where, text)
    if ctx.args.file is not None:
        for where, text in _read_members(ctx, ctx.args.file):
            check(where, text)
    if problems:
        report(ctx, problems, str)
        raise CommandError(
            f"{plural(len(problems), 'invalid line')}; no member was added"
            if ctx.args.file is not None
            else "no member was added"
        )
    return members


def _add(ctx: Context) -> int:
    _require_addresses(ctx, "add")
    with ctx.registry(create=False) as registry:
        list_address = require_list(registry, ctx.args.list).posting_address
        members = _collect_members(ctx, registry)
        total = len(members)
        progress = Progress(ctx.stderr, total, f"Adding to {list_address}")
        batch_size = batches(total, progress)
        duplicates: list[str] = []
        done = 0
        progress.update(0)
        try:
            for start in range(0, total, batch_size):
                batch = members[start : start + batch_size]
                duplicates.extend(registry.add_members(list_address, batch))
                done += len(batch)
                progress.update(done)
        except MailrelayError as e:
            progress.finish()
            added = done - len(duplicates)
            raise CommandError(f"{e} (added {added:,} of {total:,} before the error)") from None
        progress.finish()
    added = total - len(duplicates)
    ctx.out(f"Added {plural(added, 'member')} to {list_address}.")
    if duplicates:
        report(
            ctx,
            duplicates,
            lambda address: f"already a member of {list_address} (left as it was): {address}",
        )
        return EXIT_FAILURE
    return EXIT_OK


def _remove(ctx: Context) -> int:
    args = ctx.args
    _require_addresses(ctx, "remove")
    addresses = list(args.addresses)
    if args.file is not None:
        for where, text in _read_members(ctx, args.file):
            try:
                member = _parse_member(text)
            except ValueError as e:
                raise CommandError(f"{where}: {e}; no member was removed") from None
            if member is not None:
                addresses.append(member.address)
    with ctx.registry(create=False) as registry:
        list_address = require_list(registry, args.list).posting_address
        progress = Progress(ctx.stderr, len(addresses), f"Removing from {list_address}")
        size = batches(len(addresses), progress)
        missing: list[str] = []
        done = 0
        progress.update(0)
        try:
            for start in range(0, len(addresses), size):
                batch = addresses[start : start + size]
                missing.extend(registry.remove_members(list_address, batch))
                done += len(batch)
                progress.update(done)
        except MailrelayError as e:
            removed = done - len(missing)
            raise CommandError(
                f"{e} (removed {removed:,} of {len(addresses):,} before the error)"
            ) from None
        finally:
            progress.finish()
    ctx.out(f"Removed {plural(len(addresses) - len(missing), 'member')} from {list_address}.")
    if missing:
        report(ctx, missing, lambda address: f"not a member of {list_address}: {address}")
        return EXIT_FAILURE
    return EXIT_OK


def _list(ctx: Context) -> int:
    with ctx.registry(create=False) as registry:
        list_address = require_list(registry, ctx.args.list).posting_address
        members = registry.members(list_address, enabled_only=ctx.args.enabled_only)
    width = max((len(member.address) for member in members), default=0)
    lines = []
    for member in members:
        cells = [member.address.ljust(width)]
        if member.display_name:
            cells.append(member.display_name)
        if not member.delivery_enabled:
            cells.append(_DISABLED_MARK)
        lines.append("  ".join(cells).rstrip())
    # One write: a 100,000-member list prints in a blink.
    if lines:
        ctx.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def _member_record(registry: Any, list_address: str, address: str) -> MemberRecord:
    try:
        address = check_mailbox(address)
    except InvalidAddress as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    record = registry.get_member(list_address, address)
    if record is None:
        raise CommandError(f"{address} is not a member of {list_address}")
    return record


def _show(ctx: Context) -> int:
    from mailrelay.listproc.bouncing import BounceRules

    with ctx.registry(create=False) as registry:
        list_address = require_list(registry, ctx.args.list).posting_address
        record = _member_record(registry, list_address, ctx.args.address)
        rules = BounceRules.from_site(ctx.settings.lists).for_list(
            registry.list_settings(list_address)
        )
        refusals = [b for b in registry.bounces(list_address) if b.address == record.address]
    now = time.time()
    if record.delivery_enabled:
        delivery = "enabled"
    else:
        delivery = f"disabled ({record.disabled_reason or 'unknown'})"
    rows = [
        ("address", record.address),
        ("display name", record.display_name or "-"),
        ("delivery", delivery),
        ("moderated", "yes" if record.moderated else "no"),
        ("bounce score", f"{record.bounce_score:g} (delivery disabled at {rules.threshold})"),
        ("last bounce", format_time(record.last_bounce_at, now)),
        ("warnings sent", f"{record.warnings_sent} of {rules.warnings}"),
        ("last warning", format_time(record.last_warning_at, now)),
        ("smarthost refusals", str(len(refusals))),
    ]
    if refusals:
        last = refusals[-1]
        rows.append(("last refusal", f"{last.code} {' '.join(last.response.split())}"[:200]))
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        ctx.out(f"{label + ':':<{width}} {value}")
    return EXIT_OK


def _enable(ctx: Context) -> int:
    from mailrelay.listproc.bouncing import reenable_member

    with ctx.registry(create=False) as registry:
        list_address = require_list(registry, ctx.args.list).posting_address
        record = _member_record(registry, list_address, ctx.args.address)
        was_enabled = record.delivery_enabled
        reenable_member(registry, list_address, record.address)
    if was_enabled:
        ctx.out(f"Delivery to {record.address} on {list_address} was enabled already.")
    else:
        ctx.out(
            f"Delivery to {record.address} on {list_address} is enabled again "
            f"(was disabled: {record.disabled_reason or 'unknown'}); bounce score cleared."
        )
    return EXIT_OK


def _parse_display_name(text: str) -> str:
    if any(c in text for c in "\r\n\0"):
        raise ValueError("cannot contain a line break or NUL")
    return text.strip()


# What `members set` changes: key -> (parser of its text, help).  The record's
# other fields are bounce processing's (`members enable` resets those).
_MEMBER_SETTINGS = {
    "moderated": (
        parse_bool,
        "yes to hold every post of this member for the owners (on every list type, "
        "as Mailman's member moderation), no to let the list's policy decide",
    ),
    "display_name": (_parse_display_name, "the member's name as people read it"),
}


def _parse_member_settings(words: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` words as checked values; a word without ``=``, an unknown key,
    a key given twice (usage errors) or a bad value is named, and nothing is stored."""
    known = ", ".join(_MEMBER_SETTINGS)
    changes: dict[str, Any] = {}
    for word in words:
        name, equals, text = word.partition("=")
        name = name.strip().lower()
        if not equals or not name:
            raise CommandError(f"not KEY=VALUE: {word!r} (keys: {known})", EXIT_USAGE)
        if name not in _MEMBER_SETTINGS:
            raise CommandError(f"unknown member setting {name!r} (known: {known})", EXIT_USAGE)
        if name in changes:
            raise CommandError(f"{name} is given twice", EXIT_USAGE)
        parse, _help = _MEMBER_SETTINGS[name]
        try:
            changes[name] = parse(text.strip())
        except ValueError as e:
            raise CommandError(f"{name} = {text!r}: {e}") from None
    return changes


def _set(ctx: Context) -> int:
    changes = _parse_member_settings(ctx.args.assignments)
    with ctx.registry(create=False) as registry:
        list_address = require_list(registry, ctx.args.list).posting_address
        record = _member_record(registry, list_address, ctx.args.address)
        record = registry.update_member(list_address, record.address, changes)
    for name in changes:
        value = getattr(record, name)
        text = ("yes" if value else "no") if isinstance(value, bool) else value
        ctx.out(f"{record.address} on {list_address}: {name} = {text}")
    return EXIT_OK


def _member_settings_help() -> str:
    lines = ["settings (KEY=VALUE):"]
    lines.extend(f"  {name}: {text}" for name, (_parse, text) in _MEMBER_SETTINGS.items())
    lines.append("")
    lines.append(
        "example:\n  mailrelay members set test@example.com anne@example.org moderated=yes"
    )
    return "\n".join(lines)


def add_parser(commands: Any) -> None:
    """Register ``members`` and its commands in the top-level collection ``commands``."""
    members_commands = add_group(
        commands, "members", "add, remove, list, show, change and re-enable the members of a list"
    )
    members_add = add_command(
        members_commands,
        "add",
        _add,
        "subscribe addresses to a list",
        description="Subscribe addresses to a list.  Addresses that are already members "
        "are reported and left as they were (exit status 1); an invalid "
        "address adds nothing.",
        epilog="examples:\n"
        "  mailrelay members add test@example.com anne@example.org "
        "'Bart Simpson <bart@example.org>'\n"
        "  mailrelay members add test@example.com --file members.txt\n"
        "  mailrelay members list old@example.com | "
        "mailrelay members add new@example.com --file -",
    )
    add_list_argument(members_add, "list", "LIST")
    members_add.add_argument(
        "addresses", metavar="ADDR", nargs="*", help="'address' or 'Display Name <address>'"
    )
    members_add.add_argument("-f", "--file", metavar="FILE", help=_MEMBERS_FILE_HELP)
    members_remove = add_command(
        members_commands, "remove", _remove, "unsubscribe addresses from a list"
    )
    add_list_argument(members_remove, "list", "LIST")
    members_remove.add_argument("addresses", metavar="ADDR", nargs="*", help="a member's address")
    members_remove.add_argument(
        "-f", "--file", metavar="FILE", help="addresses to remove, in the format of `members add`"
    )
    members_list = add_command(
        members_commands,
        "list",
        _list,
        "print a list's members, one per line: address, display name",
        description="Print a list's members sorted by address, one per line: the address, "
        f"then the display name, then {_DISABLED_MARK} for a member who "
        "gets no mail.  `members add --file` reads this format back.",
    )
    add_list_argument(members_list, "list", "LIST")
    members_list.add_argument(
        "--enabled-only", action="store_true", help="only members with delivery enabled"
    )
    members_show = add_command(
        members_commands,
        "show",
        _show,
        "show one member: delivery, bounce score, last bounce, warnings",
        description="Show one member's record: whether delivery is on (and why not), the "
        "bounce score and the threshold in force, the last bounce, the warnings sent, and "
        "the smarthost's recorded refusals.",
    )
    add_list_argument(members_show, "list", "LIST")
    members_show.add_argument("address", metavar="ADDR", help="the member's address")
    members_set = add_command(
        members_commands,
        "set",
        _set,
        "change a member's flags (moderated, display name); the daemon sees it at once",
        epilog=_member_settings_help(),
    )
    add_list_argument(members_set, "list", "LIST")
    members_set.add_argument("address", metavar="ADDR", help="the member's address")
    members_set.add_argument(
        "assignments", nargs="+", metavar="KEY=VALUE", help="settings to change"
    )
    members_enable = add_command(
        members_commands,
        "enable",
        _enable,
        "turn delivery to a member back on (clears the bounce score and warnings)",
    )
    add_list_argument(members_enable, "list", "LIST")
    members_enable.add_argument("address", metavar="ADDR", help="the member's address")
