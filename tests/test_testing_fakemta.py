"""Tests for mailrelay.testing.FakeMTA and ThrowawayCA.

Most tests drive the server in memory (StringTransport, iosim, task.Clock);
TLS is also checked over loopback sockets with CPython's smtplib, an
independent client, run in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import smtplib
import ssl
import subprocess
import sys
import tempfile

from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import basic
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mailrelay.testing import FakeMTA, ThrowawayCA, Transaction

PEER = IPv4Address("TCP", "192.0.2.7", 40123)
HOST = IPv4Address("TCP", "127.0.0.1", 25)
# base64 of "\0testuser\0testpass", what Mailman's seeds expect to be recorded.
GOOD_PLAIN = "AHRlc3R1c2VyAHRlc3RwYXNz"
BAD_PLAIN = "AGJhZHVzZXIAYmFkcGFzcw=="  # "\0baduser\0badpass"
USERS = {"testuser": "testpass"}


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that accepts startTLS and remembers the options."""

    tls_options = None

    def startTLS(self, contextFactory, normal=True):
        self.tls_options = contextFactory


class Session:
    """One in-memory connection to a FakeMTA: send lines, read the reply lines."""

    def __init__(self, mta, transport=None):
        self.transport = transport or StringTransport(peerAddress=PEER, hostAddress=HOST)
        self.protocol = mta.buildProtocol(PEER)
        self.protocol.makeConnection(self.transport)

    def replies(self):
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1]

    def send(self, *lines):
        """Send the lines in one segment (pipelined) and return the replies."""
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))
        return self.replies()

    def close(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def ehlo(self):
        return self.send(b"EHLO client.example")

    def mail(self, sender=b"anne@example.com", rcpts=(b"bart@example.com",), body=None):
        """Run one whole transaction; return the reply to the final dot."""
        body = body if body is not None else [b"Subject: hi", b"", b"Hello"]
        self.send(b"MAIL FROM:<" + sender + b">")
        for rcpt in rcpts:
            self.send(b"RCPT TO:<" + rcpt + b">")
        self.send(b"DATA")
        return self.send(*body, b".")


def new_session(test, **kwargs):
    clock = Clock()
    mta = FakeMTA(clock, **kwargs)
    session = Session(mta)
    test.assertEqual(session.replies(), [b"220 fake-mta.example ESMTP mailrelay fake MTA"])
    return mta, session, clock


def cram_md5_response(challenge_line, user=b"testuser", password=b"testpass"):
    challenge = base64.b64decode(challenge_line.split(b" ", 1)[1])
    digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
    return base64.b64encode(user + b" " + digest)


class ConnectionCountTests(SynchronousTestCase):
    def test_each_connection_counts_once(self):
        """Every accepted connection increments the count, which starts at 0."""
        mta = FakeMTA(Clock())
        self.assertEqual(mta.get_connection_count(), 0)
        Session(mta)
        Session(mta)
        self.assertEqual(mta.get_connection_count(), 2)

    def test_rset_does_not_reset_the_count(self):
        """RSET answers 250 and leaves the connection count alone (unlike Mailman's fake)."""
        mta, session, _ = new_session(self)
        session.ehlo()
        self.assertEqual(session.send(b"RSET"), [b"250 I remember nothing."])
        self.assertEqual(mta.get_connection_count(), 1)

    def test_reset_connection_count(self):
        """reset_connection_count starts from zero; transactions carry the new index."""
        mta, first, _ = new_session(self)
        Session(mta)
        mta.reset_connection_count()
        self.assertEqual(mta.get_connection_count(), 0)
        session = Session(mta)
        session.ehlo()
        session.mail()
        self.assertEqual(mta.get_connection_count(), 1)
        self.assertEqual(mta.transactions[0].connection, 1)

    def test_clear_keeps_the_count(self):
        """clear() forgets recordings but not the connection count."""
        mta, session, _ = new_session(self)
        mta.clear()
        self.assertEqual(mta.get_connection_count(), 1)


class RecordingTests(SynchronousTestCase):
    def test_message_gets_peer_sender_and_accepted_recipients(self):
        """messages get X-Peer, X-MailFrom and X-RcptTo (accepted RCPTs, duplicates kept)."""
        mta, session, _ = new_session(self)
        mta.reject("rcpt", 550, match="cate@example.com")
        session.ehlo()
        reply = session.mail(
            rcpts=[b"zperson@example.com", b"cate@example.com", b"zperson@example.com"]
        )
        self.assertEqual(reply, [b"250 2.0.0 Ok: queued as 1"])
        [message] = mta.messages
        self.assertEqual(message["Subject"], "hi")
        self.assertEqual(message["X-Peer"], "('192.0.2.7', 40123)")
        self.assertEqual(message["X-MailFrom"], "anne@example.com")
        self.assertEqual(message["X-RcptTo"], "zperson@example.com, zperson@example.com")
        self.assertEqual(list(message.keys())[-3:], ["X-Peer", "X-MailFrom", "X-RcptTo"])

    def test_null_sender(self):
        """MAIL FROM:<> is accepted: mail_from is "" and X-MailFrom is <>."""
        mta, session, _ = new_session(self)
        session.ehlo()
        session.mail(sender=b"")
        self.assertEqual(mta.transactions[0].mail_from, "")
        self.assertEqual(mta.messages[0]["X-MailFrom"], "<>")

    def test_raw_message_is_unstuffed_data_with_crlf(self):
        """raw_messages hold DATA after un-dot-stuffing, CRLF-terminated, without added headers."""
        mta, session, _ = new_session(self)
        session.ehlo()
        session.mail(body=[b"Subject: dots", b"", b"..leading dot", b"...", b"end"])
        self.assertEqual(mta.raw_messages, [b"Subject: dots\r\n\r\n.leading dot\r\n..\r\nend\r\n"])
        self.assertEqual(mta.transactions[0].data, mta.raw_messages[0])

    def test_transaction_fields(self):
        """A Transaction records envelope, parameters, TLS, AUTH user and connection index."""
        mta, session, _ = new_session(self)
        session.ehlo()
        session.send(b"MAIL FROM:<anne@example.com> SIZE=20 BODY=8BITMIME")
        session.send(b"RCPT TO:<bart@example.com>", b"RCPT TO:<cate@example.com>")
        session.send(b"DATA")
        session.send(b"Subject: x", b"", b"y", b".")
        self.assertEqual(
            mta.transactions,
            [
                Transaction(
                    mail_from="anne@example.com",
                    mail_params=(b"SIZE=20", b"BODY=8BITMIME"),
                    rcpts=("bart@example.com", "cate@example.com"),
                    data=b"Subject: x\r\n\r\ny\r\n",
                    tls=False,
                    authenticated_as=None,
                    connection=1,
                )
            ],
        )

    def test_commands_are_recorded_but_not_data_lines(self):
        """commands lists every command line in order, not the message body."""
        mta, session, _ = new_session(self)
        session.ehlo()
        session.mail(body=[b"MAIL FROM:<in-body@example.com>"])
        session.send(b"QUIT")
        self.assertEqual(
            mta.commands,
            [
                b"EHLO client.example",
                b"MAIL FROM:<anne@example.com>",
                b"RCPT TO:<bart@example.com>",
                b"DATA",
                b"QUIT",
            ],
        )

    def test_many_messages_on_one_connection(self):
        """A connection carries any number of transactions, all recorded against it."""
        mta, session, _ = new_session(self)
        session.ehlo()
        for n in range(100):
            body = [b"Subject: %d" % n, b"", b"x" * 500]
            self.assertEqual(session.mail(body=body), [b"250 2.0.0 Ok: queued as %d" % (n + 1)])
        self.assertEqual(len(mta.messages), 100)
        self.assertEqual({t.connection for t in mta.transactions}, {1})
        self.assertEqual(mta.messages[99]["Subject"], "99")

    def test_clear_forgets_recordings(self):
        """clear() empties messages, transactions, commands, credentials and AUTH attempts."""
        mta, session, _ = new_session(self, users=USERS)
        session.ehlo()
        session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode())
        session.mail()
        messages = mta.messages
        mta.clear()
        self.assertIs(mta.messages, messages)
        self.assertEqual(
            (mta.messages, mta.raw_messages, mta.transactions, mta.commands, mta.auth_attempts),
            ([], [], [], [], []),
        )
        self.assertIsNone(mta.get_authentication_credentials())


