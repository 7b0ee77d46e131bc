"""Wire-level tests of the SMTP client protocol, against a scripted server in memory."""

from __future__ import annotations

import base64
import hashlib
import hmac

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.mta.client import RelayClient, Transaction
from mailrelay.mta.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    ConnectionTimeout,
    DataRefused,
    SenderRefused,
    ServerClosing,
    TLSFailed,
)
from mailrelay.mta.message import prepare_message


class _NoDelayTransport(StringTransport):
    nodelay = None

    def setTcpNoDelay(self, enabled):  # noqa: N802
        self.nodelay = enabled

    def registerProducer(self, producer, streaming):  # noqa: N802
        # Like a real transport with room in its buffer: pull until done.
        super().registerProducer(producer, streaming)
        while not streaming and self.producer is producer:
            producer.resumeProducing()


class ScriptedServer:
    """Drives a RelayClient over a StringTransport, one server reply at a time."""

    def __init__(self, testcase, host="127.0.0.1", **kwargs):
        self.clock = task.Clock()
        kwargs.setdefault("helo_name", "relay.example")
        self.client = RelayClient(clock=self.clock, **kwargs)
        self.transport = _NoDelayTransport(
            peerAddress=IPv4Address("TCP", host, 25),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.client.makeConnection(self.transport)
        self.ready = self.client.ready
        self.testcase = testcase

    def sent(self) -> list[bytes]:
        """Lines the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1] if data else []

    def reply(self, *lines: bytes | str):
        for line in lines:
            if isinstance(line, str):
                line = line.encode()
            self.client.dataReceived(line + b"\r\n")

    def handshake(self, *ehlo_lines: str):
        self.reply("220 smarthost.example ESMTP")
        self.testcase.assertEqual(self.sent(), [b"EHLO relay.example"])
        lines = ["250-smarthost.example", *[f"250-{x}" for x in ehlo_lines]]
        lines[-1] = "250 " + lines[-1][4:]
        self.reply(*lines)


def txn(
    sender="anne@example.com", rcpts=("bart@example.com",), message=b"Subject: hi\r\n\r\nbody\r\n"
):
    return Transaction(sender, tuple(rcpts), prepare_message(message))


class HandshakeTests(SynchronousTestCase):
    def test_nodelay_and_ready_without_auth(self):
        """TCP_NODELAY is set on connect; with no credentials the session is ready after EHLO."""
        s = ScriptedServer(self)
        self.assertTrue(s.transport.nodelay)
        s.handshake("PIPELINING", "AUTH PLAIN")
        self.assertIs(self.successResultOf(s.ready), s.client)
        self.assertEqual(s.sent(), [])

    def test_greeting_421(self):
        """A 421 greeting fails the session with ServerClosing carrying the reply."""
        s = ScriptedServer(self)
        s.reply("421 4.3.2 busy")
        f = self.failureResultOf(s.ready, ServerClosing)
        self.assertEqual((f.value.code, f.value.response), (421, b"4.3.2 busy"))

    def test_ehlo_421_is_not_misreported(self):
        """A 421 to EHLO keeps its code (Twisted reports 502, twisted#6212)."""
        s = ScriptedServer(self, username="u", password="p")
        s.reply("220 hi")
        s.sent()
        s.reply("421 4.7.0 go away")
        self.assertEqual(self.failureResultOf(s.ready, ServerClosing).value.code, 421)

    def test_garbage_reply_is_444(self):
        """A reply without a numeric code is a protocol error reported as 444 and the connection is aborted."""
        s = ScriptedServer(self)
        s.reply("hello there")
        f = self.failureResultOf(s.ready, ConnectionFailed)
        self.assertEqual(f.value.code, 444)
        self.assertTrue(s.transport.disconnecting)

    def test_reply_timeout(self):
        """No reply within the timeout fails with ConnectionTimeout (444) and aborts."""
        s = ScriptedServer(self, timeout=30)
        s.clock.advance(29)
        self.assertNoResult(s.ready)
        s.clock.advance(2)
        self.assertEqual(self.failureResultOf(s.ready, ConnectionTimeout).value.code, 444)


class AuthTests(SynchronousTestCase):
    def test_prefers_cram_md5(self):
        """With all three offered, CRAM-MD5 is used and answers the challenge correctly."""
        s = ScriptedServer(self, username="testuser", password="testpass")
        s.handshake("AUTH LOGIN PLAIN CRAM-MD5")
        self.assertEqual(s.sent(), [b"AUTH CRAM-MD5"])
        challenge = b"<1896.697170952@postoffice.example>"
        s.reply("334 " + base64.b64encode(challenge).decode())
        (answer,) = s.sent()
        digest = hmac.new(b"testpass", challenge, hashlib.md5).hexdigest().encode()
        self.assertEqual(base64.b64decode(answer), b"testuser " + digest)
        s.reply("235 2.7.0 ok")
        self.successResultOf(s.ready)

    def test_plain_is_initial_response_without_authzid(self):
        """PLAIN goes as one initial response '\\0user\\0pass' (the seeds' AHRlc3R1c2VyAHRlc3RwYXNz)."""
        s = ScriptedServer(self, username="testuser", password="testpass")
        s.handshake("AUTH PLAIN")
        self.assertEqual(s.sent(), [b"AUTH PLAIN AHRlc3R1c2VyAHRlc3RwYXNz"])
        s.reply("235 ok")
        self.successResultOf(s.ready)

    def test_falls_back_to_next_mechanism(self):
        """A refused mechanism is followed by the next one; PLAIN is never sent twice."""
        s = ScriptedServer(self, username="u", password="p")
        s.handshake("AUTH CRAM-MD5 PLAIN LOGIN")
        self.assertEqual(s.sent(), [b"AUTH CRAM-MD5"])
        s.reply("504 5.5.4 not today")
        (plain,) = s.sent()
        self.assertTrue(plain.startswith(b"AUTH PLAIN "))
        s.reply("535 5.7.8 nope")
        self.assertEqual(s.sent(), [b"AUTH LOGIN"])
        s.reply("334 " + base64.b64encode(b"Username:").decode())
        self.assertEqual(s.sent(), [base64.b64encode(b"u")])
        s.reply("334 " + base64.b64encode(b"Password:").decode())
        self.assertEqual(s.sent(), [base64.b64encode(b"p")])
        s.reply("235 ok")
        self.successResultOf(s.ready)

    def test_all_mechanisms_refused_reports_last_reply(self):
        """When every mechanism fails, the last reply is the error: 571 Bad authentication."""
        s = ScriptedServer(self, username="baduser", password="badpass")
        s.handshake("AUTH PLAIN")
        s.sent()
        s.reply("571 Bad authentication")
        f = self.failureResultOf(s.ready, AuthenticationFailed)
        self.assertEqual((f.value.code, f.value.response), (571, b"Bad authentication"))
        self.assertTrue(f.value.site_problem)
        self.assertFalse(f.value.permanent)
        self.assertEqual(s.sent(), [b"QUIT"])

    def test_no_credentials_in_error_text(self):
        """Neither the password nor its base64 forms appear in the error's text or repr."""
        s = ScriptedServer(self, username="secretuser", password="hunter2")
        s.handshake("AUTH PLAIN")
        s.sent()
        s.reply("535 5.7.8 Authentication credentials invalid")
        f = self.failureResultOf(s.ready, AuthenticationFailed)
        text = str(f.value) + repr(f.value) + f.getTraceback()
        for secret in (b"hunter2", base64.b64encode(b"\0secretuser\0hunter2")):
            self.assertNotIn(secret.decode(), text)

    def test_no_plaintext_auth_to_remote_host(self):
        """Credentials are not sent over clear text to a non-loopback host."""
        s = ScriptedServer(self, host="192.0.2.10", username="u", password="p")
        s.handshake("AUTH PLAIN")
        f = self.failureResultOf(s.ready, AuthenticationFailed)
        self.assertIn(b"unencrypted", f.value.response)
        self.assertEqual(s.sent(), [b"QUIT"])

    def test_plaintext_auth_allowed_explicitly(self):
        """allow_plaintext_auth lets AUTH go over clear text to a remote host."""
        s = ScriptedServer(
            self, host="192.0.2.10", username="u", password="p", allow_plaintext_auth=True
        )
        s.handshake("AUTH PLAIN")
        self.assertEqual(len(s.sent()), 1)

    def test_credentials_but_no_auth_offered(self):
        """Configured credentials and a server without AUTH is a site problem, not silence."""
        s = ScriptedServer(self, username="u", password="p")
        s.handshake("PIPELINING")
        self.assertTrue(self.failureResultOf(s.ready, AuthenticationFailed).value.site_problem)


class StartTLSTests(SynchronousTestCase):
    def test_starttls_required_but_not_offered(self):
        """STARTTLS mode never falls back to clear text: a server without it is a TLS failure."""
        s = ScriptedServer(self, tls_context=object(), require_starttls=True)
        s.handshake("PIPELINING")
        f = self.failureResultOf(s.ready, TLSFailed)
        self.assertEqual(f.value.code, 444)
        self.assertIn(b"STARTTLS", f.value.response)

    def test_starttls_refused(self):
        """A refused STARTTLS keeps the server's code."""
        s = ScriptedServer(self, tls_context=object(), require_starttls=True)
        s.handshake("STARTTLS")
        self.assertEqual(s.sent(), [b"STARTTLS"])
        s.reply("454 4.7.0 TLS not available")
        self.assertEqual(self.failureResultOf(s.ready, TLSFailed).value.code, 454)

    def test_plaintext_injected_after_starttls_reply(self):
        """Lines sent in clear text right behind the 220 to STARTTLS abort the session."""
        s = ScriptedServer(self, tls_context=object(), require_starttls=True)
        s.handshake("STARTTLS")
        s.sent()
        s.client.dataReceived(b"220 go ahead\r\n250 injected\r\n")
        self.failureResultOf(s.ready, TLSFailed)


class TransactionTests(SynchronousTestCase):
    def ready(self, *ehlo):
        s = ScriptedServer(self)
        s.handshake(*ehlo)
        self.successResultOf(s.ready)
        return s

    def test_lockstep_transaction(self):
        """Without PIPELINING: MAIL, each RCPT, DATA in turn; per-recipient replies; no RSET after success."""
        s = self.ready("SIZE 1000000")
        d = s.client.transact(txn(rcpts=("a@example.com", "b@example.com")))
        self.assertEqual(s.sent(), [b"MAIL FROM:<anne@example.com> SIZE=21"])
        s.reply("250 ok")
        self.assertEqual(s.sent(), [b"RCPT TO:<a@example.com>"])
        s.reply("550 5.1.1 no such user")
        self.assertEqual(s.sent(), [b"RCPT TO:<b@example.com>"])
        s.reply("250 ok")
        self.assertEqual(s.sent(), [b"DATA"])
        s.reply("354 go")
        self.assertEqual(s.sent(), [b"Subject: hi", b"", b"body", b"."])
        s.reply("250 2.0.0 queued")
        result = self.successResultOf(d)
        self.assertEqual(result.refused(), {0: (550, b"5.1.1 no such user")})
        self.assertEqual(s.sent(), [])
        self.assertTrue(s.client.is_usable())

    def test_pipelined_transaction(self):
        """With PIPELINING, MAIL, all RCPTs and DATA go in one write (RFC 2920)."""
        s = self.ready("PIPELINING")
        d = s.client.transact(txn(rcpts=("a@example.com", "b@example.com")))
        self.assertEqual(
            s.sent(),
            [
                b"MAIL FROM:<anne@example.com>",
                b"RCPT TO:<a@example.com>",
                b"RCPT TO:<b@example.com>",
                b"DATA",
            ],
        )
        s.reply("250 ok", "250 ok", "250 ok", "354 go")
        self.assertEqual(s.sent()[-1], b".")
        s.reply("250 ok")
        self.assertEqual(self.successResultOf(d).refused(), {})

    def test_pipelined_all_refused_resets_and_keeps_connection(self):
        """All recipients refused: the dict has each reply, RSET is sent, the connection stays usable."""
        s = self.ready("PIPELINING")
        d = s.client.transact(txn(rcpts=("a@example.com", "b@example.com")))
        s.sent()
        s.reply("250 ok", "550 no a", "451 later b", "554 no valid recipients")
        self.assertEqual(s.sent(), [b"RSET"])
        s.reply("250 reset")
        self.assertEqual(
            self.successResultOf(d).refused(), {0: (550, b"no a"), 1: (451, b"later b")}
        )
        self.assertTrue(s.client.is_usable())

    def test_mail_refused(self):
        """MAIL FROM refused fails the transaction with SenderRefused and quits."""
        s = self.ready()
        d = s.client.transact(txn())
        s.sent()
        s.reply("451 Error: SMTPResponseException")
        f = self.failureResultOf(d, SenderRefused)
        self.assertEqual((f.value.code, f.value.response), (451, b"Error: SMTPResponseException"))
        self.assertEqual(s.sent(), [b"QUIT"])
        self.assertFalse(s.client.is_usable())

    def test_pipelined_mail_refused_consumes_all_replies(self):
        """A pipelined MAIL refusal waits for the RCPT and DATA replies before failing."""
        s = self.ready("PIPELINING")
        d = s.client.transact(txn())
        s.sent()
        s.reply("452 4.3.1 full", "503 need MAIL")
        self.assertNoResult(d)
        s.reply("503 need MAIL")
        self.assertEqual(self.failureResultOf(d, SenderRefused).value.code, 452)

    def test_data_refused_after_body(self):
        """A refusal of the message after the final dot is DataRefused with that reply."""
        s = self.ready()
        d = s.client.transact(txn())
        s.reply("250 ok", "250 ok", "354 go")
        s.reply("552 5.3.4 too big")
        self.assertEqual(self.failureResultOf(d, DataRefused).value.code, 552)

    def test_421_mid_transaction(self):
        """A 421 at any point fails with ServerClosing."""
        s = self.ready()
        d = s.client.transact(txn())
        s.reply("250 ok", "421 4.3.0 shutting down")
        self.assertEqual(self.failureResultOf(d, ServerClosing).value.code, 421)

    def test_connection_lost_mid_data(self):
        """A connection dropped during DATA fails the transaction with 444."""
        s = self.ready()
        d = s.client.transact(txn())
        s.reply("250 ok", "250 ok", "354 go")
        s.client.connectionLost(Failure(ConnectionLost("reset by peer")))
        self.assertEqual(self.failureResultOf(d, ConnectionFailed).value.code, 444)

    def test_dot_stuffing_first_line_and_chunk_boundaries(self):
        """Lines starting with '.' are stuffed everywhere, including the first line and 16 KiB boundaries."""
        s = self.ready()
        # ".at-boundary" starts at offset 16384; no line is over 998 octets
        # (those would be re-encoded, see tests/test_mta_transmittable.py).
        filler = (b"x" * 962 + b"\n") * 17 + b"x" * 5 + b"\n"
        body = b".first\n" + filler + b".at-boundary\n..two\n.\n"
        self.assertEqual(body.index(b".at-boundary"), 16384)
        d = s.client.transact(txn(message=body))
        s.reply("250 ok", "250 ok", "354 go")
        wire = s.transport.value()
        self.assertIn(b"DATA\r\n..first\r\n", wire)
        self.assertIn(b"\r\n..at-boundary\r\n...two\r\n..\r\n.\r\n", wire)
        self.assertEqual(wire.count(b"\r\n.\r\n"), 1)
        s.reply("250 ok")
        self.successResultOf(d)

    def test_mail_parameters(self):
        """SIZE, BODY=8BITMIME and SMTPUTF8 are sent when offered and needed."""
        s = self.ready("SIZE", "8BITMIME", "SMTPUTF8")
        s.client.transact(txn(sender="jörg@example.com", message="Subject: ü\n\nü\n"))
        (mail,) = s.sent()
        self.assertEqual(
            mail, "MAIL FROM:<jörg@example.com> SIZE=19 BODY=8BITMIME SMTPUTF8".encode()
        )

    def test_non_ascii_recipient_without_smtputf8(self):
        """A non-ASCII recipient is refused locally (553 5.6.7) when SMTPUTF8 is not offered; others go on."""
        s = self.ready()
        d = s.client.transact(txn(rcpts=("jörg@example.com", "bart@example.com")))
        self.assertEqual(s.sent(), [b"MAIL FROM:<anne@example.com>"])
        s.reply("250 ok")
        self.assertEqual(s.sent(), [b"RCPT TO:<bart@example.com>"])
        s.reply("250 ok", "354 go", "250 ok")
        self.assertEqual(
            self.successResultOf(d).refused(),
            {0: (553, b"5.6.7 Non-ASCII address and the server does not offer SMTPUTF8")},
        )

    def test_only_non_ascii_recipients_sends_nothing(self):
        """If no recipient can be sent, no MAIL transaction is started at all."""
        s = self.ready()
        d = s.client.transact(txn(rcpts=("jörg@example.com",)))
        self.assertEqual(s.sent(), [])
        self.assertEqual(self.successResultOf(d).refused()[0][0], 553)

    def test_non_ascii_sender_without_smtputf8(self):
        """A non-ASCII sender to a server without SMTPUTF8 fails the whole transaction, nothing sent."""
        s = self.ready()
        d = s.client.transact(txn(sender="jörg@example.com"))
        self.assertEqual(self.failureResultOf(d, SenderRefused).value.code, 553)
        self.assertEqual(s.sent(), [b"QUIT"])

    def test_idle_timeout_quits(self):
        """An idle connection is closed with QUIT after idle_timeout, without an error."""
        s = ScriptedServer(self, idle_timeout=10)
        s.handshake()
        self.successResultOf(s.ready)
        s.clock.advance(11)
        self.assertEqual(s.sent(), [b"QUIT"])
        s.reply("221 bye")
        self.assertTrue(s.transport.disconnecting)

    def test_no_idle_timeout_by_default(self):
        """Without idle_timeout the connection waits for the next message indefinitely."""
        s = self.ready()
        s.clock.advance(10_000)
        self.assertEqual(s.sent(), [])
        self.assertTrue(s.client.is_usable())

    def test_quit(self):
        """quit() sends QUIT and fires once the connection is gone."""
        s = self.ready()
        d = s.client.quit()
        self.assertEqual(s.sent(), [b"QUIT"])
        s.reply("221 bye")
        self.assertNoResult(d)
        s.client.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
