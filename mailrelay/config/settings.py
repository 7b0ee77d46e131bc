"""Settings: one INI file with Mailman-compatible key names -> validated, frozen values.

The loader of the package: it reads the file, parses every key with the
parser the schema (:mod:`mailrelay.config.schema`) names, applies the rules
that span several keys, and returns a frozen :class:`Settings`, which
:mod:`mailrelay.service` and the command line turn into running parts.

Every key has a default (see :func:`describe_defaults`), so no file at all is a
working configuration.  Anything wrong (an unknown section or key, a bad value,
an unreadable file, a duplicate) raises :class:`~mailrelay.errors.ConfigurationError`
with a message naming the file, the section, the key and the value.
"""

from __future__ import annotations

import ast
import configparser
import difflib
import os
import socket
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailrelay.addresses import is_loopback_host
from mailrelay.config.endpoints import derived_endpoint, endpoint_backlog
from mailrelay.config.schema import KEYS, PASSWORD_ENVIRONMENT_VARIABLE, SCHEMA
from mailrelay.config.values import read_password_file
from mailrelay.errors import ConfigurationError

__all__ = [
    "CONFIG_ENVIRONMENT_VARIABLE",
    "DevModeSettings",
    "HTTPSettings",
    "LogSettings",
    "ListsSettings",
    "MTASettings",
    "PathSettings",
    "PostfixSettings",
    "Settings",
    "describe_defaults",
    "load_settings",
]

# Names the configuration file when no -C/--config is given (twistd and the CLI).
CONFIG_ENVIRONMENT_VARIABLE = "MAILRELAY_CONFIG"

_NO_FILE = "<built-in defaults>"
_MAPPING = "<mapping>"


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

    @property
    def reserve_path(self) -> str:
        """The file holding the spool's space reserve (``[mta] spool_reserve``)."""
        return os.path.join(self.var_dir, "space-reserve")


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
    lmtp_listen_backlog: int
    lmtp_max_sessions: int
    lmtp_idle_timeout: float
    lmtp_store_timeout: float
    spool_reserve: int
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
    # Last, with a default: MTASettings built by hand before it existed still work.
    personalize: bool = False

    def effective_lmtp_hostname(self) -> str:
        """The name in the LMTP greeting: ``lmtp_hostname``, else this host's FQDN (may do DNS)."""
        return self.lmtp_hostname or socket.getfqdn()


@dataclass(frozen=True)
class ListsSettings:
    """``[lists]``: the site's defaults for list processing.  ``template_dir``
    is absolute (``<var_dir>/templates`` unless set)."""

    pending_request_life: float = 3 * 86400.0
    max_autoresponses_per_day: int = 10
    held_post_life: float = 14 * 86400.0
    template_dir: str = ""
    # Bounce processing (mailrelay.listproc.bouncing), Mailman 3's names.
    bounce_score_threshold: int = 5
    bounce_info_stale_after: float = 7 * 86400.0
    bounce_you_are_disabled_warnings: int = 3
    bounce_you_are_disabled_warnings_interval: float = 7 * 86400.0
    bounce_notify_owner_on_disable: bool = True
    bounce_notify_owner_on_removal: bool = True
    forward_unrecognized_bounces_to: str = "owners"
    # How long list-processing mail waits for member delivery (the runner's).
    processing_yield: float = 1.0


@dataclass(frozen=True)
class DevModeSettings:
    """``[devmode]``: when enabled, every delivery goes to ``recipient`` instead."""

    enabled: bool
    recipient: str


@dataclass(frozen=True)
class HTTPSettings:
    """``[http]``: the HTTP site serving ``/metrics`` and the unsubscribe pages
    (``endpoint`` "" = none); ``public_url`` is the https base URL members see
    ("" = no unsubscribe URLs), ending in ``/``."""

    endpoint: str = ""
    public_url: str = ""


@dataclass(frozen=True)
class LogSettings:
    """``[log]``: ``format`` is ``text`` or ``json``."""

    format: str = "text"


