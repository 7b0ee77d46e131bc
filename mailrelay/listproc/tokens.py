"""Tokens: confirmation tokens for pending actions, and one-click unsubscribe tokens.

Confirmation tokens are random (160 bits from :mod:`secrets`), written as
lower-case hex so they survive the lower-casing of addresses at RCPT time in
``LIST-confirm+TOKEN@domain``.  Each names a :class:`Pending` record (list,
address, action, times) that the storage layer keeps and deletes on use;
:func:`check_pending` decides, without storage, whether a looked-up record may
be acted on for a given list and time.

One-click unsubscribe tokens (RFC 8058) are not stored at all: the token
carries the list and member addresses and an HMAC-SHA256 over them keyed by a
site secret (:func:`load_or_create_secret`), so it cannot be forged and needs
no table per message.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass
from hashlib import sha256

from mailrelay.errors import ConfigurationError

__all__ = [
    "DEFAULT_TOKEN_LIFETIME",
    "PendingAction",
    "Pending",
    "UnsubscribeTarget",
    "check_pending",
    "is_token",
    "load_or_create_secret",
    "make_unsubscribe_token",
    "new_pending",
    "new_token",
    "read_unsubscribe_token",
]

DEFAULT_TOKEN_LIFETIME = 3 * 24 * 3600.0  # the 3 days (Mailman: pending_request_life)
TOKEN_BYTES = 20  # 160 bits, as long as Mailman's SHA-1 hex tokens
_TOKEN = re.compile(r"[0-9a-f]{40}\Z")

SECRET_BYTES = 32
SECRET_FILE = "unsubscribe.key"
# Bumping the label invalidates every issued unsubscribe URL on purpose.
_UNSUBSCRIBE_LABEL = b"mailrelay one-click unsubscribe v1\0"
_MAC_BYTES = 16  # HMAC-SHA256 cut to 128 bits (RFC 2104 section 5 allows it)
_MAX_UNSUBSCRIBE_TOKEN = 1024


class PendingAction(str, enum.Enum):
    """What confirming a token does."""

    JOIN = "join"  # subscribe the address
    LEAVE = "leave"  # unsubscribe the address
    MODERATE = "moderate"  # an owner acts on the held post ``reference``
    REENABLE = "reenable"  # re-enable delivery disabled by bounces


@dataclass(frozen=True)
class Pending:
    """A pending confirmation: the value stored under ``token``.

    ``reference`` names what the action applies to beyond the address (the
    held post's spool id for MODERATE), "" otherwise.  Times are POSIX.
    """

    token: str
    list_address: str
    address: str
    action: PendingAction
    created_at: float
    expires_at: float
    reference: str = ""

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


def new_token() -> str:
    """A fresh confirmation token: 160 random bits as 40 lower-case hex digits."""
    return secrets.token_hex(TOKEN_BYTES)


def is_token(text: str) -> bool:
    """True if ``text`` has the form of a confirmation token (a cheap check
    before a look-up; case-insensitive, since addresses are lower-cased)."""
    return isinstance(text, str) and bool(_TOKEN.match(text.lower()))


def new_pending(
    list_address: str,
    address: str,
    action: PendingAction,
    now: float,
    lifetime: float = DEFAULT_TOKEN_LIFETIME,
    reference: str = "",
) -> Pending:
    """A new pending record with a fresh token, expiring ``lifetime`` seconds
    after ``now``; addresses are lower-cased."""
    if not lifetime > 0:
        raise ValueError(f"token lifetime must be positive, not {lifetime!r}")
    return Pending(
        token=new_token(),
        list_address=list_address.lower(),
        address=address.lower(),
        action=PendingAction(action),
        created_at=now,
        expires_at=now + lifetime,
        reference=reference,
    )


def check_pending(
    pending: Pending | None,
    list_address: str,
    now: float,
    actions: tuple[PendingAction, ...] | None = None,
) -> str | None:
    """Why ``pending`` (the record found for a token, or ``None``) must not be
    acted on for ``list_address`` at ``now``, or ``None`` if it may.

    A missing record covers forged and already used (single-use) tokens.
    ``actions`` limits which actions this path may confirm (e.g. only
    MODERATE from an owner's reply).  The reason is for the log; the sender
    only ever gets one neutral text, whatever it is.
    """
    if pending is None:
        return "unknown or already used token"
    if pending.list_address != list_address.lower():
        return "token of another list"
    if pending.expired(now):
        return "expired token"
    if actions is not None and pending.action not in actions:
        return f"token for a {pending.action.value} request"
    return None


# -- one-click unsubscribe ----------------------------------------------------


@dataclass(frozen=True)
class UnsubscribeTarget:
    """Who a verified one-click unsubscribe token is for (lower-case)."""

    list_address: str
    address: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, _UNSUBSCRIBE_LABEL + payload, sha256).digest()[:_MAC_BYTES]


def make_unsubscribe_token(secret: bytes, list_address: str, address: str) -> str:
    """A URL-safe token naming ``list_address`` and member ``address``:
    ``base64url(list "\\n" member) "." base64url(MAC)``.  Addresses are
    lower-cased first, so any spelling gives the same token."""
    if len(secret) < 16:
        raise ValueError("the unsubscribe secret must have at least 128 bits")
    list_address, address = list_address.lower(), address.lower()
    if any(c in list_address + address for c in "\n\r\0"):
        raise ValueError("an address cannot contain a line break or NUL")
    payload = f"{list_address}\n{address}".encode()
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def read_unsubscribe_token(secret: bytes, token: str) -> UnsubscribeTarget | None:
    """The list and member a token names if its MAC is right, else ``None``.

    Malformed, oversized, truncated and forged tokens all give ``None``; the
    MAC is compared in constant time.
    """
    if not isinstance(token, str) or len(token) > _MAX_UNSUBSCRIBE_TOKEN:
        return None
    encoded, dot, mac_text = token.partition(".")
    if not dot or not encoded or not mac_text:
        return None
    try:
        payload = _unb64(encoded)
        mac = _unb64(mac_text)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    try:
        list_address, newline, address = payload.decode("utf-8").partition("\n")
    except UnicodeDecodeError:
        return None
    if not newline or not list_address or not address:
        return None
    return UnsubscribeTarget(list_address, address)


def load_or_create_secret(directory: str, name: str = SECRET_FILE) -> bytes:
    """The site secret kept in ``directory/name``, created (mode 0600) if missing.

    The file holds 64 hex digits.  It is written to a temporary file and
    linked into place, so a concurrent caller never reads a partial key, and
    two first starts agree on one key.  An existing key that others may read,
    or that is not 256 bits of hex, raises :class:`ConfigurationError`.

    (``mailrelay._files.create_private_file`` is not used: it makes an empty
    0640 file for SQLite, while a key must be 0600 and never seen empty.)
    """
    os.makedirs(directory, mode=0o750, exist_ok=True)
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        _create_secret(path)
    return _read_secret(path)


def _create_secret(path: str) -> None:
    temporary = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process won the race; its key is the key
    finally:
        os.unlink(temporary)


def _read_secret(path: str) -> bytes:
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="ascii") as f:
            text = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"cannot read the unsubscribe secret {path}: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"the unsubscribe secret {path} is accessible to other users "
            f"(mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise ConfigurationError(
            f"the unsubscribe secret {path} must hold {SECRET_BYTES * 2} hex digits"
        )
    return secret
