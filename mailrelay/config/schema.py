"""The schema: one entry per INI key, in file order, naming its default, help text and parser.

It is the single source for parsing (:func:`mailrelay.config.load_settings`
walks it), for the defaults (a key left out takes its default text, parsed
like any other) and for the documentation (:func:`mailrelay.config.describe_defaults`
prints it), so the three cannot drift apart.  Cross-key rules live with the
loader in :mod:`mailrelay.config.settings`.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from mailrelay.config.endpoints import parse_endpoint
from mailrelay.config.values import (
    check_readable,
    parse_bool,
    parse_duration,
    parse_greeting_name,
    parse_host,
    parse_int,
    parse_mailbox,
    parse_port,
    parse_public_url,
    parse_secure_mode,
    parse_size,
    parse_text,
    positive,
    resolve_path,
)

__all__ = ["KEYS", "LOG_FORMATS", "PASSWORD_ENVIRONMENT_VARIABLE", "SCHEMA", "Key"]

PASSWORD_ENVIRONMENT_VARIABLE = "MAILRELAY_SMTP_PASS"


@dataclass(frozen=True)
class Key:
    """One INI key: where it lives, its default text, its help text and its parser."""

    section: str
    name: str
    default: str
    help: str
    # (text, base_dir) -> value; raises ValueError with a reason.
    parse: Callable[[str, str], object]
    # Shown as <hidden> in error messages.
    secret: bool = False


def _plain(parse: Callable[[str], object]) -> Callable[[str, str], object]:
    return lambda text, base_dir: parse(text)


def _path(text: str, base_dir: str) -> str:
    text = text.strip()
    return resolve_path(text, base_dir) if text else ""


def _readable_file(text: str, base_dir: str) -> str:
    path = _path(text, base_dir)
    if path:
        check_readable(path)
    return path


def _var_dir(text: str, base_dir: str) -> str:
    path = _path(text, base_dir)
    if not path:
        raise ValueError("must not be empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError("exists and is not a directory")
    return path


def _directory(text: str, base_dir: str) -> str:
    path = _path(text, base_dir)
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError("exists and is not a directory")
    return path


def _endpoint(text: str, base_dir: str) -> str:
    return parse_endpoint(text, base_dir) if text.strip() else ""


def _map_file(text: str, base_dir: str) -> str:
    path = _path(text, base_dir)
    if path and os.path.isdir(path):
        raise ValueError("is a directory, not a map file")
    return path


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return value


def _command(text: str) -> tuple[str, ...]:
    try:
        words = tuple(shlex.split(text))
    except ValueError as e:
        raise ValueError(f"not a command line: {e}") from None
    if not words:
        raise ValueError("must not be empty")
    return words


LOG_FORMATS = ("text", "json")

_duration = positive(parse_duration, "duration")


def _forward_choice(text: str) -> str:
    choice = text.strip().lower()
    if choice not in ("owners", "none"):
        raise ValueError("must be owners or none")
    return choice


_whole = _plain(parse_int)

SCHEMA: tuple[Key, ...] = (
    Key(
        "paths",
        "var_dir",
        "var",
        "Directory holding the list registry (registry.sqlite3) and the message "
        "spool (spool.sqlite3).",
        _var_dir,
    ),
    Key(
        "mta",
        "lmtp_host",
        "127.0.0.1",
        "Address the LMTP server listens on.  Use 127.0.0.1 rather than localhost "
        "so that Postfix and mailrelay agree on the address family.",
        _plain(parse_host),
    ),
    Key("mta", "lmtp_port", "8024", "TCP port of the LMTP server.", _plain(parse_port)),
    Key(
        "mta",
        "lmtp_endpoint",
        "",
        "Twisted server endpoint for LMTP (tcp:, tcp6:, unix:, ssl:, systemd:), instead "
        "of lmtp_host and lmtp_port: setting it together with either is an error.  Empty "
        "means tcp:<lmtp_port>:interface=<lmtp_host>.  A unix: socket without mode= is "
        "created with mode=660 (a world-writable mode is refused); a relative socket "
        "path is relative to this file.",
        _endpoint,
    ),
    Key(
        "mta",
        "lmtp_listen_backlog",
        "1024",
        "Connections the kernel queues for the LMTP listener before mailrelay accepts "
        "them (listen(2) backlog; Linux caps it at net.core.somaxconn).  Used unless "
        "lmtp_endpoint gives backlog=, which must then not be set here as well.  "
        "Twisted's default of 50 drops connections in a burst.",
        _plain(lambda text: parse_int(text, 1, 65535)),
    ),
    Key(
        "mta",
        "lmtp_max_sessions",
        "100",
        "Most LMTP connections served at once; more are refused until one closes.",
        _plain(lambda text: parse_int(text, 1)),
    ),
    Key(
        "mta",
        "lmtp_idle_timeout",
        "5m",
        "An LMTP client silent for this long is disconnected (the timer stops while "
        "a message is being stored).",
        _plain(_duration),
    ),
    Key(
        "mta",
        "lmtp_store_timeout",
        "60s",
        "A message not on stable storage this long after its final dot is answered "
        "451 4.3.0 for each recipient, and the client sends it again later.  If the "
        "store finishes after all, that message is delivered twice (at-least-once).  "
        "Keep it below the client's timeout (Postfix: lmtp_data_done_timeout, 600s).",
        _plain(_duration),
    ),
    Key(
        "mta",
        "spool_reserve",
        "8MiB",
        "Space kept free for delivery on the file system of [paths] var_dir, held "
        "in the file var_dir/space-reserve while there is room.  When less is free, "
        "that file is emptied so deliveries can still record their results, and new "
        "messages get 452 4.3.1 until twice this much is free again.  Keep it above "
        "4MB, the size the spool's write-ahead log grows to between checkpoints.  0 "
        "turns the reserve off (a full disk then stops delivery until space is freed).",
        _plain(parse_size),
    ),
    Key(
        "mta",
        "lmtp_max_line_length",
        "16384",
        "Longest accepted LMTP line, in octets including CRLF (RFC 5321 requires at least 1000).",
        _plain(lambda text: parse_int(text, 1000)),
    ),
    Key(
        "mta",
        "max_message_size",
        "32MiB",
        "Largest message accepted over LMTP (advertised with SIZE).",
        _plain(positive(parse_size, "size")),
    ),
    Key(
        "mta",
        "lmtp_hostname",
        "",
        "Name in the LMTP greeting; empty means this host's fully qualified name.",
        _plain(parse_greeting_name),
    ),
    Key("mta", "smtp_host", "localhost", "The outgoing smarthost.", _plain(parse_host)),
    Key(
        "mta",
        "smtp_port",
        "25",
        "Port of the smarthost (usually 25 or 587; 465 for smtps).",
        _plain(parse_port),
    ),
    Key(
        "mta",
        "smtp_user",
        "",
        "User name for SMTP AUTH; authentication happens only when a password is set too.",
        _plain(parse_text),
    ),
    Key(
        "mta",
        "smtp_pass",
        "",
        f"Password for SMTP AUTH.  Prefer smtp_pass_file or the "
        f"{PASSWORD_ENVIRONMENT_VARIABLE} environment variable, which take precedence "
        f"(environment first, then the file, then this key).",
        _plain(parse_text),
        secret=True,
    ),
    Key(
        "mta",
        "smtp_pass_file",
        "",
        "File whose first line is the SMTP AUTH password; refused unless only its "
        "owner may access it (chmod 600).",
        _readable_file,
    ),
    Key(
        "mta",
        "smtp_secure_mode",
        "smtp",
        "smtp (no TLS), smtps (TLS from the first byte) or starttls (STARTTLS "
        "required, before anything else).",
        _plain(parse_secure_mode),
    ),
    Key(
        "mta",
        "smtp_verify_cert",
        "yes",
        "Verify the smarthost's certificate (smtps and starttls only).",
        _plain(parse_bool),
    ),
    Key(
        "mta",
        "smtp_verify_hostname",
        "yes",
        "Check that the certificate names smtp_host (only when smtp_verify_cert is on).",
        _plain(parse_bool),
    ),
    Key(
        "mta",
        "smtp_ca_file",
        "",
        "PEM file of CA certificates to trust instead of the system's.",
        _readable_file,
    ),
    Key(
        "mta",
        "smtp_client_cert",
        "",
        "PEM client certificate to present to the smarthost (needs smtp_client_key).",
        _readable_file,
    ),
    Key(
        "mta",
        "smtp_client_key",
        "",
        "PEM private key of smtp_client_cert.",
        _readable_file,
    ),
    Key(
        "mta",
        "smtp_credentials_file",
        "",
        "authinfo-style file of per-host credentials "
        "(machine HOST port PORT login USER password PASS); refused unless only its "
        "owner may access it (chmod 600).",
        _readable_file,
    ),
    Key(
        "mta",
        "smtp_allow_plaintext_auth",
        "no",
        "Allow SMTP AUTH without TLS (smtp_secure_mode = smtp) to a smarthost that is "
        "not loopback, which sends the password in the clear; to localhost or a "
        "loopback address it is always allowed.",
        _plain(parse_bool),
    ),
    Key(
        "mta",
        "smtp_helo_name",
        "",
        "Name sent in EHLO/HELO; empty means this host's name when it is qualified "
        "(has a dot), else the connection's address literal such as [192.0.2.1], "
        "as smtplib does.",
        _plain(parse_greeting_name),
    ),
    Key(
        "mta",
        "smtp_timeout",
        "60s",
        "How long to wait for each reply from the smarthost.",
        _plain(_duration),
    ),
    Key(
        "mta",
        "smtp_connect_timeout",
        "30s",
        "How long to wait for a connection (and TLS handshake) to the smarthost.",
        _plain(_duration),
    ),
    Key(
        "mta",
        "max_recipients",
        "10",
        "Most recipients per SMTP transaction; 0 puts all of them in one.",
        _whole,
    ),
    Key(
        "mta",
        "max_sessions_per_connection",
        "0",
        "Transactions per SMTP connection before reconnecting; 0 means no limit.",
        _whole,
    ),
    Key(
        "mta",
        "max_connections",
        "4",
        "Most simultaneous connections to the smarthost (at least 1).",
        _plain(lambda text: parse_int(text, 1)),
    ),
    Key(
        "mta",
        "smtp_idle_timeout",
        "10s",
        "An idle connection to the smarthost is closed after this long.",
        _plain(_duration),
    ),
    Key(
        "mta",
        "delivery_retry_period",
        "5d",
        "How long to keep retrying a temporarily failing recipient before giving up.",
        _plain(parse_duration),
    ),
    Key(
        "mta",
        "retry_min_backoff",
        "300s",
        "Delay before the first retry; it doubles on each further attempt.",
        _plain(_duration),
    ),
    Key(
        "mta",
        "retry_max_backoff",
        "4000s",
        "Longest delay between retries (not less than retry_min_backoff).",
        _plain(_duration),
    ),
    Key(
        "mta",
        "verp_delivery",
        "no",
        "Send each member a separate copy with a VERP envelope sender "
        "(list-bounces+member=domain@...).",
        _plain(parse_bool),
    ),
    Key(
        "mta",
        "personalize",
        "no",
        "Send each member a separate copy (as verp_delivery does, but from the plain "
        "-bounces address), so that each copy can carry the member's own one-click "
        "unsubscribe URL (see [http] public_url).  Costs one SMTP transaction per member.",
        _plain(parse_bool),
    ),
    Key(
        "mta",
        "keep_delivered",
        "7d",
        "How long delivered entries stay in the spool (shown by mailrelay queue) "
        "before they are purged; 0 purges them at the next hourly clean-up.",
        _plain(parse_duration),
    ),
    Key(
        "lists",
        "pending_request_life",
        "3d",
        "How long a confirmation token (join, leave) stays valid; a list's own "
        "pending_request_life setting wins.  Mailman 3's [mailman] pending_request_life.",
        _plain(_duration),
    ),
    Key(
        "lists",
        "max_autoresponses_per_day",
        "10",
        "Most automatic replies (command results, confirmation requests) to one address "
        "for one list per day; beyond that mail is processed but not answered.  0 means no "
        "limit.  Mailman 3's [mta] max_autoresponses_per_day.",
        _whole,
    ),
    Key(
        "lists",
        "held_post_life",
        "14d",
        "How long a post held for moderation waits for an owner's decision; then it is "
        "discarded (and logged), and the token in its notice stops working.",
        _plain(_duration),
    ),
    Key(
        "lists",
        "template_dir",
        "",
        "Directory of the operator's reply texts: LANG/NAME.txt for the whole site and "
        "lists/LIST@DOMAIN/LANG/NAME.txt for one list, found before the shipped texts.  "
        "Empty means <var_dir>/templates.",
        _directory,
    ),
    Key(
        "lists",
        "bounce_score_threshold",
        "5",
        "Bounce score at which delivery to a member is disabled (the member stays "
        "subscribed); a permanent bounce adds one, at most once a day.  Mailman 3's "
        "bounce_score_threshold; a list's own setting wins, as for every bounce_ key.",
        _plain(lambda text: parse_int(text, 1)),
    ),
    Key(
        "lists",
        "bounce_info_stale_after",
        "7d",
        "A member's bounce score starts again from zero when the last bounce is older "
        "than this.  Mailman 3's bounce_info_stale_after.",
        _plain(_duration),
    ),
    Key(
        "lists",
        "bounce_you_are_disabled_warnings",
        "3",
        "Warnings (each with a re-enable token) sent to a member disabled by bounces "
        "before the member is removed; 0 removes at the first check.  Mailman 3's "
        "bounce_you_are_disabled_warnings.",
        _whole,
    ),
    Key(
        "lists",
        "bounce_you_are_disabled_warnings_interval",
        "7d",
        "Time between those warnings, and from the last one to the removal.  Mailman 3's "
        "bounce_you_are_disabled_warnings_interval.",
        _plain(_duration),
    ),
    Key(
        "lists",
        "bounce_notify_owner_on_disable",
        "yes",
        "Tell a list's owners when bounces disable delivery to a member (one notice per "
        "disable, with the first warning).  Mailman 3's bounce_notify_owner_on_disable.",
        _plain(parse_bool),
    ),
    Key(
        "lists",
        "bounce_notify_owner_on_removal",
        "yes",
        "Tell a list's owners when bounces remove a member.  Mailman 3's "
        "bounce_notify_owner_on_removal.",
        _plain(parse_bool),
    ),
    Key(
        "lists",
        "forward_unrecognized_bounces_to",
        "owners",
        "Who gets a copy of a bounce that names no member: owners or none (the bounce is "
        "kept as a held entry either way).  Mailman 3's forward_unrecognized_bounces_to "
        "(owners is its administrators).",
        _plain(_forward_choice),
    ),
    Key(
        "lists",
        "processing_yield",
        "1s",
        "How long new mail to -bounces and the command addresses may wait, before it is "
        "stored and acknowledged, while member copies are being delivered (so that a "
        "burst of bounces does not slow delivery); 0 never waits.",
        _plain(parse_duration),
    ),
    Key(
        "devmode",
        "enabled",
        "no",
        "Development mode: deliver every message to recipient instead of the members.",
        _plain(parse_bool),
    ),
    Key(
        "devmode",
        "recipient",
        "",
        "The mailbox that receives all mail in development mode (required then).",
        _plain(parse_mailbox),
    ),
    Key(
        "http",
        "endpoint",
        "",
        "Twisted server endpoint of the HTTP site serving Prometheus metrics at "
        "/metrics, e.g. tcp:9425:interface=127.0.0.1.  Empty (the default) means no "
        "HTTP listener.  The metrics name lists and counts: keep it on loopback or a "
        "unix: socket, or behind a proxy that restricts who reads it.  With public_url "
        "it also serves the unsubscribe pages under /unsubscribe/.",
        _endpoint,
    ),
    Key(
        "http",
        "public_url",
        "",
        "The https:// URL at which members reach this HTTP site (normally through a "
        "reverse proxy that forwards /unsubscribe/ to endpoint), e.g. "
        "https://lists.example.com/.  When set, posts carry an unsubscribe URL in "
        "List-Unsubscribe, and personal copies (verp_delivery or personalize) a "
        "one-click one (RFC 8058).  Needs endpoint.  Empty means mailto: only.",
        _plain(parse_public_url),
    ),
    Key(
        "log",
        "format",
        "text",
        "text (twistd's usual lines) or json: twistd's log file (or standard output "
        "with -n) gets one JSON object per line, twisted.logger's eventAsJSON of each "
        "event, with stable field names such as event, message_id, list, recipient, "
        "count, code and response (README, Logging).",
        _plain(_log_format),
    ),
    Key(
        "postfix",
        "transport_file",
        "",
        "When set, the Postfix transport map that mailrelay rewrites (atomically) "
        "and runs postmap on whenever lists are created or deleted, and when the "
        "daemon starts, so that Postfix routes new lists without a manual step.",
        _map_file,
    ),
    Key(
        "postfix",
        "domains_file",
        "",
        "When set, the relay_domains map of the lists' domains, kept up to date like "
        "transport_file.",
        _map_file,
    ),
    Key(
        "postfix",
        "postmap_command",
        "postmap",
        "The postmap command (with any options, such as -c /etc/postfix) run on each "
        "map after it is rewritten; its file name argument is added at the end.",
        _plain(_command),
    ),
)

# {section: {name: Key}}, sections and keys in file order.
KEYS: dict[str, dict[str, Key]] = {}
for _key in SCHEMA:
    KEYS.setdefault(_key.section, {})[_key.name] = _key
del _key
