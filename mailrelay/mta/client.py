"""The SMTP client protocol: one connection, many transactions.

Built on Twisted's ``ESMTPClient``, which supplies the line handling, reply
parsing, EHLO, STARTTLS and the SASL authenticators.  We take over where
Twisted's client is unsafe or too limited for a relay:

* authentication: CRAM-MD5 > PLAIN > LOGIN among the offered mechanisms, falling
  back to the next one when a mechanism is refused (Twisted tries only one, and
  sends a refused PLAIN twice); no credentials over clear text except to loopback;
* transactions: MAIL FROM parameters (SIZE, BODY=8BITMIME, SMTPUTF8), PIPELINING
  (RFC 2920) when offered, per-recipient results, no RSET after a success, and a
  connection that waits idle for the next message instead of quitting;
* transmittable data: a message is sent as the server's extensions allow
  (:meth:`~mailrelay.mta.message.WireMessage.for_server`: no line over 998
  octets, 7-bit without 8BITMIME), and one over the advertised SIZE is
  refused before MAIL (:class:`~mailrelay.mta.errors.MessageTooLarge`);
* errors: our own exceptions carrying code and response, never Twisted's, whose
  text includes the session log and so the base64 credentials.

The protocol knows nothing of queues or policy: its owner calls
:meth:`RelayClient.transact` for one transaction at a time.  It is one
module, though longer than most: one session state machine over Twisted's
``ESMTPClient``, whose EHLO, STARTTLS, AUTH and transaction states share the
same per-connection state.
"""

from __future__ import annotations

import base64
import socket
from collections import deque
from dataclasses import dataclass, replace

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.mail import _cred, smtp
from twisted.protocols import basic
from twisted.python.failure import Failure

from mailrelay.addresses import is_loopback_host
from mailrelay.mta.errors import (
    NO_REPLY,
    AuthenticationFailed,
    ConnectionFailed,
    ConnectionTimeout,
    DataRefused,
    DeliveryError,
    MessageTooLarge,
    SenderRefused,
    ServerClosing,
    TLSFailed,
)
from mailrelay.mta.message import WireMessage

_log = Logger()

# Most secure first, as smtplib orders them.
MECHANISMS = (b"CRAM-MD5", b"PLAIN", b"LOGIN")
_AUTHENTICATORS = {
    b"CRAM-MD5": _cred.CramMD5ClientAuthenticator,
    # RFC 4616 PLAIN with an empty authorisation identity: "\0user\0pass".
    b"PLAIN": _cred.PLAINAuthenticator,
    b"LOGIN": _cred.LOGINAuthenticator,
}

# Messages up to this size are written in one go rather than through a producer.
_SINGLE_WRITE = 256 * 1024

UTF8_REFUSAL = (553, b"5.6.7 Non-ASCII address and the server does not offer SMTPUTF8")


@dataclass(frozen=True)
class Transaction:
    """One message to send: envelope plus prepared DATA bytes."""

    sender: str
    recipients: tuple[str, ...]
    message: WireMessage


@dataclass(frozen=True)
class TransactionResult:
    """Per-recipient outcome, aligned with ``Transaction.recipients``.

    ``replies[i]`` is the (code, response) of the RCPT for recipient i, or a
    local refusal; accepted recipients have a 2xx code.
    """

    replies: tuple[tuple[int, bytes], ...]

    def refused(self) -> dict[int, tuple[int, bytes]]:
        return {i: r for i, r in enumerate(self.replies) if not 200 <= r[0] < 300}


def _describe_failure(reason: Failure) -> DeliveryError:
    """Map a connection-lost reason to our error, with a readable TLS cause."""
    exc = reason.value
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - service_identity is a dependency
        VerificationError = ()  # noqa: N806
    if isinstance(exc, VerificationError):
        return TLSFailed(NO_REPLY, f"TLS certificate does not match the host name: {exc}")
    if isinstance(exc, SSL.Error):
        return TLSFailed(NO_REPLY, f"TLS handshake failed: {exc}")
    if isinstance(exc, error.ConnectionDone):
        return ConnectionFailed(NO_REPLY, b"Connection closed by the server")
    return ConnectionFailed(NO_REPLY, f"Connection lost: {exc}")


