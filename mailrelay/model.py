"""Immutable values shared by the inbound, storage and outbound layers."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Sub-addresses a list answers to, after Mailman 3 (``-subscribe`` and
# ``-unsubscribe`` are aliases of ``-join`` and ``-leave``).
SUBADDRESSES: frozenset[str] = frozenset(
    {"bounces", "confirm", "join", "leave", "owner", "request", "subscribe", "unsubscribe"}
)
CANONICAL_SUBADDRESS: dict[str, str] = {"subscribe": "join", "unsubscribe": "leave"}


@dataclass(frozen=True)
class MailingList:
    """A list known to the registry; ``posting_address`` is lower-case."""

    posting_address: str
    display_name: str = ""
    owners: tuple[str, ...] = ()

    @property
    def local_part(self) -> str:
        return self.posting_address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.posting_address.rpartition("@")[2]

    def subaddress(self, name: str) -> str:
        """The address of sub-address ``name``, e.g. ``test-bounces@example.com``."""
        return f"{self.local_part}-{name}@{self.domain}"

    @property
    def bounces_address(self) -> str:
        return self.subaddress("bounces")

    @property
    def list_id(self) -> str:
        """RFC 2919 list identifier: ``test.example.com``."""
        return f"{self.local_part}.{self.domain}"


@dataclass(frozen=True)
class Member:
    """A subscriber of one list."""

    address: str
    display_name: str = ""
    delivery_enabled: bool = True


@dataclass(frozen=True)
class Destination:
    """What an accepted recipient address resolved to.

    ``subaddress`` is ``None`` for the posting address, otherwise the canonical
    sub-address name (``join`` for ``-subscribe``, ``leave`` for ``-unsubscribe``).
    ``address`` is the recipient as given in RCPT, lower-cased, ``+`` suffix kept.
    """

    list_address: str
    subaddress: str | None
    address: str


@dataclass(frozen=True)
class Envelope:
    """One accepted LMTP transaction, as handed to the spool."""

    sender: str  # "" for the null sender <>
    destinations: tuple[Destination, ...]  # one per accepted RCPT, in RCPT order
    received_at: float  # POSIX time
    peer: str = ""
    message_id: str = ""


class EntryKind(str, enum.Enum):
    """What a spool entry stands for, which decides how the runner handles it.

    The LMTP server stores INBOUND entries, routed by their sub-address.  The
    runner replaces a post (or ``-owner`` mail) by one MEMBER (or OWNER) entry
    per recipient, so each recipient's delivery is retried and recorded on
    its own; those are delivered as they are and never expanded again.
    """

    INBOUND = "inbound"  # as accepted over LMTP
    MEMBER = "member"  # one member's copy of a post; the address is the member
    OWNER = "owner"  # one owner's copy of mail to the list's -owner address


class EntryState(str, enum.Enum):
    """Life cycle of one spooled recipient entry."""

    QUEUED = "queued"  # waiting for the delivery runner
    INFLIGHT = "inflight"  # handed to the outbound client; back to QUEUED after a crash
    RETRY = "retry"  # temporary failure; next attempt at ``next_attempt``
    DONE = "done"  # delivered (or routed) successfully
    FAILED = "failed"  # dead-lettered: gave up, reason recorded
    HELD = "held"  # commands and bounces, kept for processing that comes later


@dataclass(frozen=True)
class SpoolEntry:
    """One row of the spool: an accepted recipient of a stored message."""

    entry_id: int
    message_key: int
    sender: str
    destination: Destination
    state: EntryState
    received_at: float
    attempts: int = 0
    first_attempt_at: float | None = None
    next_attempt_at: float | None = None
    last_error: str = ""
    message_id: str = ""
    kind: EntryKind = EntryKind.INBOUND


@dataclass(frozen=True)
class Bounce:
    """A permanent delivery failure of one member, recorded for bounce processing.

    ``response`` is the smarthost's reply text; ``at`` is POSIX time.
    """

    list_address: str
    address: str
    code: int
    response: str
    at: float


@dataclass(frozen=True)
class Route:
    """What storing a message does at once with one destination's entry
    (:meth:`~mailrelay.interfaces.ISpool.store`).

    The default leaves the entry QUEUED for the delivery runner to route.  With
    ``kind`` set (MEMBER or OWNER) the entry is expanded in the same
    transaction, exactly as ``ISpool.expand`` would do later: it is stored DONE
    with one ``kind`` entry per address of ``recipients``.  Otherwise the entry
    is stored in ``state`` (DONE, HELD or FAILED) with ``error`` as its reason.
    """

    state: EntryState = EntryState.QUEUED
    kind: EntryKind | None = None
    recipients: tuple[str, ...] = ()
    error: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.state, EntryState) or self.state in (
            EntryState.INFLIGHT,
            EntryState.RETRY,
        ):
            raise ValueError(f"a route stores an entry QUEUED, DONE, HELD or FAILED: {self!r}")
        if self.kind is not None:
            if self.kind not in (EntryKind.MEMBER, EntryKind.OWNER):
                raise ValueError(f"a route expands into MEMBER or OWNER entries: {self!r}")
            if self.state is not EntryState.DONE:
                raise ValueError(f"an expanded entry is stored DONE: {self!r}")
        elif self.recipients:
            raise ValueError(f"recipients without a kind: {self!r}")


@dataclass(frozen=True)
class Stored:
    """What :meth:`~mailrelay.interfaces.ISpool.store` did.

    ``entry_ids`` are the destinations' entries, in destination order.
    ``claimed`` are the entries stored INFLIGHT for the caller to deliver
    (with ``claim=True``): every entry the routes left QUEUED, and every copy
    they created.
    """

    entry_ids: tuple[int, ...]
    claimed: tuple[SpoolEntry, ...] = ()


@dataclass(frozen=True)
class EntryUpdate:
    """One state transition of a spool entry, applied by :meth:`ISpool.update`.

    ``error`` replaces the entry's ``last_error`` when not empty (a success
    keeps the history).  ``count_attempt`` adds one to ``attempts`` and sets
    ``first_attempt_at`` if it is unset.  A RETRY needs ``next_attempt_at``.
    """

    entry_id: int
    state: EntryState
    next_attempt_at: float | None = None
    error: str = ""
    count_attempt: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.entry_id, int) or isinstance(self.entry_id, bool):
            raise TypeError(f"entry_id must be an int, not {self.entry_id!r}")
        if type(self.state) is not EntryState:  # EntryState(...) is slow: one per recipient
            try:
                object.__setattr__(self, "state", EntryState(self.state))
            except ValueError:
                raise ValueError(f"not an entry state: {self.state!r}") from None
        if self.state is EntryState.RETRY and self.next_attempt_at is None:
            raise ValueError(f"entry {self.entry_id}: a RETRY needs next_attempt_at")
        if not isinstance(self.error, str):
            raise TypeError(f"error must be a string, not {self.error!r}")


@dataclass(frozen=True)
class PostSummary:
    """One stored message as an operator thinks of it: a post and its copies
    (:meth:`~mailrelay.interfaces.ISpool.posts`).

    ``lists`` are the posting addresses it was sent to; ``counts`` maps each
    :class:`EntryState` to its number of entries, not counting INBOUND entries
    that are DONE (expanded into copies, or a repeated RCPT).
    """

    message_key: int
    message_id: str
    sender: str
    received_at: float
    lists: tuple[str, ...]
    counts: dict[EntryState, int]

    @property
    def waiting(self) -> int:
        """Entries not yet delivered or given up: queued, in flight or retrying."""
        return sum(
            self.counts.get(state, 0)
            for state in (EntryState.QUEUED, EntryState.INFLIGHT, EntryState.RETRY)
        )
