"""``mailrelay lists``: create, list, show, change and delete mailing lists in the registry.

Works on the registry file the daemon reads, which sees a change at the next
RCPT (a setting changed with ``lists set``: at the next post or command).
Creating and deleting a list rewrite the Postfix maps of ``[postfix]
transport_file`` and ``domains_file`` and run postmap on them
(:func:`mailrelay.cli.postfix_maps.sync_configured_maps`), or, when those are
not set, remind the operator to regenerate the maps by hand.
"""

from __future__ import annotations

from typing import Any

from mailrelay.addresses import check_mailbox
from mailrelay.cli.context import EXIT_OK, EXIT_USAGE, CommandError, Context, require_list
from mailrelay.cli.output import plural
from mailrelay.cli.parser import add_command, add_group, add_list_argument, add_yes_option
from mailrelay.cli.postfix_maps import sync_configured_maps
from mailrelay.errors import InvalidAddress
from mailrelay.listsettings import LIST_SETTING_KEYS, parse_setting, settings_to_text
from mailrelay.postfix import list_addresses

# What `lists set` changes besides the settings: fields of the list itself.
_LIST_FIELDS = {
    "owners": "Who gets -owner mail and held-post notices: addresses, comma-separated "
    "(empty for none).",
    "display_name": "The list's name as people read it.",
}


def _create(ctx: Context) -> int:
    args = ctx.args
    with ctx.registry(create=True) as registry:
        # Warn when the new list and another one claim the same address:
        # RCPT resolution gives it to the list of that name.
        shadowed = registry.resolve(args.address)
        created = registry.create_list(args.address, args.display_name, args.owners)
        if shadowed is not None and shadowed.subaddress is not None:
            ctx.err(
                f"warning: {created.posting_address} was the {shadowed.subaddress} address "
                f"of {shadowed.list_address}; mail to it now goes to the new list"
            )
        for address in list_addresses(created.posting_address)[1:]:
            if registry.get_list(address) is not None:
                ctx.err(
                    f"warning: {address} is the list {address}, so it is not "
                    f"{created.posting_address}'s sub-address"
                )
        lists = [mailing_list.posting_address for mailing_list in registry.lists()]
    ctx.out(f"Created list {created.posting_address}.")
    return sync_configured_maps(ctx, lists, f"list {created.posting_address} was created")


def _list(ctx: Context) -> int:
    with ctx.registry(create=False) as registry:
        rows = [
            (
                mailing_list.posting_address,
                plural(len(registry.members(mailing_list.posting_address)), "member"),
                mailing_list.display_name,
            )
            for mailing_list in registry.lists()
        ]
    width = max((len(address) for address, _, _ in rows), default=0)
    count_width = max((len(count) for _, count, _ in rows), default=0)
    for address, count, name in rows:
        ctx.out(f"{address:<{width}}  {count:>{count_width}}  {name}".rstrip())
    return EXIT_OK


def _show(ctx: Context) -> int:
    with ctx.registry(create=False) as registry:
        mailing_list = require_list(registry, ctx.args.address)
        members = registry.members(mailing_list.posting_address)
        addresses = []
        for address in list_addresses(mailing_list.posting_address):
            if address != mailing_list.posting_address and registry.get_list(address):
                address += "  (taken by the list of that name)"
            addresses.append(address)
        settings = registry.list_settings(mailing_list.posting_address)
    changed = settings_to_text(settings)
    enabled = sum(member.delivery_enabled for member in members)
    ctx.out(mailing_list.posting_address)
    ctx.out(f"  display name:  {mailing_list.display_name or '(none)'}")
    ctx.out(f"  owners:        {', '.join(mailing_list.owners) or '(none)'}")
    ctx.out(f"  members:       {len(members):,} ({enabled:,} with delivery enabled)")
    ctx.out(f"  addresses:     {addresses[0]}  (posts)")
    for address in addresses[1:]:
        ctx.out(f"                 {address}")
    ctx.out("  settings:")
    for name, key in LIST_SETTING_KEYS.items():
        value = getattr(settings, name)
        text = "(the site's [lists] value)" if value is None else key.format(value) or "(none)"
        ctx.out(f"    {name} = {text}{'' if name in changed else '  (default)'}")
    return EXIT_OK


