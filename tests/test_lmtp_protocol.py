"""Tests for mailrelay.lmtp.protocol: LMTP on the wire, against a fake handler."""

from __future__ import annotations

import time
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.interfaces import IInboundHandler
from mailrelay.lmtp import AcceptedRecipient, RecipientRejected, Reply, Transaction
from mailrelay.lmtp.protocol import LMTPFactory, LMTPServer

HOST = b"lists.example.com"
PEER = IPv4Address("TCP", "192.0.2.7", 40123)
MAX_SIZE = 10000
LHLO_REPLY = [
    b"250-lists.example.com Hello 192.0.2.7",
    b"250-PIPELINING",
    b"250-ENHANCEDSTATUSCODES",
    b"250-8BITMIME",
    b"250 SIZE 10000",
]
SENDER_OK = b"250 2.1.0 Sender ok"
RCPT_OK = b"250 2.1.5 Recipient ok"
GO_AHEAD = b"354 Start mail input; end with <CRLF>.<CRLF>"
UNKNOWN = Reply(550, "5.1.1", "Requested action not taken: mailbox unavailable")
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = b"500 5.5.2 Line too long (see RFC 5321 4.5.3.1)"


@implementer(IInboundHandler)
class FakeHandler:
    """Accepts every recipient except those in ``reject``; records what it sees.

    With ``hold=True`` deliveries stay pending in ``pending`` until the test fires them.
    """

    def __init__(self, reject=None, explode=(), hold=False):
        self.reject = dict(reject or {})
        self.explode = set(explode)
        self.hold = hold
        self.validated: list[tuple[str, str]] = []
        self.transactions: list[Transaction] = []
        self.pending: list[defer.Deferred] = []

    def validate_recipient(self, sender, recipient):
        self.validated.append((sender, recipient))
        if recipient in self.explode:
            raise RuntimeError("registry bug")
        if recipient in self.reject:
            raise RecipientRejected(self.reject[recipient])
        return "token:" + recipient

    @staticmethod
    def accepted(transaction):
        return [Reply(250, "2.0.0", f"<{r.address}> delivered") for r in transaction.recipients]

    def deliver(self, transaction):
        self.transactions.append(transaction)
        if self.hold:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(self.accepted(transaction))


class ServerTestMixin:
    """Builds servers on StringTransports and talks to them."""

    def make_server(self, handler=None, peer=PEER, factory=None, **options):
        """A connected server; a new factory (and fake handler) unless ``factory`` is given."""
        if factory is None:
            self.clock = task.Clock()
            self.handler = handler if handler is not None else FakeHandler()
            options.setdefault("max_message_size", MAX_SIZE)
            factory = LMTPFactory(self.handler, hostname=HOST, clock=self.clock, **options)
            self.factory = factory
        server = factory.buildProtocol(peer)
        transport = StringTransport(
            peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 24)
        )
        server.makeConnection(transport)
        self.addCleanup(self._disconnect, server)
        return server, transport

    @staticmethod
    def _disconnect(server):
        if not server._lost:
            server.connectionLost(Failure(ConnectionDone()))

    @staticmethod
    def replies(transport) -> list[bytes]:
        lines = transport.value().split(b"\r\n")
        assert lines[-1] == b"", transport.value()
        transport.clear()
        return lines[:-1]

    def converse(self, data, *, chunks=None, lhlo=True, **options) -> list[bytes]:
        """Feed ``data`` (in ``chunks`` pieces of that size if given) after the
        greeting and, unless ``lhlo`` is false, an LHLO; return the reply lines."""
        self.server, self.transport = self.make_server(**options)
        greeting = self.replies(self.transport)
        self.assertEqual(greeting, [b"220 lists.example.com LMTP server ready"])
        if lhlo:
            self.server.dataReceived(b"LHLO mta.example.org\r\n")
            self.assertEqual(self.replies(self.transport), LHLO_REPLY)
        if chunks is None:
            self.server.dataReceived(data)
        else:
            for i in range(0, len(data), chunks):
                self.server.dataReceived(data[i : i + chunks])
        return self.replies(self.transport)

    def assert_server_response(self, data, expected, **options):
        """Feeding ``data`` after LHLO is answered with exactly the lines ``expected``."""
        expected = [line.encode() if isinstance(line, str) else line for line in expected]
        self.assertEqual(self.converse(data, **options), expected)


