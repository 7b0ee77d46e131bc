"""Every scenario of the outbound seed documents, ported to Twisted.

Sources: Mailman 3's ``mta/docs/connection.rst`` (and its older variant),
``mta/docs/authentication.rst``, XEmacs smtpmail's authentication chapter,
and the pin-down checklist of ``notes/mailman-behaviour.md`` section 6.  Each
test runs the Connection on the real reactor against the FakeMTA on 127.0.0.1.
"""

from __future__ import annotations

import functools
import os
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.model import MailingList
from mailrelay.mta import (
    BulkDelivery,
    Connection,
    ConnectionFailed,
    SecureMode,
    SenderRefused,
    ServerClosing,
    SmarthostUnreachable,
    TLSFailed,
    as_secure_mode,
)
from mailrelay.testing import FakeMTA, ThrowawayCA
from tests.support import as_deferred, free_port

AARDVARKS = """\
From: anne@example.com
To: bart@example.com
Subject: aardvarks

"""

FIRST_POST = """\
From: aperson@example.com
To: test@example.com
Subject: My first post
Message-ID: <first>

First post!
"""


@functools.cache
def _ca() -> tuple[ThrowawayCA, str]:
    ca = ThrowawayCA()
    return ca, ca.write_ca_file(tempfile.mkdtemp())


class SeedTestCase(TestCase):
    # trial does not run setUpClass; one CA per process is enough.
    def setUp(self):
        self.ca, self.ca_file = _ca()

    async def mta(self, **kw) -> FakeMTA:
        kw.setdefault("ca", self.ca)
        smtpd = FakeMTA(reactor, **kw)
        await smtpd.start()
        self.addCleanup(smtpd.stop)
        return smtpd

    def connection(self, smtpd, *args, **kw) -> Connection:
        kw.setdefault("reactor", reactor)
        args = args or (0,)
        conn = Connection(smtpd.host, smtpd.port, *args, **kw)
        self.addCleanup(conn.quit)
        return conn


