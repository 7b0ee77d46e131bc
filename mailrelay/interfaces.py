"""The contracts between mailrelay's layers.

Data flows one way: LMTP -> spool -> delivery runner -> outbound client ->
smarthost, with results flowing back into the spool.  (In ``makeService`` the
LMTP policy stores through the runner, an :class:`IMessageStore` in front of
the spool, so that a message is routed as it is stored.)  Each arrow is one of
the interfaces below, so an embedder can replace any layer (a PostgreSQL
registry, another spool, a different sender) without touching the others.
"""

from __future__ import annotations

from zope.interface import Interface

# Methods are declared without ``self``, as zope.interface expects.
# ruff: noqa: N805


class IListRegistry(Interface):
    """Mailing lists and their members.

    Every method is synchronous.  ``resolve`` is called at RCPT time and must
    answer from memory (Twisted answers pipelined commands out of order when
    validation returns a Deferred); it must nevertheless see changes made by
    another process (the admin CLI) without a restart.
    """

    def resolve(address):
        """Map a recipient address to a :class:`mailrelay.model.Destination`.

        Returns ``None`` for an address that is neither a list's posting address
        nor one of its sub-addresses.  Matching is case-insensitive and ignores
        anything after ``+`` in the local part.  Raises
        :class:`mailrelay.errors.RegistryUnavailable` when the store cannot be
        read (a temporary condition).
        """

    def get_list(address):
        """The :class:`~mailrelay.model.MailingList` posting at ``address``, or ``None``."""

    def lists():
        """All lists, sorted by posting address."""

    def create_list(address, display_name="", owners=()):
        """Create a list; raises :class:`~mailrelay.errors.RegistryError` if it exists
        or an address is invalid.  Returns the new :class:`MailingList`."""

    def delete_list(address):
        """Delete a list and its members; ``RegistryError`` if there is no such list."""

    def add_members(list_address, members):
        """Subscribe :class:`~mailrelay.model.Member` values to a list.

        Returns the tuple of addresses that were already members (and were left
        as they were); everything else is added in one transaction.  Raises
        ``RegistryError`` for an unknown list or an invalid address (then nothing
        is added).
        """

    def remove_members(list_address, addresses):
        """Unsubscribe addresses; returns the tuple of those that were not members."""

    def members(list_address, enabled_only=False):
        """The list's members sorted by address; ``RegistryError`` for an unknown list."""

    def member_count(list_address):
        """How many members the list has (delivery enabled or not), without
        reading them; ``RegistryError`` for an unknown list."""

    def record_bounce(list_address, address, code, response, at):
        """Record that the smarthost refused ``address`` permanently.

        ``code`` is the SMTP reply code, ``response`` its text (str or bytes),
        ``at`` POSIX time.  ``RegistryError`` for an unknown list or an invalid
        address.
        """

    def record_bounces(bounces):
        """Record many :class:`~mailrelay.model.Bounce` values in one transaction
        (all or nothing; errors as for :meth:`record_bounce`)."""

    def bounces(list_address):
        """The :class:`~mailrelay.model.Bounce` values recorded for a list, oldest
        first; ``RegistryError`` for an unknown list."""

    def close():
        """Release the store."""