def transaction(sender="<anne@example.org>", recipients=("test@example.com",), body=None):
    """The bytes of one pipelined transaction, through the final "."."""
    lines = [b"MAIL FROM:" + sender.encode()]
    lines += [b"RCPT TO:<" + r.encode() + b">" for r in recipients]
    lines.append(b"DATA")
    if body is None:
        body = b"Subject: hi\r\n\r\nHello.\r\n"
    return b"\r\n".join(lines) + b"\r\n" + body + b".\r\n"


class SessionTests(ServerTestMixin, SynchronousTestCase):
    def test_greeting_and_lhlo(self):
        """The greeting is 220; LHLO lists PIPELINING, ENHANCEDSTATUSCODES, 8BITMIME, SIZE."""
        self.assert_server_response(b"", [])

    def test_helo_and_ehlo_refused(self):
        """HELO and EHLO get 500 5.5.1, never 2xx (RFC 2033 4.1)."""
        self.assert_server_response(
            b"HELO a.example\r\nEHLO a.example\r\n",
            [b"500 5.5.1 This is an LMTP server: use LHLO"] * 2,
            lhlo=False,
        )

    def test_lhlo_needs_a_name(self):
        """A bare LHLO is a syntax error."""
        self.assert_server_response(b"LHLO\r\n", [b"501 5.5.4 Syntax: LHLO hostname"], lhlo=False)

    def test_mail_before_lhlo(self):
        """MAIL before LHLO gets 503 5.5.1."""
        self.assert_server_response(
            b"MAIL FROM:<a@example.org>\r\n", [b"503 5.5.1 Send LHLO first"], lhlo=False
        )

    def test_ordering_errors(self):
        """RCPT before MAIL, DATA without MAIL, DATA without accepted RCPT: 503 5.5.1."""
        self.assert_server_response(
            b"RCPT TO:<test@example.com>\r\nDATA\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<nobody@example.com>\r\nDATA\r\nMAIL FROM:<b@example.org>\r\n",
            [
                b"503 5.5.1 Need MAIL command",
                b"503 5.5.1 Need MAIL command",
                SENDER_OK,
                b"550 5.1.1 Requested action not taken: mailbox unavailable",
                b"503 5.5.1 Need RCPT command: no valid recipients",
                b"503 5.5.1 Sender already specified",
            ],
            handler=FakeHandler(reject={"nobody@example.com": UNKNOWN}),
        )

    def test_other_commands(self):
        """NOOP, RSET, VRFY, HELP and QUIT answer with enhanced codes; AUTH,
        STARTTLS and unknown verbs are not recognized (Twisted's AUTH would crash)."""
        self.assert_server_response(
            b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nAUTH\r\nSTARTTLS\r\nXYZZY\r\n\xff\r\n\r\nQUIT\r\n",
            [
                b"250 2.0.0 Ok",
                b"250 2.0.0 Ok",
                b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
                b"214 2.0.0 Commands: LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP",
                b"500 5.5.1 Command not recognized",
                b"500 5.5.1 Command not recognized",
                b"500 5.5.1 Command not recognized",
                b"500 5.5.1 Command not recognized",
                b"500 5.5.2 Syntax error",
                b"221 2.0.0 lists.example.com closing connection",
            ],
        )
        self.assertTrue(self.transport.disconnecting)

    def test_input_after_quit_ignored(self):
        """Commands pipelined after QUIT are not run."""
        self.assert_server_response(
            b"QUIT\r\nMAIL FROM:<a@example.org>\r\n",
            [b"221 2.0.0 lists.example.com closing connection"],
        )

    def test_rset_forgets_transaction(self):
        """RSET drops sender and recipients: DATA afterwards needs MAIL again."""
        self.assert_server_response(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<test@example.com>\r\nRSET\r\nDATA\r\n",
            [SENDER_OK, RCPT_OK, b"250 2.0.0 Ok", b"503 5.5.1 Need MAIL command"],
        )

    def test_unix_socket_peer(self):
        """A session over a unix socket (UNIXAddress peer, no host) works end to end."""
        server, transport = self.make_server(peer=UNIXAddress(None))
        server.dataReceived(b"LHLO mta\r\n" + transaction())
        lines = self.replies(transport)
        self.assertEqual(lines[1], b"250-lists.example.com Hello unix")
        self.assertEqual(lines[-1], b"250 2.0.0 <test@example.com> delivered")
        self.assertEqual(self.handler.transactions[0].peer, "unix")

    def test_transaction_contents(self):
        """The handler gets sender, recipients with their tokens, LHLO name, peer and
        the message exactly as sent, minus dot-stuffing."""
        body = b"Subject: x\r\n\r\n..leading dot\r\n.\tdot tab\r\nend\r\n"
        self.converse(transaction(recipients=("a@example.com", "b@example.com"), body=body))
        (tx,) = self.handler.transactions
        self.assertEqual(tx.sender, "anne@example.org")
        self.assertEqual(
            tx.recipients,
            (
                AcceptedRecipient("a@example.com", "token:a@example.com"),
                AcceptedRecipient("b@example.com", "token:b@example.com"),
            ),
        )
        self.assertEqual(tx.message, b"Subject: x\r\n\r\n.leading dot\r\n\tdot tab\r\nend\r\n")
        self.assertEqual((tx.lhlo, tx.peer), ("mta.example.org", "192.0.2.7"))

    def test_empty_message(self):
        """A "." right after 354 delivers an empty message."""
        self.converse(transaction(body=b""))
        self.assertEqual(self.handler.transactions[0].message, b"")

    def test_leading_dot_on_first_line(self):
        """Dot-stuffing is removed on the first line too."""
        self.converse(transaction(body=b"..x\r\n"))
        self.assertEqual(self.handler.transactions[0].message, b".x\r\n")


