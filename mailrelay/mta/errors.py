"""Whole-transaction failures of the outbound client.

Every error carries the SMTP reply ``code`` (an int) and ``response`` (bytes,
the reply text without the code), as Mailman's delivery layer reports them.
Where no reply was received (connection refused or lost, TLS failure, timeout)
the code is 444, as in Mailman.  No message text ever contains credentials.
"""

from __future__ import annotations

from mailrelay.errors import MailrelayError

NO_REPLY = 444


class DeliveryError(MailrelayError):
    """The whole SMTP transaction failed; nothing was accepted.

    ``site_problem`` marks failures caused by the relay's own set-up (bad
    credentials, TLS trouble, missing STARTTLS): the recipients are not at
    fault, so these must never be turned into bounces.
    """

    site_problem = False

    def __init__(self, code: int, response: bytes | str):
        if isinstance(response, str):
            response = response.encode("utf-8", "replace")
        super().__init__(code, response)
        self.code = code
        self.response = response

    @property
    def permanent(self) -> bool:
        """True for a 5xx reply other than 552 (RFC 5321 4.5.3.1.10), or a
        ``552 5.3.4`` (message too big: it will not shrink), unless a site problem."""
        if self.site_problem or self.code < 500:
            return False
        return self.code != 552 or self.response.lstrip().startswith(b"5.3.4")

    def __str__(self) -> str:
        return f"{self.code} {self.response.decode('utf-8', 'replace')}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.response!r})"


class ConnectionFailed(DeliveryError):
    """No usable SMTP session: refused, lost, garbled or closed by the server."""


class SmarthostUnreachable(ConnectionFailed):
    """No connection could be made at all (refused, no route, connect timeout).

    Unlike a connection lost mid-session, this says nothing about one message:
    every other message would fail the same way for now.
    """


class ConnectionTimeout(ConnectionFailed):
    """The server did not answer within the timeout."""


class ServerClosing(ConnectionFailed):
    """The server answered 421: it is closing the connection (temporary)."""


class TLSFailed(ConnectionFailed):
    """TLS could not be established or verified, or STARTTLS was not offered."""

    site_problem = True


class AuthenticationFailed(DeliveryError):
    """The server refused our credentials, or we refused to send them in clear text."""

    site_problem = True


class SenderRefused(DeliveryError):
    """MAIL FROM was refused."""


class DataRefused(DeliveryError):
    """DATA, or the message after it, was refused."""


class MessageTooLarge(DeliveryError):
    """The message is larger than the server's advertised SIZE (RFC 1870).

    Found before MAIL FROM, so nothing was sent and the connection stays
    usable.  The failure is permanent: the same message will not shrink.
    ``size`` is the message's size as it would have been sent, ``limit`` the
    server's.  The reply is the one a server gives for a message over its
    fixed maximum size (RFC 1870, RFC 5321 4.5.3.1.10, RFC 3463): ``552 5.3.4``,
    which :attr:`DeliveryError.permanent` and
    :func:`~mailrelay.retry.classify_error` take as permanent for a whole message.
    """

    def __init__(self, size: int, limit: int):
        super().__init__(
            552, b"5.3.4 Message too big for the smarthost (%d octets, limit %d)" % (size, limit)
        )
        self.size = size
        self.limit = limit

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size!r}, limit={self.limit!r})"
