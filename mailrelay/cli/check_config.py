"""``mailrelay check-config``: load the configuration and print the effective settings.

The settings come from :func:`mailrelay.config.load_settings` through the
command's :class:`~mailrelay.cli.context.Context`, as the daemon would load
them; ``--defaults`` prints the schema's documentation of every key instead.
Secrets are never printed.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from mailrelay.cli.context import EXIT_OK, Context
from mailrelay.cli.output import exact_duration
from mailrelay.cli.parser import add_command
from mailrelay.config import describe_defaults

# Keys of Settings never printed; the values are replaced by a note.
_SECRET_KEYS = frozenset({"smtp_pass"})
# Keys the effective lmtp_endpoint replaces: printed as comments, since a file
# that sets them together with lmtp_endpoint is refused.
_REPLACED_BY_ENDPOINT = frozenset({"lmtp_host", "lmtp_port"})


def _format_setting(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # Every float setting is a duration in seconds.
        return exact_duration(value)
    if isinstance(value, tuple):
        # A command line (postmap_command), as the file would spell it.
        return shlex.join(value)
    return str(value)


def _check_config(ctx: Context) -> int:
    if ctx.args.defaults:
        ctx.stdout.write(describe_defaults())
        return EXIT_OK
    settings = ctx.settings
    if settings.source:
        ctx.out(f"# Effective settings of {settings.source}")
    else:
        ctx.out("# Effective settings: the built-in defaults (no configuration file)")
    ctx.out(f"# list registry: {settings.paths.registry_path}")
    ctx.out(f"# spool:         {settings.paths.spool_path}")
    for section_field in dataclasses.fields(settings):
        section = getattr(settings, section_field.name)
        if not dataclasses.is_dataclass(section):
            continue
        ctx.out()
        ctx.out(f"[{section_field.name}]")
        # Field by field, never dataclasses.asdict: secrets must stay out.
        for key in dataclasses.fields(section):
            value = getattr(section, key.name)
            if key.name in _SECRET_KEYS:
                ctx.out(f"# {key.name} is set (not shown)" if value else f"{key.name} =")
            elif key.name in _REPLACED_BY_ENDPOINT:
                ctx.out(f"# {key.name} = {_format_setting(value)} (lmtp_endpoint says where)")
            else:
                ctx.out(f"{key.name} = {_format_setting(value)}".rstrip())
    ctx.err(f"configuration OK ({settings.source or 'built-in defaults'})")
    return EXIT_OK


def add_parser(commands: Any) -> None:
    """Register ``check-config`` in the top-level collection ``commands``."""
    check = add_command(
        commands,
        "check-config",
        _check_config,
        "check the configuration and print the effective settings",
        description="Load the configuration and print the effective settings (the "
        "password is never shown).  Exit status 3 and the reason when "
        "something is wrong.",
    )
    check.add_argument(
        "--defaults",
        action="store_true",
        help="print every setting with its default and documentation",
    )
