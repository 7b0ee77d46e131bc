"""Value parsers for the INI file: text -> a Python value, or ``ValueError`` with a short reason.

The schema (:mod:`mailrelay.config.schema`) names one of these for each key;
the loader (:mod:`mailrelay.config.settings`) turns the reason into an error
naming the file, section, key and value.  Durations, sizes, booleans, whole
numbers, ports, host names, greeting names, secure modes, mailboxes, and the
file checks (resolve, readable, password file).  Pure functions except the
file checks, which only read.
"""

from __future__ import annotations

import configparser
import math
import os
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from urllib.parse import urlsplit

from mailrelay._checks import check_positive
from mailrelay._files import secret_file_problem
from mailrelay.addresses import check_mailbox, is_host_name, is_ip_address
from mailrelay.errors import InvalidAddress

SECURE_MODES: tuple[str, ...] = ("smtp", "smtps", "starttls")

# Value parsers: each raises ValueError with a short reason.

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(_NUMBER + r"\Z", re.ASCII)
_DURATION_PART = re.compile(r"\s*(" + _NUMBER + r")\s*([a-zA-Z]+)", re.ASCII)
_DURATION_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_HINT = "not a duration (e.g. 30s, 5m, 4h, 5d, 1w, 1h30m, or plain seconds)"


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``30s``, ``5m``, ``4h``, ``5d``, ``1w``, ``1h30m`` or plain seconds.

    Units are case-insensitive and must appear largest first, each at most once.
    Raises ``ValueError`` for anything else, including negative values.
    """
    text = text.strip()
    if _PLAIN_NUMBER.match(text):
        return _finite(float(text))
    total = 0.0
    position = 0
    previous_size = None
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(_DURATION_HINT)
        number, unit = match.groups()
        size = _DURATION_UNITS.get(unit.lower())
        if size is None:
            raise ValueError(f"{_DURATION_HINT}: unknown unit {unit!r}")
        if previous_size is not None and size >= previous_size:
            raise ValueError(f"{_DURATION_HINT}: units must be largest first, each once")
        previous_size = size
        total += float(number) * size
        position = match.end()
    if previous_size is None:
        raise ValueError(_DURATION_HINT)
    return _finite(total)


def _finite(seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError("duration too large")
    return seconds


_SIZE = re.compile(r"(" + _NUMBER + r")\s*([a-zA-Z]*)\Z", re.ASCII)
_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    _SIZE_UNITS[_letter] = _SIZE_UNITS[_letter + "b"] = 1000**_power
    _SIZE_UNITS[_letter + "i"] = _SIZE_UNITS[_letter + "ib"] = 1024**_power
del _power, _letter
_SIZE_HINT = "not a size (e.g. 32MiB, 10MB, 512KiB, 512k, or plain bytes)"


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``10MB`` (10**7), ``32MiB`` (32 * 2**20), ``512k`` or plain bytes.

    SI units (k, KB, M, MB, G, GB, T, TB) are powers of 1000, IEC units (KiB, MiB,
    GiB, TiB) powers of 1024; case-insensitive.  The result must be whole bytes.
    """
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(_SIZE_HINT)
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"{_SIZE_HINT}: unknown unit {unit!r}")
    try:
        value = Decimal(number) * factor
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(_SIZE_HINT) from None
    if value != value.to_integral_value():
        raise ValueError(f"{_SIZE_HINT}: not a whole number of bytes")
    return int(value)


def parse_bool(text: str) -> bool:
    """``yes``/``no``, ``true``/``false``, ``on``/``off`` or ``1``/``0``, in any case."""
    try:
        return configparser.ConfigParser.BOOLEAN_STATES[text.strip().lower()]
    except KeyError:
        raise ValueError("not a boolean (yes/no, true/false, on/off, 1/0)") from None


