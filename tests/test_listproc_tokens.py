"""Tests for :mod:`mailrelay.listproc.tokens`: confirmation and unsubscribe tokens."""

from __future__ import annotations

import hmac
import os
import stat
from hashlib import sha256

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.errors import ConfigurationError
from mailrelay.listproc import tokens
from mailrelay.listproc.tokens import (
    DEFAULT_TOKEN_LIFETIME,
    PendingAction,
    UnsubscribeTarget,
    check_pending,
    is_token,
    load_or_create_secret,
    make_unsubscribe_token,
    new_pending,
    new_token,
    read_unsubscribe_token,
)
from tests.support import temp_dir

SECRET = bytes(range(32))


class ConfirmationTokenTests(SynchronousTestCase):
    def test_shape(self):
        """Tokens are 40 lower-case hex digits (160 bits), safe in an address
        that is lower-cased at RCPT, and all different."""
        tokens = {new_token() for _ in range(1000)}
        self.assertEqual(len(tokens), 1000)
        for token in tokens:
            self.assertTrue(is_token(token))
            self.assertEqual(len(token), 40)
            self.assertEqual(token, token.lower())

    def test_is_token(self):
        """is_token accepts any case and refuses anything else."""
        token = new_token()
        self.assertTrue(is_token(token.upper()))
        for text in ("", token[:-1], token + "0", "g" * 40, f" {token}", None, 123):
            self.assertFalse(is_token(text), text)

    def test_pending_record(self):
        """A pending record binds list, address and action and expires after 3 days."""
        pending = new_pending("Test@Example.com", "Anne@Example.org", PendingAction.JOIN, 1000.0)
        self.assertTrue(is_token(pending.token))
        self.assertEqual(pending.list_address, "test@example.com")
        self.assertEqual(pending.address, "anne@example.org")
        self.assertEqual(pending.action, PendingAction.JOIN)
        self.assertEqual(pending.expires_at, 1000.0 + DEFAULT_TOKEN_LIFETIME)
        self.assertEqual(DEFAULT_TOKEN_LIFETIME, 3 * 86400)
        self.assertRaises(ValueError, new_pending, "l@x", "a@x", "join", 0, lifetime=0)
        self.assertRaises(ValueError, new_pending, "l@x", "a@x", "frobnicate", 0)

    def test_check_pending(self):
        """Unknown (forged or used), other-list, expired and wrong-action tokens are refused."""
        pending = new_pending("test@example.com", "a@example.org", "leave", 0.0, lifetime=10)
        self.assertIsNone(check_pending(pending, "TEST@example.com", 9.9))
        self.assertIn("unknown", check_pending(None, "test@example.com", 0))
        self.assertIn("another list", check_pending(pending, "other@example.com", 1))
        self.assertIn("expired", check_pending(pending, "test@example.com", 10))
        self.assertIn(
            "leave",
            check_pending(pending, "test@example.com", 1, actions=(PendingAction.MODERATE,)),
        )


class UnsubscribeTokenTests(SynchronousTestCase):
    def test_round_trip(self):
        """A token names its list and member (lower-cased) and is URL-safe."""
        token = make_unsubscribe_token(SECRET, "Test@Example.com", "Anne+x@Example.org")
        self.assertRegex(token, r"\A[A-Za-z0-9_.-]+\Z")
        self.assertEqual(
            read_unsubscribe_token(SECRET, token),
            UnsubscribeTarget("test@example.com", "anne+x@example.org"),
        )

    def test_compact(self):
        """Tokens stay short enough for a URL in a header."""
        token = make_unsubscribe_token(SECRET, "test@example.com", "anne@example.org")
        self.assertLess(len(token), 80)

    def test_forgery_refused(self):
        """Another key, a changed address, a swapped MAC or garbage are all refused."""
        token = make_unsubscribe_token(SECRET, "test@example.com", "anne@example.org")
        other = make_unsubscribe_token(SECRET, "test@example.com", "bob@example.org")
        payload, mac = token.split(".")
        self.assertIsNone(read_unsubscribe_token(b"k" * 32, token))
        self.assertIsNone(read_unsubscribe_token(SECRET, f"{other.split('.')[0]}.{mac}"))
        self.assertIsNone(read_unsubscribe_token(SECRET, f"{payload}.{mac[:-2]}"))
        for garbage in ("", ".", payload, f"{payload}.", f".{mac}", "%%%.###", "a" * 5000, None):
            self.assertIsNone(read_unsubscribe_token(SECRET, garbage), garbage)

    def test_payload_without_member_refused(self):
        """A correctly signed payload that names no member is refused."""
        payload = b"test@example.com"
        mac = hmac.new(SECRET, tokens._UNSUBSCRIBE_LABEL + payload, sha256).digest()[:16]
        token = f"{tokens._b64(payload)}.{tokens._b64(mac)}"
        self.assertIsNone(read_unsubscribe_token(SECRET, token))

    def test_bad_inputs(self):
        """A short key or an address with a line break is a clear error."""
        self.assertRaises(ValueError, make_unsubscribe_token, b"short", "l@x", "a@x")
        self.assertRaises(ValueError, make_unsubscribe_token, SECRET, "l@x", "a@x\nb@x")


class SecretFileTests(SynchronousTestCase):
    def test_created_private(self):
        """A missing secret is created with mode 0600 and read back the same each time."""
        directory = os.path.join(temp_dir(self), "var")
        secret = load_or_create_secret(directory)
        self.assertEqual(len(secret), 32)
        path = os.path.join(directory, "unsubscribe.key")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(load_or_create_secret(directory), secret)
        self.assertEqual(os.listdir(directory), ["unsubscribe.key"])

    def test_open_mode_refused(self):
        """A key readable by others is refused with a clear error."""
        directory = temp_dir(self)
        load_or_create_secret(directory)
        os.chmod(os.path.join(directory, "unsubscribe.key"), 0o644)
        error = self.assertRaises(ConfigurationError, load_or_create_secret, directory)
        self.assertIn("chmod 600", str(error))

    def test_malformed_refused(self):
        """A key file that is not 64 hex digits is refused."""
        directory = temp_dir(self)
        path = os.path.join(directory, "unsubscribe.key")
        for content in (b"", b"abcd\n", b"zz" * 32, b"\xff" * 64):
            with open(path, "wb") as f:
                f.write(content)
            os.chmod(path, 0o600)
            self.assertRaises(ConfigurationError, load_or_create_secret, directory)