class IListProcessingStore(Interface):
    """What list processing keeps beside the lists and members: per-list
    settings, member flags, pending confirmations and the auto-reply counts.

    Synchronous, like :class:`IListRegistry` (both registries implement both
    interfaces), and seen by every process sharing the store: a confirmation
    created by the daemon can be confirmed with ``mailrelay pending``.
    Errors: :class:`~mailrelay.errors.RegistryError` for an unknown list, an
    unknown member or a bad value; ``RegistryUnavailable`` when the store
    cannot be read or written (temporary).
    """

    def list_settings(list_address):
        """The list's :class:`~mailrelay.listsettings.ListSettings` (defaults
        for anything never set)."""

    def update_list_settings(list_address, changes):
        """Set settings from ``{key: text}`` (the INI value syntax, checked by
        :func:`mailrelay.listsettings.settings_from_text`); all or nothing.
        Returns the new ``ListSettings``."""

    def update_list(list_address, display_name=None, owners=None):
        """Change a list's display name and/or its owners (a collection of
        addresses, replacing the old ones; empty for none); ``None`` leaves a
        field as it is.  Returns the new :class:`~mailrelay.model.MailingList`;
        ``RegistryError`` for an unknown list or an invalid owner address
        (then nothing changes)."""

    def get_member(list_address, address):
        """The :class:`~mailrelay.model.MemberRecord` of ``address``
        (case-insensitive), or ``None`` if it is not subscribed."""

    def member_records(list_address):
        """Every member's :class:`~mailrelay.model.MemberRecord`, sorted by address."""

    def update_member(list_address, address, changes):
        """Change the fields named in ``changes`` (a mapping; keys from
        :data:`mailrelay.model.MEMBER_FLAGS`) of one member, checked; returns
        the new ``MemberRecord``.  ``RegistryError`` if it is not a member, a
        key is unknown or a value is of the wrong kind (then nothing changes)."""

    def update_members(list_address, changes):
        """Change several members of one list in one transaction: ``changes``
        maps a member address to its field changes (as for
        :meth:`update_member`).  Returns ``{address: new MemberRecord}``
        (lower-cased addresses) for those that are members; the others are
        left out (removed meanwhile: nothing to change).  ``RegistryError`` for
        an unknown list, key or value, and then nothing changes at all."""

    def add_pending(pending):
        """Store a :class:`~mailrelay.listproc.tokens.Pending`; ``RegistryError``
        if its token is already in use or its list does not exist."""

    def consume_pending(list_address, token, now):
        """Take the pending confirmation ``token`` of ``list_address``, once.

        Atomically removes and returns it if it exists for that list and has
        not expired at ``now``; otherwise returns ``None`` and changes nothing
        (an expired one is removed).  A token of another list is left alone,
        so it cannot be spent through the wrong list's address.
        """

    def get_pending(token):
        """The pending confirmation ``token`` (any list, expired or not), or ``None``."""

    def discard_pending(token):
        """Remove the pending confirmation ``token``; returns it, or ``None``."""

    def pending(list_address=None):
        """Pending confirmations (of one list, or all), oldest first, expired ones included."""

    def purge_pending(now):
        """Remove the confirmations expired at ``now``; returns how many went."""

    def claim_autoreply(list_address, address, day, limit):
        """Count one automatic reply to ``address`` for ``list_address`` on
        ``day`` (a ``YYYY-MM-DD`` key), if fewer than ``limit`` (0: no limit)
        went there that day.  Returns whether the reply may be sent; counts
        of earlier days are forgotten."""


class IListMailHandler(Interface):
    """Handles the mail to one list-processing sub-address (``-request``,
    ``-bounces``, ...), for :class:`mailrelay.listproc.processor.ListProcessor`.

    A handler reads the message, changes the registry, and says what to send
    in reply; it never writes to the spool itself, so the processor can store
    the replies and finish the request in one transaction.
    """

    def handle(mail):
        """Handle a :class:`~mailrelay.listproc.processor.ListMail`.

        Returns a :class:`~mailrelay.listproc.processor.Handled` (or a
        Deferred or coroutine of one).  Raising
        :class:`~mailrelay.errors.RegistryUnavailable` means "try again
        shortly"; any other exception fails the entry (kept, with the reason,
        for ``mailrelay queue``).  A handler may see the same mail twice
        after a crash, so what it changes must be safe to repeat.
        """


class IBatchListMailHandler(IListMailHandler):
    """A handler that can also take many messages to one list's sub-address
    at once, so that what it changes is written in one registry transaction
    (the bounce handler, in a burst of bounces)."""

    def handle_batch(mails):
        """Handle a sequence of :class:`~mailrelay.listproc.processor.ListMail`
        of one list and sub-address; returns one
        :class:`~mailrelay.listproc.processor.Handled` per mail, in order (or
        a Deferred or coroutine of that list).  Exceptions mean what they mean
        for :meth:`IListMailHandler.handle`, for the whole batch: with
        ``RegistryUnavailable`` every mail is tried again shortly; with any
        other the processor hands the mails to :meth:`handle` one by one, so
        that one bad message fails alone.  Nothing may have changed when it
        raises (changes are written in one transaction, last)."""


