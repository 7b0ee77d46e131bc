"""A small LMTP (RFC 2033) client for tests and embedders.

Unlike ``smtplib.LMTP``, after the end of data it reads one reply per accepted
recipient (RFC 2033 4.2), so every recipient gets its own outcome, and it
pipelines MAIL, RCPT and DATA when the server offers PIPELINING::

    client = await connect_lmtp(TCP4ClientEndpoint(reactor, "127.0.0.1", 8024))
    await client.lhlo("mta.example.org")
    results = await client.sendmail("anne@example.org", ["test@example.com"], message)
    await client.quit()

Messages are bytes (or str, sent as UTF-8); lines may end in LF or CRLF and
are sent with CRLF and dot-stuffed.
"""

from __future__ import annotations

import re
from collections import deque
from typing import NamedTuple

from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.protocols import basic

_LINE_END = re.compile(rb"\r?\n")
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)")


class LMTPReplyError(Exception):
    """The server refused something that has no per-recipient outcome (greeting, MAIL)."""

    def __init__(self, code: int, text: str):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class LMTPProtocolError(Exception):
    """The server broke the protocol (a malformed reply, 354 without recipients)."""


class ServerReply(NamedTuple):
    """One reply; ``text`` joins the lines of a multi-line reply with newlines."""

    code: int
    text: str


class RecipientReply(NamedTuple):
    """The outcome for one RCPT: its RCPT reply if refused, else its reply after DATA."""

    recipient: str
    code: int
    text: str


