"""The ``mailrelay`` admin command: lists, members, the queue, configuration, Postfix maps.

``main(argv)`` runs one command in the calling process and returns its exit
status (:data:`EXIT_OK`, :data:`EXIT_FAILURE`, :data:`EXIT_USAGE`,
:data:`EXIT_CONFIG`).  It works on the same SQLite files as the daemon, which
sees registry changes at the next RCPT without a restart.

The command line is the top floor: it opens the registry and the spool
itself and nothing imports it.  Layout: :mod:`~mailrelay.cli.entry` builds the
parser and dispatches; :mod:`~mailrelay.cli.context` holds what every command
needs (settings, storage, streams, exit codes); :mod:`~mailrelay.cli.parser`
and :mod:`~mailrelay.cli.output` the shared parser pieces and wording; one
module per command group (``status``, ``lists``, ``members``, ``pending``,
``held``, ``queue``, ``check_config``, ``postfix_maps``) registers its sub-parser
and handlers.
"""

from mailrelay.cli.context import (
    CONFIG_ENVIRONMENT_VARIABLE,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
)
from mailrelay.cli.entry import main

__all__ = [
    "CONFIG_ENVIRONMENT_VARIABLE",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "main",
]