def _parse_assignments(words: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` words as a mapping; a word without ``=``, an unknown key
    or a key given twice is a usage error naming it."""
    known = [*LIST_SETTING_KEYS, *_LIST_FIELDS]
    assignments: dict[str, str] = {}
    for word in words:
        name, equals, value = word.partition("=")
        name = name.strip().lower()
        if not equals or not name:
            raise CommandError(f"not KEY=VALUE: {word!r} (keys: {', '.join(known)})", EXIT_USAGE)
        if name not in known:
            raise CommandError(
                f"unknown list setting {name!r} (known: {', '.join(known)})", EXIT_USAGE
            )
        if name in assignments:
            raise CommandError(f"{name} is given twice", EXIT_USAGE)
        assignments[name] = value
    return assignments


def _parse_owners(text: str) -> tuple[str, ...]:
    owners = []
    for part in text.split(","):
        if part.strip():
            try:
                owners.append(check_mailbox(part.strip()))
            except InvalidAddress as e:
                raise CommandError(f"owners = {text!r}: {e}") from None
    return tuple(owners)


def _set(ctx: Context) -> int:
    assignments = _parse_assignments(ctx.args.assignments)
    # Every value is checked before anything is stored: all or nothing.
    settings = {k: v for k, v in assignments.items() if k in LIST_SETTING_KEYS}
    for name, text in settings.items():
        try:
            parse_setting(name, text)
        except ValueError as e:
            raise CommandError(str(e)) from None
    owners = _parse_owners(assignments["owners"]) if "owners" in assignments else None
    display_name = assignments.get("display_name")
    if display_name is not None and any(c in display_name for c in "\r\n\0"):
        raise CommandError("display_name cannot contain a line break or NUL")
    with ctx.registry(create=False) as registry:
        address = require_list(registry, ctx.args.address).posting_address
        if settings:
            registry.update_list_settings(address, settings)
        if owners is not None or display_name is not None:
            registry.update_list(address, display_name=display_name, owners=owners)
    for name, text in assignments.items():
        ctx.out(f"{address}: {name} = {text}")
    return EXIT_OK


def _settings_help() -> str:
    lines = ["settings (KEY=VALUE):"]
    for name, key in LIST_SETTING_KEYS.items():
        lines.append(f"  {name}: {key.help}")
    for name, text in _LIST_FIELDS.items():
        lines.append(f"  {name}: {text}")
    lines.append("")
    lines.append(
        "example:\n  mailrelay lists set test@example.com posting=open owners=a@example.org"
    )
    return "\n".join(lines)


def _delete(ctx: Context) -> int:
    with ctx.registry(create=False) as registry:
        mailing_list = require_list(registry, ctx.args.address)
        address = mailing_list.posting_address
        count = len(registry.members(address))
        ctx.confirm(f"delete list {address} and its {plural(count, 'member')}")
        registry.delete_list(address)
        lists = [mailing_list.posting_address for mailing_list in registry.lists()]
    ctx.out(f"Deleted list {address} and its {plural(count, 'member')}.")
    return sync_configured_maps(ctx, lists, f"list {address} was deleted")


def add_parser(commands: Any) -> None:
    """Register ``lists`` and its commands in the top-level collection ``commands``."""
    lists_commands = add_group(commands, "lists", "create, show, change and delete mailing lists")
    create = add_command(
        lists_commands,
        "create",
        _create,
        "create a mailing list",
        epilog="example:\n  mailrelay lists create test@example.com "
        "--display-name 'Test list' --owner anne@example.org",
    )
    add_list_argument(create, "address", "ADDRESS")
    create.add_argument(
        "--display-name", metavar="NAME", default="", help="the list's name as people read it"
    )
    create.add_argument(
        "--owner",
        dest="owners",
        metavar="ADDR",
        action="append",
        default=[],
        help="an owner, who gets mail sent to LIST-owner (repeat for several)",
    )
    add_command(
        lists_commands,
        "list",
        _list,
        "list every mailing list with its member count and display name",
    )
    show = add_command(
        lists_commands,
        "show",
        _show,
        "show a list: display name, owners, member count and all its addresses",
    )
    add_list_argument(show, "address", "ADDRESS")
    set_ = add_command(
        lists_commands,
        "set",
        _set,
        "change a list's settings (posting policy, owners, ...); the daemon sees it at once",
        epilog=_settings_help(),
    )
    add_list_argument(set_, "address", "ADDRESS")
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE", help="settings to change")
    delete = add_command(lists_commands, "delete", _delete, "delete a list and all its members")
    add_list_argument(delete, "address", "ADDRESS")
    add_yes_option(delete)