class ConnectionSeedTests(SeedTestCase):
    """mta/docs/connection.rst"""

    def test_lazy_connect_and_reset(self):
        """No connection until the first message; the message is accepted ({}); the count can be reset."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            self.assertEqual(smtpd.get_connection_count(), 0)
            result = await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(result, {})
            self.assertEqual(smtpd.get_connection_count(), 1)
            smtpd.reset_connection_count()
            self.assertEqual(smtpd.get_connection_count(), 0)
            await connection.quit()

        return as_deferred(go())

    def test_authentication_credentials_recorded(self):
        """With user and password, each new connection authenticates: AUTH PLAIN AHRlc3R1c2VyAHRlc3RwYXNz."""

        async def go():
            smtpd = await self.mta(users={"testuser": "testpass"})
            connection = self.connection(smtpd, 0, "testuser", "testpass")
            self.assertEqual(
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS), {}
            )
            self.assertEqual(smtpd.get_authentication_credentials(), "AHRlc3R1c2VyAHRlc3RwYXNz")

        return as_deferred(go())

    def test_one_credential_missing_means_no_auth(self):
        """If either the user name or the password is omitted, no authentication is attempted."""

        async def go():
            smtpd = await self.mta()
            for user, password in (("testuser", None), (None, "testpass"), ("", "testpass")):
                connection = self.connection(smtpd, 0, user, password)
                self.assertEqual(
                    await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS),
                    {},
                )
                await connection.quit()
            self.assertEqual(smtpd.auth_attempts, [])

        return as_deferred(go())

    def test_secure_installations_positional(self):
        """The constructor takes (host, port, sessions, user, pass, secure_mode, verify_cert, verify_hostname)
        positionally, as the seed calls it, for SMTPS and STARTTLS alike."""

        async def go():
            for tls in ("implicit", "starttls"):
                smtpd = await self.mta(
                    users={"testuser": "testpass"}, tls=tls, require_tls=tls == "starttls"
                )
                connection = self.connection(
                    smtpd,
                    0,
                    "testuser",
                    "testpass",
                    as_secure_mode("smtps" if tls == "implicit" else "STARTTLS"),
                    True,
                    True,
                    ca_file=self.ca_file,
                )
                self.assertEqual(
                    await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS),
                    {},
                )
                self.assertTrue(smtpd.transactions[-1].tls)
                self.assertEqual(smtpd.transactions[-1].authenticated_as, "testuser")

        return as_deferred(go())

    def test_verify_hostname_ignored_without_verify_cert(self):
        """verify_hostname is ignored unless verify_cert is true."""
        connection = Connection(
            "localhost", 465, 0, None, None, SecureMode.IMPLICIT, False, True, reactor=reactor
        )
        self.assertFalse(connection.verify_hostname)

    def test_sessions_per_connection(self):
        """With 2 sessions per connection the counts after five messages are 1, 1, 2, 2, 3."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 2)
            self.assertEqual(smtpd.get_connection_count(), 0)
            counts = []
            for _ in range(5):
                self.assertEqual(
                    await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS),
                    {},
                )
                counts.append(smtpd.get_connection_count())
            self.assertEqual(counts, [1, 1, 2, 2, 3])

        return as_deferred(go())

    def test_no_maximum(self):
        """Zero means unlimited: ten messages, one connection."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            for _ in range(10):
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(smtpd.get_connection_count(), 1)
            self.assertEqual(len(smtpd.messages), 10)

        return as_deferred(go())

    def test_development_mode(self):
        """devmode sends to the devmode address once per real recipient and leaves the message alone."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0, devmode_recipient="zperson@example.com")
            smtpd.clear()
            result = await connection.sendmail(
                "anne@example.com", ["bart@example.com", "cate@example.com"], AARDVARKS
            )
            self.assertEqual(result, {})
            messages = list(smtpd.messages)
            self.assertEqual(len(messages), 1)
            text = messages[0].as_string()
            self.assertTrue(
                text.startswith(
                    "From: anne@example.com\nTo: bart@example.com\nSubject: aardvarks\n"
                )
            )
            self.assertIn("X-Peer: ", text)
            self.assertIn("X-MailFrom: anne@example.com\n", text)
            self.assertIn("X-RcptTo: zperson@example.com, zperson@example.com\n", text)

        return as_deferred(go())

    def test_devmode_results_keyed_by_real_recipients(self):
        """A devmode refusal is reported under the caller's recipients, not the devmode address (Mailman loses them)."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0, devmode_recipient="zperson@example.com")
            smtpd.reject("rcpt", 550, count=1)
            result = await connection.sendmail(
                "anne@example.com", ["bart@example.com", "cate@example.com"], AARDVARKS
            )
            self.assertEqual(result, {"bart@example.com": (550, b"Error: SMTPRecipientsRefused")})

        return as_deferred(go())


class AuthenticationSeedTests(SeedTestCase):
    """mta/docs/authentication.rst"""

    def test_bulk_with_good_credentials(self):
        """BulkDelivery authenticates before delivering; all recipients accepted."""

        async def go():
            smtpd = await self.mta(users={"testuser": "testpass"})
            mlist = MailingList("test@example.com")
            bulk = BulkDelivery(self.connection(smtpd, 0, "testuser", "testpass"))
            result = await bulk.deliver(mlist, FIRST_POST, {"recipients": ["bperson@example.com"]})
            self.assertEqual(result, {})
            self.assertEqual(smtpd.get_authentication_credentials(), "AHRlc3R1c2VyAHRlc3RwYXNz")
            self.assertEqual(smtpd.transactions[0].mail_from, "test-bounces@example.com")

        return as_deferred(go())

    def test_bulk_with_bad_credentials(self):
        """Bad credentials give (571, b'Bad authentication') for every recipient."""

        async def go():
            smtpd = await self.mta(users={"testuser": "testpass"})
            bulk = BulkDelivery(self.connection(smtpd, 0, "baduser", "badpass"))
            result = await bulk.deliver(
                MailingList("test@example.com"), FIRST_POST, {"recipients": ["bperson@example.com"]}
            )
            self.assertEqual(result, {"bperson@example.com": (571, b"Bad authentication")})
            self.assertEqual(smtpd.messages, [])

        return as_deferred(go())

    def test_bad_credentials_reconnect_per_chunk(self):
        """Each chunk reconnects and re-authenticates after a failure (3 recipients, 2 chunks: 2 connections)."""

        async def go():
            smtpd = await self.mta(users={"testuser": "testpass"})
            bulk = BulkDelivery(self.connection(smtpd, 0, "baduser", "badpass"), max_recipients=2)
            rcpts = ["bperson@example.com", "cperson@example.com", "dperson@example.org"]
            result = await bulk.deliver(
                MailingList("test@example.com"), FIRST_POST, {"recipients": rcpts}
            )
            self.assertEqual(result, {r: (571, b"Bad authentication") for r in rcpts})
            self.assertEqual(smtpd.get_connection_count(), 2)

        return as_deferred(go())


class SmtpmailSeedTests(SeedTestCase):
    """XEmacs smtpmail: per-(host, port) credentials, CRAM-MD5/LOGIN order, STARTTLS client credentials."""

    def credentials_file(self, text):
        path = os.path.join(tempfile.mkdtemp(), "authinfo")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path

    def test_credentials_by_host_and_port(self):
        """The entry matching the server's host and port is used; an entry for another port is not."""

        async def go():
            smtpd = await self.mta(users={"username": "password"})
            path = self.credentials_file(
                f"machine {smtpd.host} port {smtpd.port + 1 if smtpd.port < 65535 else 1} login wrong password x\n"
                f"machine {smtpd.host} port {smtpd.port} login username password password\n"
            )
            connection = self.connection(smtpd, 0, credentials_file=path)
            self.assertEqual(
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS), {}
            )
            self.assertEqual(smtpd.auth_attempts, [("PLAIN", "username", True)])

        return as_deferred(go())

    def test_cram_md5_before_login(self):
        """With CRAM-MD5 and LOGIN offered, CRAM-MD5 is selected."""

        async def go():
            smtpd = await self.mta(users={"username": "password"}, mechanisms=("LOGIN", "CRAM-MD5"))
            connection = self.connection(smtpd, 0, "username", "password")
            await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(smtpd.auth_attempts, [("CRAM-MD5", "username", True)])

        return as_deferred(go())

    def test_login_only(self):
        """LOGIN works when it is the only mechanism."""

        async def go():
            smtpd = await self.mta(users={"username": "password"}, mechanisms=("LOGIN",))
            connection = self.connection(smtpd, 0, "username", "password")
            await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(smtpd.auth_attempts, [("LOGIN", "username", True)])

        return as_deferred(go())

    def test_starttls_with_client_certificate_then_sasl(self):
        """STARTTLS with a client key and certificate, then SASL inside TLS: both at once."""

        async def go():
            smtpd = await self.mta(
                users={"username": "password"},
                tls="starttls",
                require_tls=True,
                require_client_cert=True,
            )
            cert, key = self.ca.write_client_cert(tempfile.mkdtemp(), "client.example")
            connection = self.connection(
                smtpd,
                0,
                "username",
                "password",
                "starttls",
                ca_file=self.ca_file,
                client_cert=cert,
                client_key=key,
            )
            self.assertEqual(
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS), {}
            )
            self.assertEqual(smtpd.client_certificate_subjects, ["client.example"])
            self.assertEqual(smtpd.transactions[0].authenticated_as, "username")

        return as_deferred(go())

    def test_starttls_without_authentication(self):
        """STARTTLS without SASL credentials (smtpmail's nil username) still encrypts."""

        async def go():
            smtpd = await self.mta(tls="starttls", require_tls=True)
            connection = self.connection(smtpd, 0, secure_mode="starttls", ca_file=self.ca_file)
            await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertTrue(smtpd.transactions[0].tls)

        return as_deferred(go())


