"""Per-list settings: their keys, defaults, parsers and text form.

Place in the flow: the registry stores each list's settings as text, one row
per key that differs from its default
(:meth:`~mailrelay.interfaces.IListProcessingStore.list_settings`), and hands
back a frozen :class:`ListSettings`; list processing (commands, posting policy,
moderation) reads it.  The same parsers validate what an operator sets
(``mailrelay lists set LIST KEY=VALUE``), with the INI file's value syntax, so
a bad value is refused with the key and the reason before anything is stored.

To add a setting: add a field to :class:`ListSettings` (with its default) and
a :class:`SettingKey` to :data:`LIST_SETTING_KEYS`; no schema change is needed.
Keys stored by a newer release that this one does not know are ignored.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from mailrelay.config.values import parse_bool, parse_duration, parse_int

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

__all__ = [
    "ForwardBounces",
    "LIST_SETTING_KEYS",
    "ListSettings",
    "NonmemberAction",
    "Posting",
    "SettingKey",
    "parse_setting",
    "settings_from_text",
    "settings_to_text",
    "stored_settings",
]


class Posting(str, enum.Enum):
    """Who may post: members (non-members get ``nonmember_action``), nobody
    without an owner's approval, or anyone."""

    MEMBERS = "members"
    MODERATED = "moderated"
    OPEN = "open"


class NonmemberAction(str, enum.Enum):
    """What becomes of a non-member's post (Mailman 3's ``default_nonmember_action``)."""

    HOLD = "hold"
    REJECT = "reject"
    DISCARD = "discard"
    ACCEPT = "accept"


class ForwardBounces(str, enum.Enum):
    """Who gets a copy of a bounce that names no member (Mailman 3's
    ``forward_unrecognized_bounces_to``; ``owners`` is its "administrators")."""

    OWNERS = "owners"
    NONE = "none"


@dataclass(frozen=True)
class ListSettings:
    """One list's settings.  ``None`` for a limit means "the site's value" (the
    ``[lists]`` section of the configuration file)."""

    posting: Posting = Posting.MEMBERS
    nonmember_action: NonmemberAction = NonmemberAction.HOLD
    # Language of the list's reply texts (a template directory name).
    language: str = "en"
    # Seconds a confirmation token stays valid.
    pending_request_life: float | None = None
    # Automatic replies per address per day; 0 = no limit.
    max_autoresponses_per_day: int | None = None
    # Bounce processing, with Mailman 3's names (mailrelay.listproc.bouncing).
    bounce_score_threshold: int | None = None
    bounce_info_stale_after: float | None = None
    bounce_you_are_disabled_warnings: int | None = None
    bounce_you_are_disabled_warnings_interval: float | None = None
    bounce_notify_owner_on_disable: bool | None = None
    bounce_notify_owner_on_removal: bool | None = None
    forward_unrecognized_bounces_to: ForwardBounces | None = None
    # Largest post in KB (1024 octets), as Mailman's max_message_size; 0 = no
    # limit of the list's own (the site's [mta] max_message_size and the
    # smarthost's SIZE still apply).  Refused at LMTP DATA with 552 5.3.4.
    max_message_size: int = 0
    # Put in front of the Subject of posts going out, with one space, once
    # (Mailman's subject_prefix, e.g. "[mylist]"); "" for none.
    subject_prefix: str = ""


@dataclass(frozen=True)
class SettingKey:
    """One settable key: its help text, and how its text becomes a value and back."""

    name: str
    help: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str] = str


def _enum(kind: type[enum.Enum]) -> Callable[[str], Any]:
    names = ", ".join(member.value for member in kind)

    def parse(text: str) -> Any:
        try:
            return kind(text.strip().lower())
        except ValueError:
            raise ValueError(f"must be one of {names}") from None

    return parse


def _language(text: str) -> str:
    # A directory name under the template directories (mailrelay.listproc.
    # templating's form): nothing that can climb out of them.
    language, underscore, region = text.strip().partition("_")
    code = language.lower() + (underscore + region.upper() if underscore else "")
    if not re.fullmatch(r"[a-z]{2,3}(?:_[A-Z]{2})?", code):
        raise ValueError("must be a language code such as en or pt_BR")
    return code


_MAX_PREFIX = 100


def _subject_prefix(text: str) -> str:
    # Stored without the white space around it: one space is put between it
    # and the subject (so "[mylist] " and "[mylist]" mean the same, as in Mailman).
    prefix = text.strip()
    if _CONTROL_CHARACTERS.search(prefix):
        raise ValueError("must be one line of text, without control characters")
    if len(prefix) > _MAX_PREFIX:
        raise ValueError(f"must be at most {_MAX_PREFIX} characters")
    return prefix


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, with "" (or ``default``) meaning the site's value (``None``)."""

    def parse_optional(text: str) -> Any:
        if text.strip().lower() in ("", "default"):
            return None
        return parse(text)

    return parse_optional


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be a duration above zero")
    return value