class RecipientTests(ServerTestMixin, SynchronousTestCase):
    def test_null_sender(self):
        """MAIL FROM:<> is accepted and reaches the handler as ""."""
        lines = self.converse(transaction(sender="<>"))
        self.assertEqual(lines[0], SENDER_OK)
        self.assertEqual(self.handler.validated, [("", "test@example.com")])
        self.assertEqual(self.handler.transactions[0].sender, "")

    def test_handler_reply_sent_verbatim(self):
        """A RecipientRejected reply is sent as it is (550 5.1.1, or 451 4.3.0)."""
        handler = FakeHandler(
            reject={
                "nobody@example.com": UNKNOWN,
                "later@example.com": Reply(
                    451, "4.3.0", "Requested action aborted: error in processing"
                ),
            }
        )
        self.assert_server_response(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@example.com>\r\n"
            b"RCPT TO:<later@example.com>\r\n",
            [
                SENDER_OK,
                b"550 5.1.1 Requested action not taken: mailbox unavailable",
                b"451 4.3.0 Requested action aborted: error in processing",
            ],
            handler=handler,
        )

    def test_handler_exception_is_451(self):
        """A handler that raises gets the recipient a 451 4.3.0 (never 5xx) and is logged."""
        self.assert_server_response(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<boom@example.com>\r\n",
            [SENDER_OK, b"451 4.3.0 Requested action aborted: error in processing"],
            handler=FakeHandler(explode={"boom@example.com"}),
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_address_syntax(self):
        """Malformed paths get 501; invalid mailboxes 553 5.1.7 / 5.1.3; source routes
        are dropped; an address without brackets is tolerated."""
        self.assert_server_response(
            b"MAIL FROM:<a@example.org\r\nMAIL FROM:<a@@example.org>\r\n"
            b"MAIL FROM:<@relay.example:a@example.org>\r\nRCPT TO:<>\r\n"
            b"RCPT TO:<postmaster>\r\nRCPT TO:test@example.com\r\nRCPT TO: <b@example.com>\r\n",
            [
                b"501 5.5.4 Syntax: MAIL FROM:<address> [parameters]",
                b"553 5.1.7 Bad sender address syntax: bad local part",
                SENDER_OK,
                b"501 5.5.4 Syntax: RCPT TO:<address>",
                b"553 5.1.3 Bad recipient address syntax: no @domain",
                RCPT_OK,
                RCPT_OK,
            ],
        )
        self.assertEqual(
            self.handler.validated,
            [("a@example.org", "test@example.com"), ("a@example.org", "b@example.com")],
        )

    def test_non_ascii_address(self):
        """UTF-8 addresses need SMTPUTF8, which is not offered: 553 5.6.7."""
        self.assert_server_response(
            "MAIL FROM:<jörg@example.org>\r\n".encode(),
            [b"553 5.6.7 Non-ASCII addresses need SMTPUTF8, which is not offered"],
        )

    def test_mail_parameters(self):
        """BODY=8BITMIME/7BIT and SIZE are accepted; SMTPUTF8 gets 501 5.5.4, other
        BODY values and bad SIZE 501 5.5.4, unknown parameters 555 5.5.4."""
        cases = [
            (b"BODY=8BITMIME SIZE=100", SENDER_OK),
            (b"body=7bit", SENDER_OK),
            (b"SMTPUTF8", b"501 5.5.4 SMTPUTF8 is not supported"),
            (b"BODY=BINARYMIME", b"501 5.5.4 BODY must be 7BIT or 8BITMIME"),
            (b"SIZE=12k", b"501 5.5.4 SIZE must be a number of octets"),
            (b"SIZE=1 SIZE=2", b"501 5.5.4 Malformed or repeated parameter"),
            (b"RET=HDRS", b"555 5.5.4 Parameters not recognized or not implemented"),
        ]
        for params, reply in cases:
            self.assert_server_response(b"MAIL FROM:<a@example.org> " + params + b"\r\n", [reply])

    def test_rcpt_parameters(self):
        """RCPT parameters (DSN's NOTIFY, ORCPT) are not implemented: 555 5.5.4."""
        self.assert_server_response(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<test@example.com> NOTIFY=NEVER\r\n",
            [SENDER_OK, b"555 5.5.4 Parameters not recognized or not implemented"],
        )
        self.assertEqual(self.handler.validated, [])

    def test_declared_size_over_limit(self):
        """MAIL FROM with SIZE= over the limit gets 552 5.3.4; at the limit it is fine."""
        self.assert_server_response(
            b"MAIL FROM:<a@example.org> SIZE=10001\r\nMAIL FROM:<a@example.org> SIZE=10000\r\n",
            [TOO_BIG, SENDER_OK],
        )

    def test_recipient_cap(self):
        """Beyond max_recipients accepted RCPTs, further ones get 452 4.5.3."""
        server, transport = self.make_server()
        server.max_recipients = 2
        server.dataReceived(
            b"LHLO x\r\nMAIL FROM:<a@example.org>\r\n" + b"RCPT TO:<test@example.com>\r\n" * 3
        )
        self.assertEqual(
            self.replies(transport)[-3:], [RCPT_OK, RCPT_OK, b"452 4.5.3 Too many recipients"]
        )


class DataReplyTests(ServerTestMixin, SynchronousTestCase):
    def test_one_reply_per_recipient_in_order_with_duplicates(self):
        """After DATA every accepted RCPT gets its own reply, in RCPT order,
        duplicates included; refused RCPTs get none."""
        handler = FakeHandler(reject={"nobody@example.com": UNKNOWN})
        lines = self.converse(
            transaction(
                recipients=("a@example.com", "nobody@example.com", "b@example.com", "a@example.com")
            ),
            handler=handler,
        )
        self.assertEqual(
            lines,
            [
                SENDER_OK,
                RCPT_OK,
                b"550 5.1.1 Requested action not taken: mailbox unavailable",
                RCPT_OK,
                RCPT_OK,
                GO_AHEAD,
                b"250 2.0.0 <a@example.com> delivered",
                b"250 2.0.0 <b@example.com> delivered",
                b"250 2.0.0 <a@example.com> delivered",
            ],
        )

    def test_mixed_outcomes_from_handler(self):
        """Each recipient's reply from the handler is sent, whatever the mix."""
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        server.dataReceived(
            b"LHLO x\r\n"
            + transaction(recipients=("a@example.com", "b@example.com", "c@example.com"))
        )
        transport.clear()
        handler.pending[0].callback(
            [
                Reply(250, "2.0.0", "ok"),
                Reply(452, "4.3.1", "Requested action not taken: insufficient system storage"),
                Reply(501, "5.6.0", "Message has defects"),
            ]
        )
        self.assertEqual(
            self.replies(transport),
            [
                b"250 2.0.0 ok",
                b"452 4.3.1 Requested action not taken: insufficient system storage",
                b"501 5.6.0 Message has defects",
            ],
        )

    def test_delivery_failure_is_451_per_recipient(self):
        """A failing deliver() Deferred gets 451 4.3.0 for each recipient and is logged."""
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        server.dataReceived(
            b"LHLO x\r\n" + transaction(recipients=("a@example.com", "b@example.com"))
        )
        transport.clear()
        handler.pending[0].errback(ZeroDivisionError())
        self.assertEqual(
            self.replies(transport),
            [b"451 4.3.0 Requested action aborted: error in processing"] * 2,
        )
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_wrong_number_of_replies_is_451_per_recipient(self):
        """A handler firing with the wrong number of replies is a bug: 451 for each, logged."""
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        server.dataReceived(
            b"LHLO x\r\n" + transaction(recipients=("a@example.com", "b@example.com"))
        )
        transport.clear()
        handler.pending[0].callback([Reply(250, "2.0.0", "ok")])
        self.assertEqual(
            self.replies(transport),
            [b"451 4.3.0 Requested action aborted: error in processing"] * 2,
        )
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_connection_lost_while_delivering(self):
        """If the client goes away while the message is being stored, the late
        replies are dropped quietly."""
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        server.dataReceived(b"LHLO x\r\n" + transaction())
        transport.clear()
        server.connectionLost(Failure(ConnectionDone()))
        handler.pending[0].callback(handler.accepted(handler.transactions[0]))
        self.assertEqual(transport.value(), b"")


class PipeliningTests(ServerTestMixin, SynchronousTestCase):
    def test_pipelined_batch_replies_in_order(self):
        """MAIL/RCPT/RCPT/DATA in one write are answered in order."""
        self.assert_server_response(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<a@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\nDATA\r\n",
            [SENDER_OK, RCPT_OK, RCPT_OK, GO_AHEAD],
        )

    def test_input_waits_for_delivery(self):
        """Commands pipelined after the final "." (a second transaction, QUIT) are
        answered only after the first message's per-recipient replies; they wait
        in memory, without pausing the transport."""
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        self.replies(transport)
        server.dataReceived(
            b"LHLO x\r\n"
            + transaction(recipients=("a@example.com", "b@example.com"))
            + transaction(recipients=("c@example.com",))
        )
        server.dataReceived(b"QUIT\r\n")
        self.assertEqual(self.replies(transport)[-4:], [SENDER_OK, RCPT_OK, RCPT_OK, GO_AHEAD])
        self.assertEqual(transport.producerState, "producing")

        handler.pending[0].callback(handler.accepted(handler.transactions[0]))
        self.assertEqual(
            self.replies(transport),
            [
                b"250 2.0.0 <a@example.com> delivered",
                b"250 2.0.0 <b@example.com> delivered",
                SENDER_OK,
                RCPT_OK,
                GO_AHEAD,
            ],
        )
        self.assertEqual(transport.producerState, "producing")
        handler.pending[1].callback(handler.accepted(handler.transactions[1]))
        self.assertEqual(
            self.replies(transport),
            [
                b"250 2.0.0 <c@example.com> delivered",
                b"221 2.0.0 lists.example.com closing connection",
            ],
        )
        self.assertTrue(transport.disconnecting)

    def test_half_close_after_pipelined_quit_still_gets_the_replies(self):
        """A client that pipelines QUIT after the final "." and then shuts down its
        sending side (as Exim's smtp transport does) gets every per-recipient reply and
        the 221 before the server closes; the server is a half-closeable protocol, so
        Twisted does not report that end of input as a lost connection."""
        self.assertTrue(IHalfCloseableProtocol.implementedBy(LMTPServer))
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        self.replies(transport)
        server.dataReceived(
            b"LHLO x\r\n" + transaction(recipients=("a@example.com", "b@example.com")) + b"QUIT\r\n"
        )
        server.readConnectionLost()
        self.assertFalse(transport.disconnecting, "closed before the replies were sent")
        self.replies(transport)

        handler.pending[0].callback(handler.accepted(handler.transactions[0]))
        self.assertEqual(
            self.replies(transport),
            [
                b"250 2.0.0 <a@example.com> delivered",
                b"250 2.0.0 <b@example.com> delivered",
                b"221 2.0.0 lists.example.com closing connection",
            ],
        )
        self.assertTrue(transport.disconnecting)

    def test_half_close_without_quit_closes_once_answered(self):
        """A client that half-closes right after the final "." without QUIT gets its
        per-recipient replies, then the server closes; one that half-closes between
        commands is closed at once."""
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        self.replies(transport)
        server.dataReceived(b"LHLO x\r\n" + transaction(recipients=("a@example.com",)))
        server.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        self.replies(transport)
        handler.pending[0].callback(handler.accepted(handler.transactions[0]))
        self.assertEqual(self.replies(transport), [b"250 2.0.0 <a@example.com> delivered"])
        self.assertTrue(transport.disconnecting)

        idle, idle_transport = self.make_server()
        idle.readConnectionLost()
        self.assertTrue(idle_transport.disconnecting)

    def test_reading_pauses_when_much_input_waits(self):
        """Past 64 KiB of input waiting for a delivery, reading from the client
        pauses; it resumes, and the input is answered, once the delivery is done."""
        handler = FakeHandler(hold=True)
        server, transport = self.make_server(handler=handler)
        server.dataReceived(b"LHLO x\r\n" + transaction(recipients=("a@example.com",)))
        self.replies(transport)
        server.dataReceived(b"NOOP\r\n" * 5000)
        self.assertEqual(transport.producerState, "producing")
        server.dataReceived(b"NOOP\r\n" * 8000)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.replies(transport), [])
        handler.pending[0].callback(handler.accepted(handler.transactions[0]))
        self.assertEqual(transport.producerState, "producing")
        replies = self.replies(transport)
        self.assertEqual(len(replies), 1 + 13000)
        self.assertEqual(set(replies[1:]), {b"250 2.0.0 Ok"})

    def test_byte_by_byte(self):
        """A session fed one byte at a time gives the same replies and message as one write."""
        session = transaction(body=b"A: b\r\n\r\n..x\r\n.\r\r\n\r\n") + b"NOOP\r\n"
        whole = self.converse(session)
        whole_message = self.handler.transactions[0].message
        self.assertEqual(self.converse(session, chunks=1), whole)
        self.assertEqual(self.handler.transactions[0].message, whole_message)
        self.assertEqual(whole[-1], b"250 2.0.0 Ok")

    @settings(max_examples=150, deadline=None)
    @given(
        content=st.lists(
            st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"a", b" "]), max_size=30
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    )
    def test_any_content_any_chunking(self, content, cuts):
        """Whatever the content (dots, bare CR and LF anywhere) and however the
        input is split into chunks, the handler receives the content exactly."""
        content = b"".join(content)
        if not content.endswith(b"\r\n"):
            content += b"\r\n"
        lines = content[:-2].split(b"\r\n")
        stuffed = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
        session = b"LHLO x\r\n" + transaction(body=stuffed) + b"NOOP\r\n"
        handler = FakeHandler()
        server, transport = self.make_server(handler=handler)
        start = 0
        for cut in sorted(set(cuts)) + [len(session)]:
            server.dataReceived(session[start:cut])
            start = max(start, cut)
        self.assertEqual([tx.message for tx in handler.transactions], [content])
        self.assertEqual(
            self.replies(transport)[-2:],
            [b"250 2.0.0 <test@example.com> delivered", b"250 2.0.0 Ok"],
        )


