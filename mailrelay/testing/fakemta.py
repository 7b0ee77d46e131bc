"""A fake SMTP server for tests: it records what clients send and injects faults.

:class:`FakeMTA` is a server factory built on Twisted's ``smtp.ESMTP``.  It
listens on a loopback port (:meth:`FakeMTA.start`) or serves in-memory
transports through :meth:`FakeMTA.buildProtocol` (``twisted.test.iosim``,
``StringTransport``), and behaves the same way in both cases.  Every reply is
computed synchronously, so pipelined commands are always answered in order;
injected delays hold the reply *and* everything received after it.

STARTTLS needs a transport that can really start TLS: a loopback socket
(iosim's ``startTLS`` is a stand-in that real TLS options do not support).
Implicit TLS works in memory too, because the TLS layer is part of the
protocol that :meth:`FakeMTA.buildProtocol` returns.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.message
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.x509.oid import NameOID
from twisted.cred.credentials import CramMD5Credentials
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.imap4 import IllegalClientResponse, PLAINCredentials
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailrelay.addresses import check_mailbox
from mailrelay.errors import InvalidAddress

if TYPE_CHECKING:
    from mailrelay.testing.tls import ThrowawayCA

__all__ = ["FakeMTA", "Transaction"]

_log = Logger()

MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")
TLS_MODES = ("none", "starttls", "implicit")
REJECT_STAGES = frozenset({"ehlo", "starttls", "auth", "mail", "rcpt", "data", "eom", "rset"})
# A connection can also be dropped or held before the greeting and at QUIT.
DISCONNECT_STAGES = REJECT_STAGES | {"greeting", "quit"}

# Mailman's fake MTA answers injected errors with these texts; tests written
# against it compare them.
_DEFAULT_REJECT_TEXT = b"Error: SMTPResponseException"
_DEFAULT_RCPT_REJECT_TEXT = b"Error: SMTPRecipientsRefused"

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


@dataclass
class _Fault:
    kind: str  # "reject", "disconnect", "delay" or "drop"
    stage: str
    remaining: int
    code: int = 0
    text: bytes = b""
    match: str | None = None
    seconds: float = 0.0
    with_421: bool = True
    after_bytes: int = 0


class FakeMTA(protocol.ServerFactory):
    """An SMTP server test double that records traffic and injects faults.

    ``reactor`` runs listening, timeouts and delays (a ``task.Clock`` will do
    in memory).  ``users`` (name -> password) turns on AUTH with
    ``mechanisms``, advertised in the given order, and makes AUTH mandatory
    before MAIL; a bad login, an unoffered mechanism or a malformed response
    gets ``571 Bad authentication``.  ``tls`` is "none", "starttls" or
    "implicit"; AUTH is offered only over TLS unless it is "none".
    ``require_tls`` refuses MAIL and AUTH before STARTTLS with 530.  ``ca``
    (a :class:`~mailrelay.testing.tls.ThrowawayCA`, made when needed) issues
    the certificate for ``hostnames`` and checks client certificates, which
    ``require_client_cert`` makes mandatory.  ``smtputf8``, ``pipelining`` and
    ``size`` advertise (and for ``size``, enforce) those extensions.

    Recorded data lives in plain lists (``messages``, ``raw_messages``,
    ``transactions``, ``commands``, ``auth_attempts``,
    ``client_certificate_subjects``) that :meth:`clear` empties in place.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        users: Mapping[str, str] | None = None,
        mechanisms: Sequence[str] = ("PLAIN",),
        tls: str = "none",
        ca: ThrowawayCA | None = None,
        require_tls: bool = False,
        hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
        require_client_cert: bool = False,
        smtputf8: bool = False,
        pipelining: bool = False,
        size: int | None = None,
        hostname: str = "fake-mta.example",
        timeout: int = 600,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        if require_tls and tls == "none":
            raise ValueError("require_tls needs tls='starttls' (or 'implicit')")
        if require_client_cert and tls == "none":
            raise ValueError("require_client_cert needs tls='starttls' or 'implicit'")
        if users is not None:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in users.items()):
                raise TypeError("users must map str user names to str passwords")
            users = dict(users)
        mechanisms = tuple(m.upper() for m in mechanisms)
        unknown = [m for m in mechanisms if m not in MECHANISMS]
        if unknown or len(set(mechanisms)) != len(mechanisms):
            raise ValueError(f"mechanisms must be distinct names from {MECHANISMS}: {mechanisms}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int or None, not {size!r}")
        if not hostname.isascii():
            raise ValueError(f"hostname must be ASCII, not {hostname!r}")

        self._reactor = reactor
        self._users = users
        self._mechanisms = mechanisms
        self._tls_mode = tls
        self._require_tls = require_tls
        self._hostnames = tuple(hostnames)
        self._require_client_cert = require_client_cert
        self._smtputf8 = smtputf8
        self._pipelining = pipelining
        self._size = size
        self._hostname = hostname.encode("ascii")
        self._timeout = timeout
        if ca is None and tls != "none":
            # Imported here: trustme is only needed (and only installed with
            # mailrelay[testing]) when TLS is used.
            from mailrelay.testing.tls import ThrowawayCA

            ca = ThrowawayCA()
        self.ca = ca
        self._tls_options: Any = None
        self._implicit_factory: TLSMemoryBIOFactory | None = None

        self.host: str | None = None
        self.port: int | None = None
        self._port: Any = None
        self._open: dict[_FakeSMTPServer, bool] = {}  # live connection -> accepted on the port
        self._connection_count = 0
        self._faults: list[_Fault] = []

        self.messages: list[email.message.Message] = []
        self.raw_messages: list[bytes] = []
        self.transactions: list[Transaction] = []
        self.commands: list[bytes] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []
        self.client_certificate_subjects: list[str] = []
        self._plain_response: str | None = None

    # -- life cycle ---------------------------------------------------------

    def start(self, interface: str = "127.0.0.1", port: int = 0) -> defer.Deferred[FakeMTA]:
        """Listen on ``interface``:``port`` (0 picks a free port).

        Fires with this object once listening; ``host`` and ``port`` then hold
        the bound address.  Resets the connection count.
        """
        if self._port is not None:
            raise RuntimeError(f"FakeMTA is already listening on {self.host}:{self.port}")
        endpoint_type = (
            endpoints.TCP6ServerEndpoint if ":" in interface else endpoints.TCP4ServerEndpoint
        )
        endpoint = endpoint_type(self._reactor, port, interface=interface)
        self._connection_count = 0

        def listening(listening_port: Any) -> FakeMTA:
            self._port = listening_port
            address = listening_port.getHost()
            self.host, self.port = address.host, address.port
            _log.debug("Fake MTA listening on {host}:{port}", host=self.host, port=self.port)
            return self

        return endpoint.listen(self).addCallback(listening)

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and drop every open connection.

        Fires once the port is closed and the connections it accepted are gone.
        In-memory connections are aborted too, but not waited for: only their
        test can deliver their ``connectionLost``.
        """
        waiting = []
        if self._port is not None:
            listening_port, self._port = self._port, None
            waiting.append(defer.maybeDeferred(listening_port.stopListening))
        for server, on_port in list(self._open.items()):
            if on_port:
                waiting.append(server.when_lost())
            server.transport.abortConnection()
        return defer.gatherResults(waiting).addCallback(lambda _: None)

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        """A server protocol for one connection (wrapped in TLS for implicit TLS)."""
        if self._tls_mode == "implicit":
            if self._implicit_factory is None:
                self._implicit_factory = TLSMemoryBIOFactory(
                    self._server_tls_options(), False, _SMTPFactory(self), clock=self._reactor
                )
                self._implicit_factory.noisy = False
            return self._implicit_factory.buildProtocol(addr)
        return self._build_smtp()

    def _build_smtp(self) -> _FakeSMTPServer:
        ctx = self._server_tls_options() if self._tls_mode == "starttls" else None
        server = _FakeSMTPServer(self, ctx)
        server.factory = self
        return server

    def _server_tls_options(self) -> Any:
        if self._tls_options is None:
            assert self.ca is not None
            self._tls_options = self.ca.server_options(
                self._hostnames, require_client_cert=self._require_client_cert
            )
        return self._tls_options

    # -- observations -------------------------------------------------------

    def get_connection_count(self) -> int:
        """Connections accepted since :meth:`start` or :meth:`reset_connection_count`."""
        return self._connection_count

    def reset_connection_count(self) -> None:
        """Count connections from zero again."""
        self._connection_count = 0

    def get_authentication_credentials(self) -> str | None:
        """The last ``AUTH PLAIN`` response, base64 exactly as the client sent it."""
        return self._plain_response

    def clear(self) -> None:
        """Forget recorded messages, transactions, commands and credentials.

        The connection count and pending faults are kept (see
        :meth:`reset_connection_count` and :meth:`clear_faults`).
        """
        for recorded in (
            self.messages,
            self.raw_messages,
            self.transactions,
            self.commands,
            self.auth_attempts,
            self.client_certificate_subjects,
        ):
            recorded.clear()
        self._plain_response = None

    # -- fault injection ----------------------------------------------------

    def reject(
        self,
        stage: str,
        code: int,
        text: bytes | str | None = None,
        count: int = 1,
        match: str | None = None,
    ) -> None:
        """Answer the next ``count`` commands of ``stage`` with ``code text``.

        ``stage`` is one of ``ehlo starttls auth mail rcpt data eom rset``
        ("eom" is the final "." of DATA).  ``match`` limits an "rcpt" fault to
        one recipient address (compared case-insensitively).  A rejected DATA or
        end of data ends the transaction; the session goes on.
        """
        self._check_stage(stage, REJECT_STAGES)
        if not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError(f"reject code must be a 4xx or 5xx int, not {code!r}")
        if match is not None and stage != "rcpt":
            raise ValueError("match only applies to the 'rcpt' stage")
        if text is None:
            text = _DEFAULT_RCPT_REJECT_TEXT if stage == "rcpt" else _DEFAULT_REJECT_TEXT
        elif isinstance(text, str):
            text = text.encode("utf-8")
        self._faults.append(
            _Fault("reject", stage, self._check_count(count), code=code, text=text, match=match)
        )

    def disconnect(self, stage: str, with_421: bool = True, count: int = 1) -> None:
        """Close the connection at the next ``count`` occurrences of ``stage``.

        With ``with_421`` the server first replies ``421 4.3.0 Closing``;
        without, it closes without replying.  Replies already sent are
        delivered either way.  Besides the reject stages, ``stage`` may be
        "greeting" (instead of the 220) or "quit" (instead of the 221).
        """
        self._check_stage(stage, DISCONNECT_STAGES)
        self._faults.append(
            _Fault("disconnect", stage, self._check_count(count), with_421=with_421)
        )

    def drop_during_data(self, after_bytes: int = 0, count: int = 1) -> None:
        """Close the connection once ``after_bytes`` bytes of DATA have arrived.

        Applies to the next ``count`` accepted DATA commands.  Bytes are
        counted on the wire at line boundaries; 0 closes right after the 354.
        """
        if not isinstance(after_bytes, int) or after_bytes < 0:
            raise ValueError(f"after_bytes must be an int >= 0, not {after_bytes!r}")
        self._faults.append(
            _Fault("drop", "data", self._check_count(count), after_bytes=after_bytes)
        )

    def delay(self, stage: str, seconds: float, count: int = 1) -> None:
        """Hold the reply to the next ``count`` occurrences of ``stage``.

        The reply (and everything the client sends meanwhile) waits ``seconds``
        on the reactor given to the constructor.  Other faults for the same
        stage apply when the delay is over.
        """
        self._check_stage(stage, DISCONNECT_STAGES)
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds!r}")
        self._faults.append(_Fault("delay", stage, self._check_count(count), seconds=seconds))

    def clear_faults(self) -> None:
        """Forget every fault that has not fired yet."""
        self._faults.clear()

    @staticmethod
    def _check_stage(stage: str, allowed: frozenset[str]) -> None:
        if stage not in allowed:
            raise ValueError(f"stage must be one of {sorted(allowed)}, not {stage!r}")

    @staticmethod
    def _check_count(count: int) -> int:
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, not {count!r}")
        return count

    def _take_fault(self, kind: str, stage: str, address: str | None = None) -> _Fault | None:
        for fault in self._faults:
            if fault.kind != kind or fault.stage != stage:
                continue
            if fault.match is not None and (
                address is None or address.casefold() != fault.match.casefold()
            ):
                continue
            fault.remaining -= 1
            if not fault.remaining:
                self._faults.remove(fault)
            _log.debug("Fake MTA injects {kind} at {stage}", kind=kind, stage=stage)
            return fault
        return None

    # -- called by the protocol ---------------------------------------------

    def _connection_made(self, server: _FakeSMTPServer) -> int:
        self._connection_count += 1
        self._open[server] = self._port is not None
        return self._connection_count

    def _connection_lost(self, server: _FakeSMTPServer) -> None:
        self._open.pop(server, None)

    def _record(self, transaction: Transaction, peer: str) -> None:
        self.transactions.append(transaction)
        self.raw_messages.append(transaction.data)
        message = email.message_from_bytes(transaction.data)
        message["X-Peer"] = peer
        message["X-MailFrom"] = transaction.mail_from or "<>"
        message["X-RcptTo"] = ", ".join(transaction.rcpts)
        self.messages.append(message)


class _SMTPFactory(protocol.Factory):
    """Builds the SMTP protocol that the implicit-TLS wrapper encloses."""

    noisy = False

    def __init__(self, mta: FakeMTA) -> None:
        self._mta = mta

    def buildProtocol(self, addr: Any) -> _FakeSMTPServer:
        return self._mta._build_smtp()


@implementer(IHandshakeListener)
class _FakeSMTPServer(smtp.ESMTP):
    """One fake-MTA connection.

    Twisted's ``_from``/``_to`` hold the envelope (``_from`` is ``""`` for
    ``<>``, ``_to`` a list of address strings) so that its HELO, EHLO and RSET
    reset them.  MAIL, RCPT and DATA are our own: Twisted's ignore parameters,
    reject UTF-8 and hand DATA to per-recipient ``IMessage`` objects that never
    see the raw bytes.
    """

    noisy = False

    def __init__(self, mta: FakeMTA, ctx: Any) -> None:
        super().__init__(chal=None, contextFactory=ctx)
        self._mta = mta
        self.host = mta._hostname
        self.timeout = mta._timeout
        # TimeoutMixin would use the global reactor.
        self.callLater = mta._reactor.callLater  # type: ignore[method-assign]
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
        self._connection = self._mta._connection_made(self)
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
        self._mta._connection_lost(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def handshakeCompleted(self) -> None:
        certificate = self.transport.getPeerCertificate()
        if certificate is not None:
            subject = certificate.to_cryptography().subject
            names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            self._mta.client_certificate_subjects.append(
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
            self._mta.commands.append(line)
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
        mta = self._mta
        if may_delay:
            fault = mta._take_fault("delay", stage, address)
            if fault is not None:
                self._held = mta._reactor.callLater(
                    fault.seconds, self._release, stage, proceed, address
                )
                return
        fault = mta._take_fault("disconnect", stage, address)
        if fault is not None:
            self._close(fault.with_421)
            return
        fault = mta._take_fault("reject", stage, address)
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
        if self._mta._pipelining:
            ext[b"PIPELINING"] = None
        if self._mta._size is not None:
            ext[b"SIZE"] = [b"%d" % self._mta._size]
        if self._mta._smtputf8:
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
        return self._mta._require_tls and not self._tls_active()

    # -- STARTTLS -----------------------------------------------------------

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self._mta._tls_mode != "starttls":
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
        if self._mta._users is None:
            return ()
        if self._mta._tls_mode != "none" and not self._tls_active():
            return ()
        return self._mta._mechanisms

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
            self._mta._plain_response = response.decode("ascii", "replace")
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
        password = (self._mta._users or {}).get(username)
        # Checked directly against the users dict: a cred Portal and realm
        # would add nothing here, as there are no avatars.
        accepted = password is not None and bool(
            self.challenger.checkPassword(password.encode("utf-8"))
        )
        self._finish_auth(accepted, username)

    def _finish_auth(self, accepted: bool, username: str, cancelled: bool = False) -> None:
        self.mode = smtp.COMMAND
        self.challenger = None
        self._mta.auth_attempts.append((self._auth_mechanism, username, accepted))
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
        if self._mta._users is not None and not self.authenticated:
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
                if self._mta._size is not None and int(value) > self._mta._size:
                    self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
                    return
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    self.sendCode(501, b"5.5.4 Bad BODY parameter")
                    return
            elif key == b"SMTPUTF8" and self._mta._smtputf8 and not equals:
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
        drop = self._mta._take_fault("drop", "data")
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
            if self._mta._size is not None and self._data_size > self._mta._size:
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
        self._mta._record(transaction, self._peer_text())
        self.sendCode(250, b"2.0.0 Ok: queued as %d" % len(self._mta.transactions))
