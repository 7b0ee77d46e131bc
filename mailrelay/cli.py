"""The ``mailrelay`` admin command: lists, members, the queue, configuration, Postfix maps.

``main(argv)`` runs one command in the calling process and returns its exit
status (:data:`EXIT_OK`, :data:`EXIT_FAILURE`, :data:`EXIT_USAGE`,
:data:`EXIT_CONFIG`).  It works on the same SQLite files as the daemon, which
sees registry changes at the next RCPT without a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.utils
import functools
import math
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailrelay import __version__
from mailrelay.addresses import check_mailbox, resolve_recipient
from mailrelay.config import Settings, describe_defaults, load_settings
from mailrelay.errors import (
    ConfigurationError,
    InvalidAddress,
    MailrelayError,
    RegistryError,
    RegistryUnavailable,
    SpoolError,
)
from mailrelay.model import EntryState, MailingList, Member, SpoolEntry
from mailrelay.postfix import (
    PostfixMapError,
    check_nexthop,
    domains_map,
    list_addresses,
    lmtp_nexthop,
    relay_domains,
    transport_map,
)
from mailrelay.registry import MemoryRegistry, SQLiteRegistry
from mailrelay.spool import MemorySpool, SQLiteSpool

__all__ = [
    "CONFIG_ENVIRONMENT_VARIABLE",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

CONFIG_ENVIRONMENT_VARIABLE = "MAILRELAY_CONFIG"

EXIT_OK = 0
EXIT_FAILURE = 1  # the command failed: unknown list, bad address, duplicate, storage error
EXIT_USAGE = 2  # bad command line (argparse's own convention)
EXIT_CONFIG = 3  # the configuration file is missing or wrong
_EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# A large import on a terminal shows a progress bar, so it is written in about
# this many batches of one registry transaction each; otherwise in one.
_PROGRESS_THRESHOLD = 1000
_IMPORT_BATCHES = 10

_MAX_REPORTED = 20  # problems listed one by one before "... and N more"
_DEFAULT_QUEUE_LIMIT = 100
_DISABLED_MARK = "(delivery disabled)"
# Keys of Settings never printed; the values are replaced by a note.
_SECRET_KEYS = frozenset({"smtp_pass"})


class CommandError(MailrelayError):
    """A command cannot do what was asked; the message is shown without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


class _Exit(Exception):
    """Raised by the argument parser instead of calling ``sys.exit``."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# -- the thread bridge for SQLiteSpool ----------------------------------------


class _ThreadBridge:
    """The two reactor methods :class:`SQLiteSpool` uses, for one short command.

    Not ``task.react``: it runs the global reactor, which can run once per
    process and then calls ``sys.exit``, so ``main`` could not be called twice
    in one process (tests, embedders).  Here the spool's writer thread queues
    its results and :meth:`wait` runs them in the calling thread.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict]] = queue.SimpleQueue()

    def seconds(self) -> float:
        return time.time()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:  # noqa: N802
        self._calls.put((f, args, kwargs))

    def wait(self, result: Any) -> Any:
        """The result of ``result`` if it is a Deferred (raising its failure), else itself."""
        if not isinstance(result, Deferred):
            return result
        outcome: list[Any] = []
        result.addBoth(outcome.append)
        while not outcome:
            f, args, kwargs = self._calls.get()
            f(*args, **kwargs)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]


# -- the command context -------------------------------------------------------


