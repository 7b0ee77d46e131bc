"""``mailrelay postfix-maps``: write the Postfix maps that route list addresses to mailrelay.

Reads the lists from the registry and renders them with :mod:`mailrelay.postfix`:
the transport(5) map (every posting address and its sub-addresses to the LMTP
nexthop) or, with ``--domains``, the relay_domains map.  A file is replaced
atomically so that Postfix and postmap never read half of it.

With ``[postfix] transport_file`` (or ``domains_file``) set, ``--sync``
rewrites those maps and runs ``postmap_command`` on them, as ``lists create``
and ``lists delete`` do after every change (:func:`sync_configured_maps`).
"""

from __future__ import annotations

from typing import Any

from mailrelay.cli.context import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError, Context
from mailrelay.cli.output import plural
from mailrelay.cli.parser import add_command
from mailrelay.mapfiles import MapFileError, sync_settings_maps, write_atomically
from mailrelay.postfix import (
    PostfixMapError,
    check_nexthop,
    domains_map,
    lmtp_nexthop,
    relay_domains,
    transport_map,
)

_SYNC_HINT = "then run `mailrelay postfix-maps --sync`"


def sync_configured_maps(ctx: Context, posting_addresses: list[str], change: str) -> int:
    """After ``change`` (a list created or deleted, already stored), rewrite the
    ``[postfix]`` maps for ``posting_addresses`` and run postmap on them.

    Returns the exit status: :data:`EXIT_OK`, or :data:`EXIT_FAILURE` with a
    message naming the failed command and its output when the maps could not
    be brought up to date (the change itself is kept).  Without maps
    configured it only reminds the operator to regenerate them by hand.
    """
    if not ctx.settings.postfix.enabled:
        ctx.err(
            "note: regenerate the Postfix maps (`mailrelay postfix-maps`), or set "
            "[postfix] transport_file to have them rewritten on every list change"
        )
        return EXIT_OK
    try:
        synced = sync_settings_maps(ctx.settings, posting_addresses)
    except (MapFileError, PostfixMapError) as e:
        ctx.err(f"{change}, but the Postfix maps are not up to date: {e}")
        ctx.err(f"fix that, {_SYNC_HINT} (until then Postfix routes the old lists)")
        return EXIT_FAILURE
    ctx.err(f"updated the Postfix maps: {', '.join(synced.files)}")
    return EXIT_OK


def _sync(ctx: Context) -> int:
    if not ctx.settings.postfix.enabled:
        raise CommandError(
            "--sync needs [postfix] transport_file or domains_file in the configuration",
            EXIT_USAGE,
        )
    with ctx.registry(create=False) as registry:
        addresses = [mailing_list.posting_address for mailing_list in registry.lists()]
    try:
        synced = sync_settings_maps(ctx.settings, addresses)
    except (MapFileError, PostfixMapError) as e:
        raise CommandError(f"the Postfix maps are not up to date: {e}") from None
    ctx.out(f"Updated {', '.join(synced.files)} for {plural(synced.lists, 'list')}.")
    return EXIT_OK


def _postfix_maps(ctx: Context) -> int:
    args = ctx.args
    if args.sync:
        if args.output or args.domains or args.nexthop:
            raise CommandError("--sync takes no other option", EXIT_USAGE)
        return _sync(ctx)
    nexthop = ""
    if args.nexthop is not None:
        nexthop = check_nexthop(args.nexthop)
    elif not args.domains:
        nexthop = lmtp_nexthop(ctx.settings.mta.lmtp_endpoint)
    with ctx.registry(create=False) as registry:
        addresses = [mailing_list.posting_address for mailing_list in registry.lists()]
    text = domains_map(addresses) if args.domains else transport_map(addresses, nexthop)
    if not addresses:
        ctx.err("warning: there are no lists yet: the map is empty")
    if args.output:
        try:
            write_atomically(args.output, text)
        except MapFileError as e:
            raise CommandError(str(e)) from None
        what = "relay domains" if args.domains else "transport map"
        ctx.err(
            f"wrote the {what} for {plural(len(addresses), 'list')} to {args.output}; "
            f"now run: postmap {args.output}"
        )
    else:
        ctx.stdout.write(text)
    if not args.domains:
        if nexthop.startswith("lmtp:unix:"):
            ctx.err(
                "note: a chrooted Postfix lmtp client (chroot = y in master.cf) resolves "
                "the socket path inside its queue directory"
            )
        domains = relay_domains(addresses)
        if domains:
            ctx.err(
                f"Postfix must relay for: {' '.join(domains)} "
                f"(relay_domains; `mailrelay postfix-maps --domains` writes that map)"
            )
    return EXIT_OK


def add_parser(commands: Any) -> None:
    """Register ``postfix-maps`` in the top-level collection ``commands``."""
    maps = add_command(
        commands,
        "postfix-maps",
        _postfix_maps,
        "print the Postfix transport map routing every list address to mailrelay",
        description="Print the Postfix transport(5) map that sends every list's posting "
        "address and its sub-addresses (bounces confirm join leave owner "
        "request subscribe unsubscribe) to mailrelay's LMTP server, or, with "
        "--domains, the map of the lists' domains for relay_domains.",
        epilog="example (then set transport_maps = hash:/etc/postfix/mailrelay_transport "
        "and\nrelay_domains = hash:/etc/postfix/mailrelay_domains in main.cf):\n"
        "  mailrelay postfix-maps -o /etc/postfix/mailrelay_transport\n"
        "  mailrelay postfix-maps --domains -o /etc/postfix/mailrelay_domains\n"
        "  postmap /etc/postfix/mailrelay_transport /etc/postfix/mailrelay_domains",
    )
    maps.add_argument(
        "--sync",
        action="store_true",
        help="rewrite the maps of [postfix] transport_file and domains_file and run "
        "postmap_command on them (what lists create and delete do)",
    )
    maps.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the map to FILE (atomically) instead of standard output",
    )
    maps.add_argument(
        "--domains", action="store_true", help="the relay_domains map instead of the transport map"
    )
    maps.add_argument(
        "--nexthop",
        metavar="TRANSPORT:NEXTHOP",
        help="where Postfix delivers, e.g. lmtp:[127.0.0.1]:8024 or "
        "lmtp:unix:/run/mailrelay/lmtp.sock (default: derived from the "
        "configured LMTP endpoint)",
    )
