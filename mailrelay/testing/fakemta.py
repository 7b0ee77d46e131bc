"""A fake SMTP server for tests: it records what clients send and injects faults.

:class:`FakeMTA` is the public face of the fake: a server factory that checks
its options, listens on a loopback port (:meth:`FakeMTA.start`) or serves
in-memory transports through :meth:`FakeMTA.buildProtocol`
(``twisted.test.iosim``, ``StringTransport``), and behaves the same way in
both cases.  It keeps what the sessions report (recorded :class:`Transaction`
values, messages, commands, AUTH attempts) and the faults tests arm.

The pieces behind it: :mod:`mailrelay.testing.smtpserver` speaks ESMTP on one
connection and is handed a frozen ``ServerBehaviour``, this module's record
keeper (its ``SessionObserver``) and a
:class:`~mailrelay.testing.faults.FaultPlan`; :mod:`mailrelay.testing.tls`
makes the certificates.  Every reply is computed synchronously, so pipelined
commands are always answered in order; injected delays hold the reply *and*
everything received after it.

STARTTLS needs a transport that can really start TLS: a loopback socket
(iosim's ``startTLS`` is a stand-in that real TLS options do not support).
Implicit TLS works in memory too, because the TLS layer is part of the
protocol that :meth:`FakeMTA.buildProtocol` returns.
"""

from __future__ import annotations

import email
import email.message
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailrelay.testing.faults import FaultPlan
from mailrelay.testing.smtpserver import FakeSMTPServer, ServerBehaviour, Transaction

if TYPE_CHECKING:
    from mailrelay.testing.tls import ThrowawayCA

__all__ = ["FakeMTA", "Transaction"]

_log = Logger()

MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")
TLS_MODES = ("none", "starttls", "implicit")


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
        self._behaviour = ServerBehaviour(
            clock=reactor,
            hostname=hostname.encode("ascii"),
            timeout=timeout,
            users=users,
            mechanisms=mechanisms,
            tls_mode=tls,
            require_tls=require_tls,
            smtputf8=smtputf8,
            pipelining=pipelining,
            size=size,
        )
        self._hostnames = tuple(hostnames)
        self._require_client_cert = require_client_cert
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
        self._faults = FaultPlan()
        self._records = _Records()

        self.messages = self._records.messages
        self.raw_messages = self._records.raw_messages
        self.transactions = self._records.transactions
        self.commands = self._records.commands
        self.auth_attempts = self._records.auth_attempts
        self.client_certificate_subjects = self._records.client_certificate_subjects

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
        self._records.connection_count = 0

        def listening(listening_port: Any) -> FakeMTA:
            self._port = listening_port
            self._records.listening = True
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
            self._records.listening = False
            waiting.append(defer.maybeDeferred(listening_port.stopListening))
        for server, on_port in list(self._records.open.items()):
            if on_port:
                waiting.append(server.when_lost())
            server.transport.abortConnection()
        return defer.gatherResults(waiting).addCallback(lambda _: None)

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        """A server protocol for one connection (wrapped in TLS for implicit TLS)."""
        if self._behaviour.tls_mode == "implicit":
            if self._implicit_factory is None:
                self._implicit_factory = TLSMemoryBIOFactory(
                    self._server_tls_options(),
                    False,
                    _SMTPFactory(self._build_smtp),
                    clock=self._reactor,
                )
                self._implicit_factory.noisy = False
            return self._implicit_factory.buildProtocol(addr)
        return self._build_smtp()

    def _build_smtp(self) -> FakeSMTPServer:
        ctx = self._server_tls_options() if self._behaviour.tls_mode == "starttls" else None
        server = FakeSMTPServer(self._behaviour, self._records, self._faults, ctx)
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
        return self._records.connection_count

    def reset_connection_count(self) -> None:
        """Count connections from zero again."""
        self._records.connection_count = 0

    def get_authentication_credentials(self) -> str | None:
        """The last ``AUTH PLAIN`` response, base64 exactly as the client sent it."""
        return self._records.plain_response

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
        self._records.plain_response = None

    # -- fault injection (kept in a FaultPlan; see mailrelay.testing.faults) ----

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
        self._faults.reject(stage, code, text, count, match)

    def disconnect(self, stage: str, with_421: bool = True, count: int = 1) -> None:
        """Close the connection at the next ``count`` occurrences of ``stage``.

        With ``with_421`` the server first replies ``421 4.3.0 Closing``;
        without, it closes without replying.  Replies already sent are
        delivered either way.  Besides the reject stages, ``stage`` may be
        "greeting" (instead of the 220) or "quit" (instead of the 221).
        """
        self._faults.disconnect(stage, with_421, count)

    def drop_during_data(self, after_bytes: int = 0, count: int = 1) -> None:
        """Close the connection once ``after_bytes`` bytes of DATA have arrived.

        Applies to the next ``count`` accepted DATA commands.  Bytes are
        counted on the wire at line boundaries; 0 closes right after the 354.
        """
        self._faults.drop_during_data(after_bytes, count)

    def delay(self, stage: str, seconds: float, count: int = 1) -> None:
        """Hold the reply to the next ``count`` occurrences of ``stage``.

        The reply (and everything the client sends meanwhile) waits ``seconds``
        on the reactor given to the constructor.  Other faults for the same
        stage apply when the delay is over.
        """
        self._faults.delay(stage, seconds, count)

    def clear_faults(self) -> None:
        """Forget every fault that has not fired yet."""
        self._faults.clear()


class _Records:
    """What the sessions of one fake MTA reported: the ``SessionObserver`` it hands them.

    The lists are the ones :class:`FakeMTA` exposes; they are only ever
    emptied in place, so references tests hold stay current.
    """

    def __init__(self) -> None:
        self.listening = False  # whether new connections come from the listening port
        self.open: dict[FakeSMTPServer, bool] = {}  # live connection -> accepted on the port
        self.connection_count = 0
        self.plain_response: str | None = None
        self.messages: list[email.message.Message] = []
        self.raw_messages: list[bytes] = []
        self.transactions: list[Transaction] = []
        self.commands: list[bytes] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []
        self.client_certificate_subjects: list[str] = []

    def connection_made(self, server: FakeSMTPServer) -> int:
        self.connection_count += 1
        self.open[server] = self.listening
        return self.connection_count

    def connection_lost(self, server: FakeSMTPServer) -> None:
        self.open.pop(server, None)

    def command_received(self, line: bytes) -> None:
        self.commands.append(line)

    def auth_attempted(self, mechanism: str, username: str, accepted: bool) -> None:
        self.auth_attempts.append((mechanism, username, accepted))

    def plain_response_received(self, response: str) -> None:
        self.plain_response = response

    def client_certificate_seen(self, subject: str) -> None:
        self.client_certificate_subjects.append(subject)

    def transaction_accepted(self, transaction: Transaction, peer: str) -> int:
        self.transactions.append(transaction)
        self.raw_messages.append(transaction.data)
        message = email.message_from_bytes(transaction.data)
        message["X-Peer"] = peer
        message["X-MailFrom"] = transaction.mail_from or "<>"
        message["X-RcptTo"] = ", ".join(transaction.rcpts)
        self.messages.append(message)
        return len(self.transactions)


class _SMTPFactory(protocol.Factory):
    """Builds the SMTP protocol that the implicit-TLS wrapper encloses."""

    noisy = False

    def __init__(self, build: Callable[[], FakeSMTPServer]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> FakeSMTPServer:
        return self._build()
