"""The fake MTA's ESMTP server protocol: one SMTP session, computed synchronously.

:class:`FakeSMTPServer` speaks the server side of one connection.  It is built
by :class:`~mailrelay.testing.fakemta.FakeMTA` and gets everything it needs
from three objects handed to it, never from the factory: a frozen
:class:`ServerBehaviour` (what to advertise and enforce), a
:class:`SessionObserver` (where to report connections, commands, AUTH
attempts, client certificates and accepted :class:`Transaction` values) and a
:class:`~mailrelay.testing.faults.FaultPlan` (asked at every stage whether to
reject, drop, hold or cut the reply).

Every reply is computed synchronously, so pipelined commands are always
answered in order; a held reply holds everything received after it.  This
module is one session state machine, so it stays one module: EHLO, STARTTLS,
AUTH, MAIL, RCPT and DATA all read and reset the same per-session state.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.x509.oid import NameOID
from twisted.cred.credentials import CramMD5Credentials
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.imap4 import IllegalClientResponse, PLAINCredentials
from zope.interface import implementer

from mailrelay.addresses import check_mailbox
from mailrelay.errors import InvalidAddress
from mailrelay.testing.faults import FaultPlan

__all__ = ["FakeSMTPServer", "ServerBehaviour", "SessionObserver", "Transaction"]

_log = Logger()

_STAGE_OF_VERB = {
    b"EHLO": "ehlo",
    b"HELO": "ehlo",
    b"STARTTLS": "starttls",
    b"AUTH": "auth",
    b"MAIL": "mail",
    b"RCPT": "rcpt",
    b"DATA": "data",
    b"RSET": "rset",
    b"QUIT": "quit",
}

# Twisted's mail_re/rcpt_re reject UTF-8 addresses and throw parameters away
# (twisted#8128), so MAIL and RCPT are parsed here.
_MAIL_RE = re.compile(rb"FROM:\s*<(?P<path>[^<>]*)>(?:\s+(?P<params>.*?))?\s*\Z", re.I | re.S)
_RCPT_RE = re.compile(rb"TO:\s*<(?P<path>[^<>]*)>(?:\s+(?P<params>.*?))?\s*\Z", re.I | re.S)

_CHALLENGERS: dict[str, Callable[[bytes], Any]] = {
    "CRAM-MD5": lambda host: CramMD5Credentials(host),
    "PLAIN": lambda host: PLAINCredentials(),
    "LOGIN": lambda host: smtp.LOGINCredentials(),
}


@dataclass(frozen=True)
class Transaction:
    """One message the fake MTA accepted (answered 250 to the final ".")."""

    mail_from: str  # "" for the null reverse-path <>
    mail_params: tuple[bytes, ...]  # MAIL parameters as sent, e.g. (b"SIZE=123",)
    rcpts: tuple[str, ...]  # accepted recipients, in RCPT order, duplicates kept
    data: bytes  # DATA after un-dot-stuffing, CRLF line ends
    tls: bool  # the transaction ran over TLS (implicit or STARTTLS)
    authenticated_as: str | None  # the AUTH user name, None without AUTH
    connection: int  # 1-based; the connection count when this connection was accepted


@dataclass(frozen=True)
class ServerBehaviour:
    """What every session of one fake MTA advertises and enforces (already validated).

    ``users`` None means no AUTH; otherwise AUTH with ``mechanisms`` is
    offered (over TLS only unless ``tls_mode`` is "none") and required before
    MAIL.  ``clock`` runs the idle timeout and injected delays.
    """

    clock: Any  # IReactorTime
    hostname: bytes
    timeout: int
    users: Mapping[str, str] | None
    mechanisms: tuple[str, ...]
    tls_mode: str  # "none", "starttls" or "implicit"
    require_tls: bool
    smtputf8: bool
    pipelining: bool
    size: int | None


class SessionObserver(Protocol):
    """Where a session reports what happened on it (the fake MTA's records)."""

    def connection_made(self, server: FakeSMTPServer) -> int:
        """Count a new connection; its 1-based number."""

    def connection_lost(self, server: FakeSMTPServer) -> None:
        """Forget a closed connection."""

    def command_received(self, line: bytes) -> None:
        """Record a command line as received (not DATA lines)."""

    def auth_attempted(self, mechanism: str, username: str, accepted: bool) -> None:
        """Record the outcome of one AUTH exchange."""

    def plain_response_received(self, response: str) -> None:
        """Record an ``AUTH PLAIN`` response, base64 as sent."""

    def client_certificate_seen(self, subject: str) -> None:
        """Record the subject (common name if any) of a client certificate."""

    def transaction_accepted(self, transaction: Transaction, peer: str) -> int:
        """Record an accepted message from ``peer``; the number it was queued as."""


@implementer(IHandshakeListener)
class FakeSMTPServer(smtp.ESMTP):
    """One fake-MTA connection.

    Twisted's ``_from``/``_to`` hold the envelope (``_from`` is ``""`` for
    ``<>``, ``_to`` a list of address strings) so that its HELO, EHLO and RSET
    reset them.  MAIL, RCPT and DATA are our own: Twisted's ignore parameters,
    reject UTF-8 and hand DATA to per-recipient ``IMessage`` objects that never
    see the raw bytes.
    """

    noisy = False

    def __init__(
        self,
        behaviour: ServerBehaviour,
        observer: SessionObserver,
        faults: FaultPlan,
        ctx: Any = None,
    ) -> None:
        super().__init__(chal=None, contextFactory=ctx)
        self._behaviour = behaviour
        self._observer = observer
        self._faults = faults
        self.host = behaviour.hostname
        self.timeout = behaviour.timeout
        # TimeoutMixin would use the global reactor.
        self.callLater = behaviour.clock.callLater  # type: ignore[method-assign]
        self._connection = 0
        self._greeted = False
        self._closing = False
        self._held: Any = None  # the DelayedCall of a held reply
        self._backlog: deque[bytes] = deque()
        self._in_data_received = False
        self._discard_plaintext = False
        self._lost_waiters: list[defer.Deferred[None]] = []
        self._authenticated_as: str | None = None
        self._auth_mechanism = ""
        self._mail_params: tuple[bytes, ...] = ()
        self._smtputf8 = False
        self._data_lines: list[bytes] = []
        self._data_size = 0  # bytes of the message after un-dot-stuffing
        self._data_received = 0  # bytes on the wire, for drop_during_data
        self._data_too_big = False
        self._drop_after: int | None = None

    def when_lost(self) -> defer.Deferred[None]:
        """Fires when this connection is closed."""
        d: defer.Deferred[None] = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        # Not SMTP.connectionMade: it sends the greeting at once, and a
        # "greeting" fault must be able to replace or hold it.
        self._connection = self._observer.connection_made(self)
        self.canStartTLS = self.ctx is not None and ITLSTransport.providedBy(self.transport)
        self._helo = (None, self._peer_host())
        self.setTimeout(self.timeout)
        self._run_stage("greeting", self._send_greeting)

    def _send_greeting(self) -> None:
        self.sendCode(220, self.greeting())

    def greeting(self) -> bytes:
        return self.host + b" ESMTP mailrelay fake MTA"

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self._closing = True
        if self._held is not None and self._held.active():
            self._held.cancel()
        self._held = None
        self._backlog.clear()
        super().connectionLost(reason)
        self._observer.connection_lost(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def handshakeCompleted(self) -> None:
        certificate = self.transport.getPeerCertificate()
        if certificate is not None:
            subject = certificate.to_cryptography().subject
            names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self._observer.client_certificate_seen(
                str(names[0].value) if names else subject.rfc4514_string()
            )

    def _tls_active(self) -> bool:
        return bool(self.startedTLS or ISSLTransport.providedBy(self.transport))

    def _peer_host(self) -> bytes:
        # ESMTP.do_EHLO assumes peer.host, which UNIX and iosim addresses lack.
        host = getattr(self.transport.getPeer(), "host", None)
        if host is None:
            return b"unknown"
        return host if isinstance(host, bytes) else host.encode("ascii", "replace")

    def _peer_text(self) -> str:
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        if host is not None and port is not None:
            # aiosmtpd's X-Peer format, which Mailman's fake MTA produced.
            return str((host, port))
        return str(getattr(peer, "name", None) or peer)

    # -- line dispatch, faults and held replies -----------------------------

    def dataReceived(self, data: bytes) -> None:
        self._in_data_received = True
        try:
            super().dataReceived(data)
        finally:
            self._in_data_received = False
            self._discard_plaintext = False

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout()
        if self._closing or self._discard_plaintext:
            return
        if self._held is not None:
            self._backlog.append(line)
            return
        self._handle_line(line)

    def _handle_line(self, line: bytes) -> None:
        if self.mode == smtp.COMMAND:
            self._observer.command_received(line)
        stage, address = self._stage_of(line)
        self._run_stage(stage, lambda: getattr(self, "state_" + self.mode)(line), address)

    def _stage_of(self, line: bytes) -> tuple[str | None, str | None]:
        if self.mode == smtp.DATA:
            return ("eom" if line == b"." else None), None
        if self.mode != smtp.COMMAND:
            return None, None
        parts = line.split(None, 1)
        stage = _STAGE_OF_VERB.get(parts[0].upper()) if parts else None
        address = None
        if stage == "rcpt" and len(parts) == 2:
            match = _RCPT_RE.match(parts[1])
            if match is not None:
                address = match.group("path").decode("utf-8", "replace")
        return stage, address

    def _run_stage(
        self,
        stage: str | None,
        proceed: Callable[[], object],
        address: str | None = None,
        may_delay: bool = True,
    ) -> None:
        if stage is None:
            proceed()
            return
        if may_delay:
            fault = self._faults.take("delay", stage, address)
            if fault is not None:
                self._held = self._behaviour.clock.callLater(
                    fault.seconds, self._release, stage, proceed, address
                )
                return
        fault = self._faults.take("disconnect", stage, address)
        if fault is not None:
            self._close(fault.with_421)
            return
        fault = self._faults.take("reject", stage, address)
        if fault is not None:
            if stage == "eom":
                self.mode = smtp.COMMAND
                self._reset_data()
            if stage in ("data", "eom"):
                self._from, self._to = None, []
            self.sendCode(fault.code, fault.text)
            return
        proceed()

    def _release(self, stage: str, proceed: Callable[[], object], address: str | None) -> None:
        self._held = None
        self._run_stage(stage, proceed, address, may_delay=False)
        while self._backlog and self._held is None and not self._closing:
            self._handle_line(self._backlog.popleft())

    def _close(self, with_421: bool) -> None:
        self._closing = True
        self._backlog.clear()
        if with_421:
            self.sendCode(421, b"4.3.0 Closing")
        self.transport.loseConnection()

    def lookupMethod(self, command: bytes) -> Any:
        try:
            return super().lookupMethod(command)
        except UnicodeDecodeError:  # a non-ASCII verb is just an unknown command
            return None

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted's version falls back to command mode in the middle of DATA,
        # so the rest of the body would run as commands: close instead.
        self._closing = True
        self.sendCode(500, b"5.5.6 Line too long")
        self.transport.loseConnection()

    # -- greeting and extensions --------------------------------------------

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {}
        # ESMTP.extensions offers STARTTLS on implicit-TLS connections too.
        if self.canStartTLS and not self._tls_active():
            ext[b"STARTTLS"] = None
        mechanisms = self._offered_mechanisms()
        if mechanisms:
            ext[b"AUTH"] = [m.encode("ascii") for m in mechanisms]
        ext[b"8BITMIME"] = None
        if self._behaviour.pipelining:
            ext[b"PIPELINING"] = None
        if self._behaviour.size is not None:
            ext[b"SIZE"] = [b"%d" % self._behaviour.size]
        if self._behaviour.smtputf8:
            ext[b"SMTPUTF8"] = None
        return ext

    def do_EHLO(self, rest: bytes) -> None:
        peer = self._peer_host()
        self._helo = (rest, peer)
        self._from, self._to = None, []
        self._greeted = True
        self.sendCode(250, self.host + b" Hello " + peer + b"\n" + self.listExtensions())

    def do_HELO(self, rest: bytes) -> None:
        peer = self._peer_host()
        self._helo = (rest, peer)
        self._from, self._to = None, []
        self._greeted = True
        self.sendCode(250, self.host + b" Hello " + peer)

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        self.sendCode(252, b"2.5.0 Cannot VRFY user, but will accept message")

    def _must_start_tls(self) -> bool:
        return self._behaviour.require_tls and not self._tls_active()

    # -- STARTTLS -----------------------------------------------------------

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self._behaviour.tls_mode != "starttls":
            self.sendCode(502, b"5.5.1 STARTTLS not offered")
        elif self._tls_active():
            self.sendCode(503, b"5.5.1 TLS already active")
        elif not self.canStartTLS:
            self.sendCode(454, b"4.7.0 TLS not available")
        else:
            self.sendCode(220, b"2.0.0 Ready to start TLS")
            self.transport.startTLS(self.ctx)
            self.startedTLS = True
            # RFC 3207 4.2: forget what was said in plaintext.  Anything the
            # client pipelined after STARTTLS arrived unprotected and must not
            # be acted on as if it came over TLS (CVE-2011-0411).
            self._greeted = False
            self._from, self._to = None, []
            self._backlog.clear()
            self._buffer = b""
            self._discard_plaintext = self._in_data_received

    # -- AUTH ---------------------------------------------------------------

    def _offered_mechanisms(self) -> tuple[str, ...]:
        if self._behaviour.users is None:
            return ()
        if self._behaviour.tls_mode != "none" and not self._tls_active():
            return ()
        return self._behaviour.mechanisms

    def ext_AUTH(self, rest: bytes) -> None:
        if self._must_start_tls():
            self.sendCode(530, b"5.7.0 Must issue a STARTTLS command first")
            return
        if self.authenticated:
            self.sendCode(503, b"5.5.1 Already authenticated")
            return
        parts = rest.split(None, 1)
        self._auth_mechanism = parts[0].upper().decode("ascii", "replace") if parts else ""
        if self._auth_mechanism not in self._offered_mechanisms():
            self._finish_auth(False, "")
            return
        self.challenger = _CHALLENGERS[self._auth_mechanism](self.host)
        self.mode = smtp.AUTH
        if len(parts) == 2:
            # An initial response answers the first challenge unseen.
            self.challenger.getChallenge()
            self.state_AUTH(parts[1])
        else:
            self.state_AUTH(None)

    def state_AUTH(self, response: bytes | None) -> None:
        # Replaces ESMTP.state_AUTH, which needs a cred Portal, answers 535
        # (Mailman's fake MTA, and the seeds, use 571) and lets a malformed
        # response escape as an exception.
        if response is None:
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
            return
        if self._auth_mechanism == "PLAIN":
            self._observer.plain_response_received(response.decode("ascii", "replace"))
        if response == b"*":
            self._finish_auth(False, "", cancelled=True)
            return
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
            self.challenger.setResponse(decoded)
        except (binascii.Error, ValueError, IllegalClientResponse):
            self._finish_auth(False, "")
            return
        if self.challenger.moreChallenges():
            self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
            return
        try:
            username = (self.challenger.username or b"").decode("utf-8")
        except UnicodeDecodeError:
            self._finish_auth(False, repr(self.challenger.username))
            return
        password = (self._behaviour.users or {}).get(username)
        # Checked directly against the users dict: a cred Portal and realm
        # would add nothing here, as there are no avatars.
        accepted = password is not None and bool(
            self.challenger.checkPassword(password.encode("utf-8"))
        )
        self._finish_auth(accepted, username)

    def _finish_auth(self, accepted: bool, username: str, cancelled: bool = False) -> None:
        self.mode = smtp.COMMAND
        self.challenger = None
        self._observer.auth_attempted(self._auth_mechanism, username, accepted)
        if accepted:
            self.authenticated = True
            self._authenticated_as = username
            self.sendCode(235, b"2.7.0 Authentication successful")
        elif cancelled:
            self.sendCode(501, b"5.7.0 Authentication cancelled")
        else:
            self.sendCode(571, b"Bad authentication")

    # -- the mail transaction -----------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        if self._must_start_tls():
            self.sendCode(530, b"5.7.0 Must issue a STARTTLS command first")
            return
        if not self._greeted:
            self.sendCode(503, b"5.5.1 Error: send HELO/EHLO first")
            return
        if self._behaviour.users is not None and not self.authenticated:
            self.sendCode(530, b"5.7.0 Authentication required")
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Error: nested MAIL command")
            return
        match = _MAIL_RE.match(rest)
        if match is None:
            self.sendCode(501, b"5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        params = tuple((match.group("params") or b"").split())
        smtputf8 = False
        for param in params:
            key, equals, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not (equals and value.isdigit()):
                    self.sendCode(501, b"5.5.4 Bad SIZE parameter")
                    return
                if self._behaviour.size is not None and int(value) > self._behaviour.size:
                    self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
                    return
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    self.sendCode(501, b"5.5.4 Bad BODY parameter")
                    return
            elif key == b"SMTPUTF8" and self._behaviour.smtputf8 and not equals:
                smtputf8 = True
            else:
                self.sendCode(555, b"5.5.4 Unsupported parameter " + key)
                return
        sender = self._check_address(match.group("path"), smtputf8, is_sender=True)
        if sender is None:
            return
        self._from, self._to = sender, []
        self._mail_params = params
        self._smtputf8 = smtputf8
        self.sendCode(250, b"2.1.0 Ok")

    def do_RCPT(self, rest: bytes) -> None:
        if self._from is None:
            self.sendCode(503, b"5.5.1 Error: need MAIL command")
            return
        match = _RCPT_RE.match(rest)
        if match is None:
            self.sendCode(501, b"5.5.4 Syntax: RCPT TO:<address>")
            return
        if match.group("params"):
            self.sendCode(555, b"5.5.4 RCPT parameters are not supported")
            return
        recipient = self._check_address(match.group("path"), self._smtputf8, is_sender=False)
        if recipient is None:
            return
        self._to.append(recipient)
        self.sendCode(250, b"2.1.5 Ok")

    def _check_address(self, path: bytes, smtputf8: bool, is_sender: bool) -> str | None:
        """The address in ``path``, or None after replying with the reason it is refused."""
        status = b"5.1.7" if is_sender else b"5.1.3"
        try:
            address = path.decode("utf-8")
        except UnicodeDecodeError:
            self.sendCode(553, status + b" Address is not UTF-8")
            return None
        if not address:
            if is_sender:
                return ""
            self.sendCode(553, status + b" Empty recipient address")
            return None
        if not address.isascii() and not smtputf8:
            self.sendCode(553, b"5.6.7 Non-ASCII address needs SMTPUTF8")
            return None
        if not is_sender and address.casefold() == "postmaster":
            return address
        try:
            check_mailbox(address)
        except InvalidAddress as e:
            self.sendCode(553, status + b" Bad address syntax: " + e.reason.encode("ascii"))
            return None
        return address

    def do_DATA(self, rest: bytes) -> None:
        if self._from is None:
            self.sendCode(503, b"5.5.1 Error: need MAIL command")
            return
        if not self._to:
            self.sendCode(503, b"5.5.1 Error: need RCPT command")
            return
        drop = self._faults.take("drop", "data")
        self._reset_data()
        self._drop_after = None if drop is None else drop.after_bytes
        self.mode = smtp.DATA
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")
        self._check_drop()

    def _reset_data(self) -> None:
        self._data_lines = []
        self._data_size = 0
        self._data_received = 0
        self._data_too_big = False
        self._drop_after = None

    def _check_drop(self) -> None:
        if self._drop_after is not None and self._data_received >= self._drop_after:
            self._drop_after = None
            self._close(with_421=False)

    def dataLineReceived(self, line: bytes) -> None:
        if line == b".":
            self._end_of_data()
            return
        self._data_received += len(line) + 2
        if line[:1] == b".":
            line = line[1:]
        if not self._data_too_big:
            self._data_size += len(line) + 2
            if self._behaviour.size is not None and self._data_size > self._behaviour.size:
                self._data_too_big = True
                self._data_lines = []
            else:
                self._data_lines.append(line)
        self._check_drop()

    # SMTP binds state_DATA to its own dataLineReceived when the class is made.
    state_DATA = dataLineReceived

    def _end_of_data(self) -> None:
        self.mode = smtp.COMMAND
        sender, recipients = self._from, tuple(self._to)
        lines, too_big = self._data_lines, self._data_too_big
        self._from, self._to = None, []
        self._reset_data()
        if too_big:
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
            return
        assert sender is not None
        transaction = Transaction(
            mail_from=sender,
            mail_params=self._mail_params,
            rcpts=recipients,
            data=b"".join(line + b"\r\n" for line in lines),
            tls=self._tls_active(),
            authenticated_as=self._authenticated_as,
            connection=self._connection,
        )
        queued_as = self._observer.transaction_accepted(transaction, self._peer_text())
        self.sendCode(250, b"2.0.0 Ok: queued as %d" % queued_as)
