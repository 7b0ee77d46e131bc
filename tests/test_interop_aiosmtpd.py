"""The outbound Connection against an independent SMTP server: aiosmtpd.

aiosmtpd runs in its own thread with its own asyncio loop on 127.0.0.1; the
Connection runs on the test's reactor.  Covers AUTH (PLAIN, LOGIN, CRAM-MD5),
STARTTLS and implicit TLS with certificate and host name verification, and
client certificates.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import ssl
import tempfile
import types

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.mta import AuthenticationFailed, Connection, SecureMode, TLSFailed
from tests.support import as_deferred, free_port

try:
    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
except ImportError:  # pragma: no cover - test dependencies
    Controller = None

USERS = {"testuser": "testpass"}
MESSAGE = "From: anne@example.com\nTo: bart@example.com\nSubject: aardvarks\n\n.dotted line\nbody\n"


class Recorder:
    """aiosmtpd handler remembering each message with its envelope."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(
            (
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.content,
                session.auth_data,
                session.ssl is not None,
            )
        )
        return "250 2.0.0 OK"


def authenticate(server, session, envelope, mechanism, auth_data):
    if isinstance(auth_data, LoginPassword):
        ok = USERS.get(auth_data.login.decode()) == auth_data.password.decode()
        return AuthResult(
            success=ok, handled=False, auth_data=auth_data.login.decode() if ok else None
        )
    return AuthResult(success=False, handled=False)


if Controller is not None:

    class CramSMTP(SMTP):
        """aiosmtpd with CRAM-MD5 (RFC 2195), which it lacks."""

        async def auth_CRAM__MD5(self, server, args):  # noqa: N802
            challenge = b"<4711.1700000000@localhost>"
            response = await self.challenge_auth(challenge)
            if not isinstance(response, bytes):
                return AuthResult(success=False, handled=False)
            user, _, digest = response.decode().rpartition(" ")
            secret = USERS.get(user, "").encode()
            ok = bool(secret) and hmac.compare_digest(
                hmac.new(secret, challenge, hashlib.md5).hexdigest(), digest
            )
            return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    class CramController(Controller):
        def factory(self):
            return CramSMTP(self.handler, **self.SMTP_kwargs)


@functools.cache
def _certificates() -> types.SimpleNamespace:
    """One CA, server and client certificate per process (trial has no setUpClass)."""
    if Controller is None:
        raise AssertionError("aiosmtpd/trustme missing: install the test extras")
    ca = trustme.CA()
    tmp = tempfile.mkdtemp()
    certs = types.SimpleNamespace(
        ca=ca,
        server_cert=ca.issue_cert("localhost"),
        tmp=tmp,
        ca_file=os.path.join(tmp, "ca.pem"),
        client_cert=os.path.join(tmp, "client.pem"),
        client_key=os.path.join(tmp, "client.key"),
    )
    ca.cert_pem.write_to_path(certs.ca_file)
    client = ca.issue_cert("client.example")
    client.cert_chain_pems[0].write_to_path(certs.client_cert)
    client.private_key_pem.write_to_path(certs.client_key)
    return certs


class AiosmtpdTestCase(TestCase):
    def setUp(self):
        vars(self).update(vars(_certificates()))

    def server_context(self, require_client_cert=False):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        if require_client_cert:
            self.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def start(self, *, implicit=False, starttls=False, require_client_cert=False, exclude=(), **kw):
        self.handler = Recorder()
        options = {
            "authenticator": authenticate,
            "auth_require_tls": False,
            "auth_exclude_mechanism": list(exclude),
            **kw,
        }
        context = self.server_context(require_client_cert) if (implicit or starttls) else None
        if starttls:
            options.update(tls_context=context, require_starttls=True)
        controller = CramController(
            self.handler,
            hostname="127.0.0.1",
            port=free_port(),
            ssl_context=context if implicit else None,
            **options,
        )
        controller.start()
        self.addCleanup(controller.stop)
        return controller.port

    def connection(self, port, **kw):
        kw.setdefault("reactor", reactor)
        conn = Connection(kw.pop("host", "localhost"), port, 0, **kw)
        self.addCleanup(conn.quit)
        return conn


