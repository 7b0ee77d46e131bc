"""Endpoint descriptions: check a Twisted server endpoint string without a reactor.

Used by the schema for ``lmtp_endpoint`` (and to derive it from ``lmtp_host``
and ``lmtp_port``).  Twisted's own parser (``endpoints._parse``) is private and
``serverFromString`` needs a reactor, loads TLS keys and reads systemd's
environment, so the syntax is checked here with the same tokenising rules, and
the result is a description that ``serverFromString`` accepts unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from twisted.internet.endpoints import quoteStringArgument

from mailrelay.config.values import check_readable, parse_port, resolve_path

__all__ = [
    "ENDPOINT_TYPES",
    "derived_endpoint",
    "endpoint_backlog",
    "parse_endpoint",
    "with_backlog",
]

ENDPOINT_TYPES: tuple[str, ...] = ("tcp", "tcp6", "unix", "ssl", "systemd")

# Twisted's default for unix: endpoints is 666 (anyone on the host may inject
# mail); the MTA and mailrelay normally share a group, so 660 is the safe default.
_UNIX_SOCKET_MODE = "660"

_WHOLE_NUMBER = re.compile(r"[0-9]+\Z")

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
# The types whose listening socket mailrelay creates (systemd: hands over one
# that is already listening, with the backlog of its .socket unit).
_LISTENING_TYPES = ("tcp", "tcp6", "unix", "ssl")
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


def parse_endpoint(text: str, base_dir: str) -> str:
    """Check a server endpoint description, resolve its file names, add ``mode=660`` to unix.

    Raises ``ValueError`` naming the first problem; ``ssl:`` key files must be
    readable, and a unix socket must not be world-writable.
    """
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
        parse_port(keywords["port"])
    if kind == "ssl" and "privateKey" not in keywords:
        # Twisted would fall back to ./server.pem, wherever the process runs.
        raise ValueError("ssl: endpoint needs privateKey=")
    if kind == "unix":
        if not keywords.get("address"):
            raise ValueError("unix: endpoint needs a socket path")
        keywords.setdefault("mode", _UNIX_SOCKET_MODE)
        if not re.fullmatch(r"[0-7]{1,4}", keywords["mode"]):
            raise ValueError("unix: mode= must be octal, e.g. 660")
        if int(keywords["mode"], 8) & 0o002:
            # Connecting to a unix socket needs write permission on it.
            raise ValueError(
                "unix: mode= must not make the socket world-writable (any local user "
                "could inject mail); use 660 and a group shared with the MTA"
            )
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
            keywords[name] = resolve_path(keywords[name], base_dir)
            if kind == "ssl":
                check_readable(keywords[name])
    positional_values = [keywords.pop(name) for name in positional if name in keywords]
    return _join_endpoint(kind, positional_values, keywords)


def derived_endpoint(host: str, port: int) -> str:
    """The ``tcp:``/``tcp6:`` description that listens on ``host`` (an IP address) at ``port``."""
    kind = "tcp6" if ":" in host else "tcp"
    return _join_endpoint(kind, [str(port)], {"interface": host})


def endpoint_backlog(description: str) -> str | None:
    """The ``backlog=`` text of a checked description, or ``None`` when it has none."""
    return _split_endpoint(description)[1].get("backlog")


def with_backlog(description: str, backlog: int) -> str:
    """A checked description that listens with ``backlog`` unless it names its own.

    Twisted listens with a backlog of 50; a burst of connections beyond it is
    dropped by the kernel after the client already counted them as open.
    ``systemd:`` descriptions are returned unchanged: the socket is already
    listening.
    """
    args, keywords = _split_endpoint(description)
    kind = args.pop(0)
    if kind not in _LISTENING_TYPES or "backlog" in keywords:
        return description
    return _join_endpoint(kind, args, {**keywords, "backlog": str(backlog)})