class _Context:
    """What a command needs: its streams, the parsed arguments and the storage."""

    def __init__(
        self,
        args: argparse.Namespace,
        stdout: IO[str],
        stderr: IO[str],
        stdin: IO[Any],
        environ: dict[str, str] | Any,
    ):
        self.args = args
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin
        self.environ = environ
        self._settings: Settings | None = None

    def out(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def err(self, text: str) -> None:
        self.stderr.write(f"mailrelay: {text}\n")

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            path = getattr(self.args, "config", None)
            from_environment = False
            if not path:
                path = self.environ.get(CONFIG_ENVIRONMENT_VARIABLE) or None
                from_environment = path is not None
            try:
                self._settings = load_settings(path, environ=self.environ)
            except ConfigurationError as e:
                if from_environment:
                    raise ConfigurationError(
                        f"{e} (file named by the {CONFIG_ENVIRONMENT_VARIABLE} "
                        f"environment variable)"
                    ) from None
                raise
        return self._settings

    def _note_defaults(self) -> None:
        # A relative default var_dir depends on the current directory: an
        # operator running the CLI elsewhere than the daemon sees other data.
        if self.settings.source is None:
            self.err(
                f"note: no configuration file (-C FILE or {CONFIG_ENVIRONMENT_VARIABLE}); "
                f"using the built-in defaults, var_dir = {self.settings.paths.var_dir}"
            )

    @contextmanager
    def registry(self, *, create: bool) -> Iterator[SQLiteRegistry | MemoryRegistry]:
        """The list registry; without ``create``, an empty one if there is no file yet."""
        self._note_defaults()
        path = self.settings.paths.registry_path
        if not create and not os.path.exists(path):
            self.err(f"note: no list registry at {path} yet (no list was ever created)")
            registry: SQLiteRegistry | MemoryRegistry = MemoryRegistry()
        else:
            registry = SQLiteRegistry(path)
        try:
            yield registry
        finally:
            registry.close()

    @contextmanager
    def spool(self) -> Iterator[tuple[SQLiteSpool | MemorySpool, _ThreadBridge]]:
        """The spool and the bridge that waits for its Deferreds; closed on exit."""
        self._note_defaults()
        path = self.settings.paths.spool_path
        bridge = _ThreadBridge()
        if not os.path.exists(path):
            self.err(f"note: no spool at {path} yet (no message was ever received)")
            spool: SQLiteSpool | MemorySpool = MemorySpool(bridge)
        else:
            spool = SQLiteSpool(path, bridge)
        try:
            yield spool, bridge
        finally:
            bridge.wait(spool.close())

    def confirm(self, action: str) -> None:
        """Ask before doing ``action`` ("delete list x"); without a terminal, ``--yes``
        is required.  Raises :class:`CommandError` unless confirmed."""
        if self.args.yes:
            return
        isatty = getattr(self.stdin, "isatty", None)
        if not (isatty and isatty()):
            raise CommandError(f"not confirmed: {action} (add --yes to confirm without a terminal)")
        self.stderr.write(f"{action[:1].upper()}{action[1:]}? [y/N] ")
        self.stderr.flush()
        answer = self.stdin.readline()
        if answer.strip().lower() not in ("y", "yes"):
            raise CommandError("cancelled; nothing changed")


def _require_list(registry: SQLiteRegistry | MemoryRegistry, address: str) -> MailingList:
    mailing_list = registry.get_list(address)
    if mailing_list is None:
        raise CommandError(f"no such list: {address} (see `mailrelay lists list`)")
    return mailing_list


def _report(ctx: _Context, items: Sequence[str], describe: Callable[[str], str]) -> None:
    for item in items[:_MAX_REPORTED]:
        ctx.err(describe(item))
    if len(items) > _MAX_REPORTED:
        ctx.err(f"... and {len(items) - _MAX_REPORTED} more")


def _plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else words or word + 's'}"


# -- lists -------------------------------------------------------------------


def _lists_create(ctx: _Context) -> int:
    args = ctx.args
    with ctx.registry(create=True) as registry:
        # Warn when the new list and another one claim the same address:
        # RCPT resolution gives it to the list of that name.
        shadowed = registry.resolve(args.address)
        created = registry.create_list(args.address, args.display_name, args.owners)
        if shadowed is not None and shadowed.subaddress is not None:
            ctx.err(
                f"warning: {created.posting_address} was the {shadowed.subaddress} address "
                f"of {shadowed.list_address}; mail to it now goes to the new list"
            )
        for address in list_addresses(created.posting_address)[1:]:
            if registry.get_list(address) is not None:
                ctx.err(
                    f"warning: {address} is the list {address}, so it is not "
                    f"{created.posting_address}'s sub-address"
                )
    ctx.out(f"Created list {created.posting_address}.")
    ctx.err(
        "note: regenerate the Postfix maps (`mailrelay postfix-maps`) so that Postfix "
        "routes its addresses to mailrelay"
    )
    return EXIT_OK


