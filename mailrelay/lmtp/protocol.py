"""LMTP (RFC 2033) server on Twisted's ``smtp.ESMTP``: the wire side of inbound mail.

Twisted has no LMTP and its SMTP server needs several corrections, made here:

* one reply per accepted recipient after the end of data, in RCPT order, for
  every outcome (Twisted sends a single reply);
* limits: message size (advertised with SIZE and enforced while receiving),
  line length, recipients per transaction, concurrent sessions;
* an over-long line never drops the session back into command mode (Twisted
  then runs the rest of the body as commands) and costs bounded memory and
  linear time;
* message content is taken in whole chunks and stored once per transaction,
  not fed line by line to one message object per recipient;
* input that arrives while a delivery is being stored waits for its replies,
  so pipelined commands (even QUIT right after the final ".") stay in order;
* a client that half-closes the connection after its last command (Exim
  pipelines QUIT after the final "." and shuts down its sending side) still
  gets every reply: Twisted would otherwise take the end of its input for a
  closed connection, and drop the replies to a message it has stored, so the
  client would defer what was accepted and send it again;
* the idle timer stops while a delivery is being stored (the silence is
  ours, not the client's), and a store that takes longer than the store
  timeout is answered 451 4.3.0 per recipient instead of keeping the client
  waiting until it gives up and drops the connection;
* every reply carries an RFC 3463 enhanced status code.

Policy (which recipients exist, what happens to the message) lives behind
:class:`mailrelay.interfaces.IInboundHandler`.  Importing this module imports
:mod:`twisted.mail.smtp`, which imports the global reactor.

It is one module, though longer than most: it is one session state machine
over Twisted's ``ESMTP``, and its overrides (line limits, DATA chunks, the
reply order) read and reset the same per-session state.
"""

from __future__ import annotations

import os

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from mailrelay.addresses import check_mailbox
from mailrelay.errors import InvalidAddress
from mailrelay.interfaces import IInboundHandler
from mailrelay.lmtp import AcceptedRecipient, RecipientRejected, Reply, Transaction
from mailrelay.observer import NO_OBSERVER