class DataFramingTests(ServerTestMixin, SynchronousTestCase):
    def test_bare_cr_or_lf_around_dot_never_ends_data(self):
        """Only CRLF "." CRLF ends DATA: \\n.\\n, \\r.\\r, \\n.\\r\\n and the like are
        content, so commands hidden after them are not run (SMTP smuggling)."""
        for fake_end in [
            b"\n.\n",
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\r.\r\n",
            b".\n",
        ]:
            smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            body = b"Subject: x\r\n\r\nhello" + fake_end + smuggled + b"bye\r\n"
            handler = FakeHandler()
            lines = self.converse(transaction(body=body), handler=handler)
            self.assertEqual(lines[-1], b"250 2.0.0 <test@example.com> delivered", fake_end)
            self.assertEqual(len(handler.transactions), 1, fake_end)
            # A dot opening a CRLF line is dot-stuffing and removed; nothing else changes.
            expected = body.replace(b"\r\n.", b"\r\n")
            self.assertEqual(handler.transactions[0].message, expected, fake_end)
            self.assertEqual(handler.validated, [("anne@example.org", "test@example.com")])

    def test_size_limit_while_receiving(self):
        """Content over max_message_size is refused with 552 5.3.4 per recipient at
        the final "."; it is not buffered and the handler never sees it."""
        body = b"x" * 500 + b"\r\n"
        handler = FakeHandler()
        server, transport = self.make_server(handler=handler)
        server.dataReceived(
            b"LHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\nDATA\r\n"
        )
        tracemalloc.start()
        try:
            for _ in range(2000):  # 1 MB, 100 times the limit
                server.dataReceived(body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 3 * MAX_SIZE)
        transport.clear()
        server.dataReceived(b".\r\nNOOP\r\n")
        self.assertEqual(self.replies(transport), [TOO_BIG, TOO_BIG, b"250 2.0.0 Ok"])
        self.assertEqual(handler.transactions, [])

    def test_size_limit_exact(self):
        """A message of exactly max_message_size octets is accepted."""
        body = (b"y" * 98 + b"\r\n") * 100
        self.assertEqual(len(body), MAX_SIZE)
        lines = self.converse(transaction(body=body))
        self.assertEqual(lines[-1], b"250 2.0.0 <test@example.com> delivered")

    def test_long_line_in_data_then_smuggled_commands(self):
        """An over-long line in DATA does not drop back to command mode: commands
        after it are content (Twisted would run them), and each recipient gets 500
        at the real end of data.  The session stays usable."""
        smuggled = (
            b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nhi\r\n"
        )
        body = b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\n" + smuggled
        lines = self.converse(
            transaction(recipients=("a@example.com", "b@example.com"), body=body)
            + transaction(recipients=("c@example.com",)),
            max_line_length=1000,
        )
        self.assertEqual(
            lines,
            [SENDER_OK, RCPT_OK, RCPT_OK, GO_AHEAD, LINE_TOO_LONG, LINE_TOO_LONG]
            + [SENDER_OK, RCPT_OK, GO_AHEAD, b"250 2.0.0 <c@example.com> delivered"],
        )
        self.assertEqual(
            [r.address for tx in self.handler.transactions for r in tx.recipients],
            ["c@example.com"],
        )
        self.assertNotIn(("evil@example.org", "victim@example.com"), self.handler.validated)

    def test_line_at_the_limit(self):
        """A line of exactly max_line_length octets (without CRLF) is accepted."""
        body = b"Subject: x\r\n\r\n" + b"w" * 1000 + b"\r\n"
        for chunks in (None, 7, 1000, 1001, 1002):
            lines = self.converse(transaction(body=body), max_line_length=1000, chunks=chunks)
            self.assertEqual(lines[-1], b"250 2.0.0 <test@example.com> delivered", chunks)
            self.assertEqual(self.handler.transactions[-1].message, body)

    def test_unterminated_line_in_data_is_bounded(self):
        """An endless line in DATA neither grows memory nor costs quadratic time:
        8 MiB in 1460-octet pieces are swallowed in bounded space, with no reply
        until the end of data."""
        server, transport = self.make_server(max_line_length=16384)
        server.dataReceived(
            b"LHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
        )
        transport.clear()
        piece = b"q" * 1460
        started = time.process_time()
        tracemalloc.start()
        try:
            for _ in range(8 * 1024 * 1024 // len(piece)):
                server.dataReceived(piece)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(time.process_time() - started, 10)  # quadratic would be minutes
        self.assertLess(peak, 64 * 1024)
        self.assertEqual(transport.value(), b"")
        server.dataReceived(b"\r\n.\r\n")
        self.assertEqual(self.replies(transport), [LINE_TOO_LONG])

    def test_long_command_line(self):
        """An over-long command line gets 500 5.5.2 once, its content is never run,
        and the session goes on; an endless one is held in bounded memory."""
        server, transport = self.make_server()
        server.dataReceived(b"LHLO x\r\n")
        transport.clear()
        server.dataReceived(b"NOOP " + b"a" * 5000 + b"\r\nRCPT TO:<a@example.com>\r\n")
        tracemalloc.start()
        try:
            for _ in range(1000):  # 1 MB without a line end
                server.dataReceived(b"MAIL FROM:<x@example.org> " * 40)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 64 * 1024)
        server.dataReceived(b"\r\nNOOP\r\n")
        self.assertEqual(
            self.replies(transport),
            [LINE_TOO_LONG, b"503 5.5.1 Need MAIL command", LINE_TOO_LONG, b"250 2.0.0 Ok"],
        )
        self.assertEqual(self.handler.validated, [])