def _lists_list(ctx: _Context) -> int:
    with ctx.registry(create=False) as registry:
        rows = [
            (
                mailing_list.posting_address,
                _plural(len(registry.members(mailing_list.posting_address)), "member"),
                mailing_list.display_name,
            )
            for mailing_list in registry.lists()
        ]
    width = max((len(address) for address, _, _ in rows), default=0)
    count_width = max((len(count) for _, count, _ in rows), default=0)
    for address, count, name in rows:
        ctx.out(f"{address:<{width}}  {count:>{count_width}}  {name}".rstrip())
    return EXIT_OK


def _lists_show(ctx: _Context) -> int:
    with ctx.registry(create=False) as registry:
        mailing_list = _require_list(registry, ctx.args.address)
        members = registry.members(mailing_list.posting_address)
        addresses = []
        for address in list_addresses(mailing_list.posting_address):
            if address != mailing_list.posting_address and registry.get_list(address):
                address += "  (taken by the list of that name)"
            addresses.append(address)
    enabled = sum(member.delivery_enabled for member in members)
    ctx.out(mailing_list.posting_address)
    ctx.out(f"  display name:  {mailing_list.display_name or '(none)'}")
    ctx.out(f"  owners:        {', '.join(mailing_list.owners) or '(none)'}")
    ctx.out(f"  members:       {len(members):,} ({enabled:,} with delivery enabled)")
    ctx.out(f"  addresses:     {addresses[0]}  (posts)")
    for address in addresses[1:]:
        ctx.out(f"                 {address}")
    return EXIT_OK


def _lists_delete(ctx: _Context) -> int:
    with ctx.registry(create=False) as registry:
        mailing_list = _require_list(registry, ctx.args.address)
        address = mailing_list.posting_address
        count = len(registry.members(address))
        ctx.confirm(f"delete list {address} and its {_plural(count, 'member')}")
        registry.delete_list(address)
    ctx.out(f"Deleted list {address} and its {_plural(count, 'member')}.")
    ctx.err("note: regenerate the Postfix maps (`mailrelay postfix-maps`)")
    return EXIT_OK


# -- members -----------------------------------------------------------------


