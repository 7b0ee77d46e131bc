"""Settings: one INI file with Mailman-compatible key names -> validated, frozen values.

Every key has a default (see :func:`describe_defaults`), so no file at all is a
working configuration.  Anything wrong (an unknown section or key, a bad value,
an unreadable file, a duplicate) raises :class:`~mailrelay.errors.ConfigurationError`
with a message naming the file, the section, the key and the value.
"""

from __future__ import annotations

import ast
import configparser
import difflib
import ipaddress
import math
import os
import re
import socket
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from twisted.internet.endpoints import quoteStringArgument

from mailrelay.addresses import check_mailbox
from mailrelay.errors import ConfigurationError, InvalidAddress

__all__ = [
    "ENDPOINT_TYPES",
    "PASSWORD_ENVIRONMENT_VARIABLE",
    "SECURE_MODES",
    "DevModeSettings",
    "MTASettings",
    "PathSettings",
    "Settings",
    "describe_defaults",
    "load_settings",
    "parse_bool",
    "parse_duration",
    "parse_size",
]

PASSWORD_ENVIRONMENT_VARIABLE = "MAILRELAY_SMTP_PASS"
SECURE_MODES: tuple[str, ...] = ("smtp", "smtps", "starttls")
ENDPOINT_TYPES: tuple[str, ...] = ("tcp", "tcp6", "unix", "ssl", "systemd")

# Twisted's default for unix: endpoints is 666 (anyone on the host may inject
# mail); the MTA and mailrelay normally share a group, so 660 is the safe default.
_UNIX_SOCKET_MODE = "660"

_NO_FILE = "<built-in defaults>"
_MAPPING = "<mapping>"


# ---------------------------------------------------------------------------
# Value parsers: each raises ValueError with a short reason.

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(_NUMBER + r"\Z", re.ASCII)
_DURATION_PART = re.compile(r"\s*(" + _NUMBER + r")\s*([a-zA-Z]+)", re.ASCII)
_WHOLE_NUMBER = re.compile(r"[0-9]+\Z")
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


def _parse_int(text: str, minimum: int = 0, maximum: int | None = None) -> int:
    text = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError("not a whole number")
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            raise ValueError(f"out of range ({minimum}-{maximum})")
        raise ValueError(f"must be at least {minimum}")
    return value


def _parse_port(text: str) -> int:
    try:
        return _parse_int(text, 1, 65535)
    except ValueError:
        raise ValueError("not a port number (1-65535)") from None


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


def _is_host_name(text: str) -> bool:
    labels = text.removesuffix(".").split(".")
    return bool(text) and len(text) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_host(text: str) -> str:
    """A host name or IP address; brackets around an IPv6 address are dropped."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]") and _is_ip_address(host[1:-1]):
        return host[1:-1]
    if _is_ip_address(host) or _is_host_name(host):
        return host
    raise ValueError("not a host name or IP address")


def _parse_greeting_name(text: str) -> str:
    """A name for LHLO/EHLO greetings: a domain or an address literal; empty = the FQDN."""
    name = text.strip()
    if not name or _is_host_name(name):
        return name
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1].removeprefix("IPv6:")
        if _is_ip_address(literal):
            return name
    raise ValueError("not a domain name or address literal like [192.0.2.1]")


def _parse_text(text: str) -> str:
    return text.strip()


def _parse_secure_mode(text: str) -> str:
    # The MTA layer turns this into its SecureMode; here we only check membership
    # so that a typo fails at start-up rather than at the first delivery.
    mode = text.strip().lower()
    if mode not in SECURE_MODES:
        raise ValueError(f"not a secure mode (one of {', '.join(SECURE_MODES)}, any case)")
    return mode


def _parse_mailbox(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    try:
        return check_mailbox(text)
    except InvalidAddress as e:
        raise ValueError(f"not a valid mailbox: {e.reason}") from None


def _positive(parse: Callable[[str], float], what: str) -> Callable[[str], float]:
    def parse_positive(text: str) -> float:
        value = parse(text)
        if value <= 0:
            raise ValueError(f"{what} must be greater than zero")
        return value

    return parse_positive


# ---------------------------------------------------------------------------
# Endpoint descriptions.  Twisted's own parser (endpoints._parse) is private and
# serverFromString needs a reactor, loads TLS keys and reads systemd's
# environment, so we check the syntax ourselves with the same tokenising rules.

_ENDPOINT_KEYWORDS = {
    "tcp": {"port", "interface", "backlog"},
    "tcp6": {"port", "interface", "backlog"},
    "unix": {"address", "mode", "backlog", "lockfile"},
    "ssl": {
        "port",
        "interface",
        "backlog",
        "privateKey",
        "certKey",
        "sslmethod",
        "extraCertChain",
        "dhParameters",
    },
    "systemd": {"domain", "index", "name"},
}
_ENDPOINT_POSITIONAL = {"tcp": ["port"], "tcp6": ["port"], "ssl": ["port"], "unix": ["address"]}
_ENDPOINT_FILES = {
    "unix": ("address",),
    "ssl": ("privateKey", "certKey", "extraCertChain", "dhParameters"),
}


def _split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Split like Twisted: ``:`` separates, the first ``=`` names, ``\\`` escapes."""
    args: list[str] = []
    keywords: dict[str, str] = {}
    parts: list[str] = []
    current = ""
    allowed = ":="
    characters = iter(description)
    for character in characters:
        if character in allowed:
            parts.append(current)
            current = ""
            if character == "=":
                allowed = ":"
            else:
                _add_endpoint_part(parts, args, keywords)
                parts = []
                allowed = ":="
        elif character == "\\":
            current += next(characters, "")
        else:
            current += character
    parts.append(current)
    _add_endpoint_part(parts, args, keywords)
    return args, keywords