_OK = Reply(250, "2.0.0", "Ok")
_SENDER_OK = Reply(250, "2.1.0", "Sender ok")
_RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
_HELP = Reply(214, "2.0.0", "Commands: LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
_USE_LHLO = Reply(500, "5.5.1", "This is an LMTP server: use LHLO")
_UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized")
_SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error")
_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (see RFC 5321 4.5.3.1)")
_LHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: LHLO hostname")
_MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
_RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
_DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
_BAD_PARAMETERS = Reply(501, "5.5.4", "Malformed or repeated parameter")
_BAD_SIZE = Reply(501, "5.5.4", "SIZE must be a number of octets")
_BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
_NO_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 is not supported")
_UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Parameters not recognized or not implemented")
_NEED_LHLO = Reply(503, "5.5.1", "Send LHLO first")
_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
_NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command: no valid recipients")
_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
_NON_ASCII = Reply(553, "5.6.7", "Non-ASCII addresses need SMTPUTF8, which is not offered")
_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
_INTERNAL_ERROR = Reply(451, "4.3.0", "Requested action aborted: error in processing")
_STORE_TIMEOUT = Reply(451, "4.3.0", "Requested action aborted: storing the message timed out")

# RFC 5321 4.5.3.1: a text line holds at most 998 octets besides CRLF.
MIN_LINE_LENGTH = 998


def _parse_parameters(text: bytes | None) -> dict[bytes, bytes | None]:
    """MAIL/RCPT ``keyword[=value]`` parameters, keywords upper-cased.

    Raises ValueError for an empty keyword or value, or a repeated keyword.
    """
    params: dict[bytes, bytes | None] = {}
    for item in (text or b"").split():
        key, eq, value = item.partition(b"=")
        key = key.upper()
        if not key or key in params or (eq and not value):
            raise ValueError(item)
        params[key] = value if eq else None
    return params


def _mailbox(path: bytes) -> str:
    """The mailbox of an RFC 5321 path, without brackets or source route."""
    if path.startswith(b"<") and path.endswith(b">"):
        path = path[1:-1]
    if path.startswith(b"@"):
        # RFC 5321 4.1.1.3: a source route is accepted and ignored.
        path = path.partition(b":")[2]
    return check_mailbox(path.decode("ascii"))


def _describe_peer(address: object) -> str:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    if isinstance(address, UNIXAddress):
        # A client's end of a unix socket is usually unnamed.
        return "unix:" + os.fsdecode(address.name) if address.name else "unix"
    return str(address)


# Input buffered while the handler stores a message, before reading pauses.
_HELD_INPUT_LIMIT = 64 * 1024


@implementer(IHalfCloseableProtocol)
class LMTPServer(smtp.ESMTP):
    """One LMTP session, handing recipients and messages to an ``IInboundHandler``.

    Build it with :class:`LMTPFactory`, which sets the host name, idle timeout
    and clock and enforces the session cap.
    """

    noisy = False
    # RFC 5321 4.5.3.1.4 allows 512 octets; extensions may need a little more.
    max_command_length = 2048
    # RFC 5321 4.5.3.1.8 requires at least 100.
    max_recipients = 1000

    _log = Logger()
    _VERBS = frozenset(
        {
            b"LHLO",
            b"HELO",
            b"EHLO",
            b"MAIL",
            b"RCPT",
            b"DATA",
            b"RSET",
            b"NOOP",
            b"QUIT",
            b"VRFY",
            b"HELP",
        }
    )

    def __init__(
        self,
        handler,
        *,
        max_message_size: int,
        max_line_length: int = 16384,
        store_timeout: float = 60,
    ):
        super().__init__()
        self._handler = handler
        self._max_message_size = max_message_size
        self._max_line_length = max_line_length
        self._store_timeout = store_timeout
        # While a delivery is being stored: the store timer, and the idle
        # timeout to restore when the replies are out.
        self._store_timer = None
        self._idle_timeout: float | None = None
        self._peer = ""
        self._lhlo: str | None = None
        self._sender: str | None = None
        self._recipients: list[AcceptedRecipient] = []
        self._command_buffer = bytearray()
        self._skipping_line = False
        # While a delivery is being stored: input received meanwhile, else None.
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._input_paused = False
        self._lost = False
        # The client shut down its sending side: no more commands will come.
        self._input_ended = False
        self._reset_data()

    # -- connection life cycle ----------------------------------------------------

    def connectionMade(self):
        self._peer = _describe_peer(self.transport.getPeer())
        if self.factory is not None and not self.factory._admit(self):
            self._log.warn(
                "Refused LMTP session from {peer}: {sessions} sessions open",
                peer=self._peer,
                sessions=self.factory.sessions,
            )
            self._reply(Reply(421, "4.3.2", self._host_text() + " Too many sessions, try later"))
            self.transport.loseConnection()
            return
        super().connectionMade()  # greeting, idle timer

    def connectionLost(self, reason=protocol.connectionDone):
        self._lost = True
        if self._store_timer is not None and self._store_timer.active():
            self._store_timer.cancel()
        if self.factory is not None:
            self.factory._release(self)
        self._reset_data()
        super().connectionLost(reason)  # cancels the idle timer

    def readConnectionLost(self):  # noqa: N802
        """The client sent its last byte: answer what it sent, then close."""
        self._input_ended = True
        if self._held is None:
            self.transport.loseConnection()
        # Else a delivery is being stored: _release_input closes once its
        # replies (and any command pipelined after it) have been answered.

    def writeConnectionLost(self):  # noqa: N802
        """The client reads no more: nothing we could say would arrive."""
        self.transport.loseConnection()

    def greeting(self):
        return self.host + b" LMTP server ready"

    def timeoutConnection(self):
        self._log.info("LMTP session from {peer} timed out", peer=self._peer)
        self._reply(Reply(421, "4.4.2", self._host_text() + " Idle timeout, closing connection"))
        self.transport.loseConnection()

    # -- input framing --------------------------------------------------------------
    # LineOnlyReceiver.dataReceived is replaced: it re-joins its whole buffer for
    # every chunk (quadratic on long lines) and hands over-long lines to
    # lineLengthExceeded, which Twisted's SMTP answers by switching to command mode.

    def dataReceived(self, data: bytes) -> None:
        if self._held is not None:
            self._keep(data)
            return
        while data and self._held is None and not self.transport.disconnecting:
            if self.mode == smtp.DATA:
                data = self._receive_data(data)
            else:
                data = self._receive_commands(data)
        if data and self._held is not None:
            self._keep(data)

    def _receive_commands(self, data: bytes) -> bytes:
        """Run the complete command lines in ``data``; return the input that
        follows a command which changed mode (DATA), paused input or closed."""
        buf = self._command_buffer
        pos = max(0, len(buf) - 1)  # the buffer holds no CRLF: search only the seam on
        buf += data
        start = 0
        while (end := buf.find(b"\r\n", pos)) >= 0:
            line = bytes(buf[start:end])
            start = pos = end + 2
            if self._skipping_line or len(line) > self.max_command_length:
                self._skipping_line = False
                self._reply(_LINE_TOO_LONG)
                continue
            self.lineReceived(line)  # resets the idle timer, runs the do_ method
            if self.mode != smtp.COMMAND or self._held is not None or self.transport.disconnecting:
                rest = bytes(buf[start:])
                buf.clear()
                return rest
        del buf[:start]
        if len(buf) > self.max_command_length + 1:
            # Drop the line but keep a trailing CR, which may start its CRLF.
            self._skipping_line = True
            del buf[:-1]
        return b""

    def _reset_data(self) -> None:
        # Always starts with the CRLF that ends the previous line (initially the
        # DATA command's): then the end of data is always b"\r\n.\r\n" and
        # dot-stuffing is always b"\r\n.", with no special case for line one.
        self._data_buffer = bytearray(b"\r\n")
        self._data_chunks: list[bytes] = []
        self._data_size = 0
        self._data_failure: Reply | None = None

    def _receive_data(self, data: bytes) -> bytes:
        """Take message content; return the input that follows the end of data."""
        self.resetTimeout()
        buf = self._data_buffer
        scanned = len(buf)
        buf += data
        # Only CRLF "." CRLF ends the data: bare CR or LF around a dot never does.
        end = buf.find(b"\r\n.\r\n", max(0, scanned - 4))
        if self._data_failure is not None:
            # Already refused: look for the end only, keeping what could start it.
            if end < 0:
                del buf[:-4]
                return b""
            rest = bytes(buf[end + 5 :])
            self._end_of_data()
            return rest
        if end >= 0:
            self._absorb(bytes(buf[: end + 2]))
            rest = bytes(buf[end + 5 :])
            self._end_of_data()
            return rest
        cut = buf.rfind(b"\r\n", max(0, scanned - 1))
        if cut > 0:
            self._absorb(bytes(buf[: cut + 2]))
            del buf[:cut]
        # What is left is CRLF plus a partial line (perhaps ending in the CR of its CRLF).
        if self._data_failure is None and len(buf) - 2 > self._max_line_length + 1:
            self._refuse_data(_LINE_TOO_LONG)
        if self._data_failure is not None:
            del buf[:-4]
        return b""

    def _absorb(self, lines: bytes) -> None:
        """Store complete lines (preceded by the previous CRLF) unless over a limit."""
        if self._data_failure is not None:
            return
        if len(lines) > self._max_line_length + 4 and (
            max(map(len, lines.split(b"\r\n"))) > self._max_line_length
        ):
            self._refuse_data(_LINE_TOO_LONG)
            return
        content = lines.replace(b"\r\n.", b"\r\n")[2:]
        self._data_size += len(content)
        if self._data_size > self._max_message_size:
            self._refuse_data(_TOO_BIG)
            return
        self._data_chunks.append(content)

    def _refuse_data(self, reply: Reply) -> None:
        self._data_failure = reply
        self._data_chunks = []

    def _end_of_data(self) -> None:
        sender, recipients = self._sender, tuple(self._recipients)
        failure, chunks = self._data_failure, self._data_chunks
        self._reset_transaction()
        self._reset_data()
        self.mode = smtp.COMMAND
        if failure is not None:
            self._log.info(
                "Refused message from {sender} to {count} recipient(s): {response}",
                sender=sender,
                count=len(recipients),
                code=failure.code,
                response=str(failure),
            )
            self._send_replies([failure] * len(recipients))
            return
        transaction = Transaction(
            sender=sender,
            recipients=recipients,
            message=b"".join(chunks),
            peer=self._peer,
            lhlo=self._lhlo or "",
        )
        self._hold_input()
        # The idle timer measures the client's silence; while the message is
        # being stored the client waits for us (the store timer covers that).
        self._idle_timeout = self.setTimeout(None)
        d = defer.maybeDeferred(self._handler.deliver, transaction)
        d.addCallback(self._check_replies, len(recipients))
        d.addErrback(self._delivery_failed, transaction)
        answer = self._within_store_timeout(d, transaction)
        answer.addCallback(self._send_replies)
        answer.addBoth(self._release_input)

    # -- waiting for the handler -------------------------------------------------

    def _within_store_timeout(self, stored: defer.Deferred, transaction: Transaction):
        """A Deferred firing with ``stored``'s replies, or with 451 4.3.0 for
        every recipient if they take longer than the store timeout.

        The store is not cancelled: a write the spool has begun may still
        commit.  Then the message is delivered although the client was told
        451 and will send it again: a duplicate, never a loss (at-least-once).
        """
        answer: defer.Deferred = defer.Deferred()

        def timed_out() -> None:
            self._log.warn(
                "Storing message from {sender} for {count} recipient(s) took over "
                "{timeout}s: answered {code} {status}",
                sender=transaction.sender,
                count=len(transaction.recipients),
                timeout=self._store_timeout,
                code=_STORE_TIMEOUT.code,
                status=_STORE_TIMEOUT.status,
            )
            answer.callback([_STORE_TIMEOUT] * len(transaction.recipients))

        # Local as well: by the time a late store finishes, the session's
        # attribute may hold the next transaction's timer.
        self._store_timer = timer = self.callLater(self._store_timeout, timed_out)

        def finished(replies: list[Reply]) -> None:
            if timer.active():
                timer.cancel()
                answer.callback(replies)
            elif answer.called and any(reply.code == 250 for reply in replies):
                self._log.warn(
                    "Message from {sender} was stored after its store timeout: the "
                    "client was told 451 and will likely send it again (a duplicate)",
                    sender=transaction.sender,
                    count=len(transaction.recipients),
                )

        stored.addCallback(finished)
        return answer

    def _hold_input(self) -> None:
        # Input that arrives meanwhile (a pipelined next transaction) waits in
        # memory; reading stops only past _HELD_INPUT_LIMIT, which spares two
        # epoll changes per message in the common case.
        self._held = []
        self._held_size = 0

    def _keep(self, data: bytes) -> None:
        assert self._held is not None
        self._held.append(data)
        self._held_size += len(data)
        if (
            self._held_size > _HELD_INPUT_LIMIT
            and not self._input_paused
            and not (self._lost or self.transport.disconnecting)
        ):
            self._input_paused = True
            self.transport.pauseProducing()

    def _release_input(self, ignored: object) -> None:
        held, self._held = b"".join(self._held or ()), None
        paused, self._input_paused = self._input_paused, False
        self._store_timer = None
        if self._lost or self.transport.disconnecting:
            return
        self.setTimeout(self._idle_timeout)
        if paused:
            self.transport.resumeProducing()
        if held:
            self.dataReceived(held)
        if self._input_ended and self._held is None and not self.transport.disconnecting:
            self.transport.loseConnection()

    @staticmethod
    def _check_replies(replies: object, count: int) -> list[Reply]:
        if (
            not isinstance(replies, (list, tuple))
            or len(replies) != count
            or not all(isinstance(r, Reply) for r in replies)
        ):
            raise TypeError(f"deliver() must fire with {count} Reply values, not {replies!r}")
        return list(replies)

    def _delivery_failed(self, failure, transaction: Transaction) -> list[Reply]:
        self._log.failure(
            "Delivery of message from {sender} raised", failure, sender=transaction.sender
        )
        return [_INTERNAL_ERROR] * len(transaction.recipients)

    def _send_replies(self, replies: list[Reply]) -> None:
        if self._lost:
            return
        for reply in replies:
            self._reply(reply)

    # -- commands -----------------------------------------------------------------

    def lookupMethod(self, command):
        # Only our verbs: ESMTP's AUTH and STARTTLS must stay unreachable.
        if isinstance(command, str):
            command = command.encode("ascii", "replace")
        verb = command.upper()
        if verb in self._VERBS:
            return getattr(self, "do_" + verb.decode("ascii"))
        return None

    def extensions(self):
        return {
            b"PIPELINING": None,
            b"ENHANCEDSTATUSCODES": None,
            b"8BITMIME": None,
            b"SIZE": [str(self._max_message_size).encode("ascii")],
        }

    def do_LHLO(self, rest):
        name = rest.strip()
        if not name:
            self._reply(_LHLO_SYNTAX)
            return
        self._lhlo = name.decode("ascii", "backslashreplace")
        self._reset_transaction()
        hello = self.host + b" Hello " + self._peer.encode("ascii", "backslashreplace")
        self.sendCode(250, hello + b"\n" + self.listExtensions())

    def do_HELO(self, rest):
        self._reply(_USE_LHLO)

    do_EHLO = do_HELO

    def do_MAIL(self, rest):
        if self._lhlo is None:
            self._reply(_NEED_LHLO)
            return
        if self._sender is not None:
            self._reply(_NESTED_MAIL)
            return
        parsed = self._parse_path_command(rest, self.mail_re, _MAIL_SYNTAX)
        if parsed is None:
            return
        path, params = parsed
        problem = self._check_mail_parameters(params)
        if problem is not None:
            self._reply(problem)
            return
        if path == b"<>":
            sender = ""
        else:
            try:
                sender = _mailbox(path)
            except InvalidAddress as e:
                self._reply(Reply(553, "5.1.7", f"Bad sender address syntax: {e.reason}"))
                return
        self._sender = sender
        self._recipients = []
        self._reply(_SENDER_OK)

    def _parse_path_command(self, rest: bytes, pattern, syntax_error: Reply):
        """Split MAIL/RCPT arguments into (path, parameters), or reply and return None."""
        if not rest.isascii():
            self._reply(_NON_ASCII)
            return None
        match = pattern.match(rest)
        if match is None:
            self._reply(syntax_error)
            return None
        try:
            return match.group("path"), _parse_parameters(match.group("opts"))
        except ValueError:
            self._reply(_BAD_PARAMETERS)
            return None

    def _check_mail_parameters(self, params: dict[bytes, bytes | None]) -> Reply | None:
        if b"SMTPUTF8" in params:
            return _NO_SMTPUTF8
        if params.keys() - {b"SIZE", b"BODY"}:
            return _UNKNOWN_PARAMETER
        if b"BODY" in params and (params[b"BODY"] or b"").upper() not in (b"7BIT", b"8BITMIME"):
            return _BAD_BODY
        if b"SIZE" in params:
            size = params[b"SIZE"] or b""
            if not (size.isdigit() and len(size) <= 20):
                return _BAD_SIZE
            if int(size) > self._max_message_size:
                return _TOO_BIG
        return None

    def do_RCPT(self, rest):
        if self._sender is None:
            self._reply(_NEED_MAIL)
            return
        parsed = self._parse_path_command(rest, self.rcpt_re, _RCPT_SYNTAX)
        if parsed is None:
            return
        path, params = parsed
        if params:
            self._reply(_UNKNOWN_PARAMETER)
            return
        try:
            address = _mailbox(path)
        except InvalidAddress as e:
            self._reply(Reply(553, "5.1.3", f"Bad recipient address syntax: {e.reason}"))
            return
        if len(self._recipients) >= self.max_recipients:
            self._reply(_TOO_MANY_RECIPIENTS)
            return
        try:
            token = self._handler.validate_recipient(self._sender, address)
            if isinstance(token, defer.Deferred):
                raise TypeError("validate_recipient() must not return a Deferred")
        except RecipientRejected as e:
            self._reply(e.reply)
            return
        except Exception:
            self._log.failure(
                "Validating recipient {recipient} raised", sender=self._sender, recipient=address
            )
            self._reply(_INTERNAL_ERROR)
            return
        self._recipients.append(AcceptedRecipient(address, token))
        self._reply(_RECIPIENT_OK)

    def do_DATA(self, rest):
        if self._sender is None:
            self._reply(_NEED_MAIL)
            return
        if not self._recipients:
            self._reply(_NEED_RCPT)  # RFC 2033 4.2
            return
        if rest.strip():
            self._reply(_DATA_SYNTAX)
            return
        self._reset_data()
        self.mode = smtp.DATA
        self.sendCode(354, b"Start mail input; end with <CRLF>.<CRLF>")

    def do_RSET(self, rest):
        self._reset_transaction()
        self._reply(_OK)

    def do_NOOP(self, rest):
        self._reply(_OK)

    def do_VRFY(self, rest):
        self._reply(_VRFY)

    def do_HELP(self, rest):
        self._reply(_HELP)

    def do_QUIT(self, rest):
        self._reply(Reply(221, "2.0.0", self._host_text() + " closing connection"))
        self.transport.loseConnection()

    def do_UNKNOWN(self, rest):
        self._reply(_UNKNOWN_COMMAND)

    def sendSyntaxError(self):
        self._reply(_SYNTAX_ERROR)

    # -- helpers --------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []

    def _host_text(self) -> str:
        return self.host.decode("ascii", "replace")

    def _reply(self, reply: Reply) -> None:
        self.sendCode(
            reply.code, f"{reply.status} {reply.text}".encode("ascii", "backslashreplace")
        )


class LMTPFactory(protocol.ServerFactory):
    """Builds :class:`LMTPServer` sessions sharing one handler and one set of limits.

    ``max_message_size`` is in octets, ``max_line_length`` in octets without
    CRLF, ``idle_timeout`` in seconds (on ``clock``, the global reactor if
    ``None``).  Beyond ``max_sessions`` open sessions, a connection is answered
    421 4.3.2 and closed at once.  A message the handler has not stored within
    ``store_timeout`` seconds is answered 451 4.3.0 for each recipient.
    ``observer`` (an :class:`~mailrelay.interfaces.IRelayObserver`) is told of
    each admitted session and of its end.
    """

    protocol = LMTPServer
    noisy = False

    def __init__(
        self,
        handler,
        *,
        hostname: bytes,
        max_message_size: int,
        max_line_length: int = 16384,
        idle_timeout: float = 300,
        max_sessions: int = 100,
        store_timeout: float = 60,
        clock=None,
        observer=None,
    ):
        if not IInboundHandler.providedBy(handler):
            raise TypeError(f"handler must provide IInboundHandler, not {handler!r}")
        if (
            not isinstance(hostname, bytes)
            or not hostname
            or not hostname.isascii()
            or (len(hostname.split()) != 1 or hostname.strip() != hostname)
        ):
            raise ValueError(f"hostname must be one ASCII word as bytes, not {hostname!r}")
        _check_positive("max_message_size", max_message_size, int)
        _check_positive("max_line_length", max_line_length, int)
        if max_line_length < MIN_LINE_LENGTH:
            raise ValueError(
                f"max_line_length must be at least {MIN_LINE_LENGTH} (RFC 5321 4.5.3.1.6),"
                f" not {max_line_length!r}"
            )
        _check_positive("idle_timeout", idle_timeout, (int, float))
        _check_positive("max_sessions", max_sessions, int)
        _check_positive("store_timeout", store_timeout, (int, float))
        self.handler = handler
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.max_line_length = max_line_length
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.store_timeout = store_timeout
        self.clock = clock
        # An IRelayObserver, told of each admitted session and its end.
        self.observer = observer if observer is not None else NO_OBSERVER
        self._sessions: set[LMTPServer] = set()

    @property
    def sessions(self) -> int:
        """The number of sessions open now."""
        return len(self._sessions)

    def buildProtocol(self, addr):
        p = self.protocol(
            self.handler,
            max_message_size=self.max_message_size,
            max_line_length=self.max_line_length,
            store_timeout=self.store_timeout,
        )
        p.factory = self
        p.host = self.hostname
        # SMTPFactory.timeout is never copied to the protocol: set it here.
        p.timeout = self.idle_timeout
        if self.clock is not None:
            # TimeoutMixin otherwise schedules on the global reactor.
            p.callLater = self.clock.callLater
        return p

    def _admit(self, session: LMTPServer) -> bool:
        if len(self._sessions) >= self.max_sessions:
            return False
        self._sessions.add(session)
        self.observer.lmtp_session_opened()
        return True

    def _release(self, session: LMTPServer) -> None:
        if session in self._sessions:
            self._sessions.remove(session)
            self.observer.lmtp_session_closed()


def _check_positive(name: str, value: object, types) -> None:
    if isinstance(value, bool) or not isinstance(value, types) or value <= 0:
        raise ValueError(f"{name} must be a positive number, not {value!r}")


__all__ = ["LMTPFactory", "LMTPServer", "MIN_LINE_LENGTH"]
