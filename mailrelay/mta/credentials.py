"""Per-destination SMTP credentials from an authinfo/netrc-style file.

Each non-comment line names a destination and its credentials, in any order::

    machine smtp.example.com port 587 login relay password "s3cret word"
    machine mail.example.org login lists password hunter2        # any port
    default login fallback password xyzzy

This is the format of Emacs smtpmail's ``~/.authinfo`` (auth-source).  The
standard library's ``netrc`` cannot be used: it has no ``port`` token, so
per-(host, port) entries - what smtpmail's credential tuples express - would be
lost.  The first matching line wins; host names match case-insensitively.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from mailrelay._files import secret_file_problem
from mailrelay.errors import ConfigurationError

# Service names smtpmail and auth-source accept in place of a number.
_SERVICES = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465, "ssmtp": 465}
_KEYS = {"machine", "host", "login", "user", "account", "password", "port", "protocol"}


@dataclass(frozen=True)
class Credentials:
    """A user name and password; the password never appears in repr()."""

    user: str
    password: str = field(repr=False)


def _parse_port(value: str, where: str) -> int:
    if value.lower() in _SERVICES:
        return _SERVICES[value.lower()]
    try:
        port = int(value)
    except ValueError:
        raise ConfigurationError(
            f"{where}: port {value!r} is neither a number nor a service name"
        ) from None
    if not 0 < port < 65536:
        raise ConfigurationError(f"{where}: port {value!r} out of range")
    return port


@dataclass(frozen=True)
class _Entry:
    host: str | None  # None: the "default" line
    port: int | None  # None: any port
    credentials: Credentials


class CredentialsFile:
    """The parsed file; :meth:`lookup` finds the credentials for a destination."""

    def __init__(self, entries: list[_Entry], path: str):
        self._entries = entries
        self.path = path

    @classmethod
    def load(cls, path: str) -> CredentialsFile:
        """Parse ``path``; raises ConfigurationError naming the file and line,
        or the file and the fix if the group or others may access it."""
        try:
            with open(path, encoding="utf-8") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except OSError as e:
            raise ConfigurationError(
                f"{path}: cannot read credentials file: {e.strerror}"
            ) from None
        problem = secret_file_problem(path, mode)
        if problem is not None:
            raise ConfigurationError(f"credentials file {problem}")
        return cls(list(_parse(text, path)), path)

    def lookup(self, host: str, port: int) -> Credentials | None:
        host = host.lower()
        for entry in self._entries:
            if entry.host is not None and entry.host != host:
                continue
            if entry.port is not None and entry.port != port:
                continue
            return entry.credentials
        return None

    def __repr__(self) -> str:
        return f"<CredentialsFile {self.path!r}: {len(self._entries)} entries>"


def _parse(text: str, path: str):
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{path}, line {lineno}"
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigurationError(f"{where}: {e}") from None
        if not tokens:
            continue
        fields: dict[str, str] = {}
        default = False
        i = 0
        while i < len(tokens):
            key = tokens[i].lower()
            if key == "default":
                default = True
                i += 1
                continue
            if key not in _KEYS:
                raise ConfigurationError(f"{where}: unknown token {tokens[i]!r}")
            if i + 1 >= len(tokens):
                raise ConfigurationError(f"{where}: {key!r} has no value")
            fields[key] = tokens[i + 1]
            i += 2
        host = fields.get("machine", fields.get("host"))
        user = fields.get("login", fields.get("user", fields.get("account")))
        if host is None and not default:
            raise ConfigurationError(f"{where}: needs 'machine HOST' or 'default'")
        if user is None or "password" not in fields:
            raise ConfigurationError(f"{where}: needs both 'login' and 'password'")
        port = _parse_port(fields["port"], where) if "port" in fields else None
        yield _Entry(None if default else host.lower(), port, Credentials(user, fields["password"]))