def _add_endpoint_part(parts: list[str], args: list[str], keywords: dict[str, str]) -> None:
    if len(parts) == 1:
        if keywords:
            raise ValueError(
                "positional argument after a keyword argument (write ':' in a value as '\\:')"
            )
        args.append(parts[0])
    else:
        name, value = parts
        if name in keywords:
            raise ValueError(f"{name}= given twice")
        keywords[name] = value


def _quote_positional(argument: str) -> str:
    # quoteStringArgument escapes ':' and '\'; a positional argument also needs '='.
    return quoteStringArgument(argument).replace("=", "\\=")


def _join_endpoint(kind: str, args: Iterable[str], keywords: Mapping[str, str]) -> str:
    pieces = [kind]
    pieces.extend(_quote_positional(arg) for arg in args)
    pieces.extend(f"{name}={quoteStringArgument(value)}" for name, value in keywords.items())
    return ":".join(pieces)


def _parse_endpoint(text: str, base_dir: str) -> str:
    """Check a server endpoint description, resolve its file names, add ``mode=660`` to unix."""
    text = text.strip()
    args, keywords = _split_endpoint(text)
    kind = args.pop(0) if args else ""
    if kind not in _ENDPOINT_KEYWORDS:
        raise ValueError(f"not a server endpoint (type must be one of {', '.join(ENDPOINT_TYPES)})")
    positional = _ENDPOINT_POSITIONAL.get(kind, [])
    if len(args) > len(positional):
        raise ValueError(f"{kind}: endpoint has too many arguments")
    given = dict(zip(positional, args, strict=False))
    for name in given.keys() & keywords.keys():
        raise ValueError(f"{kind}: endpoint gives {name} twice")
    keywords = {**given, **keywords}
    unknown = sorted(set(keywords) - _ENDPOINT_KEYWORDS[kind])
    if unknown:
        raise ValueError(f"{kind}: endpoint does not take {unknown[0]}=")
    if kind in ("tcp", "tcp6", "ssl"):
        if "port" not in keywords:
            raise ValueError(f"{kind}: endpoint needs a port")
        _parse_port(keywords["port"])
    if kind == "ssl" and "privateKey" not in keywords:
        # Twisted would fall back to ./server.pem, wherever the process runs.
        raise ValueError("ssl: endpoint needs privateKey=")
    if kind == "unix":
        if not keywords.get("address"):
            raise ValueError("unix: endpoint needs a socket path")
        keywords.setdefault("mode", _UNIX_SOCKET_MODE)
        if not re.fullmatch(r"[0-7]{1,4}", keywords["mode"]):
            raise ValueError("unix: mode= must be octal, e.g. 660")
        if keywords.get("lockfile", "0") not in ("0", "1"):
            raise ValueError("unix: lockfile= must be 0 or 1")
    if kind == "systemd":
        if keywords.get("domain") not in ("INET", "INET6", "UNIX"):
            raise ValueError("systemd: endpoint needs domain=INET, INET6 or UNIX")
        if ("index" in keywords) == ("name" in keywords):
            raise ValueError("systemd: endpoint needs exactly one of index= and name=")
        if "index" in keywords and not _WHOLE_NUMBER.match(keywords["index"]):
            raise ValueError("systemd: index= must be a whole number")
    if "backlog" in keywords and not _WHOLE_NUMBER.match(keywords["backlog"]):
        raise ValueError(f"{kind}: backlog= must be a whole number")
    for name in _ENDPOINT_FILES.get(kind, ()):
        if name in keywords:
            keywords[name] = _resolve(keywords[name], base_dir)
            if kind == "ssl":
                _check_readable(keywords[name])
    positional_values = [keywords.pop(name) for name in positional if name in keywords]
    return _join_endpoint(kind, positional_values, keywords)


