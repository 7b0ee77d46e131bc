"""Tests for mailrelay.config: value parsers, defaults, INI loading and its errors."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.config import (
    PASSWORD_ENVIRONMENT_VARIABLE,
    DevModeSettings,
    MTASettings,
    PathSettings,
    Settings,
    describe_defaults,
    load_settings,
    parse_bool,
    parse_duration,
    parse_size,
)
from mailrelay.config import settings as settings_module
from mailrelay.config.schema import SCHEMA
from mailrelay.errors import ConfigurationError
from mailrelay.mta.client import RelayClient
from mailrelay.mta.errors import AuthenticationFailed
from mailrelay.service import lmtp_listen_endpoint

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mailrelay.ini.example"
)


class _FileMixin:
    """Helpers to write configuration files in a private temporary directory."""

    def setUp(self) -> None:
        super().setUp()
        self.directory = os.path.realpath(tempfile.mkdtemp(prefix="mailrelay-config-"))
        self.addCleanup(shutil.rmtree, self.directory)

    def write(self, text: str, name: str = "mailrelay.ini") -> str:
        path = os.path.join(self.directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def write_secret(self, text: str, name: str) -> str:
        """Write a file of secrets, mode 0600 as mailrelay requires."""
        path = self.write(text, name)
        os.chmod(path, 0o600)
        return path

    def load(self, text: str, environ: dict[str, str] | None = None) -> Settings:
        return load_settings(self.write(text), environ=environ or {})

    def load_error(self, text: str, environ: dict[str, str] | None = None) -> str:
        """Load ``text`` expecting a ConfigurationError; return its message."""
        error = self.assertRaises(ConfigurationError, self.load, text, environ)
        return str(error)

    def mta(self, **keys: str) -> MTASettings:
        body = "".join(f"{k} = {v}\n" for k, v in keys.items())
        return self.load("[mta]\n" + body).mta


class ParseDurationTests(SynchronousTestCase):
    """parse_duration: seconds from a number with optional units."""

    def test_units(self) -> None:
        """Each unit s, m, h, d, w scales to seconds."""
        self.assertEqual(
            [parse_duration(t) for t in ["30s", "5m", "4h", "5d", "1w"]],
            [30.0, 300.0, 14400.0, 432000.0, 604800.0],
        )

    def test_plain_number(self) -> None:
        """A bare number is seconds, including zero and decimals."""
        self.assertEqual(parse_duration("4000"), 4000.0)
        self.assertEqual(parse_duration("0"), 0.0)
        self.assertEqual(parse_duration("2.5"), 2.5)
        self.assertEqual(parse_duration(".5"), 0.5)

    def test_compound(self) -> None:
        """Units combine, largest first, with optional spaces between them."""
        self.assertEqual(parse_duration("1h30m"), 5400.0)
        self.assertEqual(parse_duration("1d 2h 3m 4s"), 93784.0)
        self.assertEqual(parse_duration("1w1s"), 604801.0)

    def test_case_and_space(self) -> None:
        """Units are case-insensitive; surrounding whitespace is ignored."""
        self.assertEqual(parse_duration(" 5M "), 300.0)
        self.assertEqual(parse_duration("1H 30 M"), 5400.0)

    def test_fraction_with_unit(self) -> None:
        """A decimal number may carry a unit."""
        self.assertEqual(parse_duration("1.5h"), 5400.0)

    def test_rejected(self) -> None:
        """Empty, negative, unit-less tails, unknown units and junk are ValueErrors."""
        for text in [
            "",
            " ",
            "-5s",
            "-1",
            "s",
            "5x",
            "5 minutes",
            "1h30",
            "abc",
            "inf",
            "nan",
            "1e3",
            "5s5",
            "5ss",
            "\u0665s",  # ARABIC-INDIC DIGIT FIVE: only ASCII digits count
        ]:
            with self.subTest(text=text):
                error = self.assertRaises(ValueError, parse_duration, text)
                self.assertIn("not a duration", str(error))

    def test_order_and_repeats(self) -> None:
        """Units out of order or repeated are rejected (likely typos)."""
        for text in ["30m1h", "5m5m", "1s1w"]:
            with self.subTest(text=text):
                error = self.assertRaises(ValueError, parse_duration, text)
                self.assertIn("largest first", str(error))

    def test_too_large(self) -> None:
        """A number too large for a float is refused rather than becoming infinity."""
        for text in ["9" * 400, "9" * 400 + "w"]:
            with self.subTest(text=text[-3:]):
                error = self.assertRaises(ValueError, parse_duration, text)
                self.assertIn("too large", str(error))

    def test_unknown_unit_named(self) -> None:
        """The error for an unknown unit names it."""
        self.assertIn("'y'", str(self.assertRaises(ValueError, parse_duration, "5y")))


class ParseSizeTests(SynchronousTestCase):
    """parse_size: bytes from a number with an SI or IEC unit."""

    def test_si_units(self) -> None:
        """k/KB/MB/GB/TB are powers of 1000."""
        self.assertEqual(parse_size("10MB"), 10 * 10**6)
        self.assertEqual(parse_size("512k"), 512 * 10**3)
        self.assertEqual(parse_size("512KB"), 512 * 10**3)
        self.assertEqual(parse_size("2G"), 2 * 10**9)
        self.assertEqual(parse_size("1TB"), 10**12)

    def test_iec_units(self) -> None:
        """KiB/MiB/GiB/TiB (and Ki/Mi/...) are powers of 1024."""
        self.assertEqual(parse_size("32MiB"), 32 * 2**20)
        self.assertEqual(parse_size("512KiB"), 512 * 2**10)
        self.assertEqual(parse_size("1Gi"), 2**30)
        self.assertEqual(parse_size("1TiB"), 2**40)

    def test_plain_and_bytes(self) -> None:
        """A bare number or a B suffix is bytes."""
        self.assertEqual(parse_size("1000"), 1000)
        self.assertEqual(parse_size("1000B"), 1000)
        self.assertEqual(parse_size("0"), 0)

    def test_case_and_space(self) -> None:
        """Units are case-insensitive and may follow a space."""
        self.assertEqual(parse_size(" 32 mib "), 32 * 2**20)
        self.assertEqual(parse_size("10mb"), 10 * 10**6)

    def test_fraction(self) -> None:
        """A fraction is allowed when the result is whole bytes."""
        self.assertEqual(parse_size("1.5KiB"), 1536)
        self.assertEqual(parse_size("0.5k"), 500)
        error = self.assertRaises(ValueError, parse_size, "1.0001k")
        self.assertIn("whole number of bytes", str(error))
        self.assertRaises(ValueError, parse_size, "1.5")

    def test_rejected(self) -> None:
        """Empty, negative, unknown units and junk are ValueErrors."""
        for text in ["", "-1", "MB", "10 XB", "10MBB", "ten", "1e6", "10 MB x"]:
            with self.subTest(text=text):
                error = self.assertRaises(ValueError, parse_size, text)
                self.assertIn("not a size", str(error))


class ParseBoolTests(SynchronousTestCase):
    """parse_bool: the usual INI spellings."""

    def test_true(self) -> None:
        """yes/true/on/1 in any case are True."""
        for text in ["yes", "YES", "Yes", "true", "True", "on", "ON", "1", " yes "]:
            with self.subTest(text=text):
                self.assertIs(parse_bool(text), True)

    def test_false(self) -> None:
        """no/false/off/0 in any case are False."""
        for text in ["no", "NO", "false", "FALSE", "off", "Off", "0"]:
            with self.subTest(text=text):
                self.assertIs(parse_bool(text), False)

    def test_rejected(self) -> None:
        """Anything else, including empty, is a ValueError listing the choices."""
        for text in ["", "y", "n", "2", "enabled", "nope"]:
            with self.subTest(text=text):
                error = self.assertRaises(ValueError, parse_bool, text)
                self.assertIn("yes/no", str(error))


# The documented default of every key, as the Python value it parses to.
EXPECTED_MTA_DEFAULTS = {
    "lmtp_host": "127.0.0.1",
    "lmtp_port": 8024,
    "lmtp_endpoint": "tcp:8024:interface=127.0.0.1",
    "lmtp_listen_backlog": 1024,
    "lmtp_max_sessions": 100,
    "lmtp_idle_timeout": 300.0,
    "lmtp_store_timeout": 60.0,
    "spool_reserve": 8 * 2**20,
    "lmtp_max_line_length": 16384,
    "max_message_size": 32 * 2**20,
    "lmtp_hostname": "",
    "smtp_host": "localhost",
    "smtp_port": 25,
    "smtp_user": "",
    "smtp_pass": "",
    "smtp_pass_file": "",
    "smtp_secure_mode": "smtp",
    "smtp_verify_cert": True,
    "smtp_verify_hostname": True,
    "smtp_ca_file": "",
    "smtp_client_cert": "",
    "smtp_client_key": "",
    "smtp_credentials_file": "",
    "smtp_allow_plaintext_auth": False,
    "smtp_helo_name": "",
    "smtp_timeout": 60.0,
    "smtp_connect_timeout": 30.0,
    "max_recipients": 10,
    "max_sessions_per_connection": 0,
    "max_connections": 4,
    "smtp_idle_timeout": 10.0,
    "delivery_retry_period": 5 * 86400.0,
    "retry_min_backoff": 300.0,
    "retry_max_backoff": 4000.0,
    "verp_delivery": False,
    "keep_delivered": 7 * 86400.0,
    "personalize": False,
}


class PublicURLTests(SynchronousTestCase):
    def test_public_url_normalised(self):
        """[http] public_url keeps scheme, host, port and path, lower-cases the
        host and ends in /; personalize is off by default."""
        settings = Settings.from_mapping(
            {"http": {"endpoint": "tcp:8080", "public_url": "https://Lists.Example.com:8443/l"}}
        )
        self.assertEqual(settings.http.public_url, "https://lists.example.com:8443/l/")
        self.assertFalse(settings.mta.personalize)

    def test_bad_public_urls(self):
        """Not https, a query, a user name, no host or an overlong URL are refused
        with the reason; so is a public_url without an endpoint to serve it."""
        for url, reason in [
            ("http://lists.example.com/", "https://"),
            ("https://lists.example.com/?x=1", "query"),
            ("https://me@lists.example.com/", "user name"),
            ("https:///path", "must name a host"),
            ("https://lists.example.com/" + "a" * 200, "at most 200"),
        ]:
            with self.subTest(url=url):
                with self.assertRaises(ConfigurationError) as caught:
                    Settings.from_mapping({"http": {"endpoint": "tcp:8080", "public_url": url}})
                self.assertIn(reason, str(caught.exception))
        with self.assertRaises(ConfigurationError) as caught:
            Settings.from_mapping({"http": {"public_url": "https://lists.example.com/"}})
        self.assertIn("public_url needs an endpoint", str(caught.exception))


class DefaultsTests(SynchronousTestCase):
    """With no file every key has its documented default."""

    def test_every_mta_default(self) -> None:
        """Each [mta] key has the documented default, and no key is left untested."""
        mta = Settings.from_defaults().mta
        self.assertEqual(
            {f.name for f in dataclasses.fields(MTASettings)}, set(EXPECTED_MTA_DEFAULTS)
        )
        for name, expected in EXPECTED_MTA_DEFAULTS.items():
            with self.subTest(key=name):
                self.assertEqual(getattr(mta, name), expected)
                self.assertIs(type(getattr(mta, name)), type(expected))

    def test_devmode_defaults(self) -> None:
        """[devmode] is off with no recipient."""
        self.assertEqual(
            Settings.from_defaults().devmode, DevModeSettings(enabled=False, recipient="")
        )

    def test_paths_default_to_cwd(self) -> None:
        """Without a file, var_dir is ./var of the current directory."""
        paths = Settings.from_defaults().paths
        var = os.path.join(os.getcwd(), "var")
        self.assertEqual(paths, PathSettings(var_dir=var))
        self.assertEqual(paths.registry_path, os.path.join(var, "registry.sqlite3"))
        self.assertEqual(paths.spool_path, os.path.join(var, "spool.sqlite3"))

    def test_no_source(self) -> None:
        """Defaults have no source file."""
        self.assertIsNone(Settings.from_defaults().source)

    def test_from_defaults_ignores_environment(self) -> None:
        """from_defaults() is load_settings(None, environ={}): the process env is not read."""
        self.patch(os, "environ", {PASSWORD_ENVIRONMENT_VARIABLE: "from-env"})
        self.assertEqual(Settings.from_defaults().mta.smtp_pass, "")
        self.assertEqual(Settings.from_defaults(), load_settings(None, environ={}))

    def test_load_none_reads_process_environment(self) -> None:
        """load_settings(None) consults os.environ for the password by default."""
        self.patch(os, "environ", {PASSWORD_ENVIRONMENT_VARIABLE: "from-env"})
        error = self.assertRaises(ConfigurationError, load_settings, None)
        self.assertIn(PASSWORD_ENVIRONMENT_VARIABLE, str(error))
        self.assertIn("<built-in defaults>: [mta] smtp_user = ''", str(error))

    def test_frozen(self) -> None:
        """Settings and their sections cannot be changed after loading."""
        settings = Settings.from_defaults()
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, settings, "source", "x")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, settings.mta, "smtp_port", 2)

    def test_lmtp_hostname_resolved_at_use(self) -> None:
        """An empty lmtp_hostname means the FQDN, looked up only when asked for."""
        calls = []
        self.patch(settings_module.socket, "getfqdn", lambda: calls.append(1) or "relay.example")
        mta = Settings.from_defaults().mta
        self.assertEqual(calls, [])
        self.assertEqual(mta.effective_lmtp_hostname(), "relay.example")
        named = dataclasses.replace(mta, lmtp_hostname="lists.example.org")
        self.assertEqual(named.effective_lmtp_hostname(), "lists.example.org")


class LoadFileTests(_FileMixin, SynchronousTestCase):
    """Reading values from an INI file."""

    def test_empty_file_is_defaults(self) -> None:
        """An empty file gives the defaults, with the file recorded as source."""
        path = self.write("")
        settings = load_settings(path, environ={})
        self.assertEqual(settings.source, path)
        self.assertEqual(settings.mta, Settings.from_defaults().mta)

    def test_values_override(self) -> None:
        """Given values replace defaults and are converted to their types."""
        mta = self.mta(
            smtp_host="smtp.example.com",
            smtp_port="587",
            smtp_secure_mode="STARTTLS",
            max_message_size="10MB",
            smtp_timeout="2m",
            smtp_verify_cert="off",
            max_recipients="0",
            verp_delivery="true",
            lmtp_idle_timeout="1h30m",
        )
        self.assertEqual(mta.smtp_host, "smtp.example.com")
        self.assertEqual(mta.smtp_port, 587)
        self.assertEqual(mta.smtp_secure_mode, "starttls")
        self.assertEqual(mta.max_message_size, 10**7)
        self.assertEqual(mta.smtp_timeout, 120.0)
        self.assertIs(mta.smtp_verify_cert, False)
        self.assertEqual(mta.max_recipients, 0)
        self.assertIs(mta.verp_delivery, True)
        self.assertEqual(mta.lmtp_idle_timeout, 5400.0)

    def test_colon_separator_and_comments(self) -> None:
        """Mailman-style 'key: value' lines and full-line # and ; comments work."""
        mta = self.load("""\
            # a comment
            [mta]
            ; another
            smtp_port: 2525
            """).mta
        self.assertEqual(mta.smtp_port, 2525)

    def test_no_interpolation(self) -> None:
        """A % in a value is literal (interpolation is off)."""
        mta = self.load(
            "[mta]\nsmtp_user = a%(b)s\nsmtp_pass = 100%\nsmtp_secure_mode = starttls\n"
        ).mta
        self.assertEqual((mta.smtp_user, mta.smtp_pass), ("a%(b)s", "100%"))

    def test_relative_var_dir(self) -> None:
        """A relative var_dir resolves against the config file's directory."""
        path = self.write("[paths]\nvar_dir = state/db\n", name="etc/mailrelay.ini")
        paths = load_settings(path, environ={}).paths
        expected = os.path.join(self.directory, "etc", "state", "db")
        self.assertEqual(paths.var_dir, expected)
        self.assertEqual(paths.spool_path, os.path.join(expected, "spool.sqlite3"))
        self.assertEqual(paths.registry_path, os.path.join(expected, "registry.sqlite3"))

    def test_default_var_dir_next_to_file(self) -> None:
        """The default var_dir is ./var beside the config file, not the cwd."""
        path = self.write("", name="etc/mailrelay.ini")
        self.assertEqual(
            load_settings(path, environ={}).paths.var_dir,
            os.path.join(self.directory, "etc", "var"),
        )

    def test_absolute_var_dir(self) -> None:
        """An absolute var_dir is kept as it is."""
        self.assertEqual(self.load("[paths]\nvar_dir = /srv/relay\n").paths.var_dir, "/srv/relay")

    def test_source_is_absolute(self) -> None:
        """A relative file name still gives an absolute source and base directory."""
        self.write("[paths]\nvar_dir = v\n")
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.directory)
        settings = load_settings("mailrelay.ini", environ={})
        self.assertEqual(settings.source, os.path.join(self.directory, "mailrelay.ini"))
        self.assertEqual(settings.paths.var_dir, os.path.join(self.directory, "v"))

    def test_relative_file_keys(self) -> None:
        """File keys resolve against the config file's directory."""
        for name in ["ca.pem", "cert.pem", "key.pem", "authinfo"]:
            self.write("x\n", name=f"etc/tls/{name}")
        path = self.write(
            """\
            [mta]
            smtp_ca_file = tls/ca.pem
            smtp_client_cert = tls/cert.pem
            smtp_client_key = tls/key.pem
            smtp_credentials_file = tls/authinfo
            """,
            name="etc/mailrelay.ini",
        )
        mta = load_settings(path, environ={}).mta
        tls = os.path.join(self.directory, "etc", "tls")
        self.assertEqual(mta.smtp_ca_file, os.path.join(tls, "ca.pem"))
        self.assertEqual(mta.smtp_client_cert, os.path.join(tls, "cert.pem"))
        self.assertEqual(mta.smtp_client_key, os.path.join(tls, "key.pem"))
        self.assertEqual(mta.smtp_credentials_file, os.path.join(tls, "authinfo"))

    def test_devmode(self) -> None:
        """devmode with a valid recipient loads."""
        devmode = self.load("[devmode]\nenabled = yes\nrecipient = dev@example.com\n").devmode
        self.assertEqual(devmode, DevModeSettings(enabled=True, recipient="dev@example.com"))

    def test_ipv6_lmtp_host(self) -> None:
        """An IPv6 lmtp_host (bracketed or not) derives a tcp6 endpoint with escaped colons."""
        for host in ["::1", "[::1]"]:
            with self.subTest(host=host):
                mta = self.mta(lmtp_host=host, lmtp_port="24")
                self.assertEqual(mta.lmtp_host, "::1")
                self.assertEqual(mta.lmtp_endpoint, "tcp6:24:interface=\\:\\:1")