class IMessageStore(Interface):
    """Where the LMTP policy puts an accepted message: an :class:`ISpool`, or
    the delivery runner in front of one (which routes it and starts delivering
    in the same step)."""

    def enqueue(envelope, message):
        """Store ``message`` (bytes) for every destination of ``envelope`` (a
        :class:`~mailrelay.model.Envelope`).

        Fires with one entry id per destination, in destination order, once
        the message is on stable storage; fails with
        :class:`~mailrelay.errors.SpoolError` (``disk_full`` set when out of
        space), and then nothing is acknowledged.
        """


class ISpool(IMessageStore):
    """Durable storage of accepted messages, one entry per accepted recipient.

    Methods that change state return Deferreds that fire only once the change
    is on stable storage; concurrent callers share disk syncs (group commit).
    """

    def enqueue(envelope, message):
        """Store ``message`` (bytes) once and one QUEUED entry per destination of
        ``envelope`` (a :class:`~mailrelay.model.Envelope`).

        Fires with the list of entry ids, in destination order, after an fsync.
        Fails with :class:`~mailrelay.errors.SpoolError` (``disk_full`` set when
        out of space); nothing is acknowledged then.
        """

    def store(envelope, message, routes=None, claim=False):
        """:meth:`enqueue` that can also route the new entries in the same transaction.

        ``routes``, one :class:`~mailrelay.model.Route` per destination (or
        ``None``: all QUEUED), says what becomes of each entry at once: left
        QUEUED, expanded into MEMBER or OWNER copies (as :meth:`expand`), or
        stored DONE, HELD or FAILED.  With ``claim`` every entry left QUEUED
        and every copy is stored INFLIGHT instead, for a caller that delivers
        them at once (a crash makes them QUEUED again, as any claim).  Fires
        with a :class:`~mailrelay.model.Stored` after an fsync.
        """

    def store_outgoing(messages, finish=(), refusals=()):
        """Store messages mailrelay wrote itself (:class:`~mailrelay.model.Outgoing`
        values), each with one QUEUED NOTICE entry per recipient, and apply the
        :class:`~mailrelay.model.EntryUpdate` values of ``finish`` (typically:
        the request they answer is DONE), all in one durable transaction.

        Each :class:`~mailrelay.model.Refusal` of ``refusals`` (one per stored
        message at most) records why the smarthost refused that message as a
        whole and stores its notices like ``messages`` — but only the first
        time: for a message already refused (or gone) it changes nothing, so
        a post refused in several batches is told about once.

        The runner delivers a NOTICE exactly as stored, from the stored
        envelope sender.  Fires with the new entries' ids, message by message.
        """

    def release_held(subaddresses=None, entry_ids=None):
        """Make HELD INBOUND entries QUEUED again, for the runner to route:
        those to one of ``subaddresses`` (``None``: any), of ``entry_ids``
        (``None``: any).  Fires with how many changed."""

    def get_message(message_key):
        """The stored bytes of a message (synchronous)."""

    def claim_due(now, limit):
        """Move up to ``limit`` entries that are QUEUED, or RETRY with
        ``next_attempt_at <= now``, to INFLIGHT; fires with those
        :class:`~mailrelay.model.SpoolEntry` values (oldest first)."""

    def update(updates):
        """Apply a batch of :class:`mailrelay.model.EntryUpdate` transitions in one
        transaction; fires when durable."""

    def expand(entry_id, recipients, kind):
        """Replace an INBOUND entry by one QUEUED entry of ``kind``
        (:class:`~mailrelay.model.EntryKind` MEMBER or OWNER) per recipient.

        The new entries share the message and list of the original and name
        the recipient as their address; the original becomes DONE in the same
        transaction.  Fires with the new ids; an entry that is DONE or gone
        expands to ``[]``.
        """

    def purge(before):
        """Delete DONE entries last changed before ``before`` (POSIX time), and
        messages left without entries; fires with how many entries went."""

    def set_status(key, text):
        """Publish ``text`` under ``key`` for other processes, such as the
        delivery circuit breaker's state under ``"circuit"``; ``None`` removes
        it.  Fires when durable."""

    def get_status(key):
        """The text published under ``key``, or ``None`` (synchronous)."""

    def recover(claimed_before=None, keep=()):
        """Return INFLIGHT entries to QUEUED; fires with the count.

        Without arguments every one (at start, after a crash).  With
        ``claimed_before`` (a time) only those claimed before it whose ids are
        not in ``keep``: claims that outlived their lease because their
        results could not be recorded, while the process goes on."""

    def entries(state=None, limit=None):
        """Entries, optionally of one :class:`~mailrelay.model.EntryState` (synchronous)."""

    def counts():
        """Mapping of every EntryState to its number of entries (synchronous)."""

    def next_due():
        """The earliest ``next_attempt_at`` of a RETRY entry, or ``None`` (synchronous)."""

    def retry_now(entry_ids=None):
        """Make RETRY/FAILED entries (all when ``None``) QUEUED again; fires with the count.

        FAILED entries start a fresh retry period (attempts and first attempt
        time cleared); RETRY entries keep theirs.
        """

    def delete(entry_ids):
        """Remove entries; fires with the count."""

    def get_entry(entry_id):
        """The :class:`~mailrelay.model.SpoolEntry` with ``entry_id``, in any
        state, or ``None`` if there is none (synchronous, one indexed lookup)."""

    def message_entries(message_key):
        """Every entry of one stored message, by id (synchronous): its
        destinations and, once expanded, one copy per recipient."""

    def copy_counts(message_key):
        """Mapping of every EntryState to the number of MEMBER and OWNER copies
        of one message in that state (synchronous, one indexed query)."""

    def delivery_progress(message_key, delivered):
        """``(first, last)`` for the ``delivered`` copies of one message just
        recorded DONE: whether no other copy was DONE before them, and whether
        no copy is left waiting (QUEUED, INFLIGHT or RETRY).  Synchronous and
        cheap whatever the post's size (the runner asks after every batch
        when metrics are on)."""

    def oldest_entry(state):
        """The entry in ``state`` received first (lowest id), or ``None``
        (synchronous, one indexed lookup)."""

    def posts(limit=None, message_id=None, include_done=False):
        """:class:`~mailrelay.model.PostSummary` values, oldest first (synchronous).

        Only messages with an entry that is not DONE, unless ``include_done``;
        only those with Message-ID ``message_id`` when it is given.
        """

    def cancel_messages(message_keys):
        """Delete every entry of these messages that is not DONE, in one durable
        transaction; fires with a mapping of EntryState to the number deleted.

        A copy in flight may still reach its recipient; nothing else is sent.
        DONE entries (the history) stay until purged.
        """

    def delivered_since(when):
        """How many MEMBER and OWNER copies became DONE at or after ``when``
        (POSIX time; synchronous)."""

    def posts_since(when):
        """Mapping of list address to the number of posts (INBOUND entries for
        the posting address) received at or after ``when`` (synchronous)."""

    def close():
        """Flush pending writes and release the store; returns a Deferred."""