def parse_int(text: str, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number (sign allowed) within ``minimum``..``maximum`` (no maximum if ``None``)."""
    text = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError("not a whole number")
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            raise ValueError(f"out of range ({minimum}-{maximum})")
        raise ValueError(f"must be at least {minimum}")
    return value


def parse_port(text: str) -> int:
    """A TCP port number, 1-65535."""
    try:
        return parse_int(text, 1, 65535)
    except ValueError:
        raise ValueError("not a port number (1-65535)") from None


def parse_host(text: str) -> str:
    """A host name or IP address; brackets around an IPv6 address are dropped."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]") and is_ip_address(host[1:-1]):
        return host[1:-1]
    if is_ip_address(host) or is_host_name(host):
        return host
    raise ValueError("not a host name or IP address")


def parse_greeting_name(text: str) -> str:
    """A name for LHLO/EHLO greetings: a domain or an address literal; empty = the FQDN."""
    name = text.strip()
    if not name or is_host_name(name):
        return name
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1].removeprefix("IPv6:")
        if is_ip_address(literal):
            return name
    raise ValueError("not a domain name or address literal like [192.0.2.1]")


def parse_text(text: str) -> str:
    """Any text, without surrounding blanks."""
    return text.strip()


def parse_secure_mode(text: str) -> str:
    # The MTA layer turns this into its SecureMode; here we only check membership
    # so that a typo fails at start-up rather than at the first delivery.
    mode = text.strip().lower()
    if mode not in SECURE_MODES:
        raise ValueError(f"not a secure mode (one of {', '.join(SECURE_MODES)}, any case)")
    return mode


def parse_mailbox(text: str) -> str:
    """An RFC 5321 mailbox, or "" for an empty value."""
    text = text.strip()
    if not text:
        return ""
    try:
        return check_mailbox(text)
    except InvalidAddress as e:
        raise ValueError(f"not a valid mailbox: {e.reason}") from None


_URL_SAFE_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]*\Z")
MAX_PUBLIC_URL = 200


def parse_public_url(text: str) -> str:
    """An ``https://`` base URL (scheme, host, optional port and path; no query,
    fragment or user name), returned ending in ``/``; empty stays empty.

    Only https: RFC 8058 requires it of one-click unsubscribe URLs.  At most
    200 characters, so that a header carrying a URL below it stays within
    SMTP's line limit.
    """
    url = text.strip()
    if not url:
        return ""
    if len(url) > MAX_PUBLIC_URL or not url.isascii():
        raise ValueError(f"must be an ASCII URL of at most {MAX_PUBLIC_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a URL: {e}") from None
    if parts.scheme.lower() != "https":
        raise ValueError("must be an https:// URL (RFC 8058 requires HTTPS)")
    host = parts.hostname or ""
    if not (is_host_name(host) or is_ip_address(host)) or "@" in parts.netloc:
        raise ValueError("must name a host, without a user name")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must not have a query (?) or fragment (#)")
    if not _URL_SAFE_PATH.match(parts.path):
        raise ValueError("the path has characters that must be percent-encoded")
    netloc = host.lower() if ":" not in host else f"[{host}]"
    if port is not None:
        netloc += f":{port}"
    return f"https://{netloc}{parts.path.rstrip('/')}/"


def positive(parse: Callable[[str], float], what: str) -> Callable[[str], float]:
    """``parse``, refusing a result that is not above zero (``what`` names it)."""

    def parse_positive(text: str) -> float:
        return check_positive(what, parse(text))

    return parse_positive


# ---------------------------------------------------------------------------
# Files.


def resolve_path(path: str, base_dir: str) -> str:
    """``path`` with ``~`` expanded, made absolute against ``base_dir`` (the file's directory)."""
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def check_readable(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` can be opened for reading now."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read file: {e.strerror or e}") from None


def read_password_file(path: str) -> str:
    """The first line of ``path`` without its line ending; it must not be empty,
    and the group and others must have no access to the file."""
    try:
        with open(path, encoding="utf-8") as f:
            problem = secret_file_problem(path, os.fstat(f.fileno()).st_mode)
            line = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"cannot read password file: {getattr(e, 'strerror', None) or e}"
        ) from None
    if problem is not None:
        raise ValueError(f"password file {problem}")
    password = line.rstrip("\r\n")
    if not password:
        raise ValueError("password file's first line is empty")
    return password
