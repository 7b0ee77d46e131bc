"""The delivery runner: from the spool to the list's members through the smarthost.

LMTP → :mod:`~mailrelay.runner.routing` (stores new posts, routed) → spool →
:mod:`~mailrelay.runner.scheduler` (claims, batches, purge, the poll timer) →
:mod:`~mailrelay.runner.sending` (one SMTP transaction per chunk) → mta, with
:mod:`~mailrelay.runner.outcomes` (what each reply means for its entry) and
:mod:`~mailrelay.runner.breaker` (pausing all delivery on a site problem);
:mod:`~mailrelay.runner.service` composes them into :class:`DeliveryRunner`.
Every module reaches storage only through ``ISpool``.
"""

from mailrelay.runner.breaker import CIRCUIT_STATUS_KEY
from mailrelay.runner.service import DeliveryRunner

__all__ = ["CIRCUIT_STATUS_KEY", "DeliveryRunner"]