class LimitTests(ServerTestMixin, SynchronousTestCase):
    def test_idle_timeout(self):
        """After idle_timeout seconds without input (on the injected clock) the
        session gets 421 4.4.2 and is closed; input resets the timer."""
        server, transport = self.make_server(idle_timeout=30)
        transport.clear()
        self.clock.advance(29)
        server.dataReceived(b"NOOP\r\n")
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(
            self.replies(transport),
            [b"250 2.0.0 Ok", b"421 4.4.2 lists.example.com Idle timeout, closing connection"],
        )
        self.assertTrue(transport.disconnecting)

    def test_data_resets_idle_timer(self):
        """A slow but steady message upload is not cut off by the idle timeout."""
        server, transport = self.make_server(idle_timeout=30)
        server.dataReceived(
            b"LHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
        )
        for _ in range(10):
            self.clock.advance(20)
            server.dataReceived(b"x")
        self.assertFalse(transport.disconnecting)

    def start_held_delivery(self, **options):
        """A session whose message (two recipients) is being stored by a holding handler."""
        server, transport = self.make_server(FakeHandler(hold=True), **options)
        server.dataReceived(
            b"LHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n"
        )
        transport.clear()
        return server, transport

    def test_idle_timer_stops_while_storing(self):
        """While a message waits for the store, the idle timer does not run: a store
        slower than idle_timeout (but within store_timeout) is answered, not cut off;
        the idle timer runs again once the replies are out."""
        server, transport = self.start_held_delivery(idle_timeout=30, store_timeout=100)
        self.clock.advance(90)
        self.assertFalse(transport.disconnecting)
        self.handler.pending[0].callback(self.handler.accepted(self.handler.transactions[0]))
        self.assertEqual(
            self.replies(transport),
            [b"250 2.0.0 <a@example.com> delivered", b"250 2.0.0 <b@example.com> delivered"],
        )
        self.clock.advance(30)
        self.assertEqual(
            self.replies(transport),
            [b"421 4.4.2 lists.example.com Idle timeout, closing connection"],
        )

    def test_store_timeout(self):
        """A store slower than store_timeout gets 451 4.3.0 for each recipient and the
        session goes on (pipelined input is then served); the late result is dropped."""
        server, transport = self.start_held_delivery(idle_timeout=300, store_timeout=60)
        server.dataReceived(b"NOOP\r\n")
        self.clock.advance(59)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        timed_out = b"451 4.3.0 Requested action aborted: storing the message timed out"
        self.assertEqual(self.replies(transport), [timed_out, timed_out, b"250 2.0.0 Ok"])
        self.assertFalse(transport.disconnecting)
        self.handler.pending[0].callback(self.handler.accepted(self.handler.transactions[0]))
        self.assertEqual(transport.value(), b"")
        # The idle timer runs again; no store timer is left behind.
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [360.0])
        self.handler.hold = False
        server.dataReceived(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\nx\r\n.\r\n"
        )
        self.assertEqual(
            self.replies(transport),
            [SENDER_OK, RCPT_OK, GO_AHEAD, b"250 2.0.0 <a@example.com> delivered"],
        )

    def test_store_timer_stops_with_connection(self):
        """A connection lost while its message is stored leaves no timer behind,
        and the store's late result is ignored."""
        server, transport = self.start_held_delivery(idle_timeout=30, store_timeout=60)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.handler.pending[0].callback(self.handler.accepted(self.handler.transactions[0]))
        self.assertEqual(transport.value(), b"")

    def test_timer_stops_with_connection(self):
        """Closing the connection cancels the idle timer."""
        server, transport = self.make_server(idle_timeout=30)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_session_cap(self):
        """Beyond max_sessions, a connection gets 421 4.3.2 and is closed; once a
        session ends a new one is admitted."""
        first, _ = self.make_server(max_sessions=2)
        second, _ = self.make_server(factory=self.factory)
        third, transport = self.make_server(factory=self.factory)
        self.assertEqual(
            self.replies(transport), [b"421 4.3.2 lists.example.com Too many sessions, try later"]
        )
        self.assertTrue(transport.disconnecting)
        third.dataReceived(b"LHLO x\r\n")
        self.assertEqual(transport.value(), b"")
        third.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.sessions, 2)
        first.connectionLost(Failure(ConnectionDone()))
        fourth, transport = self.make_server(factory=self.factory)
        self.assertEqual(self.replies(transport), [b"220 lists.example.com LMTP server ready"])
        self.assertEqual(self.factory.sessions, 2)