def _parse_member(line: str) -> Member | None:
    """A member from ``addr``, ``addr Name`` or ``Name <addr>``; ``None`` for blanks and
    ``#`` comments.  A trailing ``(delivery disabled)``, as ``members list`` prints it,
    adds the member with delivery disabled.  Raises ``ValueError`` with a reason."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    enabled = not line.endswith(_DISABLED_MARK)
    if not enabled:
        line = line.removesuffix(_DISABLED_MARK).rstrip()
    if line.endswith(">"):
        name, address = email.utils.parseaddr(line)
        if not address:
            raise ValueError(f"cannot read {line!r} as 'Display Name <address>'")
    else:
        address, *rest = line.split(None, 1)
        name = rest[0] if rest else ""
    try:
        address = check_mailbox(address)
    except InvalidAddress as e:
        raise ValueError(str(e)) from None
    return Member(address.lower(), name.strip(), enabled)


def _open_input(ctx: _Context, name: str) -> Iterator[bytes | str]:
    if name == "-":
        yield from getattr(ctx.stdin, "buffer", ctx.stdin)
        return
    try:
        with open(name, "rb") as f:
            yield from f
    except OSError as e:
        raise CommandError(f"cannot read {name}: {e.strerror or e}") from None


def _read_members(ctx: _Context, name: str) -> Iterator[tuple[str, str]]:
    """(where, text) of each line of file ``name`` (``-``: standard input)."""
    label = "standard input" if name == "-" else name
    for number, line in enumerate(_open_input(ctx, name), start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise CommandError(f"{label}, line {number}: not UTF-8 text") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte order mark from Windows editors
        yield f"{label}, line {number}", line


def _collect_members(ctx: _Context, registry: Any) -> list[Member]:
    """The members named on the command line and in ``--file``; all checked first, so
    that a bad line adds nothing (fix the file and run the same command again)."""
    sources: list[tuple[str, str]] = [(f"argument {text!r}", text) for text in ctx.args.addresses]
    members: list[Member] = []
    problems: list[str] = []
    # Asking the registry about every address costs a query each; a member
    # outside the lists' domains cannot be a list address anyway.
    lists = registry.lists()
    postings = {mailing_list.posting_address for mailing_list in lists}
    domains = {mailing_list.domain for mailing_list in lists}

    def check(where: str, text: str) -> None:
        try:
            member = _parse_member(text)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            return
        if member is None:
            return
        destination = (
            resolve_recipient(member.address, postings.__contains__)
            if member.address.rpartition("@")[2] in domains
            else None
        )
        if destination is not None:
            problems.append(
                f"{where}: {member.address} is an address of the list "
                f"{destination.list_address}; subscribing it would loop mail"
            )
            return
        members.append(member)

    for where, text in sources:
        check(where, text)
    if ctx.args.file is not None:
        for where, text in _read_members(ctx, ctx.args.file):
            check(where, text)
    if problems:
        _report(ctx, problems, str)
        raise CommandError(
            f"{_plural(len(problems), 'invalid line')}; no member was added"
            if ctx.args.file is not None
            else "no member was added"
        )
    return members


class _Progress:
    """A one-line progress bar on a terminal (the standard library has none)."""

    def __init__(self, stream: IO[str], total: int, label: str, enabled: bool):
        self._stream = stream
        self._total = total
        self._label = label
        self._enabled = enabled

    def update(self, done: int) -> None:
        if not self._enabled:
            return
        fraction = done / self._total if self._total else 1.0
        filled = int(fraction * 30)
        self._stream.write(
            f"\r{self._label} [{'#' * filled}{'.' * (30 - filled)}] "
            f"{done:,}/{self._total:,} {fraction:4.0%}"
        )
        self._stream.flush()

    def finish(self) -> None:
        if self._enabled:
            self._stream.write("\n")
            self._stream.flush()


def _members_add(ctx: _Context) -> int:
    args = ctx.args
    if not args.addresses and args.file is None:
        raise CommandError(
            "give the addresses to add, or --file FILE (- for standard input)", EXIT_USAGE
        )
    with ctx.registry(create=False) as registry:
        list_address = _require_list(registry, args.list).posting_address
        members = _collect_members(ctx, registry)
        total = len(members)
        isatty = getattr(ctx.stderr, "isatty", None)
        show_progress = total > _PROGRESS_THRESHOLD and bool(isatty and isatty())
        progress = _Progress(ctx.stderr, total, f"Adding to {list_address}", show_progress)
        batch_size = math.ceil(total / _IMPORT_BATCHES) if show_progress else max(total, 1)
        duplicates: list[str] = []
        done = 0
        progress.update(0)
        try:
            for start in range(0, total, batch_size):
                batch = members[start : start + batch_size]
                duplicates.extend(registry.add_members(list_address, batch))
                done += len(batch)
                progress.update(done)
        except MailrelayError as e:
            progress.finish()
            added = done - len(duplicates)
            raise CommandError(f"{e} (added {added:,} of {total:,} before the error)") from None
        progress.finish()
    added = total - len(duplicates)
    ctx.out(f"Added {_plural(added, 'member')} to {list_address}.")
    if duplicates:
        _report(
            ctx,
            duplicates,
            lambda address: f"already a member of {list_address} (left as it was): {address}",
        )
        return EXIT_FAILURE
    return EXIT_OK


def _members_remove(ctx: _Context) -> int:
    args = ctx.args
    if not args.addresses and args.file is None:
        raise CommandError(
            "give the addresses to remove, or --file FILE (- for standard input)", EXIT_USAGE
        )
    addresses = list(args.addresses)
    if args.file is not None:
        for where, text in _read_members(ctx, args.file):
            try:
                member = _parse_member(text)
            except ValueError as e:
                raise CommandError(f"{where}: {e}; no member was removed") from None
            if member is not None:
                addresses.append(member.address)
    with ctx.registry(create=False) as registry:
        list_address = _require_list(registry, args.list).posting_address
        missing = registry.remove_members(list_address, addresses)
    ctx.out(f"Removed {_plural(len(addresses) - len(missing), 'member')} from {list_address}.")
    if missing:
        _report(ctx, missing, lambda address: f"not a member of {list_address}: {address}")
        return EXIT_FAILURE
    return EXIT_OK


def _members_list(ctx: _Context) -> int:
    with ctx.registry(create=False) as registry:
        list_address = _require_list(registry, ctx.args.list).posting_address
        members = registry.members(list_address, enabled_only=ctx.args.enabled_only)
    width = max((len(member.address) for member in members), default=0)
    lines = []
    for member in members:
        cells = [member.address.ljust(width)]
        if member.display_name:
            cells.append(member.display_name)
        if not member.delivery_enabled:
            cells.append(_DISABLED_MARK)
        lines.append("  ".join(cells).rstrip())
    # One write: a 100,000-member list prints in a blink.
    if lines:
        ctx.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


# -- queue -------------------------------------------------------------------


def _format_time(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    when = datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    delta = timestamp - now
    if abs(delta) < 1:
        return f"{when} (now)"
    distance = _rough_duration(abs(delta))
    return f"{when} (in {distance})" if delta > 0 else f"{when} ({distance} ago)"


_UNITS = (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def _exact_duration(seconds: float) -> str:
    """``5d``, ``90m``, ``0.5s``: the largest unit that divides ``seconds`` evenly,
    as the configuration file accepts it."""
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds}s"


def _rough_duration(seconds: float) -> str:
    """``2h``, ``5m``: ``seconds`` in the largest unit it reaches, rounded."""
    seconds = round(seconds)
    for unit, size in _UNITS:
        if seconds >= size:
            return f"{round(seconds / size)}{unit}"
    return "0s"


_STATE_ORDER = [state for state in EntryState if state is not EntryState.DONE]


def _kind(entry: SpoolEntry) -> str:
    """What an entry is: ``post`` or ``-bounces`` (etc.) as received over LMTP, or
    ``member``/``owner`` for one recipient's copy made by the delivery runner."""
    # getattr: spools written before entry kinds existed have none.
    kind = getattr(getattr(entry, "kind", None), "value", "inbound")
    if kind != "inbound":
        return kind
    subaddress = entry.destination.subaddress
    return "post" if subaddress is None else f"-{subaddress}"