def _derived_endpoint(host: str, port: int) -> str:
    kind = "tcp6" if ":" in host else "tcp"
    return _join_endpoint(kind, [str(port)], {"interface": host})


# ---------------------------------------------------------------------------
# Files.


def _resolve(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read file: {e.strerror or e}") from None


def _read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"cannot read password file: {getattr(e, 'strerror', None) or e}"
        ) from None
    password = line.rstrip("\r\n")
    if not password:
        raise ValueError("password file's first line is empty")
    return password


# ---------------------------------------------------------------------------
# The settings values.


@dataclass(frozen=True)
class PathSettings:
    """``[paths]``: where mailrelay keeps its state (an absolute directory)."""

    var_dir: str

    @property
    def registry_path(self) -> str:
        """The SQLite database of lists and members."""
        return os.path.join(self.var_dir, "registry.sqlite3")

    @property
    def spool_path(self) -> str:
        """The SQLite database of queued messages."""
        return os.path.join(self.var_dir, "spool.sqlite3")


@dataclass(frozen=True)
class MTASettings:
    """``[mta]``: the LMTP listener and the outbound SMTP smarthost.

    Durations are float seconds, sizes int octets, file names absolute ("" when
    unset).  ``smtp_pass`` is the effective password (environment, then
    ``smtp_pass_file``, then ``smtp_pass``) and is left out of ``repr``.
    """

    lmtp_host: str
    lmtp_port: int
    lmtp_endpoint: str
    lmtp_max_sessions: int
    lmtp_idle_timeout: float
    lmtp_max_line_length: int
    max_message_size: int
    lmtp_hostname: str
    smtp_host: str
    smtp_port: int
    smtp_user: str
    smtp_pass: str = field(repr=False)
    smtp_pass_file: str
    smtp_secure_mode: str
    smtp_verify_cert: bool
    smtp_verify_hostname: bool
    smtp_ca_file: str
    smtp_client_cert: str
    smtp_client_key: str
    smtp_credentials_file: str
    smtp_allow_plaintext_auth: bool
    smtp_helo_name: str
    smtp_timeout: float
    smtp_connect_timeout: float
    max_recipients: int
    max_sessions_per_connection: int
    max_connections: int
    smtp_idle_timeout: float
    delivery_retry_period: float
    retry_min_backoff: float
    retry_max_backoff: float
    verp_delivery: bool
    keep_delivered: float

    def effective_lmtp_hostname(self) -> str:
        """The name in the LMTP greeting: ``lmtp_hostname``, else this host's FQDN (may do DNS)."""
        return self.lmtp_hostname or socket.getfqdn()


@dataclass(frozen=True)
class DevModeSettings:
    """``[devmode]``: when enabled, every delivery goes to ``recipient`` instead."""

    enabled: bool
    recipient: str


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration; ``source`` is the file it came from, if any."""

    paths: PathSettings
    mta: MTASettings
    devmode: DevModeSettings
    source: str | None = None

    @classmethod
    def from_defaults(cls) -> Settings:
        """The built-in defaults, ignoring the environment (relative paths from the cwd)."""
        return load_settings(None, environ={})

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, Mapping[str, str | int | float | bool]],
        *,
        base_dir: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Settings from ``{section: {key: value}}``, validated exactly like a file.

        For embedders and tests; values may be INI text or Python ints, floats and
        bools.  Relative paths resolve against ``base_dir`` (default: the cwd).
        """
        raw: dict[str, dict[str, str]] = {}
        for section, keys in values.items():
            raw[section] = {}
            for key, value in keys.items():
                if isinstance(value, bool):
                    value = "yes" if value else "no"
                raw[section][key] = str(value)
        return _build(
            raw,
            source=None,
            label=_MAPPING,
            base_dir=os.path.abspath(base_dir or os.getcwd()),
            environ=os.environ if environ is None else environ,
        )


