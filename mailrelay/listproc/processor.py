"""The list-processing core: mail to a list's service addresses, handed to handlers.

Place in the flow: LMTP → routing → spool → scheduler → **processor** →
handler → (registry changes, replies) → spool → sending → mta.  Routing
(:mod:`mailrelay.runner.routing`) stores mail to a sub-address that has a
handler QUEUED, like a post, and the runner hands the claimed entries to
:meth:`ListProcessor.process_batch` instead of expanding them (a handler
that provides ``IBatchListMailHandler``, such as the bounce handler, gets
those of one list and sub-address together; the others go through
:meth:`ListProcessor.process` one by one).  The processor reads
the list, calls the sub-address's :class:`~mailrelay.interfaces.IListMailHandler`
with a :class:`ListMail`, and records what the handler's :class:`Handled`
says: the replies it wrote are stored as NOTICE entries (delivered exactly as
written) in the same transaction that marks the request DONE, FAILED or HELD.

A sub-address without a handler keeps the behaviour of earlier releases: its
mail is HELD.  Mail that earlier releases HELD for a sub-address that now has
a handler is released for processing when the runner starts
(:meth:`ListProcessor.release_held`).

Processing is at-least-once, like delivery: a crash after a handler changed
the registry but before its replies and the DONE were stored processes the
mail again after the restart.  Handlers are written for that (a confirmation
token is spent once, so a repeated confirmation gets the neutral "unknown
token" reply; a repeated join request sends a second confirmation request).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailrelay._checks import check_count
from mailrelay.addresses import VERP_DELIMITER
from mailrelay.errors import RegistryError, RegistryUnavailable, SpoolError
from mailrelay.interfaces import IListMailHandler
from mailrelay.model import (
    Destination,
    EntryState,
    EntryUpdate,
    MailingList,
    Outgoing,
    SpoolEntry,
)
from mailrelay.observer import NO_OBSERVER
from mailrelay.runner.outcomes import retry_after_local_trouble

__all__ = ["Handled", "ListMail", "ListProcessor", "service_address"]

_log = Logger()

_FINAL_STATES = (EntryState.DONE, EntryState.FAILED, EntryState.HELD)


@dataclass(frozen=True)
class ListMail:
    """One message to a list-processing sub-address, as a handler gets it.

    ``message`` is the stored bytes (with mailrelay's ``X-MailFrom`` and any
    Message-ID it added); ``now`` is the processor's clock.
    """

    entry: SpoolEntry
    message: bytes = field(repr=False)
    mlist: MailingList
    now: float

    @property
    def sender(self) -> str:
        """The envelope sender ("" for ``<>``)."""
        return self.entry.sender

    @property
    def subaddress(self) -> str:
        """The canonical sub-address (``join`` for ``-subscribe``)."""
        return self.entry.destination.subaddress or ""

    @property
    def recipient(self) -> str:
        """The recipient as given in RCPT, lower-cased, ``+suffix`` kept."""
        return self.entry.destination.address

    @property
    def suffix(self) -> str:
        """What follows the first ``+`` of the recipient's local part ("" if
        none): the token of ``-confirm+TOKEN``, the member of a VERP bounce."""
        local = self.recipient.rpartition("@")[0]
        return local.partition(VERP_DELIMITER)[2]


@dataclass(frozen=True)
class Handled:
    """What a handler did with one message.

    ``outgoing`` are the messages to send (stored with the entry's new state
    in one transaction).  ``state`` is what becomes of the request: DONE, or
    FAILED (nothing could be done; an operator may retry it), or HELD (kept
    for later, such as an unrecognised bounce).  ``note`` is recorded on the
    entry and shown by ``mailrelay queue``: what was done, or why not.
    """

    outgoing: tuple[Outgoing, ...] = ()
    state: EntryState = EntryState.DONE
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "outgoing", tuple(self.outgoing))
        if self.state not in _FINAL_STATES:
            raise ValueError(f"a handled request is DONE, FAILED or HELD, not {self.state!r}")


class ListProcessor:
    """Dispatches mail to list-processing sub-addresses to their handlers.

    ``handlers`` maps a canonical sub-address (``request``, ``join``,
    ``leave``, ``confirm``, ``bounces``) to an ``IListMailHandler``.
    ``registry`` supplies the list; ``spool`` (an ``ISpool``) stores the
    replies; ``clock`` gives the time handlers see.  ``batch_limit`` bounds
    how many messages :meth:`process_batch` hands a batch handler at once.
    """

    def __init__(
        self,
        spool: Any,
        registry: Any,
        *,
        clock: Any,
        handlers: Mapping[str, Any],
        observer: Any = NO_OBSERVER,
        batch_limit: int = 500,
    ) -> None:
        for subaddress, handler in handlers.items():
            if not IListMailHandler.providedBy(handler) and not callable(
                getattr(handler, "handle", None)
            ):
                raise TypeError(f"handler for -{subaddress} must provide handle(): {handler!r}")
        self._spool = spool
        self._registry = registry
        self._clock = clock
        self._handlers = dict(handlers)
        self._observer = observer
        self._batch_limit = check_count("batch_limit", batch_limit)

    @property
    def subaddresses(self) -> frozenset[str]:
        """The sub-addresses this processor handles."""
        return frozenset(self._handlers)

    def handles(self, subaddress: str | None) -> bool:
        """Whether mail to ``subaddress`` is processed here (else routing holds it)."""
        return subaddress in self._handlers

    def release_held(self) -> defer.Deferred[int]:
        """Queue for processing the mail that earlier releases HELD for the
        sub-addresses handled here; fires with how many entries."""
        d = self._spool.release_held(sorted(self._handlers))

        def released(count: int) -> int:
            if count:
                _log.info(
                    "Releasing {count} held messages to {subaddresses} for list processing",
                    count=count,
                    subaddresses=", ".join(f"-{s}" for s in sorted(self._handlers)),
                )
            return count

        return d.addCallback(released)

    async def process(
        self, entry: SpoolEntry, message: bytes | None = None, *, handler: Any = None
    ) -> EntryUpdate | None:
        """Process a claimed INBOUND entry with its sub-address's handler, or
        with ``handler`` (such as moderation's, for a post being held).

        Returns the entry's update for the caller to write, or ``None`` when
        the update was stored here together with the replies.  ``message`` is
        the stored bytes when the caller has them.
        """
        destination = entry.destination
        fields = dict(
            message_id=entry.message_id,
            list=destination.list_address,
            sender=entry.sender,
            subaddress=destination.subaddress or "",
            to=service_address(destination),
            entry_id=entry.entry_id,
        )
        now = self._clock.seconds()
        if handler is None:
            handler = self._handlers[destination.subaddress or ""]
        try:
            mlist = self._registry.get_list(destination.list_address)
            if mlist is None:
                _log.warn("{message_id} to {to}: the list no longer exists", **fields)
                return EntryUpdate(
                    entry.entry_id,
                    EntryState.FAILED,
                    error="the list no longer exists",
                    count_attempt=True,
                )
            if message is None:
                message = self._spool.get_message(entry.message_key)
            handled = await _call(handler, ListMail(entry, message, mlist, now))
        except KeyError:
            return None  # deleted by an operator meanwhile
        except (RegistryUnavailable, SpoolError) as e:
            _log.warn(
                "{message_id} to {to}: cannot process it now ({error}); trying again shortly",
                error=str(e),
                **fields,
            )
            return retry_after_local_trouble(entry, f"cannot process it now: {e}", now)
        except RegistryError as e:
            _log.warn("{message_id} to {to}: {error}", error=str(e), **fields)
            return EntryUpdate(entry.entry_id, EntryState.FAILED, error=str(e), count_attempt=True)
        except Exception as e:
            _log.failure("{message_id} to {to}: the handler failed", **fields)
            return EntryUpdate(
                entry.entry_id,
                EntryState.FAILED,
                error=f"internal error while processing: {type(e).__name__}: {e}",
                count_attempt=True,
            )
        if not isinstance(handled, Handled):
            _log.error(
                "{message_id} to {to}: the handler returned {result!r}",
                result=handled,
                **fields,
            )
            return EntryUpdate(
                entry.entry_id,
                EntryState.FAILED,
                error="internal error while processing: the handler returned no result",
                count_attempt=True,
            )
        update = _update_for(entry, handled)
        _log.info(
            "{message_id} from {sender} to {to}: {state}, {count} replies: {note}",
            state=handled.state.value,
            count=len(handled.outgoing),
            note=handled.note,
            **fields,
        )
        if not handled.outgoing:
            self._count_held(handled, destination.list_address)
            return update
        try:
            await self._spool.store_outgoing(handled.outgoing, [update])
        except SpoolError as e:
            # Nothing was stored: the whole request is processed again.
            _log.error(
                "{message_id} to {to}: cannot store the replies ({error})",
                error=str(e),
                **fields,
            )
            return retry_after_local_trouble(entry, f"cannot store the replies: {e}", now)
        self._count_held(handled, destination.list_address)
        return None

    async def process_batch(self, entries: Sequence[SpoolEntry]) -> list[EntryUpdate]:
        """Process claimed INBOUND entries for the sub-addresses handled here.

        Entries of one list and sub-address whose handler provides
        ``IBatchListMailHandler`` are handed to it together (in chunks of at
        most ``batch_limit``), so that a burst of bounces is scored in one
        registry transaction, and their replies are stored with their new
        states in one spool transaction; the others go through
        :meth:`process` one by one.  Returns the updates for the caller to
        write (in one transaction of its own); those stored here with replies
        are left out.
        """
        groups: dict[tuple[str, str], list[SpoolEntry]] = {}
        for entry in entries:
            destination = entry.destination
            groups.setdefault((destination.list_address, destination.subaddress or ""), []).append(
                entry
            )
        updates: list[EntryUpdate] = []
        for (_, subaddress), group in groups.items():
            handler = self._handlers[subaddress]
            if len(group) == 1 or not callable(getattr(handler, "handle_batch", None)):
                for entry in group:
                    update = await self.process(entry)
                    if update is not None:
                        updates.append(update)
                continue
            for start in range(0, len(group), self._batch_limit):
                chunk = group[start : start + self._batch_limit]
                updates.extend(await self._process_together(chunk, handler))
        return updates

    async def _process_together(self, entries: list[SpoolEntry], handler: Any) -> list[EntryUpdate]:
        """Entries of one list and sub-address, through ``handler.handle_batch``."""
        first = entries[0]
        destination = first.destination
        fields = dict(
            list=destination.list_address,
            subaddress=destination.subaddress,
            count=len(entries),
        )
        now = self._clock.seconds()
        mails: list[ListMail] = []
        try:
            mlist = self._registry.get_list(destination.list_address)
            if mlist is None:
                raise _OneByOne()  # each gets its own "no longer exists"
            for entry in entries:
                try:
                    message = self._spool.get_message(entry.message_key)
                except KeyError:
                    continue  # deleted by an operator meanwhile
                mails.append(ListMail(entry, message, mlist, now))
            if not mails:
                return []
            results = await _call_batch(handler, mails)
            if not isinstance(results, list | tuple) or len(results) != len(mails):
                raise TypeError(f"handle_batch returned {results!r:.100}")
            if not all(isinstance(handled, Handled) for handled in results):
                raise TypeError("handle_batch returned something else than Handled")
        except _OneByOne:
            return await self._one_by_one(entries, handler)
        except (RegistryUnavailable, SpoolError) as e:
            _log.warn(
                "{count} messages to {list}-{subaddress}: cannot process them now ({error}); "
                "trying again shortly",
                error=str(e),
                **fields,
            )
            return [
                retry_after_local_trouble(entry, f"cannot process it now: {e}", now)
                for entry in entries
            ]
        except Exception as e:
            # One bad message must not fail the others: each on its own.
            _log.warn(
                "{count} messages to {list}-{subaddress}: processing them together failed "
                "({error}); processing them one by one",
                error=f"{type(e).__name__}: {e}",
                **fields,
            )
            return await self._one_by_one(entries, handler)
        updates: list[EntryUpdate] = []
        with_replies: list[EntryUpdate] = []
        outgoing: list[Outgoing] = []
        for mail, handled in zip(mails, results, strict=True):
            entry = mail.entry
            update = _update_for(entry, handled)
            _log.info(
                "{message_id} from {sender} to {to}: {state}, {count} replies: {note}",
                **{
                    "message_id": entry.message_id,
                    "sender": entry.sender,
                    "to": service_address(destination),
                    "list": destination.list_address,
                    "entry_id": entry.entry_id,
                    "state": handled.state.value,
                    "count": len(handled.outgoing),
                    "note": handled.note,
                },
            )
            if handled.outgoing:
                outgoing.extend(handled.outgoing)
                with_replies.append(update)
            else:
                updates.append(update)
        if outgoing:
            try:
                await self._spool.store_outgoing(outgoing, with_replies)
            except SpoolError as e:
                # Nothing was stored: those requests are processed again.
                _log.error(
                    "{count} messages to {list}-{subaddress}: cannot store the replies ({error})",
                    error=str(e),
                    **dict(fields, count=len(with_replies)),
                )
                by_id = {mail.entry.entry_id: mail.entry for mail in mails}
                updates.extend(
                    retry_after_local_trouble(
                        by_id[u.entry_id], f"cannot store the replies: {e}", now
                    )
                    for u in with_replies
                )
        for handled in results:
            self._count_held(handled, destination.list_address)
        return updates

    async def _one_by_one(self, entries: list[SpoolEntry], handler: Any) -> list[EntryUpdate]:
        updates = []
        for entry in entries:
            update = await self.process(entry, handler=handler)
            if update is not None:
                updates.append(update)
        return updates

    def _count_held(self, handled: Handled, list_address: str) -> None:
        # Held here (a post for moderation, an unrecognised bounce), not at
        # routing: the observer hears of it once the state is about to be or
        # was written (the caller writes an update returned without replies).
        if handled.state is EntryState.HELD:
            self._observer.recipients_held(list_address, 1)


def service_address(destination: Destination) -> str:
    """The address ``destination`` names, for the log: ``test-request@example.com``
    for a sub-address (its ``+`` suffix left out: a token is a credential),
    the posting address for a post (such as one being held)."""
    if destination.subaddress is None:
        return destination.list_address
    return MailingList(destination.list_address).subaddress(destination.subaddress)


def _update_for(entry: SpoolEntry, handled: Handled) -> EntryUpdate:
    """The entry's update for what its handler did (a FAILED one counts as an attempt)."""
    return EntryUpdate(
        entry.entry_id,
        handled.state,
        error=handled.note,
        count_attempt=handled.state is EntryState.FAILED,
    )


class _OneByOne(Exception):
    """Internal: process these entries one by one after all."""


async def _call_batch(handler: Any, mails: list[ListMail]) -> Any:
    """``handler.handle_batch(mails)``: a value, a Deferred or a coroutine."""
    result = handler.handle_batch(mails)
    if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
        result = await result
    return result


async def _call(handler: Any, mail: ListMail) -> Any:
    """``handler.handle(mail)``, which may return a value, a Deferred or a coroutine."""
    result = handler.handle(mail)
    if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
        result = await result
    return result
