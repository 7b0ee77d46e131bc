"""The argument-parser pieces every command group builds its sub-parser from.

:func:`mailrelay.cli.entry.build_parser` makes the top-level parser and hands
its sub-parser collection to each group's ``add_parser``, which registers its
commands with :func:`add_command`.  The parser writes to the streams given to
``main`` and raises :class:`ParserExit` instead of calling ``sys.exit``.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from mailrelay import __version__
from mailrelay.cli.context import CONFIG_ENVIRONMENT_VARIABLE, EXIT_USAGE, Context

Handler = Callable[[Context], int]
"""A command: runs with the context and returns the exit status."""


class ParserExit(Exception):
    """Raised by the argument parser instead of calling ``sys.exit``."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that writes to given streams and raises instead of exiting."""

    def __init__(self, *args: Any, streams: tuple[IO[str], IO[str]], **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.streams = streams

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", functools.partial(type(self), streams=self.streams))
        return super().add_subparsers(**kwargs)

    def print_usage(self, file: IO[str] | None = None) -> None:
        super().print_usage(self.streams[0] if file is None else file)

    def print_help(self, file: IO[str] | None = None) -> None:
        super().print_help(self.streams[0] if file is None else file)

    def error(self, message: str) -> NoReturn:
        self.print_usage(self.streams[1])
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self.streams[1].write(message)
        raise ParserExit(status)


class VersionAction(argparse.Action):
    """``--version``: prints ``mailrelay VERSION`` and exits with status 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        parser.streams[0].write(f"mailrelay {__version__}\n")
        parser.exit()


def positive_int(text: str) -> int:
    """An argument type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``-C FILE``, accepted before the command and after it alike."""
    parser.add_argument(
        "-C",
        "--config",
        metavar="FILE",
        # SUPPRESS: a -C before the command is not reset by the command's own default.
        default=argparse.SUPPRESS,
        help=f"configuration file (default: ${CONFIG_ENVIRONMENT_VARIABLE}, else the "
        f"built-in defaults)",
    )


def add_command(
    group: Any,
    name: str,
    handler: Handler | None,
    summary: str,
    description: str | None = None,
    epilog: str | None = None,
) -> ArgumentParser:
    """Register command ``name`` in the sub-parser collection ``group``; ``handler``
    ``None`` for a group whose sub-commands have the handlers."""
    sub = group.add_parser(name, help=summary, description=description or summary, epilog=epilog)
    add_config_option(sub)
    if handler is not None:
        sub.set_defaults(handler=handler)
    return sub


def add_sub_commands(parser: ArgumentParser, dest: str, *, required: bool = True) -> Any:
    """The sub-parser collection of command ``parser``; the chosen name goes to ``dest``."""
    return parser.add_subparsers(title="commands", dest=dest, metavar="COMMAND", required=required)


def add_group(commands: Any, name: str, summary: str) -> Any:
    """Register command group ``name``, which needs one of its sub-commands, in
    ``commands``; returns the collection to register those in."""
    group = add_command(commands, name, None, summary)
    return add_sub_commands(group, f"{name}_command")


def add_yes_option(parser: ArgumentParser) -> None:
    """``-y``/``--yes`` for a command that asks :meth:`Context.confirm` first."""
    parser.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation (required without a terminal)",
    )


def add_list_argument(parser: ArgumentParser, dest: str, metavar: str) -> None:
    """The positional posting address of the list a command works on."""
    parser.add_argument(dest, metavar=metavar, help="the list's posting address")
