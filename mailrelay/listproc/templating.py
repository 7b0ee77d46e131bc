"""Reply texts: finding a template (operator override or shipped) and filling it in.

Templates are plain UTF-8 files ``LANGUAGE/NAME.txt`` with
:class:`string.Template` ``$placeholders``.  The operator's directories are
searched first, in the order given (a list's own directory, then the
site's), then the ones shipped in ``mailrelay/listproc/templates/``; a
language without a template falls back to English.  Files are read on each
use, so an edited template is used without a restart.

A template may start with a ``Subject: ...`` line and a blank line; the
message builders in :mod:`mailrelay.listproc.replies` use it as the Subject
where the Subject has no function (it has for confirmation requests).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from importlib import resources

from twisted.logger import Logger

__all__ = ["PLACEHOLDERS", "Rendered", "Templates", "check_template"]

_log = Logger()

_LANGUAGE = re.compile(r"[a-z]{2,3}(?:_[A-Z]{2})?\Z")
_NAME = re.compile(r"[a-z][a-z0-9-]*\Z")
DEFAULT_LANGUAGE = "en"
MAX_TEMPLATE_BYTES = 64 * 1024

# Every template gets these; the list's addresses and name.
COMMON = frozenset(
    {
        "list_address",
        "display_name",
        "request_address",
        "owner_address",
        "join_address",
        "leave_address",
    }
)

# The placeholders each template may use, beyond COMMON.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    name: COMMON | frozenset(extra)
    for name, extra in {
        "results": {"results", "unprocessed", "help"},
        "help": set(),
        "unprocessed": {"lines"},
        "outcome-confirmation-sent": {"address"},
        "outcome-leave-sent": {"address"},
        "outcome-confirmed": {"address"},
        "outcome-token-rejected": set(),
        "outcome-help": set(),
        "outcome-end": set(),
        "outcome-unknown-command": {"word"},
        "outcome-invalid": {"word", "error"},
        "confirm-join": {"address", "token"},
        "confirm-leave": {"address", "token"},
        "token-rejected": set(),
        "welcome": {"address"},
        "goodbye": {"address"},
        "held-notice": {"poster", "subject", "size", "reason"},
        "reject": {"subject", "reason"},
        "moderation-result": {"result"},
        "disabled-warning": {"address", "token", "warnings_left"},
        "disabled-owner": {"address", "reason"},
        "removed-owner": {"address", "reason"},
        "reenabled": {"address"},
        "unrecognised-bounce": {"reason", "recipient"},
        "refused-dsn": {"lists", "subject", "reply"},
        "refused-owner": {"lists", "poster", "message_id", "subject", "reply", "poster_told"},
    }.items()
}


@dataclass(frozen=True)
class Rendered:
    """A filled-in template: the Subject it gives ("" if none) and the body."""

    subject: str
    body: str


def check_template(name: str, text: str) -> list[str]:
    """Problems with ``text`` as a replacement for template ``name``: unknown
    placeholders and ``$`` signs that are not placeholders (write ``$$``).
    Empty when it is usable; for validating an operator's file up front."""
    if name not in PLACEHOLDERS:
        return [f"no template is called {name!r}"]
    problems = []
    for match in string.Template.pattern.finditer(text):
        placeholder = match.group("named") or match.group("braced")
        if match.group("invalid") is not None:
            problems.append(f"a lone $ at offset {match.start()} (write $$ for a dollar sign)")
        elif placeholder is not None and placeholder not in PLACEHOLDERS[name]:
            problems.append(f"unknown placeholder ${placeholder}")
    return problems


@dataclass(frozen=True)
class Templates:
    """Where a list's reply texts come from: ``directories`` (operator
    overrides, most specific first) and the list's ``language``."""

    directories: tuple[str, ...] = ()
    language: str = DEFAULT_LANGUAGE

    def __post_init__(self) -> None:
        if not _LANGUAGE.match(self.language):
            raise ValueError(f"not a language code: {self.language!r} (e.g. en, pt_BR)")
        object.__setattr__(self, "directories", tuple(self.directories))

    def text(self, name: str) -> str:
        """The template ``name`` as found first: override directories in the
        list's language, the shipped one in that language, then the same in
        English.  Raises ``KeyError`` for a name nothing provides."""
        if not _NAME.match(name):
            raise KeyError(name)
        languages = [self.language]
        if self.language != DEFAULT_LANGUAGE:
            languages.append(DEFAULT_LANGUAGE)
        for language in languages:
            for directory in self.directories:
                text = _read_override(directory, language, name)
                if text is not None:
                    return text
            text = _read_shipped(language, name)
            if text is not None:
                return text
        raise KeyError(name)

    def render(self, name: str, values: dict[str, object]) -> Rendered:
        """Fill in template ``name``.  Placeholders without a value are left
        as written rather than failing a reply at run time (operators can
        check their files with :func:`check_template`)."""
        text = string.Template(self.text(name)).safe_substitute(
            {k: str(v) for k, v in values.items()}
        )
        subject = ""
        first, newline, rest = text.partition("\n")
        if first.startswith("Subject:") and newline:
            subject = first[len("Subject:") :].strip()
            text = rest.lstrip("\n")
        return Rendered(subject, text)


def _read_override(directory: str, language: str, name: str) -> str | None:
    path = f"{directory}/{language}/{name}.txt"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEMPLATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        _log.warn("Cannot read template {path}: {error}; using the next one", path=path, error=e)
        return None
    if len(data) > MAX_TEMPLATE_BYTES:
        _log.warn("Template {path} is over 64 KiB; using the next one", path=path)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _log.warn("Template {path} is not UTF-8; using the next one", path=path)
        return None


def _read_shipped(language: str, name: str) -> str | None:
    resource = resources.files(__package__).joinpath("templates", language, f"{name}.txt")
    try:
        return resource.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