def _find_entries(spool: Any, entry_ids: Iterable[int]) -> dict[int, SpoolEntry]:
    """The spool entries with these ids (ISpool has no lookup by id: scan by state,
    leaving DONE, the bulk of a busy spool, for last)."""
    wanted = set(entry_ids)
    found: dict[int, SpoolEntry] = {}
    for state in [*_STATE_ORDER, EntryState.DONE]:
        if not wanted - found.keys():
            break
        found.update(
            (entry.entry_id, entry) for entry in spool.entries(state) if entry.entry_id in wanted
        )
    return found


def _queue_show(ctx: _Context) -> int:
    args = ctx.args
    limit = args.limit
    with ctx.spool() as (spool, bridge):
        get_status = getattr(spool, "get_status", None)
        circuit = bridge.wait(get_status("circuit")) if callable(get_status) else None
        counts = spool.counts()
        if args.state == "all":
            states = list(EntryState)
        elif args.state is None:
            states = _STATE_ORDER
        else:
            states = [EntryState(args.state)]
        entries: list[SpoolEntry] = []
        for state in states:
            entries.extend(spool.entries(state, limit))
    if circuit:
        ctx.out(f"DELIVERY PAUSED: {circuit}")
        ctx.out()
    ctx.out(
        "  ".join(f"{state.value}: {counts.get(state, 0):,}" for state in EntryState)
        + f"  (total {sum(counts.values()):,})"
    )
    entries.sort(key=lambda entry: entry.entry_id)
    shown = entries[:limit]
    matching = sum(counts.get(state, 0) for state in states)
    if not shown:
        return EXIT_OK
    now = time.time()
    rows = [("ID", "STATE", "KIND", "LIST", "RECIPIENT", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR")]
    rows.extend(
        (
            str(entry.entry_id),
            entry.state.value,
            _kind(entry),
            entry.destination.list_address,
            entry.destination.address,
            str(entry.attempts),
            _format_time(entry.next_attempt_at, now),
            # A multi-line SMTP reply stays on its row.
            " ".join(entry.last_error.split()) or "-",
        )
        for entry in shown
    )
    # Pad every column but the last (the error, which may be long).
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    ctx.out()
    for *cells, last in rows:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        ctx.out("  ".join([*padded, last]))
    if matching > len(shown):
        what = "" if args.state is None else f" {args.state}"
        ctx.err(f"showing {len(shown):,} of {matching:,}{what} entries (see --limit, --state)")
    return EXIT_OK


def _queue_retry(ctx: _Context) -> int:
    args = ctx.args
    if bool(args.ids) == args.all:
        raise CommandError("give the entry ids to retry, or --all (not both)", EXIT_USAGE)
    retryable = (EntryState.RETRY, EntryState.FAILED)
    problems: list[str] = []
    with ctx.spool() as (spool, bridge):
        if args.all:
            count = bridge.wait(spool.retry_now(None))
        else:
            found = _find_entries(spool, args.ids)
            eligible = []
            for entry_id in dict.fromkeys(args.ids):
                entry = found.get(entry_id)
                if entry is None:
                    problems.append(f"no entry {entry_id} in the queue")
                elif entry.state not in retryable:
                    problems.append(
                        f"entry {entry_id} is {entry.state.value}: only retry and failed "
                        f"entries can be retried"
                    )
                else:
                    eligible.append(entry_id)
            count = bridge.wait(spool.retry_now(eligible)) if eligible else 0
    ctx.out(f"Queued {_plural(count, 'entry', 'entries')} for delivery again.")
    _report(ctx, problems, str)
    return EXIT_FAILURE if problems else EXIT_OK


def _queue_delete(ctx: _Context) -> int:
    args = ctx.args
    problems: list[str] = []
    with ctx.spool() as (spool, bridge):
        found = _find_entries(spool, args.ids)
        chosen = []
        for entry_id in dict.fromkeys(args.ids):
            entry = found.get(entry_id)
            if entry is None:
                problems.append(f"no entry {entry_id} in the queue")
            else:
                chosen.append(entry)
        _report(ctx, problems, str)
        if not chosen:
            raise CommandError("nothing deleted")
        for entry in chosen:
            if entry.state is EntryState.INFLIGHT:
                ctx.err(
                    f"warning: entry {entry.entry_id} is being delivered right now; "
                    f"deleting it does not stop that delivery"
                )
        what = ", ".join(
            f"{entry.entry_id} ({entry.state.value}, {entry.destination.address})"
            for entry in chosen[:5]
        )
        if len(chosen) > 5:
            what += f" and {len(chosen) - 5} more"
        ctx.confirm(f"delete queue {'entry' if len(chosen) == 1 else 'entries'} {what}")
        count = bridge.wait(spool.delete([entry.entry_id for entry in chosen]))
    ctx.out(f"Deleted {_plural(count, 'entry', 'entries')}.")
    return EXIT_FAILURE if problems else EXIT_OK


# -- check-config ------------------------------------------------------------


def _format_setting(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # Every float setting is a duration in seconds.
        return _exact_duration(value)
    return str(value)


def _check_config(ctx: _Context) -> int:
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
            else:
                ctx.out(f"{key.name} = {_format_setting(value)}".rstrip())
    ctx.err(f"configuration OK ({settings.source or 'built-in defaults'})")
    return EXIT_OK


# -- postfix-maps --------------------------------------------------------------


def _write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that Postfix or postmap never read half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
                # mkstemp makes it 0600; Postfix's postmap and daemons must read it.
                os.fchmod(f.fileno(), 0o644)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None


def _postfix_maps(ctx: _Context) -> int:
    args = ctx.args
    nexthop = ""
    if args.nexthop is not None:
        nexthop = check_nexthop(args.nexthop)
    elif not args.domains:
        nexthop = lmtp_nexthop(ctx.settings.mta.lmtp_endpoint)
    with ctx.registry(create=False) as registry:
        addresses = [mailing_list.posting_address for mailing_list in registry.lists()]
    text = domains_map(addresses) if args.domains else transport_map(addresses, nexthop)
    if not addresses:
        ctx.err("warning: there are no lists yet: the map is empty")
    if args.output:
        _write_atomically(args.output, text)
        what = "relay domains" if args.domains else "transport map"
        ctx.err(
            f"wrote the {what} for {_plural(len(addresses), 'list')} to {args.output}; "
            f"now run: postmap {args.output}"
        )
    else:
        ctx.stdout.write(text)
    if not args.domains:
        if nexthop.startswith("lmtp:unix:"):
            ctx.err(
                "note: a chrooted Postfix lmtp client (chroot = y in master.cf) resolves "
                "the socket path inside its queue directory"
            )
        domains = relay_domains(addresses)
        if domains:
            ctx.err(
                f"Postfix must relay for: {' '.join(domains)} "
                f"(relay_domains; `mailrelay postfix-maps --domains` writes that map)"
            )
    return EXIT_OK


# -- the parser ----------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
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
        raise _Exit(status)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        parser.streams[0].write(f"mailrelay {__version__}\n")
        parser.exit()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


_MAIN_DESCRIPTION = f"""\
Administer mailrelay: mailing lists and their members, the delivery queue, the
configuration and the Postfix maps.  Changes take effect in a running daemon
at once, without a restart.

exit status: 0 success, 1 the command failed (unknown list, invalid address,
duplicate, storage problem), 2 bad command line, 3 configuration error.

The configuration file is -C FILE, else ${CONFIG_ENVIRONMENT_VARIABLE}, else none
(the built-in defaults: see `mailrelay check-config --defaults`)."""

_MEMBERS_FILE_HELP = """\
one member per line: 'address', 'address Display Name' or
'Display Name <address>'; blank lines and lines starting with # are
ignored; '-' reads standard input"""


def _build_parser(stdout: IO[str], stderr: IO[str]) -> _ArgumentParser:
    parser_class = functools.partial(_ArgumentParser, streams=(stdout, stderr))
    config = _ArgumentParser(add_help=False, streams=(stdout, stderr))
    config.add_argument(
        "-C",
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"configuration file (default: ${CONFIG_ENVIRONMENT_VARIABLE}, else the "
        f"built-in defaults)",
    )
    parser = parser_class(prog="mailrelay", description=_MAIN_DESCRIPTION, parents=[config])
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )

    def add(
        group: Any,
        name: str,
        handler: Callable[[_Context], int] | None,
        summary: str,
        description: str | None = None,
        epilog: str | None = None,
    ) -> _ArgumentParser:
        sub = group.add_parser(
            name, help=summary, description=description or summary, epilog=epilog, parents=[config]
        )
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    # lists
    lists = add(commands, "lists", None, "create, show and delete mailing lists")
    lists_commands = lists.add_subparsers(
        title="commands", dest="lists_command", metavar="COMMAND", required=True
    )
    create = add(
        lists_commands,
        "create",
        _lists_create,
        "create a mailing list",
        epilog="example:\n  mailrelay lists create test@example.com "
        "--display-name 'Test list' --owner anne@example.org",
    )
    create.add_argument("address", metavar="ADDRESS", help="the list's posting address")
    create.add_argument(
        "--display-name", metavar="NAME", default="", help="the list's name as people read it"
    )
    create.add_argument(
        "--owner",
        dest="owners",
        metavar="ADDR",
        action="append",
        default=[],
        help="an owner, who gets mail sent to LIST-owner (repeat for several)",
    )
    add(
        lists_commands,
        "list",
        _lists_list,
        "list every mailing list with its member count and display name",
    )
    show = add(
        lists_commands,
        "show",
        _lists_show,
        "show a list: display name, owners, member count and all its addresses",
    )
    show.add_argument("address", metavar="ADDRESS", help="the list's posting address")
    delete = add(lists_commands, "delete", _lists_delete, "delete a list and all its members")
    delete.add_argument("address", metavar="ADDRESS", help="the list's posting address")
    delete.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation (required without a terminal)",
    )

    # members
    members = add(commands, "members", None, "add, remove and list the members of a list")
    members_commands = members.add_subparsers(
        title="commands", dest="members_command", metavar="COMMAND", required=True
    )
    members_add = add(
        members_commands,
        "add",
        _members_add,
        "subscribe addresses to a list",
        description="Subscribe addresses to a list.  Addresses that are already members "
        "are reported and left as they were (exit status 1); an invalid "
        "address adds nothing.",
        epilog="examples:\n"
        "  mailrelay members add test@example.com anne@example.org "
        "'Bart Simpson <bart@example.org>'\n"
        "  mailrelay members add test@example.com --file members.txt\n"
        "  mailrelay members list old@example.com | "
        "mailrelay members add new@example.com --file -",
    )
    members_add.add_argument("list", metavar="LIST", help="the list's posting address")
    members_add.add_argument(
        "addresses", metavar="ADDR", nargs="*", help="'address' or 'Display Name <address>'"
    )
    members_add.add_argument("-f", "--file", metavar="FILE", help=_MEMBERS_FILE_HELP)
    members_remove = add(
        members_commands, "remove", _members_remove, "unsubscribe addresses from a list"
    )
    members_remove.add_argument("list", metavar="LIST", help="the list's posting address")
    members_remove.add_argument("addresses", metavar="ADDR", nargs="*", help="a member's address")
    members_remove.add_argument(
        "-f", "--file", metavar="FILE", help="addresses to remove, in the format of `members add`"
    )
    members_list = add(
        members_commands,
        "list",
        _members_list,
        "print a list's members, one per line: address, display name",
        description="Print a list's members sorted by address, one per line: the address, "
        f"then the display name, then {_DISABLED_MARK} for a member who "
        "gets no mail.  `members add --file` reads this format back.",
    )
    members_list.add_argument("list", metavar="LIST", help="the list's posting address")
    members_list.add_argument(
        "--enabled-only", action="store_true", help="only members with delivery enabled"
    )

    # queue
    states = [state.value for state in EntryState]
    queue_parser = add(
        commands,
        "queue",
        _queue_show,
        "show the delivery queue; retry or delete entries",
        description="Show the delivery queue: the number of entries in each state, then "
        "the entries (every state but done, unless --state says otherwise) "
        "with their attempts, next attempt time and last error.  A paused "
        "delivery (the smarthost refused our credentials or TLS) is shown "
        "first.",
        epilog="states: queued (waiting), inflight (being delivered), retry (failed "
        "temporarily;\nwaiting for its next attempt), done, failed (gave up), held "
        "(commands and\nbounces kept for later processing)",
    )
    queue_parser.add_argument(
        "--state", choices=[*states, "all"], help="only entries in this state ('all' includes done)"
    )
    queue_parser.add_argument(
        "--limit",
        type=_positive_int,
        default=_DEFAULT_QUEUE_LIMIT,
        metavar="N",
        help=f"show at most N entries (default {_DEFAULT_QUEUE_LIMIT})",
    )
    queue_commands = queue_parser.add_subparsers(
        title="commands", dest="queue_command", metavar="COMMAND"
    )
    retry = add(queue_commands, "retry", _queue_retry, "deliver retry and failed entries again now")
    retry.add_argument(
        "ids",
        metavar="ID",
        nargs="*",
        type=_positive_int,
        help="entry id, as `mailrelay queue` shows it",
    )
    retry.add_argument("--all", action="store_true", help="every retry and failed entry")
    queue_delete = add(
        queue_commands,
        "delete",
        _queue_delete,
        "delete entries from the queue (their mail is never delivered)",
    )
    queue_delete.add_argument(
        "ids",
        metavar="ID",
        nargs="+",
        type=_positive_int,
        help="entry id, as `mailrelay queue` shows it",
    )
    queue_delete.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation (required without a terminal)",
    )

    # check-config
    check = add(
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

    # postfix-maps
    maps = add(
        commands,
        "postfix-maps",
        _postfix_maps,
        "print the Postfix transport map routing every list address to mailrelay",
        description="Print the Postfix transport(5) map that sends every list's posting "
        "address and its sub-addresses (bounces confirm join leave owner "
        "request subscribe unsubscribe) to mailrelay's LMTP server, or, with "
        "--domains, the map of the lists' domains for relay_domains.",
        epilog="example (then set transport_maps = hash:/etc/postfix/mailrelay_transport "
        "and\nrelay_domains = hash:/etc/postfix/mailrelay_domains in main.cf):\n"
        "  mailrelay postfix-maps -o /etc/postfix/mailrelay_transport\n"
        "  mailrelay postfix-maps --domains -o /etc/postfix/mailrelay_domains\n"
        "  postmap /etc/postfix/mailrelay_transport /etc/postfix/mailrelay_domains",
    )
    maps.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the map to FILE (atomically) instead of standard output",
    )
    maps.add_argument(
        "--domains", action="store_true", help="the relay_domains map instead of the transport map"
    )
    maps.add_argument(
        "--nexthop",
        metavar="TRANSPORT:NEXTHOP",
        help="where Postfix delivers, e.g. lmtp:[127.0.0.1]:8024 or "
        "lmtp:unix:/run/mailrelay/lmtp.sock (default: derived from the "
        "configured LMTP endpoint)",
    )
    return parser


# -- main --------------------------------------------------------------------


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
    parser = _build_parser(stdout, stderr)
    try:
        args = parser.parse_args(argv)
    except _Exit as e:
        return e.code
    ctx = _Context(args, stdout, stderr, stdin, environ)
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


if __name__ == "__main__":
    sys.exit(main())