class FactoryTests(SynchronousTestCase):
    def test_rejects_bad_arguments(self):
        """Bad factory arguments raise a clear error at construction."""
        handler = FakeHandler()
        good = dict(hostname=HOST, max_message_size=1000)
        for bad in [
            dict(hostname="lists.example.com"),
            dict(hostname=b"two words"),
            dict(max_message_size=0),
            dict(max_line_length=500),
            dict(idle_timeout=-1),
            dict(max_sessions=True),
            dict(store_timeout=0),
        ]:
            with self.assertRaises(ValueError, msg=str(bad)):
                LMTPFactory(handler, **{**good, **bad})
        with self.assertRaises(TypeError):
            LMTPFactory(object(), **good)

    def test_fake_handler_provides_interface(self):
        """The fake used here honours IInboundHandler, so these tests exercise the real seam."""
        self.assertTrue(verifyObject(IInboundHandler, FakeHandler()))

    def test_reply_validation(self):
        """Reply refuses codes and enhanced statuses that do not fit together."""
        for args in [
            (250, "5.0.0", "x"),
            (354, "3.0.0", "x"),
            (250, "2.0", "x"),
            (250, "2.0.0", "a\r\nb"),
        ]:
            with self.assertRaises(ValueError, msg=str(args)):
                Reply(*args)
        self.assertEqual(str(Reply(550, "5.1.1", "no")), "550 5.1.1 no")