class RelayClient(smtp.ESMTPClient):
    """SMTP client protocol for one connection to the smarthost.

    ``ready`` fires with the client once the session is set up (greeting,
    EHLO, STARTTLS, AUTH) or fails with a :class:`DeliveryError`.  ``closed``
    fires when the connection is gone.  Call :meth:`transact` for each message,
    one at a time, and :meth:`quit` to end the session.
    """

    # Twisted's debug log records every line sent, AUTH included, and copies it
    # into exception text: keep it off.
    debug = False

    # ESMTPClient routes every attribute assignment through a Python
    # __setattr__ that only exists to warn about the deprecated ``tlsMode``
    # (never used here); some 90 assignments per transaction add up.
    __setattr__ = object.__setattr__

    def __init__(
        self,
        *,
        clock,
        username: str | None = None,
        password: str | None = None,
        tls_context=None,
        require_starttls: bool = False,
        allow_plaintext_auth: bool = False,
        helo_name: str | None = None,
        timeout: float | None = 60.0,
        idle_timeout: float | None = None,
    ):
        secret = password.encode("utf-8") if password is not None and username is not None else None
        super().__init__(secret, tls_context, b"")
        self._username = username.encode("utf-8") if username is not None else None
        self.requireTransportSecurity = require_starttls
        self.requireAuthentication = secret is not None
        # Fall back to HELO only when neither TLS nor AUTH is at stake.
        self.heloFallback = not (require_starttls or secret is not None)
        self._allow_plaintext_auth = allow_plaintext_auth
        self._helo_name = helo_name
        self.timeout = timeout
        self._idle_timeout = idle_timeout
        # TimeoutMixin schedules on the global reactor unless told otherwise.
        self.callLater = clock.callLater
        self.extensions: dict[bytes, bytes | None] = {}
        self.ready: defer.Deferred[RelayClient] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._is_ready = False
        self._quitting = False
        self._lost = False
        self._tls_unconfirmed = False
        self._failure: DeliveryError | None = None
        self._current: defer.Deferred | None = None  # the running transaction's Deferred
        self._pending: deque = deque()  # replies still expected in this transaction
        self.transactions = 0

    # -- connection set-up ------------------------------------------------

    def connectionMade(self):  # noqa: N802
        # Without TCP_NODELAY every message stalls ~40 ms on Nagle + delayed ACK.
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:  # not a TCP socket (unix socket, test transport)
                pass
        self.identity = self._ehlo_identity()
        super().connectionMade()
        # Implicit TLS: until the greeting arrives, a lost connection is a
        # failed handshake (bad certificate, wrong name), not a network error.
        self._tls_unconfirmed = bool(self._tlsMode)
        self._failresponse = self._greeting_failed

    def lineReceived(self, line):  # noqa: N802
        self._tls_unconfirmed = False
        return super().lineReceived(line)

    def _ehlo_identity(self) -> bytes:
        if self._helo_name:
            return self._helo_name.encode("idna")
        name = socket.gethostname()
        if "." in name:
            return name.encode("idna")
        # As smtplib does: an address literal when the host name is not qualified.
        host = getattr(self.transport.getHost(), "host", "127.0.0.1")
        return f"[{'IPv6:' if ':' in host else ''}{host}]".encode("ascii")

    def _greeting_failed(self, code, resp):
        self._fail(ServerClosing(code, resp) if code == 421 else ConnectionFailed(code, resp))

    def esmtpEHLORequired(self, code=-1, resp=None):  # noqa: N802
        if code == 421:
            self._fail(ServerClosing(code, resp or b""))
        else:
            self._fail(ConnectionFailed(code if code > 0 else NO_REPLY, resp or b"EHLO refused"))

    def esmtpTLSRequired(self, code=-1, resp=None):  # noqa: N802
        self._fail(TLSFailed(NO_REPLY, b"STARTTLS is required but the server does not offer it"))

    def esmtpTLSFailed(self, code=-1, resp=None):  # noqa: N802
        self._fail(TLSFailed(code if code > 0 else NO_REPLY, resp or b"STARTTLS failed"))

    def esmtpState_starttls(self, code, resp):  # noqa: N802
        # Anything the server sent after its 220 arrived in clear text and
        # must not be read as if it came over TLS (CVE-2011-0411 class).
        if self.clearLineBuffer():
            self._fail(TLSFailed(NO_REPLY, b"Plain text received after the STARTTLS reply"))
            return
        try:
            self.transport.startTLS(self.context)
        except Exception as e:
            self._fail(TLSFailed(NO_REPLY, f"Cannot start TLS: {e}"))
            return
        self._tlsMode = True
        self._tls_unconfirmed = True
        self.esmtpState_ehlo(code, resp)

    def esmtpState_serverConfig(self, code, resp):  # noqa: N802
        items = {}
        for line in resp.splitlines():
            keyword, _, value = line.partition(b" ")
            items[keyword.upper()] = value or None
        self.extensions = items
        self.tryTLS(code, resp, items)

    def authenticate(self, code, resp, items):
        """Authenticate if we have credentials, trying mechanisms in order."""
        if self.secret is None:
            self._session_ready()
            return
        offered = set((items.get(b"AUTH") or b"").upper().split())
        mechanisms = [m for m in MECHANISMS if m in offered]
        if not mechanisms:
            self._fail(
                AuthenticationFailed(
                    NO_REPLY,
                    b"Credentials are configured but the server offers no supported AUTH mechanism",
                )
            )
            return
        if not (
            self._tlsMode
            or self._allow_plaintext_auth
            # The peer's address, not the configured name: a literal, so
            # what a name resolved to is what counts.
            or is_loopback_host(self.transport.getPeer().host)
        ):
            self._fail(
                AuthenticationFailed(
                    NO_REPLY,
                    b"Refusing to send credentials over an unencrypted "
                    b"connection to a non-loopback host; use smtps or starttls",
                )
            )
            return
        self._mechanisms = deque(mechanisms)
        self._last_auth_reply = (NO_REPLY, b"")
        self._next_mechanism()

    def _next_mechanism(self):
        if not self._mechanisms:
            code, text = self._last_auth_reply
            self._fail(AuthenticationFailed(code, text))
            return
        name = self._mechanisms.popleft()
        self._authinfo = _AUTHENTICATORS[name](self._username)
        self._expected = [235, 334]
        self._failresponse = self._auth_refused
        if name == b"PLAIN":
            initial = base64.b64encode(self._authinfo.challengeResponse(self.secret, None))
            self._okresponse = self._auth_ok
            self.sendLine(b"AUTH PLAIN " + initial)
        else:
            self._okresponse = self._auth_challenge
            self.sendLine(b"AUTH " + name)

    def _auth_challenge(self, code, resp):
        if code == 235:
            self._auth_ok(code, resp)
            return
        try:
            challenge = base64.b64decode(resp, validate=True)
        except ValueError:
            self.sendLine(b"*")  # cancel the exchange (RFC 4954 4)
            self._expected, self._okresponse = range(1000), self._auth_cancelled
            self._failresponse = self._auth_cancelled
            return
        self.sendLine(base64.b64encode(self._authinfo.challengeResponse(self.secret, challenge)))

    def _auth_cancelled(self, code, resp):
        self._last_auth_reply = (501, b"5.7.0 Malformed authentication challenge")
        self._next_mechanism()

    def _auth_refused(self, code, resp):
        if code == 421:
            self._fail(ServerClosing(code, resp))
            return
        if code < 400:  # e.g. smtp-sink's 250: not a success (RFC 4954 says 235)
            self._last_auth_reply = (NO_REPLY, b"Unexpected reply to AUTH: %d %s" % (code, resp))
        else:
            self._last_auth_reply = (code, resp)
        self._next_mechanism()

    def _auth_ok(self, code, resp):
        if code != 235:  # a 334 to PLAIN's initial response: the server wants more than it should
            self._auth_refused(code, resp)
            return
        del self._authinfo
        self._session_ready()

    # Both the HELO fall-back and Twisted's own paths end in smtpState_from.
    def smtpState_from(self, code, resp):  # noqa: N802
        self._session_ready()

    def _session_ready(self):
        self._expected = range(1000)
        self._okresponse = self._failresponse = self._unexpected_reply
        self._is_ready = True
        self._go_idle()
        ready, self.ready = self.ready, None
        if ready is not None:
            ready.callback(self)

    # -- transactions -----------------------------------------------------

    def supports(self, keyword: bytes) -> bool:
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The largest message the server accepts (its SIZE), or None if it set none."""
        value = self.extensions.get(b"SIZE")
        if value is None or not value.strip().isdigit():
            return None
        return int(value) or None  # RFC 1870: SIZE 0 means no fixed limit

    def transact(self, transaction: Transaction) -> defer.Deferred[TransactionResult]:
        """Send one message; fires with per-recipient replies.

        Fails with :class:`SenderRefused` or :class:`DataRefused` when the
        server refused the whole transaction, or another
        :class:`DeliveryError` when the connection failed; after a failure the
        client is closing and must not be reused, except after
        :class:`MessageTooLarge`, which is found before anything is sent.
        """
        if not self._is_ready or self._current is not None or self._quitting:
            return defer.fail(ConnectionFailed(NO_REPLY, b"Connection not ready for a transaction"))
        d = defer.Deferred()
        self._current = d
        self.transactions += 1
        self.setTimeout(self.timeout)
        self._begin(transaction)
        return d

    def _begin(self, txn: Transaction):
        utf8 = self.supports(b"SMTPUTF8")
        if not txn.sender.isascii() and not utf8:
            self._finish_error(SenderRefused(*UTF8_REFUSAL))
            return
        self._txn = txn
        self._replies: list = [None] * len(txn.recipients)
        self._sendable = []
        for i, r in enumerate(txn.recipients):
            if r.isascii() or utf8:
                self._sendable.append(i)
            else:
                self._replies[i] = UTF8_REFUSAL
        if not self._sendable:
            self._finish_result()
            return
        # Rewritten only when needed, and then once per message and capability.
        message = txn.message.for_server(eight_bit_mime=self.supports(b"8BITMIME"))
        limit = self.size_limit
        if limit is not None and message.size > limit:
            self._refuse_locally(MessageTooLarge(message.size, limit))
            return
        if message is not txn.message:
            txn = self._txn = replace(txn, message=message)
        params = []
        if self.supports(b"SIZE"):
            params.append(b"SIZE=%d" % txn.message.size)
        if txn.message.eight_bit and self.supports(b"8BITMIME"):
            params.append(b"BODY=8BITMIME")
        needs_utf8 = not txn.sender.isascii() or any(
            not txn.recipients[i].isascii() for i in self._sendable
        )
        if needs_utf8:
            params.append(b"SMTPUTF8")
        mail = b"MAIL FROM:<" + txn.sender.encode("utf-8") + b">"
        if params:
            mail += b" " + b" ".join(params)
        self._mail_reply = None
        self._data_reply = None
        self._pipelining = self.supports(b"PIPELINING")
        self._rcpt_queue = deque(self._sendable)
        self._expected = range(1000)
        self._okresponse = self._failresponse = self._on_reply
        if self._pipelining:
            lines = [mail]
            for i in self._sendable:
                lines.append(b"RCPT TO:<" + txn.recipients[i].encode("utf-8") + b">")
                self._pending.append(("rcpt", i))
            lines.append(b"DATA")
            self._pending.appendleft(("mail", None))
            self._pending.append(("data", None))
            self.transport.write(b"".join(line + b"\r\n" for line in lines))
        else:
            self._pending.append(("mail", None))
            self.sendLine(mail)

    def _on_reply(self, code, resp):
        kind, index = self._pending.popleft()
        if code == 421:
            # The server is shutting down; it closes the connection after this.
            self._pending.clear()
            self._finish_error(ServerClosing(code, resp))
            return
        if kind == "mail":
            self._mail_reply = (code, resp)
            if not self._pipelining:
                if code != 250:
                    self._finish_error(SenderRefused(code, resp))
                else:
                    self._send_next_rcpt()
        elif kind == "rcpt":
            self._replies[index] = (code, resp)
            if not self._pipelining:
                self._send_next_rcpt()
        elif kind == "data":
            self._data_reply = (code, resp)
            self._after_data_reply(code, resp)
        elif kind == "eom":
            self._after_message(code, resp)
        elif kind == "rset":
            self._after_rset(code, resp)

    def _send_next_rcpt(self):
        if self._rcpt_queue:
            i = self._rcpt_queue.popleft()
            self._pending.append(("rcpt", i))
            self.sendLine(b"RCPT TO:<" + self._txn.recipients[i].encode("utf-8") + b">")
        elif self._accepted():
            self._pending.append(("data", None))
            self.sendLine(b"DATA")
        else:
            self._reset_then(self._finish_result)

    def _accepted(self):
        return [i for i in self._sendable if 200 <= self._replies[i][0] < 300]

    def _after_data_reply(self, code, resp):
        mail_ok = self._mail_reply is not None and self._mail_reply[0] == 250
        if code == 354:
            if not (mail_ok and self._accepted()):
                # A server that said 354 without a valid MAIL/RCPT: end the
                # empty message at once and discard whatever it says.
                self._pending.append(("eom", None))
                self.transport.write(b".\r\n")
                self._discard_message = True
                return
            self._discard_message = False
            self._pending.append(("eom", None))
            data = self._txn.message.data
            if len(data) <= _SINGLE_WRITE:
                # One write for message and terminator: a producer would cost
                # a reactor turn and a syscall per chunk, plus one for ".".
                self.transport.writeSequence((data, b".\r\n"))
                return
            sender = basic.FileSender()
            d = sender.beginFileTransfer(
                _BytesReader(self._txn.message.data), self.transport, self._chunk_sent
            )
            d.addCallback(lambda _: self.transport.write(b".\r\n"))
            return
        if not mail_ok:
            self._finish_error(SenderRefused(*self._mail_reply))
        elif not self._accepted():
            self._reset_then(self._finish_result)
        else:
            self._finish_error(DataRefused(code, resp))

    def _chunk_sent(self, chunk):
        # A large message may take longer to send than one reply timeout.
        self.resetTimeout()
        return chunk

    def _after_message(self, code, resp):
        if getattr(self, "_discard_message", False):
            self._discard_message = False
            if not self._mail_reply or self._mail_reply[0] != 250:
                self._finish_error(SenderRefused(*self._mail_reply))
            else:
                self._reset_then(self._finish_result)
            return
        if code == 250:
            self._finish_result()
        else:
            self._finish_error(DataRefused(code, resp))

    def _reset_then(self, then):
        self._after_rset_call = then
        self._pending.append(("rset", None))
        self.sendLine(b"RSET")

    def _after_rset(self, code, resp):
        then = self._after_rset_call
        if code != 250:
            # Unlike Twisted (which answers a failed RSET with RSET forever),
            # give the connection up.
            self._is_ready = False
        then()

    def _finish_result(self):
        replies = tuple(r if r is not None else (NO_REPLY, b"No reply") for r in self._replies)
        d, self._current = self._current, None
        self._go_idle()
        d.callback(TransactionResult(replies))

    def _refuse_locally(self, exc: DeliveryError):
        """Fail the transaction before anything was sent; the session stays usable."""
        d, self._current = self._current, None
        self._go_idle()
        d.errback(exc)

    def _finish_error(self, exc: DeliveryError):
        d, self._current = self._current, None
        self._is_ready = False
        d.errback(exc)
        # The owner drops a connection after a whole-transaction failure.
        self.quit()

    def _go_idle(self):
        self._expected = range(1000)
        self._okresponse = self._failresponse = self._unexpected_reply
        if not self._is_ready:
            self.quit()
            return
        self.setTimeout(self._idle_timeout)

    def _unexpected_reply(self, code, resp):
        if code == 421:
            _log.info(
                "smarthost closed the idle connection: {code} {response}", code=code, response=resp
            )
        else:
            _log.warn("unexpected reply while idle: {code} {response}", code=code, response=resp)
        self._is_ready = False
        self.transport.loseConnection()

    # -- ending -----------------------------------------------------------

    def is_usable(self) -> bool:
        return self._is_ready and not self._quitting and self._current is None

    def quit(self) -> defer.Deferred[None]:
        """Send QUIT (if the session is healthy) and close; fires when closed."""
        if not self._quitting:
            self._quitting = True
            self._is_ready = False
            if self.transport is not None and not self._lost:
                self.setTimeout(self.timeout)
                self._expected = range(1000)
                self._okresponse = self._failresponse = lambda code, resp: (
                    self.transport.loseConnection()
                )
                self.sendLine(b"QUIT")
        return _chain(self.closed)

    def timeoutConnection(self):  # noqa: N802
        if self._is_ready and self._current is None and not self._quitting:
            self.quit()  # idle too long: leave politely
            return
        self._fail(
            ConnectionTimeout(NO_REPLY, b"Timed out waiting for the server's reply"), abort=True
        )

    def sendError(self, exc):  # noqa: N802
        # Any path of Twisted's own state machine that gives up ends here;
        # never pass its exception on: its text holds the session log.
        code = getattr(exc, "code", -1)
        resp = getattr(exc, "resp", b"") or b""
        if isinstance(resp, str):
            resp = resp.encode("utf-8", "replace")
        if code is None or code < 0:
            self._fail(ConnectionFailed(NO_REPLY, b"Invalid response from the server"), abort=True)
        else:
            self._fail(ConnectionFailed(code, resp))

    def _fail(self, exc: DeliveryError, *, abort: bool = False):
        """Give up on this connection, reporting ``exc`` to whoever waits."""
        if self._failure is None:
            self._failure = exc
        self._is_ready = False
        waiting, self._current = self._current, None
        ready, self.ready = self.ready, None
        self._pending.clear()
        for d in (waiting, ready):
            if d is not None:
                d.errback(exc)
        if abort:
            self._quitting = True
            if self.transport is not None:
                self.transport.abortConnection()
        else:
            self.quit()

    def connectionLost(self, reason=error.ConnectionDone):  # noqa: N802
        super().connectionLost(reason)
        self._lost = True
        self.setTimeout(None)
        self._is_ready = False
        if self._current is not None or self.ready is not None:
            exc = self._failure or _describe_failure(reason)
            if self._tls_unconfirmed and not isinstance(exc, TLSFailed):
                exc = TLSFailed(NO_REPLY, f"TLS handshake failed: {reason.getErrorMessage()}")
            waiting, self._current = self._current, None
            ready, self.ready = self.ready, None
            for d in (waiting, ready):
                if d is not None:
                    d.errback(exc)
        closed, self.closed = self.closed, None
        if closed is not None:
            closed.callback(None)


def _chain(d):
    """A Deferred that fires when ``d`` has fired (or at once if ``d`` is None)."""
    if d is None:
        return defer.succeed(None)
    out = defer.Deferred()
    d.addBoth(lambda r: (out.callback(None), r)[1])
    return out


class _BytesReader:
    """The minimal file interface FileSender reads from, without copying."""

    def __init__(self, data: bytes):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int) -> bytes:
        chunk = self._view[self._pos : self._pos + size]
        self._pos += len(chunk)
        return bytes(chunk)