class IRefusalNotices(Interface):
    """Writes what the poster and the owners are told when the smarthost
    refused a post as a whole after it was acknowledged (used by the delivery
    runner; :class:`mailrelay.listproc.refusals.RefusalNotices` by default)."""

    def notices(refused):
        """The :class:`~mailrelay.model.Outgoing` messages about ``refused`` (a
        :class:`~mailrelay.model.RefusedPost`): typically an RFC 3464 delivery
        status notification to its envelope sender, unless that must not be
        answered, and a notice to the lists' owners.  Synchronous, no I/O
        beyond reading templates; may return ``()``."""


class IMessageSender(Interface):
    """Sends one message to a set of recipients over SMTP."""

    def sendmail(sender, recipients, message):
        """Fire with the dict of refused recipients ``{address: (code, bytes)}``
        (``{}`` when all were accepted), or fail with
        :class:`mailrelay.mta.errors.DeliveryError` when the whole transaction failed.

        ``message`` is bytes, or a :class:`mailrelay.mta.message.WireMessage`
        already encoded for DATA (the delivery runner encodes a message once
        for all of its transactions).
        """

    def quit():
        """Close any open connection; returns a Deferred."""


class IClock(Interface):
    """The subset of IReactorTime mailrelay uses (``task.Clock`` in tests)."""

    def seconds():
        """Current time."""

    def callLater(delay, f, *args, **kw):
        """Schedule a call."""