def _format_optional(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return f"{value:g}" if isinstance(value, float) else str(value)


_SITE = "; empty for the site's [lists] value."


LIST_SETTING_KEYS: dict[str, SettingKey] = {
    key.name: key
    for key in (
        SettingKey(
            "posting",
            "Who may post: members, moderated (every post is held) or open.",
            _enum(Posting),
            lambda value: value.value,
        ),
        SettingKey(
            "nonmember_action",
            "What becomes of a non-member's post: hold, reject, discard or accept.",
            _enum(NonmemberAction),
            lambda value: value.value,
        ),
        SettingKey("language", "Language of the reply texts (en is shipped).", _language),
        SettingKey(
            "pending_request_life",
            "How long a confirmation token stays valid (a duration such as 3d); "
            "empty for the site's [lists] value.",
            _optional(_positive_duration),
            _format_optional,
        ),
        SettingKey(
            "max_autoresponses_per_day",
            "Most automatic replies to one address per day (0: no limit); empty for "
            "the site's [lists] value.",
            _optional(lambda text: parse_int(text, 0)),
            _format_optional,
        ),
        SettingKey(
            "bounce_score_threshold",
            "Bounce score at which delivery to a member is disabled" + _SITE,
            _optional(lambda text: parse_int(text, 1)),
            _format_optional,
        ),
        SettingKey(
            "bounce_info_stale_after",
            "A member's bounce score starts again from zero when the last bounce is older "
            "than this (a duration such as 7d)" + _SITE,
            _optional(_positive_duration),
            _format_optional,
        ),
        SettingKey(
            "bounce_you_are_disabled_warnings",
            "How many warnings a member disabled by bounces gets before removal (0: removed "
            "at once)" + _SITE,
            _optional(lambda text: parse_int(text, 0)),
            _format_optional,
        ),
        SettingKey(
            "bounce_you_are_disabled_warnings_interval",
            "Time between those warnings (a duration such as 7d)" + _SITE,
            _optional(_positive_duration),
            _format_optional,
        ),
        SettingKey(
            "bounce_notify_owner_on_disable",
            "Tell the owners when bounces disable delivery to a member (yes or no)" + _SITE,
            _optional(parse_bool),
            _format_optional,
        ),
        SettingKey(
            "bounce_notify_owner_on_removal",
            "Tell the owners when bounces remove a member (yes or no)" + _SITE,
            _optional(parse_bool),
            _format_optional,
        ),
        SettingKey(
            "forward_unrecognized_bounces_to",
            "Who gets a copy of a bounce naming no member: owners or none" + _SITE,
            _optional(_enum(ForwardBounces)),
            _format_optional,
        ),
        SettingKey(
            "max_message_size",
            "Largest post in KB (1024 octets), refused at delivery to mailrelay with "
            "552 5.3.4; 0 for no limit of the list's own.  Mailman's max_message_size.",
            lambda text: parse_int(text, 0),
        ),
        SettingKey(
            "subject_prefix",
            "Text put in front of the Subject of posts going out, once, with one space "
            "(e.g. [mylist]); empty for none, the default.  Mailman's subject_prefix.",
            _subject_prefix,
        ),
    )
}

_DEFAULTS = ListSettings()
assert {f.name for f in fields(ListSettings)} == set(LIST_SETTING_KEYS)


def parse_setting(name: str, text: str) -> Any:
    """The value of setting ``name`` written as ``text``; ``ValueError`` naming
    the key (and the known keys, for an unknown one) otherwise."""
    key = LIST_SETTING_KEYS.get(name)
    if key is None:
        raise ValueError(f"unknown list setting {name!r} (known: {', '.join(LIST_SETTING_KEYS)})")
    if not isinstance(text, str):
        raise ValueError(f"{name} = {text!r}: the value must be text")
    try:
        return key.parse(text)
    except ValueError as e:
        raise ValueError(f"{name} = {text!r}: {e}") from None


def settings_from_text(values: Mapping[str, str], base: ListSettings = _DEFAULTS) -> ListSettings:
    """``base`` with the settings written in ``values`` applied; ``ValueError``
    (naming the key) for an unknown key or a bad value, and then nothing applies."""
    changes = {name: parse_setting(name, text) for name, text in values.items()}
    return replace(base, **changes)


def settings_to_text(settings: ListSettings) -> dict[str, str]:
    """The settings that differ from the defaults, as text (what the registry stores)."""
    text = {}
    for name, key in LIST_SETTING_KEYS.items():
        value = getattr(settings, name)
        if value != getattr(_DEFAULTS, name):
            text[name] = key.format(value)
    return text


def stored_settings(rows: Mapping[str, str]) -> ListSettings:
    """The settings a registry read back: keys it does not know (written by a
    newer release) and values it cannot read are left at their defaults."""
    changes = {}
    for name, text in rows.items():
        if name in LIST_SETTING_KEYS:
            try:
                changes[name] = LIST_SETTING_KEYS[name].parse(text)
            except ValueError:
                continue
    return replace(_DEFAULTS, **changes)
