"""Reading the commands in mail sent to a list's ``-request`` address.

This is the first step for ``-request`` mail: bytes in, a frozen
:class:`ParsedCommands` out.  Carrying the commands out (pending
confirmations, membership changes) is the caller's job, which records one
:class:`CommandResult` per command; :mod:`mailrelay.listproc.replies` renders
those into the reply.  Nothing here touches storage or sends mail.

The rules follow Mailman 3's command runner where the issue is silent:

* The Subject is read first, then the first ``text/plain`` part of the body
  (or, for HTML-only mail, the text of the first ``text/html`` part, read with
  :mod:`html.parser`; text inside ``<blockquote>`` counts as quoted).
* One command per line; the first word names it, case-insensitively.
  ``Re:``/``Fwd:``/``AW:``-style prefixes are dropped, blank and quoted
  (``>``) lines are skipped, and a ``-- `` signature line ends the text.
* ``end`` (or ``stop``) stops reading.  So does ``confirm``, as in Mailman:
  a reply to a confirmation request quotes the request, whose text must not
  be taken for more commands.  A ``join`` with a bad argument also stops,
  as in Mailman.
* At most ``max_lines`` (10) command lines are read, the Subject included;
  blank, quoted and signature lines do not count.  Lines not read are kept in
  :attr:`ParsedCommands.unprocessed` so the reply can list them.
* ``join address=ADDR`` asks to subscribe ``ADDR`` (Mailman's option); the
  confirmation request must go to ``ADDR`` itself (:meth:`Command.target`),
  so nobody can subscribe a third party without that party's consent.
  ``digest=no`` is accepted; digests are not offered, so ``digest=mime`` and
  ``digest=plain`` are refused.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from email.message import Message
from html.parser import HTMLParser

from mailrelay.addresses import check_mailbox
from mailrelay.errors import InvalidAddress
from mailrelay.listproc._mail import decoded_header, parse_prefix, part_text

__all__ = [
    "MAX_COMMAND_LINES",
    "Command",
    "CommandKind",
    "CommandResult",
    "Outcome",
    "ParsedCommands",
    "html_to_text",
    "ModerationAction",
    "ModerationDecision",
    "immediate_outcome",
    "parse_commands",
    "parse_moderation",
]

MAX_COMMAND_LINES = 10  # Mailman's email_commands_max_lines
# Commands sit at the top of a message: nothing past these limits is read.
MAX_MESSAGE_BYTES = 256 * 1024
MAX_TEXT_CHARS = 64 * 1024
MAX_PARTS = 100
# A longer line is no command; it is cut before being echoed in the reply.
MAX_LINE_CHARS = 200


class CommandKind(str, enum.Enum):
    """What a command line asks for."""

    JOIN = "join"
    LEAVE = "leave"
    CONFIRM = "confirm"
    HELP = "help"
    END = "end"
    UNKNOWN = "unknown"


_COMMAND_WORDS: dict[str, CommandKind] = {
    "join": CommandKind.JOIN,
    "subscribe": CommandKind.JOIN,
    "leave": CommandKind.LEAVE,
    "unsubscribe": CommandKind.LEAVE,
    "confirm": CommandKind.CONFIRM,
    "help": CommandKind.HELP,
    "end": CommandKind.END,
    "stop": CommandKind.END,  # Mailman's alias of end
}

# Reply and forward markers of common mail clients, possibly repeated and
# numbered ("Re[2]:", "AW: WG:"); dropped from the start of a line.
_PREFIX = re.compile(
    r"^(?:\s*(?:re|fw|fwd|aw|wg|sv|vs|antw|tr|rif|r|ref|odp|enc|res)\s*(?:\[\d+\]|\(\d+\))?\s*:)+",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Command:
    """One command line as read.

    ``line`` is the line as written (prefixes dropped, cut to 200 characters),
    for echoing in the reply; ``word`` the command word, lower-cased.
    ``address`` is the ``join address=`` option (lower-cased), ``token`` the
    argument of ``confirm`` (lower-cased, ``None`` when missing).  ``error``
    says why the command cannot be carried out as written; it is "" when it
    can.  ``source`` is ``"subject"`` or ``"body"``.
    """

    line: str
    kind: CommandKind
    word: str
    arguments: tuple[str, ...] = ()
    address: str | None = None
    token: str | None = None
    error: str = ""
    source: str = "body"

    def target(self, requester: str) -> str:
        """The address a ``join``/``leave`` is about, and so the only address
        its confirmation request may be sent to: the ``address=`` option if
        given, else the requester."""
        return self.address or requester


@dataclass(frozen=True)
class ParsedCommands:
    """The commands of one ``-request`` message, in the order read.

    ``unprocessed`` holds the command lines left unread (after ``end``,
    ``confirm``, a bad ``join`` or the line limit), at most ``max_lines`` of
    them.  ``from_html`` is true when the text came from an HTML part;
    ``other_parts`` when the message had parts that were not read (Mailman's
    "Ignoring non-text/plain MIME parts").
    """

    commands: tuple[Command, ...]
    unprocessed: tuple[str, ...] = ()
    from_html: bool = False
    other_parts: bool = False


class Outcome(str, enum.Enum):
    """What carrying out a command did, as the reply reports it.

    The texts are chosen so no outcome reveals membership: a ``leave`` is
    always reported as CONFIRMATION_SENT, whether or not the address is a
    member (the caller sends the request only to members), and every bad,
    expired, used or other-list token is TOKEN_REJECTED.
    """

    CONFIRMATION_SENT = "confirmation-sent"
    CONFIRMED = "confirmed"
    TOKEN_REJECTED = "token-rejected"
    HELP = "help"
    END = "end"
    UNKNOWN_COMMAND = "unknown-command"
    INVALID = "invalid"


@dataclass(frozen=True)
class CommandResult:
    """One command and what came of it; ``address`` is who a confirmation
    request was sent to (for CONFIRMATION_SENT)."""

    command: Command
    outcome: Outcome
    address: str = ""


def immediate_outcome(command: Command) -> Outcome | None:
    """The outcome of a command that needs no storage (help, end, unknown,
    invalid), or ``None`` for a join, leave or confirm to be carried out."""
    if command.error:
        return Outcome.INVALID
    return {
        CommandKind.HELP: Outcome.HELP,
        CommandKind.END: Outcome.END,
        CommandKind.UNKNOWN: Outcome.UNKNOWN_COMMAND,
    }.get(command.kind)


def parse_commands(message: bytes, max_lines: int = MAX_COMMAND_LINES) -> ParsedCommands:
    """Read the commands of a ``-request`` message given as raw bytes.

    Never raises on malformed mail: what cannot be decoded is read as
    replacement characters, and a message without text yields no commands.
    """
    msg = parse_prefix(message, MAX_MESSAGE_BYTES)
    body_lines, from_html, other_parts = _body_lines(msg)
    sources = [("subject", decoded_header(msg, "subject"))]
    sources.extend(("body", line) for line in body_lines)

    commands: list[Command] = []
    unprocessed: list[str] = []
    stopped = False
    for source, raw in sources:
        line = _command_text(raw)
        if line is None:
            if source == "body":
                break  # signature: the rest is not commands
            continue
        if not line:
            continue
        if stopped or len(commands) >= max_lines:
            if len(unprocessed) < max_lines:
                unprocessed.append(line)
            continue
        command = _parse_line(line, source)
        commands.append(command)
        stopped = command.kind in (CommandKind.END, CommandKind.CONFIRM) or bool(command.error)
    return ParsedCommands(tuple(commands), tuple(unprocessed), from_html, other_parts)


class ModerationAction(str, enum.Enum):
    """What an owner's reply to a held-post notice asks for."""

    APPROVE = "approve"
    REJECT = "reject"
    DISCARD = "discard"


