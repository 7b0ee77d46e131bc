"""The relay's log events: their stable names and fields, and the JSON observer.

Every line that follows a message through the relay carries an ``event``
field with one of the names below, and the same field names wherever they
apply (README, "Logging"):

``accepted``
    A message accepted over LMTP and stored (one line per LMTP transaction):
    ``message_id``, ``sender``, ``lists`` (the recipients' list addresses),
    ``count`` (recipients accepted), ``code`` (250).
``queued``
    A post's (or ``-owner`` mail's) copies queued for one list: ``message_id``,
    ``list``, ``sender``, ``count`` (copies), ``kind`` (``member``, ``owner``).
``delivered``
    One SMTP transaction the smarthost completed: ``message_id``, ``list``,
    ``count`` (recipients it accepted), ``recipients`` (the first
    :data:`LISTED_RECIPIENTS` of them), ``attempted`` (recipients in the
    transaction), ``refused`` (how many it refused), ``code`` (250),
    ``duration`` (seconds), ``sender`` (the envelope sender).
``deferred``
    Copies of one message with the same temporary failure: ``message_id``,
    ``list``, ``count``, ``recipients``, ``code``, ``response``, ``attempt``,
    ``delay`` (until the next attempt).
``failed``
    Copies of one message that will not be delivered: ``message_id``, ``list``,
    ``count``, ``recipients``, ``code``, ``response``, ``attempt`` and
    ``outcome``: ``refused`` (a permanent refusal) or ``dead-lettered`` (out of
    retries, or the list is gone).
``bounced``
    A member's bounce scored (a refusal by the smarthost, or a bounce message
    to ``-bounces``): ``list``, ``recipient``, ``result`` (what scoring did:
    ``scored``, ``disabled``, ...), ``score``, and ``code`` and ``response``
    when the smarthost refused the member.

Never a message body or a credential.  :func:`json_observer` is the
observer ``[log] format = json`` (and ``twistd --logger
mailrelay.logs.json_observer``) writes with.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Any

from twisted.logger import FileLogObserver, eventAsJSON, formatEvent

__all__ = [
    "ACCEPTED",
    "BOUNCED",
    "DEFERRED",
    "DELIVERED",
    "EVENTS",
    "FAILED",
    "JSONLogObserver",
    "LISTED_RECIPIENTS",
    "QUEUED",
    "json_observer",
    "listed",
]

ACCEPTED = "accepted"
QUEUED = "queued"
DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"
BOUNCED = "bounced"
EVENTS = (ACCEPTED, QUEUED, DELIVERED, DEFERRED, FAILED, BOUNCED)

# Recipients a line lists by address, besides their count: enough to follow a
# small list's copies, bounded so that a 50,000-member post stays one short line.
LISTED_RECIPIENTS = 10


def listed(addresses: Sequence[str]) -> list[str]:
    """The first :data:`LISTED_RECIPIENTS` of ``addresses`` (the ``recipients`` field)."""
    return list(addresses[:LISTED_RECIPIENTS])


class JSONLogObserver(FileLogObserver):
    """A :class:`FileLogObserver` of JSON lines that can close its file."""

    def __init__(self, out: IO[Any]):
        super().__init__(out, _json_line)
        self._out = out

    def close(self) -> None:
        """Close the file written to (the daemon's log file at shutdown, a test's file)."""
        self._out.close()


def json_observer(out: IO[Any] | None = None) -> JSONLogObserver:
    """An observer writing each event to ``out`` (default: standard output) as
    one line of JSON, as twisted.logger's ``eventAsJSON`` encodes it (``log_time``,
    ``log_level``, ``log_namespace``, ``log_format`` and the event's own fields),
    plus ``log_text``: the line the text log would have shown.

    Lines are plain JSON Lines (no RS separator), for log shippers and ``jq``;
    ``twisted.logger.eventsFromJSONLogFile`` reads them back.  Usable as
    ``twistd --logger mailrelay.logs.json_observer`` (which calls it with no
    argument); ``[log] format = json`` writes to twistd's log file instead.
    """
    return JSONLogObserver(sys.stdout if out is None else out)


def _json_line(event: dict) -> str:
    # The text line too: an operator reading the file should not need the
    # format strings to know what happened.
    return eventAsJSON(dict(event, log_text=formatEvent(event))) + "\n"