class LMTPClientProtocol(basic.LineOnlyReceiver):
    """Parses replies and hands them out in order through :meth:`read_reply`."""

    MAX_LENGTH = 65536

    def __init__(self):
        self._replies: deque[ServerReply] = deque()
        self._waiters: deque[defer.Deferred] = deque()
        self._lines: list[str] = []
        self._lost = None
        self._closed = defer.Deferred()

    def connectionMade(self):
        # Without it each message waits ~40 ms for Nagle and delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def lineReceived(self, line: bytes) -> None:
        match = _REPLY_LINE.match(line)
        if match is None:
            self._abort(LMTPProtocolError(f"malformed reply line {line!r}"))
            return
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if match.group(2) == b"-":
            return
        reply = ServerReply(int(match.group(1)), "\n".join(self._lines))
        self._lines = []
        if self._waiters:
            self._waiters.popleft().callback(reply)
        else:
            self._replies.append(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(LMTPProtocolError(f"reply line longer than {self.MAX_LENGTH} octets"))

    def read_reply(self) -> defer.Deferred:
        """Fires with the next :class:`ServerReply` not yet read."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._lost is not None:
            return defer.fail(self._lost)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def send(self, *lines: bytes) -> None:
        """Write command lines, adding CRLF to each, in one write."""
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def when_closed(self) -> defer.Deferred:
        """Fires with ``None`` once the connection is closed."""
        d = defer.Deferred()
        self._closed.addBoth(lambda _: d.callback(None))
        return d

    def connectionLost(self, reason):
        self._lost = reason
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(reason)
        self._closed.callback(None)

    def _abort(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            d.errback(error)
        self.transport.loseConnection()


def encode_message(message: bytes | str) -> bytes:
    """``message`` as DATA content: CRLF line ends, dot-stuffed, without the final "."."""
    if isinstance(message, str):
        message = message.encode("utf-8")
    if not isinstance(message, bytes):
        raise TypeError(f"message must be bytes or str, not {type(message).__name__}")
    lines = _LINE_END.split(message)
    if lines[-1] == b"":
        lines.pop()  # the message ended with a line end
    return b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)


def _path(address: str) -> bytes:
    if not isinstance(address, str):
        raise TypeError(f"address must be str, not {type(address).__name__}")
    if not address.isascii() or any(c in address for c in "\r\n<> "):
        raise ValueError(f"unusable address {address!r} (ASCII mailbox without <> or spaces)")
    return b"<" + address.encode("ascii") + b">"


class LMTPClient:
    """An LMTP session over a connected :class:`LMTPClientProtocol`."""

    def __init__(self, protocol: LMTPClientProtocol, greeting: ServerReply):
        self.protocol = protocol
        self.greeting = greeting
        self.extensions: dict[str, str] = {}

    def command(self, line: bytes | str) -> defer.Deferred:
        """Send one command line; fires with its :class:`ServerReply`."""
        if isinstance(line, str):
            line = line.encode("ascii")
        self.protocol.send(line)
        return self.protocol.read_reply()

    def lhlo(self, name: str = "localhost") -> defer.Deferred:
        """Send LHLO; fires with the reply and fills :attr:`extensions` on 250."""

        async def lhlo() -> ServerReply:
            reply = await self.command(b"LHLO " + name.encode("ascii"))
            if reply.code == 250:
                self.extensions = {}
                for line in reply.text.split("\n")[1:]:
                    keyword, _, value = line.partition(" ")
                    self.extensions[keyword.upper()] = value
            return reply

        return defer.Deferred.fromCoroutine(lhlo())

    def sendmail(self, sender: str, recipients, message: bytes | str) -> defer.Deferred:
        """Send one message; fires with a :class:`RecipientReply` per recipient, in order.

        ``sender`` ``""`` is the null sender.  Fails with
        :class:`LMTPReplyError` if MAIL is refused.
        """
        if isinstance(recipients, str):
            recipients = [recipients]
        recipients = list(recipients)
        if not recipients:
            raise ValueError("sendmail needs at least one recipient")
        content = encode_message(message)
        mail = b"MAIL FROM:" + (b"<>" if sender == "" else _path(sender))
        if "SIZE" in self.extensions:
            mail += b" SIZE=%d" % len(content)
        rcpts = [b"RCPT TO:" + _path(r) for r in recipients]
        return defer.Deferred.fromCoroutine(self._sendmail(recipients, mail, rcpts, content))

    async def _sendmail(self, recipients, mail, rcpts, content) -> list[RecipientReply]:
        read = self.protocol.read_reply
        if "PIPELINING" in self.extensions:
            self.protocol.send(mail, *rcpts, b"DATA")
            mail_reply = await read()
            rcpt_replies = [await read() for _ in rcpts]
            data_reply = await read()
        else:
            mail_reply = await self.command(mail)
            if mail_reply.code != 250:
                raise LMTPReplyError(*mail_reply)
            rcpt_replies = [await self.command(r) for r in rcpts]
            accepted = any(r.code // 100 == 2 for r in rcpt_replies)
            data_reply = await self.command(b"DATA") if accepted else None
        if mail_reply.code != 250:
            await self.command(b"RSET")
            raise LMTPReplyError(*mail_reply)

        results = [
            RecipientReply(to, *reply) for to, reply in zip(recipients, rcpt_replies, strict=True)
        ]
        accepted = [i for i, reply in enumerate(rcpt_replies) if reply.code // 100 == 2]
        if data_reply is not None and data_reply.code == 354 and not accepted:
            self.protocol.transport.loseConnection()
            raise LMTPProtocolError("354 to DATA although no recipient was accepted")
        if not accepted:
            await self.command(b"RSET")
            return results
        if data_reply.code != 354:
            for i in accepted:
                results[i] = RecipientReply(recipients[i], *data_reply)
            return results
        self.protocol.transport.write(content + b".\r\n")
        for i in accepted:
            results[i] = RecipientReply(recipients[i], *(await read()))
        return results

    def quit(self) -> defer.Deferred:
        """Send QUIT; fires with its reply once the connection is closed."""

        async def quit() -> ServerReply:
            closed = self.protocol.when_closed()
            reply = await self.command(b"QUIT")
            self.protocol.transport.loseConnection()
            await closed
            return reply

        return defer.Deferred.fromCoroutine(quit())


def connect_lmtp(endpoint) -> defer.Deferred:
    """Connect to an LMTP server at ``endpoint`` (an ``IStreamClientEndpoint``).

    Fires with an :class:`LMTPClient` after a 220 greeting; call
    :meth:`LMTPClient.lhlo` next.  Fails with :class:`LMTPReplyError` otherwise.
    """

    async def connect() -> LMTPClient:
        protocol = await connectProtocol(endpoint, LMTPClientProtocol())
        greeting = await protocol.read_reply()
        if greeting.code != 220:
            protocol.transport.loseConnection()
            raise LMTPReplyError(*greeting)
        return LMTPClient(protocol, greeting)

    return defer.Deferred.fromCoroutine(connect())


__all__ = [
    "LMTPClient",
    "LMTPClientProtocol",
    "LMTPProtocolError",
    "LMTPReplyError",
    "RecipientReply",
    "ServerReply",
    "connect_lmtp",
    "encode_message",
]