# ---------------------------------------------------------------------------
# The schema: one entry per key, in file order.  It drives parsing, defaults
# and describe_defaults(), so the three cannot drift apart.


@dataclass(frozen=True)
class _Key:
    section: str
    name: str
    default: str
    help: str
    # (text, base_dir) -> value; raises ValueError with a reason.
    parse: Callable[[str, str], object]
    secret: bool = False


def _plain(parse: Callable[[str], object]) -> Callable[[str, str], object]:
    return lambda text, base_dir: parse(text)


def _path(text: str, base_dir: str) -> str:
    text = text.strip()
    return _resolve(text, base_dir) if text else ""


def _readable_file(text: str, base_dir: str) -> str:
    path = _path(text, base_dir)
    if path:
        _check_readable(path)
    return path


def _var_dir(text: str, base_dir: str) -> str:
    path = _path(text, base_dir)
    if not path:
        raise ValueError("must not be empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError("exists and is not a directory")
    return path


def _endpoint(text: str, base_dir: str) -> str:
    return _parse_endpoint(text, base_dir) if text.strip() else ""


def _secret(text: str) -> str:
    return text.strip()


_duration = _positive(parse_duration, "duration")
_whole = _plain(_parse_int)

_SCHEMA: tuple[_Key, ...] = (
    _Key(
        "paths",
        "var_dir",
        "var",
        "Directory holding the list registry (registry.sqlite3) and the message "
        "spool (spool.sqlite3).",
        _var_dir,
    ),
    _Key(
        "mta",
        "lmtp_host",
        "127.0.0.1",
        "Address the LMTP server listens on.  Use 127.0.0.1 rather than localhost "
        "so that Postfix and mailrelay agree on the address family.",
        _plain(_parse_host),
    ),
    _Key("mta", "lmtp_port", "8024", "TCP port of the LMTP server.", _plain(_parse_port)),
    _Key(
        "mta",
        "lmtp_endpoint",
        "",
        "Twisted server endpoint for LMTP (tcp:, tcp6:, unix:, ssl:, systemd:); when "
        "set it wins over lmtp_host and lmtp_port.  Empty means "
        "tcp:<lmtp_port>:interface=<lmtp_host>.  A unix: socket without mode= is "
        "created with mode=660; a relative socket path is relative to this file.",
        _endpoint,
    ),
    _Key(
        "mta",
        "lmtp_max_sessions",
        "100",
        "Most LMTP connections served at once; more are refused until one closes.",
        _plain(lambda text: _parse_int(text, 1)),
    ),
    _Key(
        "mta",
        "lmtp_idle_timeout",
        "5m",
        "An LMTP client silent for this long is disconnected.",
        _plain(_duration),
    ),
    _Key(
        "mta",
        "lmtp_max_line_length",
        "16384",
        "Longest accepted LMTP line, in octets including CRLF (RFC 5321 requires at least 1000).",
        _plain(lambda text: _parse_int(text, 1000)),
    ),
    _Key(
        "mta",
        "max_message_size",
        "32MiB",
        "Largest message accepted over LMTP (advertised with SIZE).",
        _plain(_positive(parse_size, "size")),
    ),
    _Key(
        "mta",
        "lmtp_hostname",
        "",
        "Name in the LMTP greeting; empty means this host's fully qualified name.",
        _plain(_parse_greeting_name),
    ),
    _Key("mta", "smtp_host", "localhost", "The outgoing smarthost.", _plain(_parse_host)),
    _Key(
        "mta",
        "smtp_port",
        "25",
        "Port of the smarthost (usually 25 or 587; 465 for smtps).",
        _plain(_parse_port),
    ),
    _Key(
        "mta",
        "smtp_user",
        "",
        "User name for SMTP AUTH; authentication happens only when a password is set too.",
        _plain(_parse_text),
    ),
    _Key(
        "mta",
        "smtp_pass",
        "",
        f"Password for SMTP AUTH.  Prefer smtp_pass_file or the "
        f"{PASSWORD_ENVIRONMENT_VARIABLE} environment variable, which take precedence "
        f"(environment first, then the file, then this key).",
        _plain(_secret),
        secret=True,
    ),
    _Key(
        "mta",
        "smtp_pass_file",
        "",
        "File whose first line is the SMTP AUTH password.",
        _readable_file,
    ),
    _Key(
        "mta",
        "smtp_secure_mode",
        "smtp",
        "smtp (no TLS), smtps (TLS from the first byte) or starttls (STARTTLS "
        "required, before anything else).",
        _plain(_parse_secure_mode),
    ),
    _Key(
        "mta",
        "smtp_verify_cert",
        "yes",
        "Verify the smarthost's certificate (smtps and starttls only).",
        _plain(parse_bool),
    ),
    _Key(
        "mta",
        "smtp_verify_hostname",
        "yes",
        "Check that the certificate names smtp_host (only when smtp_verify_cert is on).",
        _plain(parse_bool),
    ),
    _Key(
        "mta",
        "smtp_ca_file",
        "",
        "PEM file of CA certificates to trust instead of the system's.",
        _readable_file,
    ),
    _Key(
        "mta",
        "smtp_client_cert",
        "",
        "PEM client certificate to present to the smarthost (needs smtp_client_key).",
        _readable_file,
    ),
    _Key(
        "mta",
        "smtp_client_key",
        "",
        "PEM private key of smtp_client_cert.",
        _readable_file,
    ),
    _Key(
        "mta",
        "smtp_credentials_file",
        "",
        "authinfo-style file of per-host credentials "
        "(machine HOST port PORT login USER password PASS).",
        _readable_file,
    ),
    _Key(
        "mta",
        "smtp_allow_plaintext_auth",
        "no",
        "Allow SMTP AUTH without TLS (smtp_secure_mode = smtp) to a smarthost that is "
        "not loopback, which sends the password in the clear; to localhost or a "
        "loopback address it is always allowed.",
        _plain(parse_bool),
    ),
    _Key(
        "mta",
        "smtp_helo_name",
        "",
        "Name sent in EHLO/HELO; empty means this host's name when it is qualified "
        "(has a dot), else the connection's address literal such as [192.0.2.1], "
        "as smtplib does.",
        _plain(_parse_greeting_name),
    ),
    _Key(
        "mta",
        "smtp_timeout",
        "60s",
        "How long to wait for each reply from the smarthost.",
        _plain(_duration),
    ),
    _Key(
        "mta",
        "smtp_connect_timeout",
        "30s",
        "How long to wait for a connection (and TLS handshake) to the smarthost.",
        _plain(_duration),
    ),
    _Key(
        "mta",
        "max_recipients",
        "10",
        "Most recipients per SMTP transaction; 0 puts all of them in one.",
        _whole,
    ),
    _Key(
        "mta",
        "max_sessions_per_connection",
        "0",
        "Transactions per SMTP connection before reconnecting; 0 means no limit.",
        _whole,
    ),
    _Key(
        "mta",
        "max_connections",
        "4",
        "Most simultaneous connections to the smarthost (at least 1).",
        _plain(lambda text: _parse_int(text, 1)),
    ),
    _Key(
        "mta",
        "smtp_idle_timeout",
        "10s",
        "An idle connection to the smarthost is closed after this long.",
        _plain(_duration),
    ),
    _Key(
        "mta",
        "delivery_retry_period",
        "5d",
        "How long to keep retrying a temporarily failing recipient before giving up.",
        _plain(parse_duration),
    ),
    _Key(
        "mta",
        "retry_min_backoff",
        "300s",
        "Delay before the first retry; it doubles on each further attempt.",
        _plain(_duration),
    ),
    _Key(
        "mta",
        "retry_max_backoff",
        "4000s",
        "Longest delay between retries (not less than retry_min_backoff).",
        _plain(_duration),
    ),
    _Key(
        "mta",
        "verp_delivery",
        "no",
        "Send each member a separate copy with a VERP envelope sender "
        "(list-bounces+member=domain@...).",
        _plain(parse_bool),
    ),
    _Key(
        "mta",
        "keep_delivered",
        "7d",
        "How long delivered entries stay in the spool (shown by mailrelay queue) "
        "before they are purged; 0 purges them at the next hourly clean-up.",
        _plain(parse_duration),
    ),
    _Key(
        "devmode",
        "enabled",
        "no",
        "Development mode: deliver every message to recipient instead of the members.",
        _plain(parse_bool),
    ),
    _Key(
        "devmode",
        "recipient",
        "",
        "The mailbox that receives all mail in development mode (required then).",
        _plain(_parse_mailbox),
    ),
)

_KEYS: dict[str, dict[str, _Key]] = {}
for _key in _SCHEMA:
    _KEYS.setdefault(_key.section, {})[_key.name] = _key
del _key


# ---------------------------------------------------------------------------
# Loading.


class _Context:
    """What an error message needs: the file label and the raw text of every key."""

    def __init__(self, label: str, raw: dict[str, dict[str, str]]):
        self.label = label
        self.raw = raw

    def error(self, section: str, keys: Iterable[str], reason: str) -> ConfigurationError:
        shown = []
        for name in keys:
            value = self.raw[section][name]
            if _KEYS[section][name].secret and value:
                shown.append(f"{name} = <hidden>")
            else:
                shown.append(f"{name} = {value!r}")
        return ConfigurationError(f"{self.label}: [{section}] {', '.join(shown)}: {reason}")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read and validate the INI file at ``path``; ``None`` means the built-in defaults.

    ``environ`` (default ``os.environ``) supplies ``MAILRELAY_SMTP_PASS``.  Raises
    :class:`ConfigurationError` naming file, section, key and value on any problem.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        return _build({}, source=None, label=_NO_FILE, base_dir=os.getcwd(), environ=environ)
    label = os.fspath(path)
    parser = configparser.ConfigParser(
        interpolation=None,
        # No [DEFAULT] magic: a key there would silently apply to every section.
        default_section="",
        strict=True,
    )
    try:
        with open(label, encoding="utf-8") as f:
            parser.read_file(f, source=label)
    except OSError as e:
        raise ConfigurationError(
            f"{label}: cannot read configuration file: {e.strerror or e}"
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigurationError(
            f"{label}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except configparser.DuplicateSectionError as e:
        raise ConfigurationError(
            f"{label}: [{e.section}]: duplicate section (line {e.lineno})"
        ) from None
    except configparser.DuplicateOptionError as e:
        raise ConfigurationError(
            f"{label}: [{e.section}] {e.option}: duplicate key (line {e.lineno})"
        ) from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigurationError(
            f"{label}, line {e.lineno}: key before any [section]: {e.line.strip()!r}"
        ) from None
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        line = _unrepr(line)
        raise ConfigurationError(
            f"{label}, line {lineno}: not a section header or key = value: {line.strip()!r}"
        ) from None
    raw = {section: dict(parser.items(section)) for section in parser.sections()}
    absolute = os.path.abspath(label)
    return _build(
        raw,
        source=absolute,
        label=label,
        base_dir=os.path.dirname(absolute),
        environ=environ,
    )


def _build(
    given: dict[str, dict[str, str]],
    *,
    source: str | None,
    label: str,
    base_dir: str,
    environ: Mapping[str, str],
) -> Settings:
    for section, keys in given.items():
        if section not in _KEYS:
            hint = _did_you_mean(section, _KEYS)
            raise ConfigurationError(
                f"{label}: [{section}]: unknown section{hint} (known: {', '.join(_KEYS)})"
            )
        for name, value in keys.items():
            if name not in _KEYS[section]:
                hint = _did_you_mean(name, _KEYS[section])
                raise ConfigurationError(
                    f"{label}: [{section}] {name} = {value!r}: unknown key{hint}"
                )

    raw = {
        section: {name: given.get(section, {}).get(name, key.default) for name, key in keys.items()}
        for section, keys in _KEYS.items()
    }
    context = _Context(label, raw)
    values: dict[str, dict[str, Any]] = {section: {} for section in _KEYS}
    for key in _SCHEMA:
        text = raw[key.section][key.name]
        try:
            if "\n" in text:
                raise ValueError("value spans several lines (is the next line indented?)")
            values[key.section][key.name] = key.parse(text, base_dir)
        except ValueError as e:
            raise context.error(key.section, [key.name], str(e)) from None

    mta = values["mta"]
    _check_mta(context, mta, environ)
    devmode = values["devmode"]
    if devmode["enabled"] and not devmode["recipient"]:
        raise context.error(
            "devmode", ["enabled", "recipient"], "development mode needs a recipient"
        )
    return Settings(
        paths=PathSettings(**values["paths"]),
        mta=MTASettings(**mta),
        devmode=DevModeSettings(**devmode),
        source=source,
    )


def _check_mta(context: _Context, mta: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Cross-key rules of ``[mta]``; fills in the effective endpoint and password."""
    if not mta["lmtp_endpoint"]:
        mta["lmtp_endpoint"] = _derived_endpoint(mta["lmtp_host"], mta["lmtp_port"])

    if bool(mta["smtp_client_cert"]) != bool(mta["smtp_client_key"]):
        raise context.error(
            "mta",
            ["smtp_client_cert", "smtp_client_key"],
            "a client certificate and its key go together: set both or neither",
        )
    if mta["retry_min_backoff"] > mta["retry_max_backoff"]:
        raise context.error(
            "mta",
            ["retry_min_backoff", "retry_max_backoff"],
            "retry_min_backoff must not exceed retry_max_backoff",
        )

    password = environ.get(PASSWORD_ENVIRONMENT_VARIABLE, "")
    password_keys = ["smtp_user"]  # what to show if the password turns out unusable
    if not password and mta["smtp_pass_file"]:
        try:
            password = _read_password_file(mta["smtp_pass_file"])
        except ValueError as e:
            raise context.error("mta", ["smtp_pass_file"], str(e)) from None
        password_keys.append("smtp_pass_file")
    if not password and mta["smtp_pass"]:
        password = mta["smtp_pass"]
        password_keys.append("smtp_pass")
    mta["smtp_pass"] = password

    if password and not mta["smtp_user"]:
        source = (
            password_keys[-1]
            if len(password_keys) > 1
            else (f"the {PASSWORD_ENVIRONMENT_VARIABLE} environment variable")
        )
        raise context.error("mta", password_keys, f"a password is set (by {source}) but no user")
    if mta["smtp_user"] and not password and not mta["smtp_credentials_file"]:
        raise context.error(
            "mta",
            ["smtp_user", "smtp_pass"],
            f"a user is set but no password (smtp_pass, smtp_pass_file or "
            f"{PASSWORD_ENVIRONMENT_VARIABLE})",
        )
    if (
        mta["smtp_user"]
        and mta["smtp_secure_mode"] == "smtp"
        and not mta["smtp_allow_plaintext_auth"]
        and not _is_loopback_host(mta["smtp_host"])
    ):
        # The same rule the client applies: clear-text AUTH only to loopback.
        raise context.error(
            "mta",
            ["smtp_user", "smtp_secure_mode", "smtp_host"],
            "SMTP AUTH without TLS would send the password in the clear to a host that is "
            "not loopback; use starttls or smtps, or set smtp_allow_plaintext_auth = yes",
        )


def _is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (no name lookup: this runs at load time)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unrepr(line: str) -> str:
    # configparser records bad lines as repr() text; show the line itself.
    try:
        value = ast.literal_eval(line)
    except (ValueError, SyntaxError):
        return line
    return value if isinstance(value, str) else line


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    by_lower = {candidate.lower(): candidate for candidate in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


# ---------------------------------------------------------------------------
# Documentation.

_HEADER = f"""\
# mailrelay configuration.
#
# Every key is shown with its default; a key left out keeps its default, and
# with no file at all mailrelay runs on these defaults.  Key names follow
# Mailman 3's [mta] and [devmode] sections.  Unknown sections or keys, bad
# values and unreadable files are errors naming the file, section and key.
#
# Values: durations are seconds or a number with a unit (30s, 5m, 4h, 5d, 1w,
# 1h30m); sizes are bytes or a number with a unit (10MB = 10**7, 32MiB =
# 32 * 2**20, 512k, 512KiB); booleans are yes/no, true/false, on/off or 1/0.
# Relative file names are relative to the directory of this file.  Comments
# go on lines of their own ('#' or ';'): text after a value is part of it.
#
# The SMTP password may also come from the {PASSWORD_ENVIRONMENT_VARIABLE}
# environment variable, which wins over smtp_pass_file and smtp_pass.
"""


def describe_defaults() -> str:
    """The defaults as INI text with a comment per key; loading it gives the defaults."""
    lines = [_HEADER.rstrip("\n")]
    for section, keys in _KEYS.items():
        lines.extend(["", f"[{section}]"])
        for index, key in enumerate(keys.values()):
            if index:
                lines.append("")
            lines.extend(
                textwrap.wrap(
                    key.help,
                    width=78,
                    initial_indent="# ",
                    subsequent_indent="# ",
                    break_on_hyphens=False,
                )
            )
            lines.append(f"{key.name} = {key.default}".rstrip())
    return "\n".join(lines) + "\n"