class ChecklistTests(SeedTestCase):
    """notes/mailman-behaviour.md section 6: refusals, failures and chunking on the wire."""

    def test_one_recipient_refused(self):
        """One RCPT refused of two: DATA still goes, the dict names it, the connection is kept."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            smtpd.reject("rcpt", 550, match="bart@example.com")
            result = await connection.sendmail(
                "anne@example.com", ["bart@example.com", "cate@example.com"], AARDVARKS
            )
            self.assertEqual(result, {"bart@example.com": (550, b"Error: SMTPRecipientsRefused")})
            self.assertEqual(smtpd.transactions[0].rcpts, ("cate@example.com",))
            await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(smtpd.get_connection_count(), 1)

        return as_deferred(go())

    def test_all_recipients_refused(self):
        """All refused: each keeps its own code; nothing is delivered."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            smtpd.reject("rcpt", 550, match="bart@example.com")
            smtpd.reject("rcpt", 451, match="cate@example.com")
            result = await connection.sendmail(
                "anne@example.com", ["bart@example.com", "cate@example.com"], AARDVARKS
            )
            self.assertEqual(
                result,
                {
                    "bart@example.com": (550, b"Error: SMTPRecipientsRefused"),
                    "cate@example.com": (451, b"Error: SMTPRecipientsRefused"),
                },
            )
            self.assertEqual(smtpd.messages, [])
            self.assertIn(b"RSET", smtpd.commands)

        return as_deferred(go())

    def test_mail_refused(self):
        """MAIL 451: SenderRefused for the Connection, (451, ...) per recipient for BulkDelivery; reconnect next."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            smtpd.reject("mail", 451)
            with self.assertRaises(SenderRefused) as cm:
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(
                (cm.exception.code, cm.exception.response), (451, b"Error: SMTPResponseException")
            )
            smtpd.reject("mail", 451)
            result = await BulkDelivery(connection).deliver(
                MailingList("test@example.com"),
                FIRST_POST,
                {"recipients": ["b@example.com", "c@example.com"]},
            )
            self.assertEqual(
                result,
                {
                    r: (451, b"Error: SMTPResponseException")
                    for r in ("b@example.com", "c@example.com")
                },
            )
            self.assertEqual(
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS), {}
            )
            self.assertEqual(smtpd.get_connection_count(), 3)

        return as_deferred(go())

    def test_mta_down(self):
        """Nothing listening: 444 for the Connection and for every BulkDelivery recipient."""

        async def go():
            connection = Connection("127.0.0.1", free_port(), 0, reactor=reactor)
            with self.assertRaises(ConnectionFailed) as cm:
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(cm.exception.code, 444)
            self.assertIn(b"refused", cm.exception.response.lower())
            # Nothing reached at all: the runner may defer the rest of a batch at once.
            self.assertIsInstance(cm.exception, SmarthostUnreachable)
            result = await BulkDelivery(connection).deliver(
                MailingList("test@example.com"), FIRST_POST, {"recipients": ["b@example.com"]}
            )
            self.assertEqual(result["b@example.com"][0], 444)

        return as_deferred(go())

    def test_starttls_not_supported(self):
        """STARTTLS mode against a server without it: EHLO, QUIT, TLSFailed; no message."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0, secure_mode="starttls", ca_file=self.ca_file)
            with self.assertRaises(TLSFailed):
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            await connection.quit()  # the failed session has said QUIT and closed
            self.assertEqual([c.split()[0] for c in smtpd.commands], [b"EHLO", b"QUIT"])

        return as_deferred(go())

    def test_chunking_on_one_connection(self):
        """max 2: {b,c}@example.com then d@example.org, two transactions on one connection, RCPTs sorted."""

        async def go():
            smtpd = await self.mta()
            bulk = BulkDelivery(self.connection(smtpd, 0), max_recipients=2)
            rcpts = ["cperson@example.com", "dperson@example.org", "bperson@example.com"]
            self.assertEqual(
                await bulk.deliver(
                    MailingList("test@example.com"), FIRST_POST, {"recipients": rcpts}
                ),
                {},
            )
            self.assertEqual(
                [t.rcpts for t in smtpd.transactions],
                [("bperson@example.com", "cperson@example.com"), ("dperson@example.org",)],
            )
            self.assertEqual(smtpd.get_connection_count(), 1)

        return as_deferred(go())

    def test_421_then_reconnect(self):
        """A 421 mid-session fails that message with ServerClosing; the next message reconnects."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            smtpd.disconnect("mail")
            with self.assertRaises(ServerClosing):
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS)
            self.assertEqual(
                await connection.sendmail("anne@example.com", ["bart@example.com"], AARDVARKS), {}
            )
            self.assertEqual(smtpd.get_connection_count(), 2)

        return as_deferred(go())

    def test_dropped_mid_data(self):
        """A connection dropped during DATA fails with 444; nothing was recorded as delivered."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            smtpd.drop_during_data(after_bytes=10)
            with self.assertRaises(ConnectionFailed) as cm:
                await connection.sendmail(
                    "anne@example.com", ["bart@example.com"], AARDVARKS + "x" * 5000
                )
            self.assertEqual(cm.exception.code, 444)
            self.assertEqual(smtpd.messages, [])

        return as_deferred(go())

    def test_leading_dots_round_trip(self):
        """A leading '.' on the first line and at a 16 KiB boundary arrives intact; the message is not cut."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            # ".boundary" starts at offset 16384; no line is over 998 octets
            # (those would be re-encoded, see tests/test_mta_transmittable.py).
            filler = ("x" * 962 + "\n") * 17 + "x" * 5 + "\n"
            body = ".first\n" + filler + ".boundary\n.\n..two\nend\n"
            self.assertEqual(body.index(".boundary"), 16384)
            await connection.sendmail("anne@example.com", ["bart@example.com"], body)
            self.assertEqual(smtpd.raw_messages, [body.replace("\n", "\r\n").encode()])

        return as_deferred(go())

    def test_bad_input_sends_nothing(self):
        """Invalid addresses, no recipients, a wrong message type: clear errors before any connection."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            for sender, rcpts, msg, exc in (
                ("a@b@c", ["bart@example.com"], "x", ValueError),
                ("anne@example.com", ["bart@example.com", "a,b@c"], "x", ValueError),
                ("anne@example.com", [], "x", ValueError),
                ("anne@example.com", ["bart@example.com"], 42, TypeError),
            ):
                with self.assertRaises(exc):
                    await connection.sendmail(sender, rcpts, msg)
            self.assertEqual(smtpd.get_connection_count(), 0)

        return as_deferred(go())

    def test_non_ascii_without_smtputf8(self):
        """A non-ASCII recipient to a server without SMTPUTF8 is refused locally (553 5.6.7), nothing sent;
        with SMTPUTF8 offered it goes through."""

        async def go():
            smtpd = await self.mta()
            connection = self.connection(smtpd, 0)
            result = await connection.sendmail("anne@example.com", ["jörg@example.com"], AARDVARKS)
            self.assertEqual(result["jörg@example.com"][0], 553)
            self.assertEqual(smtpd.transactions, [])
            utf8 = await self.mta(smtputf8=True)
            connection = self.connection(utf8, 0)
            self.assertEqual(
                await connection.sendmail("anne@example.com", ["jörg@example.com"], AARDVARKS), {}
            )
            self.assertEqual(utf8.transactions[0].rcpts, ("jörg@example.com",))

        return as_deferred(go())

    def test_pipelining_against_fake(self):
        """Against a server offering PIPELINING the client pipelines and results stay per recipient."""

        async def go():
            smtpd = await self.mta(pipelining=True)
            connection = self.connection(smtpd, 0)
            smtpd.reject("rcpt", 550, match="b@example.com")
            result = await connection.sendmail(
                "anne@example.com", ["a@example.com", "b@example.com"], AARDVARKS
            )
            self.assertEqual(result, {"b@example.com": (550, b"Error: SMTPRecipientsRefused")})
            self.assertEqual(smtpd.transactions[0].rcpts, ("a@example.com",))

        return as_deferred(go())