__all__ = ["IListRegistry", "ISpool", "IMessageSender", "IClock"]


class IInboundHandler(Interface):
    """The policy behind the LMTP server (:mod:`mailrelay.lmtp`).

    The wire protocol asks it which recipients to accept and hands it each
    complete transaction; it never sees a socket.  Values are defined in
    :mod:`mailrelay.lmtp` (``Reply``, ``RecipientRejected``, ``Transaction``).
    """

    def validate_recipient(sender, recipient):
        """Decide synchronously whether to accept ``RCPT TO:<recipient>``.

        ``sender`` is the envelope sender (``""`` for ``<>``), ``recipient`` the
        address as given.  Returns a token that comes back in the transaction's
        ``AcceptedRecipient.token``, or raises
        :class:`mailrelay.lmtp.RecipientRejected` carrying the reply to send.
        Synchronous because a Deferred would reorder pipelined replies.
        """

    def deliver(transaction):
        """Take responsibility for a :class:`mailrelay.lmtp.Transaction`.

        Returns a Deferred firing with a list of :class:`mailrelay.lmtp.Reply`,
        one per ``transaction.recipients`` entry and in that order.  A success
        reply promises the message is on stable storage.
        """


__all__.append("IInboundHandler")


class IRelayObserver(Interface):
    """Told what the relay does, for metrics (:mod:`mailrelay.metrics`) or an
    embedder's own instrumentation.

    Called on the reactor thread at session, transaction and batch
    granularity, never per line or per recipient: counts come summed.  Every
    method must return quickly and must not raise; the default observer
    (:data:`mailrelay.observer.NO_OBSERVER`) does nothing.  ``list_address``
    is a list's posting address.
    """

    def lmtp_session_opened():
        """An LMTP session was admitted."""

    def lmtp_session_closed():
        """An admitted LMTP session ended."""

    def message_accepted(recipients):
        """An LMTP transaction was stored for ``recipients`` accepted recipients."""

    def message_refused(reason, recipients):
        """Refused: a RCPT (``recipients`` 1) or a whole transaction.

        ``reason`` is one of ``unknown_recipient``, ``registry_unavailable``,
        ``defects``, ``spool_error``, ``disk_full``, ``too_big``.
        """

    def recipients_held(list_address, count):
        """``count`` destinations of one message were HELD (commands, bounces)."""

    def recipients_queued(list_address, count):
        """``count`` member or owner copies of one message were queued."""

    def recipients_done(list_address, delivered, deferred, dead_lettered, bounced):
        """The results of one message's copies to one list in a delivery batch.

        ``bounced`` copies were refused permanently (recorded as bounces);
        ``dead_lettered`` ones failed for good otherwise (retry period over,
        list gone, owner refused).
        """

    def smtp_transaction(seconds, ok):
        """One SMTP transaction to the smarthost took ``seconds``; ``ok`` is
        False when the whole transaction failed."""

    def smtp_connection_opened():
        """A connection to the smarthost was established (greeting and set-up done)."""

    def smtp_connection_failed():
        """Connecting to the smarthost (or setting the session up) failed."""

    def post_delivered(list_address, seconds, first, last):
        """Copies of a post were delivered ``seconds`` after it was received:
        ``first`` when these include its first delivered copy, ``last`` when
        none of its copies is left waiting."""


__all__.append("IRelayObserver")
__all__ += ["IListProcessingStore", "IListMailHandler"]
__all__.append("IRefusalNotices")