class AuthenticationTests(SynchronousTestCase):
    def test_without_users_no_auth_is_offered(self):
        """Without users, EHLO offers no AUTH, mail needs none, and AUTH gets 571."""
        mta, session, _ = new_session(self)
        self.assertFalse([line for line in session.ehlo() if b"AUTH" in line])
        self.assertEqual(session.mail(), [b"250 2.0.0 Ok: queued as 1"])
        self.assertEqual(
            session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode()), [b"571 Bad authentication"]
        )

    def test_plain_initial_response_is_recorded_exactly(self):
        """AUTH PLAIN with good credentials gets 235 and is recorded as sent."""
        mta, session, _ = new_session(self, users=USERS)
        self.assertIn(b"250-AUTH PLAIN", session.ehlo())
        self.assertEqual(
            session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode()),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertEqual(mta.get_authentication_credentials(), GOOD_PLAIN)
        self.assertEqual(mta.auth_attempts, [("PLAIN", "testuser", True)])
        session.mail()
        self.assertEqual(mta.transactions[0].authenticated_as, "testuser")

    def test_plain_without_initial_response(self):
        """AUTH PLAIN alone gets an empty 334 challenge, then the response."""
        mta, session, _ = new_session(self, users=USERS)
        session.ehlo()
        self.assertEqual(session.send(b"AUTH PLAIN"), [b"334 "])
        self.assertEqual(
            session.send(GOOD_PLAIN.encode()), [b"235 2.7.0 Authentication successful"]
        )
        self.assertEqual(mta.get_authentication_credentials(), GOOD_PLAIN)

    def test_bad_credentials_get_571(self):
        """Wrong credentials get "571 Bad authentication" and stay unauthenticated."""
        mta, session, _ = new_session(self, users=USERS)
        session.ehlo()
        self.assertEqual(
            session.send(b"AUTH PLAIN " + BAD_PLAIN.encode()), [b"571 Bad authentication"]
        )
        self.assertEqual(mta.auth_attempts, [("PLAIN", "baduser", False)])
        self.assertEqual(mta.get_authentication_credentials(), BAD_PLAIN)
        self.assertEqual(
            session.send(b"MAIL FROM:<anne@example.com>"),
            [b"530 5.7.0 Authentication required"],
        )

    def test_unoffered_and_malformed_auth_get_571(self):
        """An unoffered mechanism, bare AUTH and undecodable responses all get 571."""
        mta, session, _ = new_session(self, users=USERS)
        session.ehlo()
        for line in [
            b"AUTH LOGIN",
            b"AUTH",
            b"AUTH PLAIN !!notbase64!!",
            b"AUTH PLAIN " + base64.b64encode(b"no-separators"),
        ]:
            self.assertEqual(session.send(line), [b"571 Bad authentication"], line)
        self.assertEqual([accepted for (_, _, accepted) in mta.auth_attempts], [False] * 4)

    def test_cancelled_auth(self):
        """A "*" response cancels AUTH with 501 and the session continues."""
        mta, session, _ = new_session(self, users=USERS, mechanisms=("LOGIN",))
        session.ehlo()
        session.send(b"AUTH LOGIN")
        self.assertEqual(session.send(b"*"), [b"501 5.7.0 Authentication cancelled"])
        self.assertEqual(session.send(b"NOOP"), [b"250 2.0.0 Ok"])

    def test_cram_md5(self):
        """CRAM-MD5 works against the stored plaintext password."""
        mta, session, _ = new_session(self, users=USERS, mechanisms=("CRAM-MD5",))
        session.ehlo()
        [challenge] = session.send(b"AUTH CRAM-MD5")
        self.assertTrue(challenge.startswith(b"334 "))
        self.assertEqual(
            session.send(cram_md5_response(challenge)),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertEqual(mta.auth_attempts, [("CRAM-MD5", "testuser", True)])

    def test_cram_md5_wrong_password(self):
        """A CRAM-MD5 digest made with the wrong password gets 571."""
        mta, session, _ = new_session(self, users=USERS, mechanisms=("CRAM-MD5",))
        session.ehlo()
        [challenge] = session.send(b"AUTH CRAM-MD5")
        response = cram_md5_response(challenge, password=b"wrong")
        self.assertEqual(session.send(response), [b"571 Bad authentication"])

    def test_login_prompts_for_username_and_password(self):
        """LOGIN prompts "Username:" then "Password:" and then accepts."""
        mta, session, _ = new_session(self, users=USERS, mechanisms=("LOGIN",))
        session.ehlo()
        self.assertEqual(session.send(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(session.send(base64.b64encode(b"testuser")), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(
            session.send(base64.b64encode(b"testpass")),
            [b"235 2.7.0 Authentication successful"],
        )
        self.assertEqual(mta.auth_attempts, [("LOGIN", "testuser", True)])

    def test_mechanisms_advertised_in_the_given_order(self):
        """EHLO lists exactly the configured mechanisms, in the given order."""
        mta, session, _ = new_session(self, users=USERS, mechanisms=("LOGIN", "CRAM-MD5"))
        self.assertIn(b"250-AUTH LOGIN CRAM-MD5", session.ehlo())

    def test_second_auth_is_refused(self):
        """AUTH after a successful AUTH gets 503."""
        mta, session, _ = new_session(self, users=USERS)
        session.ehlo()
        session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode())
        self.assertEqual(
            session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode()),
            [b"503 5.5.1 Already authenticated"],
        )


class ProtocolTests(SynchronousTestCase):
    def test_mail_needs_ehlo_first(self):
        """MAIL before HELO/EHLO gets 503."""
        mta, session, _ = new_session(self)
        self.assertEqual(
            session.send(b"MAIL FROM:<anne@example.com>"),
            [b"503 5.5.1 Error: send HELO/EHLO first"],
        )
        session.send(b"HELO client.example")
        self.assertEqual(session.send(b"MAIL FROM:<anne@example.com>"), [b"250 2.1.0 Ok"])

    def test_extensions_follow_the_options(self):
        """PIPELINING, SIZE and SMTPUTF8 are advertised only when enabled; 8BITMIME always."""
        mta, session, _ = new_session(self)
        self.assertEqual(session.ehlo(), [b"250-fake-mta.example Hello 192.0.2.7", b"250 8BITMIME"])
        mta, session, _ = new_session(self, pipelining=True, size=1000, smtputf8=True)
        self.assertEqual(
            session.ehlo(),
            [
                b"250-fake-mta.example Hello 192.0.2.7",
                b"250-8BITMIME",
                b"250-PIPELINING",
                b"250-SIZE 1000",
                b"250 SMTPUTF8",
            ],
        )

    def test_pipelined_commands_are_answered_in_order(self):
        """A pipelined group gets its replies in command order, rejections included."""
        mta, session, _ = new_session(self, pipelining=True)
        mta.reject("rcpt", 550, match="bad@example.com")
        session.ehlo()
        replies = session.send(
            b"MAIL FROM:<anne@example.com>",
            b"RCPT TO:<bad@example.com>",
            b"RCPT TO:<bart@example.com>",
            b"RCPT TO:<not an address>",
            b"DATA",
        )
        self.assertEqual(
            replies,
            [
                b"250 2.1.0 Ok",
                b"550 Error: SMTPRecipientsRefused",
                b"250 2.1.5 Ok",
                b"553 5.1.3 Bad address syntax: no @domain",
                b"354 End data with <CR><LF>.<CR><LF>",
            ],
        )
        self.assertEqual(
            session.send(b"x", b".", b"RSET"),
            [b"250 2.0.0 Ok: queued as 1", b"250 I remember nothing."],
        )

    def test_mail_parameters(self):
        """SIZE=, BODY=7BIT|8BITMIME are accepted; bad or unknown parameters are refused."""
        mta, session, _ = new_session(self)
        session.ehlo()
        cases = [
            (b"SIZE=100 BODY=7BIT", b"250 2.1.0 Ok"),
            (b"BODY=8bitmime", b"250 2.1.0 Ok"),
            (b"BODY=BINARYMIME", b"501 5.5.4 Bad BODY parameter"),
            (b"SIZE=lots", b"501 5.5.4 Bad SIZE parameter"),
            (b"SMTPUTF8", b"555 5.5.4 Unsupported parameter SMTPUTF8"),
            (b"RET=HDRS", b"555 5.5.4 Unsupported parameter RET"),
        ]
        for params, reply in cases:
            self.assertEqual(
                session.send(b"MAIL FROM:<anne@example.com> " + params), [reply], params
            )
            session.send(b"RSET")
        session.send(b"MAIL FROM:<anne@example.com>")
        self.assertEqual(
            session.send(b"RCPT TO:<bart@example.com> NOTIFY=NEVER"),
            [b"555 5.5.4 RCPT parameters are not supported"],
        )

    def test_non_ascii_address_needs_smtputf8(self):
        """Without SMTPUTF8 a non-ASCII sender or recipient gets 553 5.6.7."""
        mta, session, _ = new_session(self)
        session.ehlo()
        utf8 = "jörg@example.com".encode()
        self.assertEqual(
            session.send(b"MAIL FROM:<" + utf8 + b">"),
            [b"553 5.6.7 Non-ASCII address needs SMTPUTF8"],
        )
        session.send(b"MAIL FROM:<anne@example.com>")
        self.assertEqual(
            session.send(b"RCPT TO:<" + utf8 + b">"),
            [b"553 5.6.7 Non-ASCII address needs SMTPUTF8"],
        )

    def test_smtputf8(self):
        """With smtputf8=True, MAIL ... SMTPUTF8 allows UTF-8 addresses."""
        mta, session, _ = new_session(self, smtputf8=True)
        session.ehlo()
        utf8 = "jörg@exämple.com".encode()
        self.assertEqual(session.send(b"MAIL FROM:<" + utf8 + b"> SMTPUTF8"), [b"250 2.1.0 Ok"])
        self.assertEqual(session.send(b"RCPT TO:<" + utf8 + b">"), [b"250 2.1.5 Ok"])
        session.send(b"DATA")
        session.send(b"Subject: utf8", b"", b"x", b".")
        self.assertEqual(mta.transactions[0].rcpts, ("jörg@exämple.com",))
        self.assertEqual(mta.transactions[0].mail_params, (b"SMTPUTF8",))

    def test_bad_addresses(self):
        """Malformed paths get 501, invalid mailboxes 553; postmaster is accepted."""
        mta, session, _ = new_session(self)
        session.ehlo()
        self.assertEqual(
            session.send(b"MAIL FROM:anne@example.com"),
            [b"501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"],
        )
        self.assertEqual(
            session.send(b"MAIL FROM:<a@b@c>"),
            [b"553 5.1.7 Bad address syntax: bad local part"],
        )
        session.send(b"MAIL FROM:<anne@example.com>")
        self.assertEqual(session.send(b"RCPT TO:<>"), [b"553 5.1.3 Empty recipient address"])
        self.assertEqual(session.send(b"RCPT TO:<Postmaster>"), [b"250 2.1.5 Ok"])

    def test_transaction_order_errors(self):
        """RCPT without MAIL, DATA without RCPT and a second MAIL get 503."""
        mta, session, _ = new_session(self)
        session.ehlo()
        self.assertEqual(
            session.send(b"RCPT TO:<bart@example.com>"),
            [b"503 5.5.1 Error: need MAIL command"],
        )
        session.send(b"MAIL FROM:<anne@example.com>")
        self.assertEqual(
            session.send(b"MAIL FROM:<anne@example.com>"),
            [b"503 5.5.1 Error: nested MAIL command"],
        )
        self.assertEqual(session.send(b"DATA"), [b"503 5.5.1 Error: need RCPT command"])

    def test_declared_size_over_the_limit(self):
        """MAIL SIZE= above the advertised limit gets 552."""
        mta, session, _ = new_session(self, size=100)
        session.ehlo()
        self.assertEqual(
            session.send(b"MAIL FROM:<anne@example.com> SIZE=101"),
            [b"552 5.3.4 Message size exceeds fixed maximum message size"],
        )

    def test_oversized_body_is_refused_and_the_session_continues(self):
        """A body over the limit gets 552 at the dot, is not recorded, and RSET still works."""
        mta, session, _ = new_session(self, size=100)
        session.ehlo()
        reply = session.mail(body=[b"Subject: big", b"", b"x" * 200])
        self.assertEqual(reply, [b"552 5.3.4 Message size exceeds fixed maximum message size"])
        self.assertEqual(mta.messages, [])
        self.assertEqual(session.send(b"RSET"), [b"250 I remember nothing."])
        self.assertEqual(session.mail(), [b"250 2.0.0 Ok: queued as 1"])

    def test_overlong_line_closes_the_connection(self):
        """A line over the limit gets 500 and the connection closes (no smuggling)."""
        mta, session, _ = new_session(self)
        session.ehlo()
        session.send(b"MAIL FROM:<anne@example.com>", b"RCPT TO:<bart@example.com>", b"DATA")
        replies = session.send(b"x" * (session.protocol.MAX_LENGTH + 1), b"MAIL FROM:<x@y.z>")
        self.assertEqual(replies, [b"500 5.5.6 Line too long"])
        self.assertTrue(session.transport.disconnecting)

    def test_idle_timeout_uses_the_given_reactor(self):
        """The idle timeout runs on the reactor given to FakeMTA and closes with 421."""
        mta, session, clock = new_session(self, timeout=30)
        session.ehlo()
        clock.advance(29)
        self.assertEqual(session.replies(), [])
        clock.advance(1)
        self.assertEqual(
            session.replies(), [b"421 fake-mta.example Timeout. Try talking faster next time!"]
        )
        self.assertTrue(session.transport.disconnecting)

    def test_connection_lost_leaves_no_delayed_calls(self):
        """Closing the connection cancels its timeout and any held reply."""
        mta, session, clock = new_session(self)
        mta.delay("ehlo", 5)
        session.ehlo()
        session.close()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_noop_vrfy_and_unknown_commands(self):
        """NOOP gets 250, VRFY 252, and unknown (even non-ASCII) verbs 500."""
        mta, session, _ = new_session(self)
        self.assertEqual(session.send(b"NOOP"), [b"250 2.0.0 Ok"])
        self.assertEqual(
            session.send(b"VRFY anne"), [b"252 2.5.0 Cannot VRFY user, but will accept message"]
        )
        self.assertEqual(
            session.send(b"XYZZY", "ÜBER".encode()),
            [b"500 Command not implemented", b"500 Command not implemented"],
        )

    def test_constructor_rejects_bad_options(self):
        """Impossible option combinations raise ValueError naming the option."""
        for kwargs in [
            {"tls": "ssl"},
            {"require_tls": True},
            {"require_client_cert": True},
            {"mechanisms": ("XOAUTH2",)},
            {"mechanisms": ("PLAIN", "plain")},
            {"size": 0},
        ]:
            self.assertRaises(ValueError, FakeMTA, Clock(), **kwargs)


class FaultTests(SynchronousTestCase):
    def test_reject_uses_mailman_default_texts(self):
        """Injected rejections default to the texts Mailman's fake MTA sends."""
        mta, session, _ = new_session(self)
        session.ehlo()
        mta.reject("mail", 451)
        self.assertEqual(
            session.send(b"MAIL FROM:<anne@example.com>"),
            [b"451 Error: SMTPResponseException"],
        )
        self.assertEqual(session.send(b"MAIL FROM:<anne@example.com>"), [b"250 2.1.0 Ok"])
        mta.reject("rcpt", 550)
        self.assertEqual(
            session.send(b"RCPT TO:<bart@example.com>"),
            [b"550 Error: SMTPRecipientsRefused"],
        )

    def test_reject_count(self):
        """count=N rejects the next N matching commands, then stops."""
        mta, session, _ = new_session(self)
        session.ehlo()
        session.send(b"MAIL FROM:<anne@example.com>")
        mta.reject("rcpt", 450, "4.2.0 Try later", count=2)
        replies = session.send(*[b"RCPT TO:<bart@example.com>"] * 3)
        self.assertEqual(replies, [b"450 4.2.0 Try later", b"450 4.2.0 Try later", b"250 2.1.5 Ok"])

    def test_reject_rcpt_match_only_hits_that_address(self):
        """A matched RCPT fault waits for its address and leaves the others alone."""
        mta, session, _ = new_session(self)
        mta.reject("rcpt", 550, match="Bart@Example.com")
        session.ehlo()
        session.send(b"MAIL FROM:<anne@example.com>")
        self.assertEqual(session.send(b"RCPT TO:<cate@example.com>"), [b"250 2.1.5 Ok"])
        self.assertEqual(
            session.send(b"RCPT TO:<bart@example.com>"), [b"550 Error: SMTPRecipientsRefused"]
        )

    def test_rejected_data_ends_the_transaction_not_the_session(self):
        """After DATA is rejected, RSET answers 250 and a new transaction goes through."""
        mta, session, _ = new_session(self)
        mta.reject("data", 554, "5.5.0 No thanks")
        session.ehlo()
        session.send(b"MAIL FROM:<anne@example.com>", b"RCPT TO:<bart@example.com>")
        self.assertEqual(session.send(b"DATA"), [b"554 5.5.0 No thanks"])
        self.assertEqual(session.send(b"RSET"), [b"250 I remember nothing."])
        self.assertEqual(session.mail(), [b"250 2.0.0 Ok: queued as 1"])

    def test_rejected_end_of_data_records_nothing(self):
        """A rejected final dot is not recorded; the session continues."""
        mta, session, _ = new_session(self)
        mta.reject("eom", 451)
        session.ehlo()
        self.assertEqual(session.mail(), [b"451 Error: SMTPResponseException"])
        self.assertEqual((mta.messages, mta.transactions, mta.raw_messages), ([], [], []))
        self.assertEqual(session.send(b"RSET"), [b"250 I remember nothing."])
        self.assertEqual(session.mail(), [b"250 2.0.0 Ok: queued as 1"])

    def test_reject_other_stages(self):
        """EHLO, AUTH, STARTTLS and RSET can be rejected with the given reply."""
        mta, session, _ = new_session(self, users=USERS, tls="starttls", require_tls=False)
        for stage, line in [
            ("ehlo", b"EHLO x"),
            ("starttls", b"STARTTLS"),
            ("auth", b"AUTH PLAIN " + GOOD_PLAIN.encode()),
            ("rset", b"RSET"),
        ]:
            mta.reject(stage, 454, f"4.7.0 {stage} refused")
            self.assertEqual(session.send(line), [f"454 4.7.0 {stage} refused".encode()])
        self.assertEqual(mta.auth_attempts, [])

    def test_disconnect_with_421_at_each_stage(self):
        """disconnect(stage) answers that stage's command with 421 and closes."""
        steps = [
            ("ehlo", b"EHLO x"),
            ("auth", b"AUTH PLAIN " + GOOD_PLAIN.encode()),
            ("mail", b"MAIL FROM:<anne@example.com>"),
            ("rcpt", b"RCPT TO:<bart@example.com>"),
            ("data", b"DATA"),
            ("eom", b"."),
            ("rset", b"RSET"),
            ("quit", b"QUIT"),
        ]
        for index, (stage, _) in enumerate(steps):
            mta, session, _ = new_session(self, users=USERS)
            mta.disconnect(stage)
            for _, line in steps[:index]:
                session.send(line)
            self.assertEqual(session.send(steps[index][1]), [b"421 4.3.0 Closing"], stage)
            self.assertTrue(session.transport.disconnecting, stage)
            self.assertEqual(mta.messages, [] if index <= 5 else mta.messages[:1], stage)

    def test_disconnect_without_421(self):
        """disconnect(stage, with_421=False) closes without a reply; later lines are ignored."""
        mta, session, _ = new_session(self)
        mta.disconnect("mail", with_421=False)
        session.ehlo()
        replies = session.send(b"MAIL FROM:<anne@example.com>", b"NOOP")
        self.assertEqual(replies, [])
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(mta.commands[-1], b"MAIL FROM:<anne@example.com>")

    def test_disconnect_at_greeting(self):
        """disconnect("greeting") sends 421 instead of 220 (or nothing) and closes."""
        for with_421, expected in [(True, [b"421 4.3.0 Closing"]), (False, [])]:
            mta = FakeMTA(Clock())
            mta.disconnect("greeting", with_421=with_421)
            session = Session(mta)
            self.assertEqual(session.replies(), expected)
            self.assertTrue(session.transport.disconnecting)
            self.assertEqual(mta.get_connection_count(), 1)

    def test_disconnect_count_spans_connections(self):
        """A fault with count=2 hits two connections, then the third is served."""
        mta = FakeMTA(Clock())
        mta.disconnect("greeting", count=2)
        sessions = [Session(mta) for _ in range(3)]
        self.assertEqual([s.replies()[0][:3] for s in sessions], [b"421", b"421", b"220"])

    def test_drop_during_data(self):
        """drop_during_data closes once that many DATA bytes arrived; nothing is recorded."""
        mta, session, _ = new_session(self)
        mta.drop_during_data(after_bytes=20)
        session.ehlo()
        session.send(b"MAIL FROM:<anne@example.com>", b"RCPT TO:<bart@example.com>")
        self.assertEqual(session.send(b"DATA"), [b"354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(session.send(b"Subject: first line"), [])  # 21 bytes with CRLF
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(session.send(b"", b"body", b"."), [])
        self.assertEqual(mta.messages, [])

    def test_drop_during_data_at_zero_bytes(self):
        """after_bytes=0 closes right after the 354."""
        mta, session, _ = new_session(self)
        mta.drop_during_data()
        session.ehlo()
        session.send(b"MAIL FROM:<anne@example.com>", b"RCPT TO:<bart@example.com>")
        self.assertEqual(session.send(b"DATA"), [b"354 End data with <CR><LF>.<CR><LF>"])
        self.assertTrue(session.transport.disconnecting)

    def test_delay_holds_the_reply_and_what_follows(self):
        """A held reply waits on the clock; later commands are answered after it, in order."""
        mta, session, clock = new_session(self, pipelining=True)
        mta.delay("mail", 5)
        session.ehlo()
        replies = session.send(
            b"MAIL FROM:<anne@example.com>", b"RCPT TO:<bart@example.com>", b"DATA"
        )
        self.assertEqual(replies, [])
        clock.advance(4.9)
        self.assertEqual(session.replies(), [])
        clock.advance(0.1)
        self.assertEqual(
            session.replies(),
            [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>"],
        )

    def test_delay_then_reject(self):
        """A delay and a rejection on the same stage give a slow rejection."""
        mta, session, clock = new_session(self)
        mta.delay("eom", 30)
        mta.reject("eom", 451)
        session.ehlo()
        self.assertEqual(session.mail(), [])
        clock.advance(30)
        self.assertEqual(session.replies(), [b"451 Error: SMTPResponseException"])

    def test_delay_greeting(self):
        """A delayed greeting arrives after the delay; early commands wait for it."""
        clock = Clock()
        mta = FakeMTA(clock)
        mta.delay("greeting", 2)
        session = Session(mta)
        self.assertEqual(session.send(b"NOOP"), [])
        clock.advance(2)
        self.assertEqual(
            session.replies(), [b"220 fake-mta.example ESMTP mailrelay fake MTA", b"250 2.0.0 Ok"]
        )

    def test_fault_arguments_are_checked(self):
        """Unknown stages, non-error codes, bad counts and misplaced match raise ValueError."""
        mta = FakeMTA(Clock())
        self.assertRaises(ValueError, mta.reject, "helo", 550)
        self.assertRaises(ValueError, mta.reject, "greeting", 554)
        self.assertRaises(ValueError, mta.reject, "mail", 250)
        self.assertRaises(ValueError, mta.reject, "mail", 550, count=0)
        self.assertRaises(ValueError, mta.reject, "mail", 550, match="a@b.c")
        self.assertRaises(ValueError, mta.disconnect, "body")
        self.assertRaises(ValueError, mta.delay, "mail", -1)
        self.assertRaises(ValueError, mta.drop_during_data, -5)

    def test_clear_faults(self):
        """clear_faults() forgets faults that have not fired."""
        mta, session, _ = new_session(self)
        mta.reject("mail", 550)
        mta.clear_faults()
        session.ehlo()
        self.assertEqual(session.send(b"MAIL FROM:<anne@example.com>"), [b"250 2.1.0 Ok"])


class StartTLSInMemoryTests(SynchronousTestCase):
    def starttls_session(self, **kwargs):
        mta = FakeMTA(Clock(), tls="starttls", users=USERS, **kwargs)
        session = Session(mta, TLSStringTransport(peerAddress=PEER, hostAddress=HOST))
        session.replies()
        return mta, session

    def test_auth_is_offered_only_after_starttls(self):
        """STARTTLS is advertised before TLS and AUTH only after it."""
        mta, session = self.starttls_session()
        self.assertEqual(
            session.ehlo(),
            [b"250-fake-mta.example Hello 192.0.2.7", b"250-STARTTLS", b"250 8BITMIME"],
        )
        self.assertEqual(
            session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode()), [b"571 Bad authentication"]
        )
        self.assertEqual(session.send(b"STARTTLS"), [b"220 2.0.0 Ready to start TLS"])
        self.assertIsNotNone(session.transport.tls_options)
        self.assertEqual(
            session.ehlo(),
            [b"250-fake-mta.example Hello 192.0.2.7", b"250-AUTH PLAIN", b"250 8BITMIME"],
        )
        self.assertEqual(session.send(b"STARTTLS"), [b"503 5.5.1 TLS already active"])

    def test_commands_pipelined_after_starttls_are_discarded(self):
        """Plaintext pipelined after STARTTLS is dropped, and EHLO is needed again."""
        mta, session = self.starttls_session()
        session.ehlo()
        replies = session.send(b"STARTTLS", b"AUTH PLAIN " + GOOD_PLAIN.encode())
        self.assertEqual(replies, [b"220 2.0.0 Ready to start TLS"])
        self.assertEqual(mta.auth_attempts, [])
        session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode())
        self.assertEqual(
            session.send(b"MAIL FROM:<anne@example.com>"),
            [b"503 5.5.1 Error: send HELO/EHLO first"],
        )

    def test_require_tls(self):
        """With require_tls, MAIL and AUTH before STARTTLS get 530 5.7.0."""
        mta, session = self.starttls_session(require_tls=True)
        session.ehlo()
        must = [b"530 5.7.0 Must issue a STARTTLS command first"]
        self.assertEqual(session.send(b"MAIL FROM:<anne@example.com>"), must)
        self.assertEqual(session.send(b"AUTH PLAIN " + GOOD_PLAIN.encode()), must)

    def test_starttls_without_tls_configured(self):
        """STARTTLS gets 502 when the fake MTA was not configured for it."""
        mta, session, _ = new_session(self)
        self.assertEqual(session.send(b"STARTTLS"), [b"502 5.5.1 STARTTLS not offered"])


class LineClient(basic.LineReceiver):
    """Records the server's reply lines."""

    def __init__(self):
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)


class IOSimTests(SynchronousTestCase):
    def connect(self, mta, clock, client_factory=None):
        def server():
            return mta.buildProtocol(PEER)

        def client():
            if client_factory is None:
                return LineClient()
            return client_factory.buildProtocol(HOST)

        return iosim.connectedServerAndClient(
            server,
            client,
            clientTransportFactory=lambda p: iosim.FakeTransport(p, False, PEER, HOST),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, HOST, PEER),
            clock=clock,
        )

    def test_plain_session_in_memory(self):
        """buildProtocol serves iosim connections: a whole transaction, then QUIT."""
        clock = Clock()
        mta = FakeMTA(clock)
        client, server, pump = self.connect(mta, clock)
        for line in [
            b"EHLO c",
            b"MAIL FROM:<a@example.com>",
            b"RCPT TO:<b@example.com>",
            b"DATA",
            b"Subject: s\r\n\r\nbody\r\n.",
            b"QUIT",
        ]:
            client.sendLine(line)
        pump.flush()
        self.assertEqual(client.lines[-2:], [b"250 2.0.0 Ok: queued as 1", b"221 See you later"])
        self.assertEqual(mta.raw_messages, [b"Subject: s\r\n\r\nbody\r\n"])
        self.assertEqual(mta.get_connection_count(), 1)

    def test_implicit_tls_in_memory(self):
        """Implicit TLS runs in memory: no STARTTLS offered, AUTH offered, tls recorded."""
        clock = Clock()
        ca = ThrowawayCA()
        mta = FakeMTA(clock, tls="implicit", ca=ca, users=USERS)
        options = optionsForClientTLS("localhost", trustRoot=ca.trust_root())
        tls_client = TLSMemoryBIOFactory(
            options, True, Factory.forProtocol(LineClient), clock=clock
        )
        client, server, pump = self.connect(mta, clock, tls_client)
        client.wrappedProtocol.sendLine(b"EHLO c")
        pump.flush()
        lines = client.wrappedProtocol.lines
        self.assertEqual(lines[0], b"220 fake-mta.example ESMTP mailrelay fake MTA")
        self.assertIn(b"250-AUTH PLAIN", lines)
        self.assertFalse([line for line in lines if b"STARTTLS" in line])
        for line in [
            b"AUTH PLAIN " + GOOD_PLAIN.encode(),
            b"MAIL FROM:<a@example.com>",
            b"RCPT TO:<b@example.com>",
            b"DATA",
            b"x\r\n.",
        ]:
            client.wrappedProtocol.sendLine(line)
        pump.flush()
        self.assertEqual(lines[-1], b"250 2.0.0 Ok: queued as 1")
        self.assertTrue(mta.transactions[0].tls)
        self.assertEqual(mta.get_connection_count(), 1)


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


class LoopbackTests(TestCase):
    """Real sockets on 127.0.0.1 with CPython's smtplib as an independent client."""

    async def start(self, **kwargs):
        mta = FakeMTA(reactor, **kwargs)
        self.addCleanup(mta.stop)
        return await mta.start()

    def tls_context(self, mta, client_cert=False):
        # Not self.mktemp(): under pytest it lands in the working directory.
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        context = ssl.create_default_context(cafile=mta.ca.write_ca_file(directory))
        if client_cert:
            context.load_cert_chain(*mta.ca.write_client_cert(directory))
        return context

    async def test_plain_credentials_and_connection_count(self):
        """smtplib's AUTH PLAIN is recorded exactly and the connection counted once."""
        mta = await self.start(users=USERS)

        def send():
            with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
                client.login("testuser", "testpass")
                return client.sendmail("anne@example.com", ["bart@example.com"], "Subject: a\n\n")

        self.assertEqual(await in_thread(send), {})
        self.assertEqual(mta.get_authentication_credentials(), GOOD_PLAIN)
        self.assertEqual(mta.get_connection_count(), 1)
        self.assertEqual(mta.messages[0]["X-RcptTo"], "bart@example.com")

    async def test_bad_credentials(self):
        """smtplib sees (571, b"Bad authentication") for wrong credentials."""
        mta = await self.start(users=USERS)

        def login():
            with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
                try:
                    client.login("baduser", "badpass")
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error

        self.assertEqual(await in_thread(login), (571, b"Bad authentication"))

    async def test_cram_md5_and_login(self):
        """smtplib authenticates with CRAM-MD5 (its first choice) and with LOGIN."""
        mta = await self.start(users=USERS, mechanisms=("LOGIN", "CRAM-MD5"))

        def login(mechanism):
            with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
                if mechanism is None:
                    return client.login("testuser", "testpass")[0]
                client.ehlo()
                client.user, client.password = "testuser", "testpass"
                return client.auth("LOGIN", client.auth_login)[0]

        self.assertEqual(await in_thread(login, None), 235)
        self.assertEqual(await in_thread(login, "LOGIN"), 235)
        self.assertEqual(
            mta.auth_attempts, [("CRAM-MD5", "testuser", True), ("LOGIN", "testuser", True)]
        )

    async def test_starttls(self):
        """STARTTLS with the throwaway CA: AUTH appears after TLS and the mail is marked TLS."""
        mta = await self.start(users=USERS, tls="starttls", require_tls=True)
        context = self.tls_context(mta)

        def send():
            with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
                client.ehlo()
                before = dict(client.esmtp_features)
                client.starttls(context=context)
                client.ehlo()
                after = dict(client.esmtp_features)
                client.login("testuser", "testpass")
                client.sendmail("anne@example.com", ["bart@example.com"], "Subject: a\n\n")
                return before, after

        before, after = await in_thread(send)
        self.assertIn("starttls", before)
        self.assertNotIn("auth", before)
        self.assertNotIn("starttls", after)
        self.assertEqual(after["auth"], " PLAIN")
        self.assertTrue(mta.transactions[0].tls)
        self.assertEqual(mta.get_connection_count(), 1)

    async def test_implicit_tls(self):
        """Implicit TLS: one connection, STARTTLS never offered, the mail is marked TLS."""
        mta = await self.start(tls="implicit")
        context = self.tls_context(mta)

        def send():
            with smtplib.SMTP_SSL(mta.host, mta.port, timeout=10, context=context) as client:
                client.ehlo()
                features = dict(client.esmtp_features)
                client.sendmail("anne@example.com", ["bart@example.com"], "Subject: a\n\n")
                return features

        self.assertNotIn("starttls", await in_thread(send))
        self.assertTrue(mta.transactions[0].tls)
        self.assertEqual(mta.get_connection_count(), 1)
        self.assertEqual(mta.client_certificate_subjects, [])

    async def test_client_certificate_subject_is_recorded(self):
        """The CN of a client certificate issued by the CA is recorded."""
        mta = await self.start(tls="implicit", require_client_cert=True)
        context = self.tls_context(mta, client_cert=True)

        def noop():
            with smtplib.SMTP_SSL(mta.host, mta.port, timeout=10, context=context) as client:
                return client.noop()[0]

        self.assertEqual(await in_thread(noop), 250)
        self.assertEqual(mta.client_certificate_subjects, ["client.example"])

    async def test_required_client_certificate_missing(self):
        """Without a client certificate, require_client_cert makes the session fail."""
        mta = await self.start(tls="implicit", require_client_cert=True)
        context = self.tls_context(mta)

        def noop():
            try:
                with smtplib.SMTP_SSL(mta.host, mta.port, timeout=10, context=context) as client:
                    client.noop()
            except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError) as e:
                return e

        self.assertIsNotNone(await in_thread(noop))
        self.assertEqual(mta.transactions, [])

    async def test_stop_drops_open_connections(self):
        """stop() closes the port and the connections it accepted."""
        mta = await self.start()
        client = smtplib.SMTP(timeout=10)
        self.addCleanup(client.close)
        await in_thread(client.connect, mta.host, mta.port)
        self.assertEqual(await in_thread(client.noop), (250, b"2.0.0 Ok"))
        await mta.stop()

        def after_stop():
            try:
                client.noop()
            except smtplib.SMTPServerDisconnected:
                pass
            else:
                raise AssertionError("the connection survived stop()")
            try:
                smtplib.SMTP(mta.host, mta.port, timeout=10).close()
            except ConnectionRefusedError:
                return True

        self.assertTrue(await in_thread(after_stop))

    async def test_stop_drops_implicit_tls_connections(self):
        """stop() also closes connections that are inside an implicit-TLS wrapper."""
        mta = await self.start(tls="implicit")
        context = self.tls_context(mta)
        client = await in_thread(smtplib.SMTP_SSL, mta.host, mta.port, timeout=10, context=context)
        self.addCleanup(client.close)
        self.assertEqual(await in_thread(client.noop), (250, b"2.0.0 Ok"))
        await mta.stop()
        with self.assertRaises(smtplib.SMTPServerDisconnected):
            await in_thread(client.noop)


class ImportTests(SynchronousTestCase):
    def test_importing_the_package_leaves_the_reactor_alone(self):
        """import mailrelay.testing does not import twisted.mail.smtp (it installs a reactor)."""
        code = (
            "import sys, mailrelay.testing; "
            "print('twisted.mail.smtp' in sys.modules, 'twisted.internet.reactor' in sys.modules)"
        )
        output = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, check=True, text=True
        ).stdout
        self.assertEqual(output.split(), ["False", "False"])

    def test_public_names_import_from_the_package_and_their_module(self):
        """FakeMTA and Transaction are the same objects from mailrelay.testing and .fakemta."""
        import mailrelay.testing
        from mailrelay.testing import fakemta

        for name in mailrelay.testing.__all__:
            self.assertIsNotNone(getattr(mailrelay.testing, name))
        for name in fakemta.__all__:
            self.assertIs(getattr(mailrelay.testing, name), getattr(fakemta, name))

    def test_the_protocol_reads_nothing_of_the_factory(self):
        """The SMTP server module imports neither FakeMTA nor its module: it is handed its behaviour."""
        import ast

        from mailrelay.testing import smtpserver

        with open(smtpserver.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        self.assertNotIn("mailrelay.testing.fakemta", imported)