class AuthTests(AiosmtpdTestCase):
    def test_cram_md5_preferred(self):
        """With PLAIN, LOGIN and CRAM-MD5 offered, the client authenticates with CRAM-MD5."""
        port = self.start()

        async def go():
            c = self.connection(port, user="testuser", password="testpass")
            self.assertEqual(
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
            )
            self.assertEqual(self.handler.messages[0][3], "testuser")

        return as_deferred(go())

    def test_plain_and_login(self):
        """PLAIN and LOGIN each work when they are the only mechanism offered."""
        port_plain = self.start(exclude=("LOGIN", "CRAM-MD5"))
        plain_handler = self.handler
        port_login = self.start(exclude=("PLAIN", "CRAM-MD5"))

        async def go():
            for port, handler in ((port_plain, plain_handler), (port_login, self.handler)):
                c = self.connection(port, user="testuser", password="testpass")
                self.assertEqual(
                    await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
                )
                self.assertEqual(handler.messages[-1][3], "testuser")

        return as_deferred(go())

    def test_bad_credentials(self):
        """Refused credentials fail with AuthenticationFailed carrying aiosmtpd's 535 reply."""
        port = self.start()

        async def go():
            c = self.connection(port, user="testuser", password="wrong")
            with self.assertRaises(AuthenticationFailed) as cm:
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
            self.assertEqual(cm.exception.code, 535)
            self.assertNotIn("wrong", str(cm.exception))
            self.assertEqual(self.handler.messages, [])

        return as_deferred(go())


class TLSTests(AiosmtpdTestCase):
    def test_starttls_verified(self):
        """STARTTLS with the right CA succeeds; AUTH happens inside TLS; the message arrives intact."""
        port = self.start(starttls=True, auth_require_tls=True)

        async def go():
            c = self.connection(
                port,
                user="testuser",
                password="testpass",
                secure_mode=SecureMode.STARTTLS,
                ca_file=self.ca_file,
            )
            self.assertEqual(
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
            )
            mail_from, rcpts, content, auth, over_tls = self.handler.messages[0]
            self.assertEqual(
                (mail_from, rcpts, auth, over_tls),
                ("anne@example.com", ["bart@example.com"], "testuser", True),
            )
            self.assertIn(b"\r\n.dotted line\r\n", content)

        return as_deferred(go())

    def test_implicit_tls_verified(self):
        """SMTPS with the right CA succeeds, and the connection is reused for a second message."""
        port = self.start(implicit=True)

        async def go():
            c = self.connection(port, secure_mode="smtps", ca_file=self.ca_file)
            for _ in range(2):
                self.assertEqual(
                    await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
                )
            self.assertEqual(len(self.handler.messages), 2)

        return as_deferred(go())

    def test_unknown_ca(self):
        """A server certificate from an unknown CA is a TLS failure (444), for both modes; nothing is sent."""
        implicit = self.start(implicit=True)
        starttls = self.start(starttls=True)

        async def go():
            for port, mode in ((implicit, SecureMode.IMPLICIT), (starttls, SecureMode.STARTTLS)):
                other_ca = os.path.join(self.tmp, "other-ca.pem")
                trustme.CA().cert_pem.write_to_path(other_ca)
                c = self.connection(port, secure_mode=mode, ca_file=other_ca)
                with self.assertRaises(TLSFailed) as cm:
                    await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
                self.assertEqual(cm.exception.code, 444)
                self.assertTrue(cm.exception.site_problem)
            self.assertEqual(self.handler.messages, [])

        return as_deferred(go())

    def test_wrong_hostname(self):
        """A certificate for another name fails; with verify_hostname off (chain still checked) it succeeds."""
        port = self.start(implicit=True)

        async def go():
            # The certificate names "localhost" only; 127.0.0.1 is not in it.
            c = self.connection(port, host="127.0.0.1", secure_mode="smtps", ca_file=self.ca_file)
            with self.assertRaises(TLSFailed):
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
            c = self.connection(
                port,
                host="127.0.0.1",
                secure_mode="smtps",
                ca_file=self.ca_file,
                verify_hostname=False,
            )
            self.assertEqual(
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
            )

        return as_deferred(go())

    def test_no_verification(self):
        """verify_cert off accepts any certificate (discouraged, but Mailman-compatible)."""
        port = self.start(implicit=True)

        async def go():
            c = self.connection(port, secure_mode="smtps", verify_cert=False)
            self.assertEqual(
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
            )

        return as_deferred(go())

    def test_client_certificate(self):
        """A server demanding a client certificate accepts ours when configured and refuses us without it."""
        port = self.start(implicit=True, require_client_cert=True)

        async def go():
            c = self.connection(
                port,
                secure_mode="smtps",
                ca_file=self.ca_file,
                client_cert=self.client_cert,
                client_key=self.client_key,
            )
            self.assertEqual(
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
            )
            c = self.connection(port, secure_mode="smtps", ca_file=self.ca_file)
            with self.assertRaises(TLSFailed):
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)

        return as_deferred(go())

    def test_starttls_not_offered(self):
        """STARTTLS mode against a server without STARTTLS fails and sends no mail in clear text."""
        port = self.start()

        async def go():
            c = self.connection(port, secure_mode="starttls", ca_file=self.ca_file)
            with self.assertRaises(TLSFailed) as cm:
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
            self.assertIn(b"STARTTLS", cm.exception.response)
            self.assertEqual(self.handler.messages, [])

        return as_deferred(go())