class ErrorMessageTests(_FileMixin, SynchronousTestCase):
    """Every problem is a ConfigurationError naming file, section, key and value."""

    def test_port_message_exact(self) -> None:
        """A bad port reads 'FILE: [mta] smtp_port = 'abc': not a port number (1-65535)'."""
        path = self.write("[mta]\nsmtp_port = abc\n")
        error = self.assertRaises(ConfigurationError, load_settings, path, environ={})
        self.assertEqual(
            str(error), f"{path}: [mta] smtp_port = 'abc': not a port number (1-65535)"
        )

    # (section, key, bad value, fragment of the reason)
    BAD_VALUES = [
        ("paths", "var_dir", "", "must not be empty"),
        ("mta", "lmtp_host", "not a host!", "not a host name or IP address"),
        ("mta", "lmtp_port", "0", "not a port number"),
        ("mta", "lmtp_port", "65536", "not a port number"),
        ("mta", "lmtp_endpoint", "tcp:abc", "not a port number"),
        ("mta", "lmtp_listen_backlog", "0", "out of range (1-65535)"),
        ("mta", "lmtp_max_sessions", "0", "at least 1"),
        ("mta", "lmtp_idle_timeout", "0", "greater than zero"),
        ("mta", "lmtp_idle_timeout", "soon", "not a duration"),
        ("mta", "lmtp_store_timeout", "0", "greater than zero"),
        ("mta", "spool_reserve", "-1", "not a size"),
        ("mta", "lmtp_max_line_length", "999", "at least 1000"),
        ("mta", "max_message_size", "0", "greater than zero"),
        ("mta", "max_message_size", "lots", "not a size"),
        ("mta", "lmtp_hostname", "bad name", "not a domain name"),
        ("mta", "smtp_host", "", "not a host name"),
        ("mta", "smtp_port", "-25", "not a port number"),
        ("mta", "smtp_port", "2.5", "not a port number"),
        ("mta", "smtp_port", "\u0662\u0665", "not a port number"),
        ("mta", "smtp_secure_mode", "tls", "not a secure mode"),
        ("mta", "smtp_verify_cert", "maybe", "not a boolean"),
        ("mta", "smtp_verify_hostname", "2", "not a boolean"),
        ("mta", "smtp_ca_file", "missing.pem", "cannot read file"),
        ("mta", "smtp_client_cert", "missing.pem", "cannot read file"),
        ("mta", "smtp_client_key", "missing.pem", "cannot read file"),
        ("mta", "smtp_pass_file", "missing", "cannot read file"),
        ("mta", "smtp_credentials_file", "missing", "cannot read file"),
        ("mta", "smtp_allow_plaintext_auth", "sure", "not a boolean"),
        ("mta", "smtp_helo_name", "[not-an-ip]", "address literal"),
        ("mta", "smtp_timeout", "-1s", "not a duration"),
        ("mta", "smtp_connect_timeout", "0s", "greater than zero"),
        ("mta", "max_recipients", "-1", "at least 0"),
        ("mta", "max_recipients", "ten", "not a whole number"),
        ("mta", "max_sessions_per_connection", "1.5", "not a whole number"),
        ("mta", "max_connections", "0", "at least 1"),
        ("mta", "smtp_idle_timeout", "0", "greater than zero"),
        ("mta", "delivery_retry_period", "forever", "not a duration"),
        ("mta", "retry_min_backoff", "0", "greater than zero"),
        ("mta", "retry_max_backoff", "x", "not a duration"),
        ("mta", "verp_delivery", "perhaps", "not a boolean"),
        ("mta", "keep_delivered", "-1d", "not a duration"),
        ("mta", "personalize", "maybe", "not a boolean"),
        ("lists", "pending_request_life", "0", "greater than zero"),
        ("lists", "held_post_life", "soon", "duration"),
        ("lists", "max_autoresponses_per_day", "-1", "at least 0"),
        ("lists", "template_dir", "mailrelay.ini", "exists and is not a directory"),
        ("lists", "bounce_score_threshold", "0", "at least 1"),
        ("lists", "bounce_info_stale_after", "0", "greater than zero"),
        ("lists", "bounce_you_are_disabled_warnings", "-1", "at least 0"),
        ("lists", "bounce_you_are_disabled_warnings_interval", "week", "not a duration"),
        ("lists", "bounce_notify_owner_on_disable", "often", "not a boolean"),
        ("lists", "bounce_notify_owner_on_removal", "sometimes", "not a boolean"),
        ("lists", "forward_unrecognized_bounces_to", "administrators", "must be owners or none"),
        ("lists", "processing_yield", "-1s", "not a duration"),
        ("devmode", "enabled", "y", "not a boolean"),
        ("devmode", "recipient", "not-a-mailbox", "not a valid mailbox"),
        ("http", "endpoint", "tcp:abc", "not a port number"),
        ("http", "public_url", "http://lists.example.com/", "must be an https:// URL"),
        ("log", "format", "xml", "must be one of text, json"),
        ("postfix", "transport_file", ".", "is a directory"),
        ("postfix", "domains_file", ".", "is a directory"),
        ("postfix", "postmap_command", "'unclosed", "not a command line"),
    ]

    def test_bad_values(self) -> None:
        """Each key's bad value names file, [section], key, the value's repr and a reason."""
        path = self.write("")
        for section, key, value, reason in self.BAD_VALUES:
            with self.subTest(key=key, value=value):
                self.write(f"[{section}]\n{key} = {value}\n")
                error = self.assertRaises(ConfigurationError, load_settings, path, environ={})
                self.assertTrue(
                    str(error).startswith(f"{path}: [{section}] {key} = {value!r}: "), str(error)
                )
                self.assertIn(reason, str(error))

    def test_every_key_has_a_bad_value_test(self) -> None:
        """BAD_VALUES covers every key of the schema (a new key needs a test)."""
        tested = {(section, key) for section, key, _, _ in self.BAD_VALUES}
        keys = {(k.section, k.name) for k in SCHEMA}
        # smtp_user and smtp_pass accept any text; their rules are cross-key.
        self.assertEqual(keys - tested, {("mta", "smtp_user"), ("mta", "smtp_pass")})

    def test_unknown_section(self) -> None:
        """An unknown section is named, with the known ones and a suggestion."""
        message = self.load_error("[mtaa]\nsmtp_host = x\n")
        self.assertIn("mailrelay.ini: [mtaa]: unknown section (did you mean mta?)", message)
        self.assertIn("known: paths, mta, lists, devmode", message)

    def test_section_names_are_case_sensitive(self) -> None:
        """[MTA] is not [mta], but the suggestion points at it."""
        self.assertIn("[MTA]: unknown section (did you mean mta?)", self.load_error("[MTA]\n"))

    def test_key_names_are_case_insensitive(self) -> None:
        """Key names are folded to lower case, as configparser does."""
        self.assertEqual(self.load("[mta]\nSMTP_Port = 26\n").mta.smtp_port, 26)

    def test_default_section_is_unknown(self) -> None:
        """[DEFAULT] gets no special meaning: it is an unknown section."""
        self.assertIn("[DEFAULT]: unknown section", self.load_error("[DEFAULT]\nsmtp_port = 2\n"))

    def test_unknown_key(self) -> None:
        """An unknown key is named with its value and a close match."""
        message = self.load_error("[mta]\nsmtp_hots = relay.example\n")
        self.assertIn(
            "[mta] smtp_hots = 'relay.example': unknown key (did you mean smtp_host?)", message
        )

    def test_unknown_key_no_suggestion(self) -> None:
        """Mailman-only keys are rejected rather than silently ignored."""
        message = self.load_error("[mta]\nincoming = mailman.mta.postfix.LMTP\n")
        self.assertIn("[mta] incoming = 'mailman.mta.postfix.LMTP': unknown key", message)

    def test_duplicate_key(self) -> None:
        """A key given twice is an error naming section, key and line."""
        message = self.load_error("[mta]\nsmtp_port = 25\nsmtp_port = 26\n")
        self.assertIn("mailrelay.ini: [mta] smtp_port: duplicate key (line 3)", message)

    def test_duplicate_section(self) -> None:
        """A section given twice is an error naming it and the line."""
        message = self.load_error("[mta]\n[paths]\n[mta]\n")
        self.assertIn("mailrelay.ini: [mta]: duplicate section (line 3)", message)

    def test_missing_file(self) -> None:
        """A file that does not exist is an error naming it (no silent defaults)."""
        path = os.path.join(self.directory, "nope.ini")
        error = self.assertRaises(ConfigurationError, load_settings, path, environ={})
        self.assertEqual(
            str(error), f"{path}: cannot read configuration file: No such file or directory"
        )

    def test_directory(self) -> None:
        """A directory given as the file is an error naming it."""
        error = self.assertRaises(ConfigurationError, load_settings, self.directory, environ={})
        self.assertIn(f"{self.directory}: cannot read configuration file", str(error))

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are an error naming the file."""
        path = os.path.join(self.directory, "latin1.ini")
        with open(path, "wb") as f:
            f.write(b"[mta]\nsmtp_user = caf\xe9\n")
        error = self.assertRaises(ConfigurationError, load_settings, path, environ={})
        self.assertIn(f"{path}: not UTF-8 text", str(error))

    def test_key_before_section(self) -> None:
        """A key before any section header names the file, line and text."""
        message = self.load_error("smtp_port = 25\n")
        self.assertIn("mailrelay.ini, line 1: key before any [section]: 'smtp_port = 25'", message)

    def test_garbage_line(self) -> None:
        """A line that is neither header nor key = value names the file and line."""
        message = self.load_error("[mta]\nsmtp_port 25\n")
        self.assertIn(
            "mailrelay.ini, line 2: not a section header or key = value: 'smtp_port 25'", message
        )

    def test_multiline_value(self) -> None:
        """An indented continuation line makes a multi-line value, which is refused."""
        message = self.load_error("[mta]\nsmtp_host = a\n  smtp_port = 2\n")
        self.assertIn("[mta] smtp_host = 'a\\nsmtp_port = 2': value spans several lines", message)

    def test_inline_comment_is_part_of_value(self) -> None:
        """Text after a value is not a comment: the error shows it as part of the value."""
        message = self.load_error("[mta]\nsmtp_port = 25  # the default\n")
        self.assertIn("[mta] smtp_port = '25  # the default': not a port number", message)

    def test_unreadable_file_key(self) -> None:
        """An existing but unreadable file key is an error naming the key."""
        if os.geteuid() == 0:
            raise self.skipTest("root can read any file")  # pragma: no cover
        secret = self.write("pw\n", name="pass")
        os.chmod(secret, 0)
        message = self.load_error("[mta]\nsmtp_ca_file = pass\n")
        self.assertIn("[mta] smtp_ca_file = 'pass': cannot read file: Permission denied", message)

    def test_directory_as_file_key(self) -> None:
        """A directory where a file is expected is refused, naming the key."""
        os.mkdir(os.path.join(self.directory, "certs"))
        message = self.load_error("[mta]\nsmtp_ca_file = certs\n")
        self.assertIn("[mta] smtp_ca_file = 'certs': cannot read file: Is a directory", message)

    def test_var_dir_is_a_file(self) -> None:
        """var_dir naming an existing non-directory is refused."""
        self.write("x", name="state")
        message = self.load_error("[paths]\nvar_dir = state\n")
        self.assertIn("[paths] var_dir = 'state': exists and is not a directory", message)


class CrossKeyTests(_FileMixin, SynchronousTestCase):
    """Rules that involve two keys name both."""

    def test_cert_without_key(self) -> None:
        """A client certificate without its key names both keys."""
        self.write("x", name="cert.pem")
        message = self.load_error("[mta]\nsmtp_client_cert = cert.pem\n")
        self.assertIn(
            "[mta] smtp_client_cert = 'cert.pem', smtp_client_key = '': "
            "a client certificate and its key go together",
            message,
        )

    def test_key_without_cert(self) -> None:
        """A client key without its certificate names both keys."""
        self.write("x", name="key.pem")
        message = self.load_error("[mta]\nsmtp_client_key = key.pem\n")
        self.assertIn("[mta] smtp_client_cert = '', smtp_client_key = 'key.pem': ", message)

    def test_backoff_order(self) -> None:
        """retry_min_backoff above retry_max_backoff names both."""
        message = self.load_error("[mta]\nretry_min_backoff = 2h\n")
        self.assertIn(
            "[mta] retry_min_backoff = '2h', retry_max_backoff = '4000s': "
            "retry_min_backoff must not exceed retry_max_backoff",
            message,
        )

    def test_backoff_equal(self) -> None:
        """Equal minimum and maximum backoff are allowed (a fixed delay)."""
        mta = self.mta(retry_min_backoff="15m", retry_max_backoff="900")
        self.assertEqual((mta.retry_min_backoff, mta.retry_max_backoff), (900.0, 900.0))

    def test_devmode_needs_recipient(self) -> None:
        """Enabled devmode without a recipient names both keys."""
        message = self.load_error("[devmode]\nenabled = yes\n")
        self.assertIn(
            "[devmode] enabled = 'yes', recipient = '': development mode needs a recipient",
            message,
        )

    def test_devmode_recipient_checked_when_disabled(self) -> None:
        """A bad recipient is refused even while devmode is off."""
        message = self.load_error("[devmode]\nrecipient = a@@b\n")
        self.assertIn("[devmode] recipient = 'a@@b': not a valid mailbox", message)

    def test_user_without_password(self) -> None:
        """A user with no password from any source is refused."""
        message = self.load_error("[mta]\nsmtp_user = relay\nsmtp_secure_mode = starttls\n")
        self.assertIn(
            "[mta] smtp_user = 'relay', smtp_pass = '': a user is set but no password", message
        )

    def test_user_with_credentials_file(self) -> None:
        """A user without password is fine when a credentials file may supply it."""
        self.write("machine x login relay password p\n", name="authinfo")
        mta = self.mta(
            smtp_user="relay", smtp_credentials_file="authinfo", smtp_secure_mode="starttls"
        )
        self.assertEqual((mta.smtp_user, mta.smtp_pass), ("relay", ""))

    def test_password_without_user(self) -> None:
        """A password with no user is refused, naming where the password came from."""
        message = self.load_error("[mta]\nsmtp_pass = s3cret\n")
        self.assertIn(
            "[mta] smtp_user = '', smtp_pass = <hidden>: a password is set (by smtp_pass) "
            "but no user",
            message,
        )
        self.assertNotIn("s3cret", message)
        self.write_secret("s3cret\n", name="pw")
        message = self.load_error("[mta]\nsmtp_pass_file = pw\n")
        self.assertIn(
            "[mta] smtp_user = '', smtp_pass_file = 'pw': a password is set (by "
            "smtp_pass_file) but no user",
            message,
        )
        message = self.load_error("", environ={PASSWORD_ENVIRONMENT_VARIABLE: "s3cret"})
        self.assertIn(
            f"[mta] smtp_user = '': a password is set (by the {PASSWORD_ENVIRONMENT_VARIABLE} "
            "environment variable) but no user",
            message,
        )
        self.assertNotIn("s3cret", message)

    def test_plaintext_auth_refused(self) -> None:
        """AUTH over plain smtp to a host that is not loopback is refused unless
        smtp_allow_plaintext_auth is on; to loopback it is allowed (as the client does)."""
        message = self.load_error(
            "[mta]\nsmtp_host = smtp.example.com\nsmtp_user = u\nsmtp_pass = p\n"
        )
        self.assertIn(
            "[mta] smtp_user = 'u', smtp_secure_mode = 'smtp', smtp_host = 'smtp.example.com': "
            "SMTP AUTH without TLS",
            message,
        )
        for host in ["localhost", "127.0.0.1", "::1", "[127.0.0.2]"]:
            with self.subTest(host=host):
                self.assertEqual(
                    self.mta(smtp_host=host, smtp_user="u", smtp_pass="p").smtp_user, "u"
                )
        mta = self.mta(
            smtp_host="smtp.example.com",
            smtp_user="u",
            smtp_pass="p",
            smtp_allow_plaintext_auth="yes",
        )
        self.assertEqual((mta.smtp_user, mta.smtp_pass), ("u", "p"))
        for mode in ["smtps", "starttls"]:
            with self.subTest(mode=mode):
                self.assertEqual(
                    self.mta(smtp_user="u", smtp_pass="p", smtp_secure_mode=mode).smtp_pass, "p"
                )


class PasswordTests(_FileMixin, SynchronousTestCase):
    """The effective password: environment > smtp_pass_file > smtp_pass; never shown."""

    CONFIG = "[mta]\nsmtp_user = u\nsmtp_secure_mode = starttls\n"

    def test_key_only(self) -> None:
        """smtp_pass alone is used."""
        self.assertEqual(self.load(self.CONFIG + "smtp_pass = key\n").mta.smtp_pass, "key")

    def test_file_beats_key(self) -> None:
        """smtp_pass_file wins over smtp_pass; only its first line counts, CRLF stripped."""
        self.write_secret("from file \r\nsecond line\n", name="pw")
        mta = self.load(self.CONFIG + "smtp_pass = key\nsmtp_pass_file = pw\n").mta
        self.assertEqual(mta.smtp_pass, "from file ")
        self.assertEqual(mta.smtp_pass_file, os.path.join(self.directory, "pw"))

    def test_environment_beats_file(self) -> None:
        """MAILRELAY_SMTP_PASS wins over both keys."""
        self.write_secret("from file\n", name="pw")
        mta = self.load(
            self.CONFIG + "smtp_pass = key\nsmtp_pass_file = pw\n",
            environ={PASSWORD_ENVIRONMENT_VARIABLE: "from env"},
        ).mta
        self.assertEqual(mta.smtp_pass, "from env")

    def test_empty_environment_is_unset(self) -> None:
        """An empty MAILRELAY_SMTP_PASS falls through to the file and the key."""
        environ = {PASSWORD_ENVIRONMENT_VARIABLE: ""}
        self.assertEqual(
            self.load(self.CONFIG + "smtp_pass = key\n", environ=environ).mta.smtp_pass, "key"
        )
        self.write_secret("from file\n", name="pw")
        mta = self.load(self.CONFIG + "smtp_pass_file = pw\n", environ=environ).mta
        self.assertEqual(mta.smtp_pass, "from file")

    def test_environment_only(self) -> None:
        """The environment alone supplies the password."""
        mta = self.load(self.CONFIG, environ={PASSWORD_ENVIRONMENT_VARIABLE: "env"}).mta
        self.assertEqual(mta.smtp_pass, "env")

    def test_password_file_others_may_read(self) -> None:
        """A password file the group or others may access is refused, naming the
        file and the fix; mode 0600 (or 0400) is accepted."""
        path = self.write_secret("s3cret\n", name="pw")
        for mode in (0o644, 0o640, 0o604, 0o620):
            with self.subTest(mode=oct(mode)):
                os.chmod(path, mode)
                message = self.load_error(self.CONFIG + "smtp_pass_file = pw\n")
                self.assertIn(
                    f"[mta] smtp_pass_file = 'pw': password file {path} is accessible to "
                    f"other users (mode {mode:04o})",
                    message,
                )
                self.assertIn(f"run chmod 600 {path}", message)
                self.assertNotIn("s3cret", message)
        os.chmod(path, 0o400)
        self.assertEqual(self.load(self.CONFIG + "smtp_pass_file = pw\n").mta.smtp_pass, "s3cret")

    def test_empty_password_file(self) -> None:
        """A password file with an empty first line is an error naming the key."""
        self.write_secret("\nsecond\n", name="pw")
        message = self.load_error(self.CONFIG + "smtp_pass_file = pw\n")
        self.assertIn("[mta] smtp_pass_file = 'pw': password file's first line is empty", message)

    def test_password_file_not_utf8(self) -> None:
        """A password file that is not UTF-8 is an error naming the key."""
        with open(os.path.join(self.directory, "pw"), "wb") as f:
            f.write(b"\xff\xfe\n")
        message = self.load_error(self.CONFIG + "smtp_pass_file = pw\n")
        self.assertIn("[mta] smtp_pass_file = 'pw': cannot read password file", message)

    def test_repr_hides_password(self) -> None:
        """Neither the section's nor the whole settings' repr shows the password."""
        settings = self.load(self.CONFIG + "smtp_pass = hunter2\n")
        self.assertEqual(settings.mta.smtp_pass, "hunter2")
        self.assertNotIn("hunter2", repr(settings))
        self.assertNotIn("hunter2", str(settings.mta))
        self.assertIn("smtp_user='u'", repr(settings.mta))

    def test_error_hides_password(self) -> None:
        """An error about smtp_pass shows <hidden> instead of its value."""
        message = self.load_error("[mta]\nsmtp_pass = hunter2\n  more\n")
        self.assertIn("[mta] smtp_pass = <hidden>: value spans several lines", message)
        self.assertNotIn("hunter2", message)


class EndpointTests(_FileMixin, SynchronousTestCase):
    """lmtp_endpoint: derived from host/port, or given, checked and made safe."""

    def listen(self, description: str) -> MemoryReactor:
        """Listen on ``description`` with a MemoryReactor; Twisted must accept it."""
        reactor = MemoryReactor()
        serverFromString(reactor, description).listen(Factory())
        return reactor

    def test_derived_from_host_and_port(self) -> None:
        """Without lmtp_endpoint, Twisted listens on lmtp_host:lmtp_port."""
        mta = self.mta(lmtp_host="192.0.2.7", lmtp_port="2424")
        self.assertEqual(mta.lmtp_endpoint, "tcp:2424:interface=192.0.2.7")
        port, _, _, interface = self.listen(mta.lmtp_endpoint).tcpServers[0]
        self.assertEqual((port, interface), (2424, "192.0.2.7"))

    def test_derived_ipv6_is_usable(self) -> None:
        """The derived IPv6 endpoint parses back to the right interface."""
        mta = self.mta(lmtp_host="::1")
        port, _, _, interface = self.listen(mta.lmtp_endpoint).tcpServers[0]
        self.assertEqual((port, interface), (8024, "::1"))

    def test_endpoint_with_host_or_port_is_refused(self) -> None:
        """lmtp_endpoint set together with lmtp_host or lmtp_port is an error naming
        the file, the section and both keys (neither silently wins)."""
        for name, value in [("lmtp_host", "192.0.2.7"), ("lmtp_port", "9025")]:
            with self.subTest(name=name):
                message = self.load_error(
                    f"[mta]\n{name} = {value}\nlmtp_endpoint = tcp:9024:interface=0.0.0.0\n"
                )
                self.assertIn(os.path.join(self.directory, "mailrelay.ini"), message)
                self.assertIn(
                    f"[mta] {name} = '{value}', lmtp_endpoint = 'tcp:9024:interface=0.0.0.0'",
                    message,
                )
                self.assertIn(f"set either lmtp_endpoint or {name}, not both", message)

    def test_endpoint_alone(self) -> None:
        """A given endpoint is used as it is."""
        mta = self.mta(lmtp_endpoint="tcp:9024:interface=0.0.0.0")
        self.assertEqual(mta.lmtp_endpoint, "tcp:9024:interface=0.0.0.0")

    def test_listen_backlog_default(self) -> None:
        """The LMTP listener's endpoint gets backlog=1024 (Twisted's default is 50),
        for TCP and unix sockets alike, and Twisted listens with it."""
        for given, expected in [
            ({}, "tcp:8024:interface=127.0.0.1:backlog=1024"),
            ({"lmtp_endpoint": "unix:/run/lmtp"}, "unix:/run/lmtp:mode=660:backlog=1024"),
        ]:
            with self.subTest(given=given):
                description = lmtp_listen_endpoint(self.load_mta(given))
                self.assertEqual(description, expected)
        reactor = self.listen("tcp:8024:interface=127.0.0.1:backlog=1024")
        self.assertEqual(reactor.tcpServers[0][2], 1024)
        reactor = self.listen("unix:/run/lmtp:mode=660:backlog=1024")
        self.assertEqual(reactor.unixServers[0][2], 1024)

    def test_listen_backlog_configured(self) -> None:
        """lmtp_listen_backlog sets the backlog; an endpoint's own backlog= is kept;
        systemd: sockets (already listening) are left alone."""
        for given, expected in [
            ({"lmtp_listen_backlog": "4096"}, "tcp:8024:interface=127.0.0.1:backlog=4096"),
            ({"lmtp_endpoint": "tcp:24:backlog=10"}, "tcp:24:backlog=10"),
            ({"lmtp_endpoint": "systemd:domain=UNIX:index=0"}, "systemd:domain=UNIX:index=0"),
        ]:
            with self.subTest(given=given):
                self.assertEqual(lmtp_listen_endpoint(self.load_mta(given)), expected)

    def test_listen_backlog_twice_is_refused(self) -> None:
        """A backlog in both lmtp_listen_backlog and lmtp_endpoint is an error naming both."""
        message = self.load_error(
            "[mta]\nlmtp_listen_backlog = 5\nlmtp_endpoint = tcp:24:backlog=10\n"
        )
        self.assertIn(
            "[mta] lmtp_listen_backlog = '5', lmtp_endpoint = 'tcp:24:backlog=10': "
            "lmtp_endpoint gives backlog= too",
            message,
        )

    def load_mta(self, keys: dict[str, str]) -> Settings:
        body = "".join(f"{k} = {v}\n" for k, v in keys.items())
        return self.load("[mta]\n" + body)

    def test_unix_gets_mode_660(self) -> None:
        """A unix: endpoint without mode= is created 0660, not Twisted's 0666."""
        mta = self.mta(lmtp_endpoint="unix:/run/mailrelay/lmtp")
        self.assertEqual(mta.lmtp_endpoint, "unix:/run/mailrelay/lmtp:mode=660")
        address, _, _, mode, _ = self.listen(mta.lmtp_endpoint).unixServers[0]
        self.assertEqual((address, mode), ("/run/mailrelay/lmtp", 0o660))

    def test_unix_mode_kept(self) -> None:
        """An explicit mode= is left alone."""
        mta = self.mta(lmtp_endpoint="unix:/run/lmtp:mode=600:lockfile=0")
        self.assertEqual(mta.lmtp_endpoint, "unix:/run/lmtp:mode=600:lockfile=0")

    def test_unix_address_keyword(self) -> None:
        """The socket path may be given as address=."""
        mta = self.mta(lmtp_endpoint="unix:address=/run/lmtp")
        self.assertEqual(mta.lmtp_endpoint, "unix:/run/lmtp:mode=660")

    def test_unix_relative_path(self) -> None:
        """A relative unix socket path resolves against the config file's directory."""
        mta = self.mta(lmtp_endpoint="unix:run/lmtp")
        self.assertEqual(
            mta.lmtp_endpoint, f"unix:{os.path.join(self.directory, 'run', 'lmtp')}:mode=660"
        )

    def test_escaped_path(self) -> None:
        """Backslash-escaped colons and equals signs survive the round trip."""
        mta = self.mta(lmtp_endpoint=r"unix:/run/a\:b\=c")
        self.assertEqual(mta.lmtp_endpoint, r"unix:/run/a\:b\=c:mode=660")
        address = self.listen(mta.lmtp_endpoint).unixServers[0][0]
        self.assertEqual(address, "/run/a:b=c")

    def test_other_types(self) -> None:
        """tcp6: and systemd: descriptions are accepted unchanged."""
        for description in [
            "tcp6:8024:interface=\\:\\:1",
            "systemd:domain=INET:index=0",
            "systemd:domain=UNIX:name=lmtp",
            "tcp:24:backlog=10",
        ]:
            with self.subTest(description=description):
                self.assertEqual(self.mta(lmtp_endpoint=description).lmtp_endpoint, description)

    def test_ssl(self) -> None:
        """ssl: needs privateKey=; its files resolve relative to the config and must exist."""
        self.write("pem", name="tls/key.pem")
        mta = self.mta(lmtp_endpoint="ssl:8025:privateKey=tls/key.pem")
        key = os.path.join(self.directory, "tls", "key.pem")
        self.assertEqual(mta.lmtp_endpoint, f"ssl:8025:privateKey={key}")
        message = self.load_error("[mta]\nlmtp_endpoint = ssl:8025:privateKey=nope.pem\n")
        self.assertIn(
            "[mta] lmtp_endpoint = 'ssl:8025:privateKey=nope.pem': cannot read file", message
        )

    BAD_ENDPOINTS = [
        ("smtp:25", "type must be one of tcp, tcp6, unix, ssl, systemd"),
        (":25", "type must be one of"),
        ("tcp", "tcp: endpoint needs a port"),
        ("tcp:0", "not a port number"),
        ("tcp:99999", "not a port number"),
        ("tcp:25:26", "too many arguments"),
        ("tcp:25:port=26", "gives port twice"),
        ("tcp:interface=::1", "write ':' in a value as '\\:'"),
        ("tcp:25:bogus=1", "tcp: endpoint does not take bogus="),
        ("tcp:25:backlog=many", "backlog= must be a whole number"),
        ("tcp:25:backlog=\u00b2", "backlog= must be a whole number"),
        ("=tcp", "type must be one of"),
        ("tcp:25:interface=a:interface=b", "interface= given twice"),
        ("tcp:interface=x:25", "positional argument after a keyword"),
        ("ssl:465", "ssl: endpoint needs privateKey="),
        ("unix:", "unix: endpoint needs a socket path"),
        ("unix:/s:mode=rw", "mode= must be octal"),
        ("unix:/s:mode=666", "must not make the socket world-writable"),
        ("unix:/s:mode=0772", "must not make the socket world-writable"),
        ("unix:/s:lockfile=yes", "lockfile= must be 0 or 1"),
        ("systemd:domain=INET", "exactly one of index= and name="),
        ("systemd:domain=INET:index=0:name=x", "exactly one of index= and name="),
        ("systemd:domain=IPX:index=0", "domain=INET, INET6 or UNIX"),
        ("systemd:domain=INET:index=first", "index= must be a whole number"),
    ]

    def test_bad_endpoints(self) -> None:
        """Malformed descriptions are refused with the key, value and a reason."""
        for description, reason in self.BAD_ENDPOINTS:
            with self.subTest(description=description):
                message = self.load_error(f"[mta]\nlmtp_endpoint = {description}\n")
                self.assertIn(f"[mta] lmtp_endpoint = {description!r}: ", message)
                self.assertIn(reason, message)


