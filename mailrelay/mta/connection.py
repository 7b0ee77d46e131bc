"""``Connection``: sessions to one smarthost over a reused SMTP connection.

The Twisted counterpart of Mailman's ``mailman.mta.connection.Connection``:
the same constructor order and the same behaviour (lazy connect, N sessions
per connection then reconnect, 0 = unlimited, AUTH only with both user and
password, STARTTLS mandatory when chosen, devmode recipient rewrite), with
Deferreds instead of blocking calls and these deliberate improvements:

* timeouts on connect and on every reply;
* the refused dict stays keyed by the caller's recipients in devmode;
* a whole-transaction failure raises a :class:`DeliveryError` with ``code`` and
  ``response`` (444 when no reply came) and drops the connection, so the next
  ``sendmail`` reconnects and re-authenticates;
* credentials may come from an authinfo file per (host, port), and are never
  sent in clear text to a host that is not loopback unless allowed.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

from twisted.internet import defer, endpoints, error, protocol
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.addresses import check_mailbox
from mailrelay.errors import ConfigurationError
from mailrelay.interfaces import IMessageSender
from mailrelay.mta.client import RelayClient, Transaction
from mailrelay.mta.credentials import CredentialsFile
from mailrelay.mta.errors import NO_REPLY, ConnectionFailed, DeliveryError, SmarthostUnreachable
from mailrelay.mta.message import prepare_message
from mailrelay.mta.tls import client_tls_options
from mailrelay.observer import NO_OBSERVER

_log = Logger()


class SecureMode(enum.Enum):
    """How the connection to the smarthost is secured."""

    INSECURE = "smtp"  # no TLS
    IMPLICIT = "smtps"  # TLS from the first byte (RFC 8314)
    STARTTLS = "starttls"  # upgrade at once; a server without STARTTLS is an error


class InvalidSecureMode(ConfigurationError, ValueError):
    """A secure-mode string that is not smtp, smtps or starttls."""


def as_secure_mode(value: str | SecureMode) -> SecureMode:
    """Parse a configuration value into a SecureMode, ignoring case."""
    if isinstance(value, SecureMode):
        return value
    try:
        return SecureMode(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in SecureMode)
        raise InvalidSecureMode(
            f"invalid secure mode {value!r}: expected one of {choices}"
        ) from None


class _ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, make):
        self._make = make

    def buildProtocol(self, addr):  # noqa: N802
        return self._make()


@implementer(IMessageSender)
class Connection:
    """Send messages through one smarthost, reusing the connection.

    The connection is opened by the first :meth:`sendmail` and kept for the
    next ones; after ``sessions_per_connection`` messages (0: no limit) it is
    closed and the next message opens a new one.  Calls made while a message
    is being sent wait their turn: one transaction at a time.
    """

    def __init__(
        self,
        host: str,
        port: int,
        sessions_per_connection: int,
        user: str | None = None,
        password: str | None = None,
        secure_mode: SecureMode | str = SecureMode.INSECURE,
        verify_cert: bool = True,
        verify_hostname: bool = True,
        *,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 30.0,
        idle_timeout: float | None = None,
        devmode_recipient: str | None = None,
        credentials_file: str | None = None,
        allow_plaintext_auth: bool = False,
        helo_name: str | None = None,
        reactor: Any = None,
        observer: Any = None,
    ):
        if reactor is None:
            from twisted.internet import reactor  # noqa: PLC0415 - never at import time
        self._reactor = reactor
        # An IRelayObserver, told of each connection made or failed.
        self._observer = observer if observer is not None else NO_OBSERVER
        self.host = host
        self.port = int(port)
        self.sessions_per_connection = max(0, int(sessions_per_connection or 0))
        self.secure_mode = as_secure_mode(secure_mode)
        self.verify_cert = verify_cert
        # The host name check needs the certificate check (as in Mailman).
        self.verify_hostname = verify_hostname and verify_cert
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._allow_plaintext_auth = allow_plaintext_auth
        self._helo_name = helo_name
        if devmode_recipient is not None:
            check_mailbox(devmode_recipient)
        self.devmode_recipient = devmode_recipient
        # Empty strings mean "not set", as Mailman's configuration does.
        user, password = user or None, password or None
        if (user is None or password is None) and credentials_file:
            found = CredentialsFile.load(credentials_file).lookup(host, self.port)
            if found is not None:
                user, password = found.user, found.password
        self._user = user
        self._password = password
        self._tls_options = None
        if self.secure_mode is not SecureMode.INSECURE:
            self._tls_options = client_tls_options(
                host,
                verify_cert=self.verify_cert,
                verify_hostname=self.verify_hostname,
                ca_file=ca_file,
                client_cert=client_cert,
                client_key=client_key,
            )
        self._client: RelayClient | None = None
        self._session_count = 0
        self._queue: deque = deque()
        self._running = False
        self._closing: set[defer.Deferred] = set()

    @property
    def connected(self) -> bool:
        """Whether a usable connection to the smarthost is open now."""
        return self._client is not None and self._client.is_usable()

    @property
    def authenticates(self) -> bool:
        """Whether sessions authenticate (both user and password are set)."""
        return self._user is not None and self._password is not None

    def __repr__(self) -> str:
        return (
            f"<Connection {self.host}:{self.port} {self.secure_mode.value} "
            f"sessions={self.sessions_per_connection} user={self._user!r}>"
        )

    # -- public API -------------------------------------------------------

    def sendmail(self, sender: str, recipients, message) -> defer.Deferred[dict]:
        """Send ``message`` from ``sender`` to ``recipients``.

        Fires with ``{recipient: (code, response)}`` for the refused
        recipients (``{}`` when all were accepted), or fails with a
        :class:`DeliveryError` when the whole transaction failed.  Invalid
        input (a bad address, no recipients, a message of the wrong type)
        fails with ``InvalidAddress``/``ValueError``/``TypeError`` before
        anything is sent.
        """
        try:
            txn, originals = self._transaction(sender, recipients, message)
        except Exception:
            return defer.fail()
        d: defer.Deferred[dict] = defer.Deferred()
        self._queue.append((txn, originals, d))
        if not self._running:
            self._running = True
            defer.Deferred.fromCoroutine(self._drain())
        return d

    def quit(self) -> defer.Deferred[None]:
        """Close the connection (after the messages already queued)."""
        if self._running:
            # Let queued messages finish first; _drain closes nothing itself.
            d = defer.Deferred()
            self._queue.append((None, None, d))
            return d
        return self._close_client()

    # -- internals --------------------------------------------------------

    def _transaction(self, sender, recipients, message):
        if sender is None:
            sender = ""
        if sender != "":
            check_mailbox(sender)
        if isinstance(recipients, (str, bytes)):
            recipients = [recipients]
        originals = tuple(recipients)
        if not originals:
            raise ValueError("no recipients given")
        for r in originals:
            check_mailbox(r)
        wire = prepare_message(message)
        rcpts = originals
        if self.devmode_recipient is not None:
            # Same count as the real recipients, as Mailman does.
            rcpts = (self.devmode_recipient,) * len(originals)
        return Transaction(sender, tuple(str(r) for r in rcpts), wire), originals

    async def _drain(self):
        try:
            while self._queue:
                txn, originals, d = self._queue.popleft()
                if txn is None:  # a quit() queued behind messages
                    await self._close_client()
                    d.callback(None)
                    continue
                try:
                    refused = await self._send(txn, originals)
                except DeliveryError as e:
                    d.errback(e)
                except Exception:
                    _log.failure(
                        "unexpected error while sending to {host}:{port}",
                        host=self.host,
                        port=self.port,
                    )
                    d.errback(ConnectionFailed(NO_REPLY, b"Internal error in the SMTP client"))
                else:
                    d.callback(refused)
        finally:
            self._running = False

    async def _send(self, txn: Transaction, originals) -> dict:
        client = await self._ensure_client()
        try:
            result = await client.transact(txn)
        except DeliveryError:
            self._drop_client()
            raise
        self._session_count += 1
        if self.sessions_per_connection and self._session_count >= self.sessions_per_connection:
            self._close_client()
        refused = {}
        for index, reply in result.refused().items():
            refused.setdefault(originals[index], reply)
        return refused

    async def _ensure_client(self) -> RelayClient:
        if self._client is not None and self._client.is_usable():
            return self._client
        self._drop_client()
        client = await self._connect()
        self._client = client
        self._session_count = 0
        return client

    def _make_client(self) -> RelayClient:
        return RelayClient(
            clock=self._reactor,
            username=self._user,
            password=self._password,
            tls_context=self._tls_options if self.secure_mode is SecureMode.STARTTLS else None,
            require_starttls=self.secure_mode is SecureMode.STARTTLS,
            allow_plaintext_auth=self._allow_plaintext_auth,
            helo_name=self._helo_name,
            timeout=self.timeout,
            idle_timeout=self.idle_timeout,
        )

    async def _connect(self) -> RelayClient:
        endpoint = endpoints.HostnameEndpoint(
            self._reactor, self.host, self.port, timeout=self.connect_timeout
        )
        if self.secure_mode is SecureMode.IMPLICIT:
            endpoint = endpoints.wrapClientTLS(self._tls_options, endpoint)
        try:
            client = await endpoint.connect(_ClientFactory(self._make_client))
        except (error.ConnectError, error.DNSLookupError, OSError) as e:
            self._observer.smtp_connection_failed()
            # error.TimeoutError (the connect timeout) is a ConnectError as well.
            raise SmarthostUnreachable(
                NO_REPLY, f"Cannot connect to {self.host}:{self.port}: {e}"
            ) from None
        # ProtocolWrapper around the client when TLS wraps the endpoint.
        client = getattr(client, "wrappedProtocol", client)
        try:
            ready = await client.ready
        except DeliveryError:
            self._observer.smtp_connection_failed()
            self._track_closing(client)
            raise
        self._observer.smtp_connection_opened()
        return ready

    def _drop_client(self):
        client, self._client = self._client, None
        if client is not None:
            client.quit()
            self._track_closing(client)

    def _close_client(self) -> defer.Deferred[None]:
        self._drop_client()
        if not self._closing:
            return defer.succeed(None)
        return defer.DeferredList(list(self._closing)).addCallback(lambda _: None)

    def _track_closing(self, client: RelayClient):
        d = client.quit()
        if not d.called:
            self._closing.add(d)
            d.addBoth(lambda r: self._closing.discard(d))