@dataclass(frozen=True)
class ModerationDecision:
    """An owner's decision on a held post; ``reason`` only for REJECT ("" if none given)."""

    action: ModerationAction
    reason: str = ""


def parse_moderation(
    message: bytes, max_lines: int = MAX_COMMAND_LINES
) -> ModerationDecision | None:
    """The decision in an owner's reply to a held-post notice, or ``None``.

    The lines are read as for :func:`parse_commands` (Subject first, quoted
    and signature lines skipped, at most ``max_lines``); the first whose
    first word is ``approve``, ``reject`` or ``discard`` decides, and the rest
    of a ``reject`` line is the reason sent to the poster.  Other lines (the
    ``Re: ...`` subject of the reply) are passed over.  Never raises.
    """
    msg = parse_prefix(message, MAX_MESSAGE_BYTES)
    body_lines, _from_html, _other = _body_lines(msg)
    read = 0
    for source, raw in [("subject", decoded_header(msg, "subject"))] + [
        ("body", line) for line in body_lines
    ]:
        line = _command_text(raw)
        if line is None and source == "body":
            break
        if not line:
            continue
        read += 1
        if read > max_lines:
            break
        word, *rest = line.split(None, 1)
        try:
            action = ModerationAction(word.lower())
        except ValueError:
            continue
        reason = rest[0].strip() if rest and action is ModerationAction.REJECT else ""
        return ModerationDecision(action, reason)
    return None