class RawRecorder:
    """aiosmtpd handler remembering each message's envelope and exact octets."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append((list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK"


class TransmittableTests(TestCase):
    """A strict smarthost (aiosmtpd's default limits: 1,001 octets a line as
    received, SIZE, and without 8BITMIME when it decodes data) gets every post
    in a form it accepts, decoding to the post's content."""

    def start(self, **options):
        if Controller is None:
            raise AssertionError("aiosmtpd missing: install the test extras")
        self.handler = RawRecorder()
        controller = Controller(self.handler, hostname="127.0.0.1", port=free_port(), **options)
        controller.start()
        self.addCleanup(controller.stop)
        return controller.port

    def connection(self, port):
        conn = Connection("127.0.0.1", port, 0, reactor=reactor)
        self.addCleanup(conn.quit)
        return conn

    def test_long_lines_long_headers_and_attachments(self):
        """5,000-character text and HTML lines, an over-long header and a base64
        attachment reach every member of a chunked fan-out and decode the same."""
        from mailrelay.mta import BulkDelivery
        from tests.test_mta_transmittable import MIXED, assert_same_content

        post = MIXED.replace(
            b"Subject: test\r\n", b"Subject: " + b"a long subject " * 100 + b"\r\n"
        )
        port = self.start()
        members = ["m1@example.com", "m2@example.org", "m3@example.net"]
        mlist = types.SimpleNamespace(bounces_address="list-bounces@example.com")

        async def go():
            bulk = BulkDelivery(self.connection(port), max_recipients=1)
            refused = await bulk.deliver(mlist, post, {"recipients": members})
            self.assertEqual(refused, {})
            self.assertEqual(
                sorted(r for rcpts, _ in self.handler.messages for r in rcpts), members
            )
            for _, content in self.handler.messages:
                assert_same_content(self, post, content)

        return as_deferred(go())

    def test_eight_bit_without_8bitmime(self):
        """To a server without 8BITMIME (which refuses 8-bit data outright), an
        8-bit post with an 8-bit subject goes 7-bit and decodes the same."""
        from tests.test_mta_transmittable import LONG_TEXT, assert_same_content, crlf

        post = crlf(
            "From: anne@example.com\nTo: list@example.com\nSubject: Grüße aus Köln\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
            f"Content-Transfer-Encoding: 8bit\n\nGrüße!\n.dotted\n{LONG_TEXT}\n"
        )
        port = self.start(decode_data=True, enable_SMTPUTF8=False)

        async def go():
            c = self.connection(port)
            self.assertEqual(await c.sendmail("anne@example.com", ["bart@example.com"], post), {})
            ((_, content),) = self.handler.messages
            self.assertTrue(content.isascii())
            assert_same_content(self, post, content)

        return as_deferred(go())

    def test_larger_than_size(self):
        """A message over the advertised SIZE fails with MessageTooLarge before
        MAIL; the same connection then sends a smaller one."""
        from mailrelay.mta import MessageTooLarge

        port = self.start(data_size_limit=2000)

        async def go():
            c = self.connection(port)
            self.assertEqual(
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
            )
            self.assertEqual(c.size_limit, 2000)
            with self.assertRaises(MessageTooLarge) as cm:
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE + "x" * 3000)
            self.assertEqual(cm.exception.limit, 2000)
            self.assertEqual(
                await c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE), {}
            )
            self.assertEqual(len(self.handler.messages), 2)

        return as_deferred(go())