@dataclass(frozen=True)
class PostfixSettings:
    """``[postfix]``: the maps kept up to date as lists change ("" = not kept)
    and the postmap command line (a tuple of words)."""

    transport_file: str = ""
    domains_file: str = ""
    postmap_command: tuple[str, ...] = ("postmap",)

    @property
    def enabled(self) -> bool:
        """Whether any map is to be kept up to date."""
        return bool(self.transport_file or self.domains_file)


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration; ``source`` is the file it came from, if any."""

    paths: PathSettings
    mta: MTASettings
    devmode: DevModeSettings
    source: str | None = None
    http: HTTPSettings = field(default_factory=HTTPSettings)
    log: LogSettings = field(default_factory=LogSettings)
    postfix: PostfixSettings = field(default_factory=PostfixSettings)
    lists: ListsSettings = field(default_factory=ListsSettings)

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
# Loading.


class _Context:
    """What an error message needs: the file label and the raw text of every key
    (``given`` holds only the keys the file or mapping set)."""

    def __init__(
        self, label: str, raw: dict[str, dict[str, str]], given: dict[str, dict[str, str]]
    ):
        self.label = label
        self.raw = raw
        self.given = given

    def error(self, section: str, keys: Iterable[str], reason: str) -> ConfigurationError:
        shown = []
        for name in keys:
            value = self.raw[section][name]
            if KEYS[section][name].secret and value:
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
        if section not in KEYS:
            hint = _did_you_mean(section, KEYS)
            raise ConfigurationError(
                f"{label}: [{section}]: unknown section{hint} (known: {', '.join(KEYS)})"
            )
        for name, value in keys.items():
            if name not in KEYS[section]:
                hint = _did_you_mean(name, KEYS[section])
                raise ConfigurationError(
                    f"{label}: [{section}] {name} = {value!r}: unknown key{hint}"
                )

    raw = {
        section: {name: given.get(section, {}).get(name, key.default) for name, key in keys.items()}
        for section, keys in KEYS.items()
    }
    context = _Context(label, raw, given)
    values: dict[str, dict[str, Any]] = {section: {} for section in KEYS}
    for key in SCHEMA:
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
    http = values["http"]
    if http["public_url"] and not http["endpoint"]:
        raise context.error(
            "http",
            ["public_url", "endpoint"],
            "public_url needs an endpoint to serve the unsubscribe pages on",
        )
    lists = values["lists"]
    if not lists["template_dir"]:
        lists["template_dir"] = os.path.join(values["paths"]["var_dir"], "templates")
    return Settings(
        paths=PathSettings(**values["paths"]),
        mta=MTASettings(**mta),
        devmode=DevModeSettings(**devmode),
        source=source,
        http=HTTPSettings(**http),
        log=LogSettings(**values["log"]),
        postfix=PostfixSettings(**values["postfix"]),
        lists=ListsSettings(**lists),
    )


def _check_mta(context: _Context, mta: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Cross-key rules of ``[mta]``; fills in the effective endpoint and password."""
    given = context.given.get("mta", {})
    if not mta["lmtp_endpoint"]:
        mta["lmtp_endpoint"] = derived_endpoint(mta["lmtp_host"], mta["lmtp_port"])
    else:
        # Which address wins would be a guess: an operator who set both meant one.
        for name in ("lmtp_host", "lmtp_port"):
            if name in given:
                raise context.error(
                    "mta",
                    [name, "lmtp_endpoint"],
                    f"lmtp_endpoint replaces lmtp_host and lmtp_port: set either "
                    f"lmtp_endpoint or {name}, not both",
                )
        if "lmtp_listen_backlog" in given and endpoint_backlog(mta["lmtp_endpoint"]) is not None:
            raise context.error(
                "mta",
                ["lmtp_listen_backlog", "lmtp_endpoint"],
                "lmtp_endpoint gives backlog= too: set the backlog in one place",
            )

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
            password = read_password_file(mta["smtp_pass_file"])
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
        and not is_loopback_host(mta["smtp_host"])
    ):
        # The client's rule (addresses.is_loopback_host), applied to the configured
        # name because nothing is looked up at load time: clear-text AUTH only to loopback.
        raise context.error(
            "mta",
            ["smtp_user", "smtp_secure_mode", "smtp_host"],
            "SMTP AUTH without TLS would send the password in the clear to a host that is "
            "not loopback; use starttls or smtps, or set smtp_allow_plaintext_auth = yes",
        )


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
    for section, keys in KEYS.items():
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