class FromMappingTests(SynchronousTestCase):
    """Settings.from_mapping validates Python values exactly like a file."""

    def test_python_values(self) -> None:
        """Ints, floats and bools are accepted alongside INI text."""
        settings = Settings.from_mapping(
            {
                "mta": {
                    "smtp_port": 2525,
                    "verp_delivery": True,
                    "smtp_timeout": 1.5,
                    "max_message_size": "1MB",
                }
            },
            base_dir="/srv",
            environ={},
        )
        self.assertEqual(settings.mta.smtp_port, 2525)
        self.assertIs(settings.mta.verp_delivery, True)
        self.assertEqual(settings.mta.smtp_timeout, 1.5)
        self.assertEqual(settings.mta.max_message_size, 10**6)
        self.assertEqual(settings.paths.var_dir, "/srv/var")
        self.assertIsNone(settings.source)

    def test_errors_labelled(self) -> None:
        """Errors from a mapping are labelled <mapping>."""
        error = self.assertRaises(
            ConfigurationError, Settings.from_mapping, {"mta": {"smtp_port": 0}}, environ={}
        )
        self.assertEqual(
            str(error), "<mapping>: [mta] smtp_port = '0': not a port number (1-65535)"
        )
        error = self.assertRaises(
            ConfigurationError, Settings.from_mapping, {"nope": {}}, environ={}
        )
        self.assertIn("<mapping>: [nope]: unknown section", str(error))