def _command_text(raw: str) -> str | None:
    """The command text of a line: "" for a line to skip (blank or quoted),
    ``None`` for a signature separator."""
    if raw.rstrip("\r\n") == "-- " or raw.strip() == "--":
        return None
    line = raw.strip()
    if line.startswith(">"):
        return ""
    line = _PREFIX.sub("", line).strip()
    if len(line) > MAX_LINE_CHARS:
        line = line[:MAX_LINE_CHARS] + "..."
    return line


def _parse_line(line: str, source: str) -> Command:
    word, *arguments = line.split()
    word = word.lower()
    kind = _COMMAND_WORDS.get(word, CommandKind.UNKNOWN)
    base = Command(line=line, kind=kind, word=word, arguments=tuple(arguments), source=source)
    if kind is CommandKind.CONFIRM:
        token = arguments[0].lower() if arguments else None
        error = "" if token else "confirm needs the token from the confirmation request"
        return replace(base, token=token, error=error)
    if kind is CommandKind.JOIN:
        address, error = _join_options(arguments)
        return replace(base, address=address, error=error)
    return base


def _join_options(arguments: list[str]) -> tuple[str | None, str]:
    """``(address, error)`` from ``join``'s ``key=value`` options (Mailman's
    ``address=`` and ``digest=``)."""
    address = None
    digest = None
    for argument in arguments:
        key, equals, value = argument.partition("=")
        key = key.lower()
        if not equals or key not in ("address", "digest") or not value:
            return None, f"bad argument: {argument}"
        if (key == "address" and address is not None) or (key == "digest" and digest is not None):
            return None, f"duplicate argument: {argument}"
        if key == "digest":
            digest = value.lower()
            if digest != "no":
                return None, f"digest delivery is not offered: {argument}"
            continue
        try:
            address = check_mailbox(value.strip("<>")).lower()
        except InvalidAddress as e:
            return None, f"bad address: {value} ({e.reason})"
    return address, ""


# -- the body -----------------------------------------------------------------


def _body_lines(msg: Message) -> tuple[list[str], bool, bool]:
    """The lines of the first text/plain part (else the first text/html part's
    text), whether that was HTML, and whether other parts were left unread."""
    leaves = _leaf_parts(msg)
    plain = next((p for p in leaves if p.get_content_type() == "text/plain"), None)
    chosen, from_html = plain, False
    if chosen is None:
        chosen = next((p for p in leaves if p.get_content_type() == "text/html"), None)
        from_html = chosen is not None
    other_parts = len(leaves) > 1 or (chosen is None and bool(leaves))
    if chosen is None:
        return [], False, other_parts
    text = part_text(chosen, MAX_TEXT_CHARS)
    if from_html:
        text = html_to_text(text)
    return text.splitlines(), from_html, other_parts


def _leaf_parts(msg: Message) -> list[Message]:
    """Non-attachment leaf parts in order, without descending into attached
    messages (a forwarded message is not the sender's commands)."""
    leaves: list[Message] = []
    stack = [msg]
    seen = 0
    while stack and seen < MAX_PARTS:
        part = stack.pop(0)
        seen += 1
        if part.is_multipart():
            payload = part.get_payload()
            if part.get_content_maintype() == "multipart" and isinstance(payload, list):
                stack[0:0] = payload
            continue
        try:
            disposition = part.get_content_disposition()
        except Exception:
            disposition = None
        if disposition != "attachment" and part.get_content_maintype() == "text":
            leaves.append(part)
    return leaves


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML document, one line per block element;
    ``<blockquote>`` content (a quoted message) and non-content elements are
    left out."""

    _BLOCKS = frozenset(
        "address article aside br dd div dl dt footer form h1 h2 h3 h4 h5 h6 header hr "
        "li main nav ol p pre section table td th tr ul".split()
    )
    _SKIPPED = frozenset({"script", "style", "head", "title", "template", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIPPED:
            self._skipping.append(tag)
        elif tag in self._BLOCKS:
            self.chunks.append("\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in self._BLOCKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED:
            if tag in self._skipping:
                # Close the innermost open element of that name (and any
                # unclosed ones inside it).
                while self._skipping and self._skipping.pop() != tag:
                    pass
        elif tag in self._BLOCKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            # Source line breaks inside a block are spaces in HTML.
            self.chunks.append(data.replace("\r", " ").replace("\n", " "))


def html_to_text(markup: str) -> str:
    """The text of an HTML document, one line per block; never raises."""
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # HTMLParser is lenient; this is a last resort
        pass
    return "".join(parser.chunks)
