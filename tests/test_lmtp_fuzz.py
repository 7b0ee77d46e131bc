"""Bad input at the LMTP server: fuzzed, smuggled, oversized.

The real server (:class:`~mailrelay.lmtp.protocol.LMTPFactory`) and the real
policy (:class:`~mailrelay.lmtp.policy.InboundHandler`) run in memory on
``StringTransport`` over a MemoryRegistry and a MemorySpool.  Whatever arrives
(random command sequences and bytes, bare LF and CR, NUL, 10 MB without a
newline, commands out of order, pipelined garbage, a disconnect inside DATA)
the server must never raise or log a failure, every reply line must be well
formed (``^\\d{3}[ -]``, with an RFC 3463 enhanced status code where one is
due), no session may leak, and afterwards a normal post on a new connection
must be accepted and stored.  A body holding a bare-LF or bare-CR "end of
data" followed by MAIL FROM must never yield a second message.

Hypothesis runs derandomized (the same examples on every run) with moderate
example counts, for a stable CI.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.lmtp.policy import InboundHandler
from mailrelay.lmtp.protocol import LMTPFactory
from mailrelay.registry import MemoryRegistry
from mailrelay.spool import MemorySpool
from tests.daemon import record_figures

LIST = "test@example.com"
PEER = IPv4Address("TCP", "192.0.2.7", 40123)
REPLY_LINE = re.compile(rb"\A\d{3}[ -]")
ENHANCED = re.compile(rb"\A(\d)\d{2} ([245])\.\d{1,3}\.\d{1,3} ")
# Replies that carry no enhanced status code (RFC 2034 3): the greeting, the
# LHLO reply and the go-ahead for DATA.
NOT_ENHANCED = (b"220 ", b"354 ")
FUZZ_SETTINGS = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NORMAL_POST = (
    b"LHLO mx.example.org\r\nMAIL FROM:<anne@example.org>\r\nRCPT TO:<test@example.com>\r\n"
    b"DATA\r\nFrom: anne@example.org\r\nMessage-ID: <normal@example.org>\r\n\r\nHello.\r\n"
    b".\r\nQUIT\r\n"
)

# Pieces a fuzzed session is made of: valid commands in any order, near
# misses, and raw hazards.
_PIECES = st.sampled_from(
    [
        b"LHLO mx.example.org\r\n",
        b"LHLO\r\n",
        b"HELO mx.example.org\r\n",
        b"EHLO mx.example.org\r\n",
        b"MAIL FROM:<anne@example.org>\r\n",
        b"MAIL FROM:<>\r\n",
        b"MAIL FROM:<anne@example.org> SIZE=99999999999\r\n",
        b"MAIL FROM:<anne@example.org> BODY=8BITMIME SMTPUTF8\r\n",
        b"MAIL FROM:anne\r\n",
        b"RCPT TO:<test@example.com>\r\n",
        b"RCPT TO:<test-owner@example.com>\r\n",
        b"RCPT TO:<nobody@example.com>\r\n",
        b"RCPT TO:<victim@elsewhere.example>\r\n",
        b"RCPT TO:<@relay.example:victim@elsewhere.example>\r\n",
        b"RCPT TO:<\xc3\xa9@example.com>\r\n",
        b"DATA\r\n",
        b"DATA now\r\n",
        b"Subject: x\r\n\r\nbody\r\n",
        b".\r\n",
        b"..\r\n",
        b"\r\n.\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"VRFY test\r\n",
        b"HELP\r\n",
        b"AUTH PLAIN AGFub24AcGFzcw==\r\n",
        b"STARTTLS\r\n",
        b"QUIT\r\n",
        b"\n",
        b"\r",
        b"\x00",
        b"\r\n",
        b"\n.\n",
        b"\r.\r",
        b"MAIL FROM:<a@example.org>\n",
        b"\xff\xfe\r\n",
        b"x" * 3000 + b"\r\n",
        b"y" * 20000,
    ]
)
_CHUNK = st.one_of(_PIECES, st.binary(max_size=64))


class Harness:
    """One factory, handler, registry and spool; sessions on StringTransports."""

    def __init__(self, case: SynchronousTestCase):
        self.case = case
        self.clock = task.Clock()
        self.registry = MemoryRegistry()
        self.registry.create_list(LIST)
        self.registry.add_members(LIST, ["bart@members.example"])
        self.spool = MemorySpool(self.clock)
        handler = InboundHandler(
            self.registry, self.spool, hostname="lists.example.com", clock=self.clock
        )
        self.factory = LMTPFactory(
            handler,
            hostname=b"lists.example.com",
            max_message_size=100_000,
            max_line_length=1000,
            clock=self.clock,
        )

    def session(self):
        server = self.factory.buildProtocol(PEER)
        transport = StringTransport(
            peerAddress=PEER, hostAddress=IPv4Address("TCP", "127.0.0.1", 24)
        )
        server.makeConnection(transport)
        return server, transport

    def feed(self, chunks) -> list[bytes]:
        """Feed ``chunks`` to a new session, then disconnect it; the reply lines."""
        server, transport = self.session()
        for chunk in chunks:
            if transport.disconnecting:
                break
            server.dataReceived(chunk)
        server.connectionLost(Failure(ConnectionDone()))
        return self.check_replies(transport.value())

    def check_replies(self, output: bytes) -> list[bytes]:
        """Every line of ``output`` is a well-formed reply; the lines."""
        case = self.case
        case.assertTrue(output == b"" or output.endswith(b"\r\n"), output[-100:])
        lines = output.split(b"\r\n")[:-1]
        continued = False
        for line in lines:
            case.assertRegex(line, REPLY_LINE)
            case.assertNotIn(b"\n", line)
            case.assertNotIn(b"\r", line)
            if not continued and not line.startswith(NOT_ENHANCED):
                match = ENHANCED.match(line)
                if line[3:4] == b"-":  # the first line of the LHLO reply
                    case.assertTrue(line.startswith(b"250-"), line)
                else:
                    case.assertIsNotNone(match, line)
                    case.assertEqual(match.group(1), match.group(2), line)
            continued = line[3:4] == b"-"
        case.assertFalse(continued, "a multi-line reply was never finished")
        return lines

    def message_ids(self) -> list[str]:
        return [e.message_id for e in self.spool.entries()]

    def normal_post_is_accepted(self) -> None:
        """A well-behaved session afterwards gets 250 and its message is stored."""
        before = self.message_ids().count("<normal@example.org>")
        lines = self.feed([NORMAL_POST])
        self.case.assertEqual(lines[-2][:3], b"250", lines)
        self.case.assertTrue(lines[-2].startswith(b"250 2.0.0 <test@example.com> Ok"), lines)
        self.case.assertEqual(self.message_ids().count("<normal@example.org>"), before + 1)
        self.case.assertEqual(self.factory.sessions, 0)


class FuzzTests(SynchronousTestCase):
    def test_random_sessions(self):
        """Random sessions of commands, near misses and raw bytes, in random chunks: no
        exception, no logged failure, well-formed replies, no leaked session, and a
        normal post is accepted afterwards."""
        harness = Harness(self)
        cases = {"examples": 0, "bytes": 0}

        @settings(FUZZ_SETTINGS, max_examples=1000)
        @given(st.lists(_CHUNK, max_size=40), st.integers(min_value=1, max_value=97))
        def session(pieces, cut):
            data = b"".join(pieces)
            chunks = [data[i : i + cut] for i in range(0, len(data), cut)]
            cases["examples"] += 1
            cases["bytes"] += len(data)
            harness.feed(chunks)
            self.assertEqual(self.flushLoggedErrors(), [])
            self.assertEqual(harness.factory.sessions, 0)
            harness.normal_post_is_accepted()

        session()
        record_figures("lmtp_fuzz_sessions", **cases)

    def test_smuggling_never_yields_a_second_message(self):
        """A body with a bare-LF/CR end of data (\\n.\\n, \\r.\\n, \\n.\\r\\n, \\r\\n.\\r) then
        MAIL FROM, RCPT and DATA stays one message, holding the smuggled text."""
        harness = Harness(self)
        cases = {"examples": 0}
        fake_ends = st.sampled_from(
            [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r"]
        )

        @FUZZ_SETTINGS
        @given(fake_ends, st.binary(max_size=20))
        def smuggle(end, noise):
            # Noise that completes a real CRLF.CRLF ends the data for real.
            assume(b"\r\n.\r\n" not in b"\r\nHello" + noise + end + b"MAIL")
            cases["examples"] += 1
            before = len(harness.spool.entries())
            body = (
                b"From: anne@example.org\r\nMessage-ID: <outer@example.org>\r\n\r\nHello"
                + noise
                + end
                + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<test@example.com>\r\nDATA\r\n"
                b"Message-ID: <smuggled@example.org>\r\n\r\nsmuggled\r\n"
            )
            lines = harness.feed(
                [
                    b"LHLO mx.example.org\r\nMAIL FROM:<anne@example.org>\r\n"
                    b"RCPT TO:<test@example.com>\r\nDATA\r\n" + body + b".\r\nQUIT\r\n"
                ]
            )
            new = harness.spool.entries()[before:]
            self.assertLessEqual(len(new), 1, lines)
            self.assertNotIn("<smuggled@example.org>", [e.message_id for e in new])
            if new:
                stored = harness.spool.get_message(new[0].message_key)
                self.assertIn(b"MAIL FROM:<evil@example.org>", stored)
            self.assertEqual([line[:3] for line in lines].count(b"354"), 1, lines)

        smuggle()
        harness.normal_post_is_accepted()
        record_figures("lmtp_fuzz_smuggling", **cases)


class NastyInputTests(SynchronousTestCase):
    """Fixed hazards, each followed by a normal post on a new connection."""

    def setUp(self):
        self.harness = Harness(self)

    def tearDown(self):
        self.assertEqual(self.flushLoggedErrors(), [])
        self.harness.normal_post_is_accepted()

    def test_ten_megabytes_without_newline_in_command_mode(self):
        """10 MB without a newline, then a command: one "line too long" reply, then the command."""
        lines = self.harness.feed([b"z" * (1 << 20)] * 10 + [b"\r\nNOOP\r\n"])
        self.assertEqual(
            lines[1:], [b"500 5.5.2 Line too long (see RFC 5321 4.5.3.1)", b"250 2.0.0 Ok"]
        )

    def test_ten_megabytes_without_newline_in_data(self):
        """10 MB without a newline inside DATA: refused per recipient at the end, not stored."""
        start = (
            b"LHLO a.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<test@example.com>\r\nDATA\r\n"
        )
        lines = self.harness.feed([start] + [b"z" * (1 << 20)] * 10 + [b"\r\n.\r\n"])
        self.assertEqual(lines[-1][:4], b"500 ", lines[-1])
        self.assertEqual(self.harness.spool.entries(), [])

    def test_nul_bytes_and_bare_line_ends(self):
        """NUL inside commands, bare LF and bare CR never run a command."""
        lines = self.harness.feed(
            [
                b"LHLO a.example\r\nNO\x00OP\r\nMAIL FROM:<a@example.org>\nRCPT TO:<test@example.com>\rDATA\r\n"
            ]
        )
        codes = [line[:3] for line in lines if not line.startswith(b"250-")]
        self.assertNotIn(b"354", codes)
        self.assertEqual(self.harness.spool.entries(), [])

    def test_pipelined_garbage_between_transactions(self):
        """Garbage pipelined between two transactions is answered and both are stored."""
        post = (
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<test@example.com>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nbody\r\n.\r\n"
        )
        lines = self.harness.feed(
            [b"LHLO a.example\r\n" + post + b"\xff\x00garbage\r\nDATA\r\n" + post]
        )
        self.assertEqual(len(self.harness.spool.entries()), 2, lines)

    def test_disconnect_in_the_middle_of_data(self):
        """A connection lost inside DATA stores nothing and frees its session."""
        self.harness.feed(
            [
                b"LHLO a.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<test@example.com>\r\nDATA\r\nSubject: half"
            ]
        )
        self.assertEqual(self.harness.spool.entries(), [])
        self.assertEqual(self.harness.factory.sessions, 0)

    def test_commands_out_of_order(self):
        """DATA, RCPT before MAIL, MAIL twice: 503 each, nothing stored."""
        lines = self.harness.feed(
            [
                b"DATA\r\nMAIL FROM:<a@example.org>\r\nLHLO a.example\r\nDATA\r\n"
                b"RCPT TO:<test@example.com>\r\nMAIL FROM:<a@example.org>\r\n"
                b"MAIL FROM:<a@example.org>\r\nDATA\r\n"
            ]
        )
        codes = [line[:3] for line in lines if not line.startswith(b"250-")]
        self.assertEqual(
            codes, [b"220", b"503", b"503", b"250", b"503", b"503", b"250", b"503", b"503"]
        )
        self.assertEqual(self.harness.spool.entries(), [])