class DescribeDefaultsTests(_FileMixin, SynchronousTestCase):
    """describe_defaults() documents every key and loads back to the defaults."""

    def test_loads_back(self) -> None:
        """The rendered defaults, loaded as a file, equal the built-in defaults."""
        path = self.write(describe_defaults())
        self.patch(os, "getcwd", lambda: self.directory)
        loaded = load_settings(path, environ={})
        self.assertEqual(dataclasses.replace(loaded, source=None), Settings.from_defaults())

    def test_every_key_commented(self) -> None:
        """Each key appears once, in its section, right after a comment line."""
        lines = describe_defaults().splitlines()
        section = None
        seen = set()
        for index, line in enumerate(lines):
            if line.startswith("["):
                section = line.strip("[]")
            elif line and not line.startswith("#"):
                name = line.split("=")[0].strip()
                self.assertTrue(lines[index - 1].startswith("# "), line)
                self.assertNotIn((section, name), seen)
                seen.add((section, name))
        self.assertEqual(seen, {(k.section, k.name) for k in SCHEMA})

    def test_example_file_matches(self) -> None:
        """mailrelay.ini.example is exactly describe_defaults() (regenerate it if not)."""
        with open(EXAMPLE, encoding="utf-8") as f:
            self.assertEqual(
                f.read(),
                describe_defaults(),
                "regenerate: python -c 'from mailrelay.config import describe_defaults as d; "
                'print(d(), end="")\' > mailrelay.ini.example',
            )

    def test_example_file_loads(self) -> None:
        """The shipped example loads without error and gives the defaults."""
        settings = load_settings(EXAMPLE, environ={})
        self.assertEqual(settings.mta, Settings.from_defaults().mta)
        self.assertEqual(settings.source, EXAMPLE)


