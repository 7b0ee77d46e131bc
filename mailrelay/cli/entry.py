"""The ``mailrelay`` entry point: build the parser from the command groups, run one command.

:func:`main` parses the command line with the sub-parsers that each group
module registers (:mod:`~mailrelay.cli.lists`, :mod:`~mailrelay.cli.members`,
:mod:`~mailrelay.cli.pending`, :mod:`~mailrelay.cli.held`,
:mod:`~mailrelay.cli.queue` (with :mod:`~mailrelay.cli.queue_show`),
:mod:`~mailrelay.cli.status`, :mod:`~mailrelay.cli.check_config`,
:mod:`~mailrelay.cli.postfix_maps`), hands the chosen handler a
:class:`~mailrelay.cli.context.Context`, and turns the expected errors into
one line on standard error and an exit status.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from mailrelay.cli import (
    check_config,
    held,
    lists,
    members,
    pending,
    postfix_maps,
    queue,
    status,
)
from mailrelay.cli.context import (
    CONFIG_ENVIRONMENT_VARIABLE,
    EXIT_CONFIG,
    EXIT_FAILURE,
    CommandError,
    Context,
)
from mailrelay.cli.parser import (
    ArgumentParser,
    ParserExit,
    VersionAction,
    add_config_option,
)
from mailrelay.errors import (
    ConfigurationError,
    InvalidAddress,
    RegistryError,
    RegistryUnavailable,
    SpoolError,
)
from mailrelay.postfix import PostfixMapError

_EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# The command groups in the order `mailrelay --help` lists them.
_GROUPS = (status, lists, members, pending, held, queue, check_config, postfix_maps)

_MAIN_DESCRIPTION = f"""\
Administer mailrelay: its status, mailing lists and their members, the delivery
queue, the configuration and the Postfix maps.  Changes take effect in a running daemon
at once, without a restart.

exit status: 0 success, 1 the command failed (unknown list, invalid address,
duplicate, storage problem), 2 bad command line, 3 configuration error.

The configuration file is -C FILE, else ${CONFIG_ENVIRONMENT_VARIABLE}, else none
(the built-in defaults: see `mailrelay check-config --defaults`)."""


def build_parser(stdout: IO[str], stderr: IO[str]) -> ArgumentParser:
    """The ``mailrelay`` parser, writing help and errors to these streams."""
    parser = ArgumentParser(
        prog="mailrelay", description=_MAIN_DESCRIPTION, streams=(stdout, stderr)
    )
    add_config_option(parser)
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for group in _GROUPS:
        group.add_parser(commands)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[Any] | None = None,
    environ: Any = None,
) -> int:
    """Run the ``mailrelay`` command line ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status; expected errors are reported on ``stderr`` in one
    line, never as a traceback.  The streams and ``environ`` default to the
    process's own.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    stdin = sys.stdin if stdin is None else stdin
    environ = os.environ if environ is None else environ
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(stdout, stderr)
    try:
        args = parser.parse_args(argv)
    except ParserExit as e:
        return e.code
    ctx = Context(args, stdout, stderr, stdin, environ)
    try:
        return args.handler(ctx)
    except CommandError as e:
        ctx.err(str(e))
        return e.code
    except ConfigurationError as e:
        ctx.err(f"configuration error: {e}")
        return EXIT_CONFIG
    except (RegistryError, RegistryUnavailable, SpoolError, InvalidAddress, PostfixMapError) as e:
        ctx.err(str(e))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        ctx.err("interrupted")
        return _EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`mailrelay members list x | head`): not worth a traceback.
        if stdout is sys.stdout:
            # Keep the interpreter's final flush from failing again at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
