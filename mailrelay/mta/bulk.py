"""Bulk delivery: one message to many recipients in chunked transactions.

Recipients are grouped by top-level domain and sent in transactions of at
most ``max_recipients``, as Mailman's ``BulkDelivery`` does (Chuq Von
Rospach's scheme: large providers of one TLD share a chunk), one after the
other over the same :class:`~mailrelay.mta.connection.Connection`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailrelay.addresses import is_valid_mailbox
from mailrelay.mta.errors import DeliveryError
from mailrelay.mta.message import prepare_message

_log = Logger()

# Mailman's chunk buckets; every other top-level domain shares bucket 0.
CHUNKMAP = {"com": 1, "net": 2, "org": 2, "edu": 3, "us": 3, "ca": 3}

INVALID_ADDRESS = (553, b"5.1.3 Invalid recipient address syntax")


def chunkify(recipients, max_recipients: int) -> list[list[str]]:
    """Split recipients into chunks of at most ``max_recipients``.

    Recipients are bucketed by top-level domain; the largest bucket is sent
    first and each bucket starts a new chunk.  ``max_recipients <= 0`` means
    a single chunk.  Recipients are sorted inside a chunk.
    """
    recipients = sorted(set(recipients))
    if not recipients:
        return []
    if not max_recipients or max_recipients <= 0:
        return [recipients]
    buckets: dict[int, list[str]] = defaultdict(list)
    for r in recipients:
        tld = r.rpartition(".")[2].lower()
        buckets[CHUNKMAP.get(tld, 0)].append(r)
    chunks = []
    for _, bucket in sorted(buckets.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        for i in range(0, len(bucket), max_recipients):
            chunks.append(bucket[i : i + max_recipients])
    return chunks


class BulkDelivery:
    """Deliver one message to all of ``msgdata['recipients']`` in chunks."""

    def __init__(self, connection, max_recipients: int = 10):
        self._connection = connection
        self.max_recipients = max_recipients

    def deliver(self, mlist: Any, msg, msgdata: dict) -> defer.Deferred[dict]:
        """Fire with ``{recipient: (code, response)}`` for every failed recipient.

        The envelope sender is ``msgdata['sender']`` or the list's bounces
        address.  A transaction that fails as a whole (connection, TLS, AUTH,
        MAIL or DATA refused) yields its ``(code, response)`` for each recipient
        of that chunk; other chunks are still attempted.
        """
        return defer.Deferred.fromCoroutine(self._deliver(mlist, msg, msgdata))

    async def _deliver(self, mlist, msg, msgdata) -> dict:
        recipients = list(msgdata.get("recipients") or ())
        if not recipients:
            return {}
        sender = msgdata.get("sender") or mlist.bounces_address
        refused: dict[str, tuple[int, bytes]] = {}
        valid = []
        for r in recipients:
            if is_valid_mailbox(r):
                valid.append(r)
            else:
                refused[r] = INVALID_ADDRESS
        wire = prepare_message(msg)  # encoded once for every chunk
        for chunk in chunkify(valid, self.max_recipients):
            try:
                result = await self._connection.sendmail(sender, chunk, wire)
            except DeliveryError as e:
                _log.warn(
                    "{message_id} delivery of {count} recipients failed: {code} {response}",
                    message_id=wire.message_id,
                    count=len(chunk),
                    code=e.code,
                    response=e.response,
                )
                result = {r: (e.code, e.response) for r in chunk}
            refused.update(result)
        return refused