class LoopbackAgreementTests(SynchronousTestCase):
    """The configuration and the SMTP client apply one rule to clear-text AUTH."""

    HOSTS = {"localhost": True, "127.0.0.2": True, "::1": True, "[::1]": True, "example.com": False}

    def config_allows(self, host: str) -> bool:
        try:
            Settings.from_mapping(
                {"mta": {"smtp_host": host, "smtp_user": "u", "smtp_pass": "p"}}, environ={}
            )
        except ConfigurationError as e:
            self.assertIn("SMTP AUTH without TLS", str(e))
            return False
        return True

    def client_allows(self, host: str) -> bool:
        client = RelayClient(
            clock=task.Clock(), username="u", password="p", helo_name="relay.example"
        )
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", host, 25),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        client.makeConnection(transport)
        ready = client.ready
        for line in [b"220 smarthost.example ESMTP", b"250-smarthost.example", b"250 AUTH PLAIN"]:
            client.dataReceived(line + b"\r\n")
        if ready.called:
            failure = self.failureResultOf(ready, AuthenticationFailed)
            self.assertIn(b"unencrypted", failure.value.response)
            return False
        self.assertIn(b"AUTH PLAIN", transport.value())
        return True

    def test_config_and_client_agree(self):
        """For localhost, 127.0.0.2, ::1, [::1] and example.com, load_settings accepts
        smtp_user over plain smtp exactly when the client sends AUTH to that peer."""
        for host, loopback in self.HOSTS.items():
            with self.subTest(host=host):
                self.assertEqual(self.config_allows(host), loopback)
                self.assertEqual(self.client_allows(host), loopback)


class PublicNamesTests(SynchronousTestCase):
    """mailrelay.config re-exports its public names from the package's modules."""

    def test_public_names_import(self):
        """Every name in mailrelay.config.__all__ is importable, including the ones
        other modules and the README use."""
        import mailrelay.config

        for name in mailrelay.config.__all__:
            with self.subTest(name=name):
                self.assertTrue(hasattr(mailrelay.config, name))
        self.assertEqual(mailrelay.config.CONFIG_ENVIRONMENT_VARIABLE, "MAILRELAY_CONFIG")
        self.assertEqual(PASSWORD_ENVIRONMENT_VARIABLE, "MAILRELAY_SMTP_PASS")

    def test_describe_defaults_command(self):
        """The README's regenerate command (python -c 'from mailrelay.config import
        describe_defaults ...') still prints the defaults."""
        code = "from mailrelay.config import describe_defaults as d; print(d(), end='')"
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=_child_env(),
        )
        self.assertEqual(result.stdout, describe_defaults())


def _child_env() -> dict[str, str]:
    # The child imports this tree's mailrelay, not an installed one.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
