"""Tests for mailrelay.lmtp.policy (the LMTP policy) and, end to end, the LMTP
server with it behind, driven by mailrelay.testing.lmtp's client."""

from __future__ import annotations

import re
import time

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.logger import capturedLogs
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailrelay.addresses import resolve_recipient
from mailrelay.errors import RegistryUnavailable, SpoolError
from mailrelay.interfaces import IInboundHandler
from mailrelay.lmtp import AcceptedRecipient, RecipientRejected, Reply, Transaction
from mailrelay.lmtp.policy import (
    ERROR_IN_PROCESSING,
    INSUFFICIENT_STORAGE,
    MAILBOX_UNAVAILABLE,
    InboundHandler,
    MessageDefects,
    prepare_message,
)
from mailrelay.lmtp.protocol import LMTPFactory
from mailrelay.model import Destination
from mailrelay.testing.lmtp import (
    LMTPClient,
    LMTPClientProtocol,
    RecipientReply,
    connect_lmtp,
    encode_message,
)

HOSTNAME = "lists.example.com"
MESSAGE = (
    b"From: anne.person@example.com\r\n"
    b"To: mylist@example.com\r\n"
    b"Subject: An interesting message\r\n"
    b"Message-ID: <badger@example.com>\r\n"
    b"\r\n"
    b"This is an interesting message.\r\n"
)
UNAVAILABLE_TEXT = "5.1.1 Requested action not taken: mailbox unavailable"
PROCESSING_TEXT = "4.3.0 Requested action aborted: error in processing"


class FakeRegistry:
    """``IListRegistry.resolve`` over a set of list addresses, with failure injection."""

    def __init__(self, *lists):
        self.lists = set(lists)
        self.error = None

    def create_list(self, address):
        self.lists.add(address)

    def resolve(self, address):
        if self.error is not None:
            raise self.error
        return resolve_recipient(address, self.lists.__contains__)


class FakeSpool:
    """``ISpool.enqueue`` in memory; ``hold`` keeps the Deferreds pending, ``error`` fails them."""

    def __init__(self):
        self.stored = []
        self.error = None
        self.hold = False
        self.pending = []
        self._next_id = 1

    def enqueue(self, envelope, message):
        if self.error is not None:
            return defer.fail(self.error)
        self.stored.append((envelope, message))
        ids = list(range(self._next_id, self._next_id + len(envelope.destinations)))
        self._next_id += len(ids)
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, ids))
            return d
        return defer.succeed(ids)


def destination(address, list_address="mylist@example.com", subaddress=None):
    return Destination(list_address=list_address, subaddress=subaddress, address=address)


def make_transaction(message=MESSAGE, sender="anne.person@example.com", recipients=None):
    if recipients is None:
        recipients = [destination("mylist@example.com")]
    return Transaction(
        sender=sender,
        recipients=tuple(AcceptedRecipient(d.address, d) for d in recipients),
        message=message,
        peer="192.0.2.7",
        lhlo="mta.example.org",
    )


class PrepareMessageTests(SynchronousTestCase):
    def test_prepends_x_mailfrom_and_keeps_bytes(self):
        """X-MailFrom is prepended and every other byte stays as received."""
        message = MESSAGE.replace(b"Subject:", b"Subject:  odd\tspacing ;")
        prepared = prepare_message(message, sender="anne@example.org", hostname=HOSTNAME)
        self.assertEqual(prepared.data, b"X-MailFrom: anne@example.org\r\n" + message)
        self.assertEqual(prepared.message_id, "<badger@example.com>")

    def test_null_sender(self):
        """The null sender is recorded as X-MailFrom: <>."""
        prepared = prepare_message(MESSAGE, sender="", hostname=HOSTNAME)
        self.assertTrue(prepared.data.startswith(b"X-MailFrom: <>\r\nFrom: "))

    def test_replaces_forged_x_mailfrom(self):
        """X-MailFrom fields that came with the message (folded ones too) are removed."""
        message = b"X-MailFrom: forged@example.net\r\nX-Mailfrom: also\r\n forged\r\n" + MESSAGE
        prepared = prepare_message(message, sender="anne@example.org", hostname=HOSTNAME)
        self.assertEqual(prepared.data, b"X-MailFrom: anne@example.org\r\n" + MESSAGE)

    def test_adds_missing_message_id(self):
        """A message without Message-ID gets one made with the handler's host name."""
        message = MESSAGE.replace(b"Message-ID: <badger@example.com>\r\n", b"")
        prepared = prepare_message(message, sender="a@example.org", hostname=HOSTNAME)
        self.assertRegex(prepared.message_id, r"\A<[^<>@]+@lists\.example\.com>\Z")
        self.assertEqual(
            prepared.data,
            b"X-MailFrom: a@example.org\r\nMessage-ID: "
            + prepared.message_id.encode()
            + b"\r\n"
            + message,
        )

    def test_replaces_empty_message_id(self):
        """An empty Message-ID is replaced, not duplicated."""
        message = MESSAGE.replace(b"<badger@example.com>", b"")
        prepared = prepare_message(message, sender="a@example.org", hostname=HOSTNAME)
        self.assertEqual(prepared.data.count(b"Message-ID:"), 1)
        self.assertIn(b"@lists.example.com>", prepared.data)

    def test_repairs_bracketed_message_id(self):
        """Message-ID [x] or <[x]> (folded or not) becomes <x>, replacing the original."""
        for written in [b"[cow@example.com]", b"<[cow@example.com]>", b"\r\n [cow@example.com]"]:
            message = MESSAGE.replace(b"<badger@example.com>", written)
            prepared = prepare_message(message, sender="a@example.org", hostname=HOSTNAME)
            self.assertEqual(prepared.message_id, "<cow@example.com>")
            self.assertEqual(
                prepared.data,
                b"X-MailFrom: a@example.org\r\nMessage-ID: <cow@example.com>\r\n"
                + MESSAGE.replace(b"Message-ID: <badger@example.com>\r\n", b""),
            )

    def test_body_is_never_edited(self):
        """Header-like lines in the body are left alone when fields are removed."""
        message = (
            b"X-MailFrom: forged\r\nMessage-ID: [a@b]\r\n\r\n"
            b"X-MailFrom: body line\r\nMessage-ID: body line\r\n"
        )
        prepared = prepare_message(message, sender="a@example.org", hostname=HOSTNAME)
        self.assertEqual(
            prepared.data,
            b"X-MailFrom: a@example.org\r\nMessage-ID: <a@b>\r\n\r\n"
            b"X-MailFrom: body line\r\nMessage-ID: body line\r\n",
        )

    def test_message_without_headers_or_body(self):
        """Messages with no header section, or no body, are handled."""
        for message in [b"", b"\r\nbody only\r\n", b"Subject: no body\r\n"]:
            prepared = prepare_message(message, sender="a@example.org", hostname=HOSTNAME)
            self.assertTrue(prepared.data.endswith(message))

    def test_defects(self):
        """Messages the email package finds defects in raise MessageDefects: broken
        header sections, and multipart bodies with missing boundaries."""
        for message in [
            b" continuation first\r\nSubject: x\r\n\r\nbody\r\n",
            b"Subject: x\r\nthis is not a header\r\n\r\nbody\r\n",
            b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter\r\n",
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\n\r\npart, never closed\r\n",
        ]:
            with self.assertRaises(MessageDefects, msg=message):
                prepare_message(message, sender="a@example.org", hostname=HOSTNAME)

    def test_clean_multipart(self):
        """A well-formed multipart message passes the full parse."""
        message = (
            b'Content-Type: multipart/mixed; boundary="b1"\r\nMessage-ID: <m@x>\r\n\r\n'
            b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n"
        )
        prepared = prepare_message(message, sender="a@example.org", hostname=HOSTNAME)
        self.assertEqual(prepared.data, b"X-MailFrom: a@example.org\r\n" + message)

    def test_header_parse_stays_cheap(self):
        """A large single-part message is checked by its header block only: the
        time does not grow with the body (a full parse takes ~10 ms per MB)."""
        big = MESSAGE + b"a line of body text, more or less as long as usual lines\r\n" * 200000
        started = time.process_time()
        for _ in range(20):
            prepare_message(big, sender="a@example.org", hostname=HOSTNAME)
        self.assertLess(time.process_time() - started, 1.0)

    def test_rejects_multiline_sender(self):
        """A sender with CR or LF could inject headers: refused."""
        with self.assertRaises(ValueError):
            prepare_message(MESSAGE, sender="a@b\r\nBcc: x@y", hostname=HOSTNAME)


class InboundHandlerTests(SynchronousTestCase):
    def setUp(self):
        self.registry = FakeRegistry("mylist@example.com")
        self.spool = FakeSpool()
        self.clock = task.Clock()
        self.clock.advance(1700000000)
        self.handler = InboundHandler(
            self.registry, self.spool, hostname=HOSTNAME, clock=self.clock
        )

    def test_provides_interface(self):
        """InboundHandler honours IInboundHandler."""
        self.assertTrue(verifyObject(IInboundHandler, self.handler))

    def test_known_recipients(self):
        """Posting and sub-addresses resolve to the registry's Destination."""
        self.assertEqual(
            self.handler.validate_recipient("a@example.org", "MyList@Example.com"),
            destination("mylist@example.com"),
        )
        self.assertEqual(
            self.handler.validate_recipient("", "mylist-request@example.com"),
            destination("mylist-request@example.com", subaddress="request"),
        )

    def test_unknown_recipient_is_550(self):
        """An address the registry does not know is refused 550 5.1.1."""
        with self.assertRaises(RecipientRejected) as caught:
            self.handler.validate_recipient("a@example.org", "other@example.com")
        self.assertEqual(caught.exception.reply, MAILBOX_UNAVAILABLE)

    def test_registry_unavailable_is_451(self):
        """While the registry cannot be read the recipient gets 451 4.3.0, never 5xx."""
        self.registry.error = RegistryUnavailable("database is locked")
        with self.assertRaises(RecipientRejected) as caught:
            self.handler.validate_recipient("a@example.org", "mylist@example.com")
        self.assertEqual(caught.exception.reply, ERROR_IN_PROCESSING)

    def test_deliver_spools_once_for_all_recipients(self):
        """One enqueue carries every accepted recipient in RCPT order (duplicates
        too), the sender, peer, time and Message-ID; each gets 250 with its entry id."""
        recipients = [
            destination("mylist@example.com"),
            destination("mylist-owner@example.com", subaddress="owner"),
            destination("mylist@example.com"),
        ]
        replies = self.successResultOf(
            self.handler.deliver(make_transaction(recipients=recipients))
        )
        self.assertEqual(
            replies,
            [
                Reply(250, "2.0.0", "<mylist@example.com> Ok: queued as 1"),
                Reply(250, "2.0.0", "<mylist-owner@example.com> Ok: queued as 2"),
                Reply(250, "2.0.0", "<mylist@example.com> Ok: queued as 3"),
            ],
        )
        ((envelope, data),) = self.spool.stored
        self.assertEqual(envelope.destinations, tuple(recipients))
        self.assertEqual(envelope.sender, "anne.person@example.com")
        self.assertEqual(envelope.received_at, 1700000000)
        self.assertEqual(envelope.peer, "192.0.2.7")
        self.assertEqual(envelope.message_id, "<badger@example.com>")
        self.assertEqual(data, b"X-MailFrom: anne.person@example.com\r\n" + MESSAGE)

    def test_success_only_after_spool_fires(self):
        """No reply before the spool's Deferred fires (250 means on stable storage)."""
        self.spool.hold = True
        d = self.handler.deliver(make_transaction())
        self.assertNoResult(d)
        pending, ids = self.spool.pending[0]
        pending.callback(ids)
        self.assertEqual(self.successResultOf(d)[0].code, 250)

    def test_spool_failure_is_451_per_recipient(self):
        """A spool failure gets every recipient 451 4.3.0."""
        self.spool.error = SpoolError("database is locked")
        replies = self.successResultOf(
            self.handler.deliver(
                make_transaction(recipients=[destination("mylist@example.com")] * 2)
            )
        )
        self.assertEqual(replies, [ERROR_IN_PROCESSING] * 2)

    def test_disk_full_is_452_per_recipient(self):
        """A full disk gets every recipient 452 4.3.1."""
        self.spool.error = SpoolError("disk full", disk_full=True)
        replies = self.successResultOf(
            self.handler.deliver(
                make_transaction(recipients=[destination("mylist@example.com")] * 2)
            )
        )
        self.assertEqual(replies, [INSUFFICIENT_STORAGE] * 2)

    def test_unexpected_spool_error_is_451_and_logged(self):
        """A spool raising something outside its contract is a bug: 451 each, logged."""
        self.spool.error = KeyError("bug")
        replies = self.successResultOf(self.handler.deliver(make_transaction()))
        self.assertEqual(replies, [ERROR_IN_PROCESSING])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_defects_are_501_per_recipient(self):
        """A defective message gets 501 5.6.0 for each recipient and is not spooled."""
        replies = self.successResultOf(
            self.handler.deliver(
                make_transaction(
                    message=b"Subject: x\r\nnot a header\r\n\r\nbody\r\n",
                    recipients=[destination("mylist@example.com")] * 2,
                )
            )
        )
        self.assertEqual(replies, [Reply(501, "5.6.0", "Message has defects")] * 2)
        self.assertEqual(self.spool.stored, [])

    def test_log_fields(self):
        """An accepted message is logged once per transaction with sender,
        recipients, entry ids, message_id and code, and the body never appears
        in the log."""
        with capturedLogs() as events:
            self.successResultOf(self.handler.deliver(make_transaction()))
        (event,) = [e for e in events if e.get("code") == 250]
        self.assertEqual(event["sender"], "anne.person@example.com")
        self.assertEqual(event["event"], "accepted")
        self.assertEqual(event["recipients"], ["mylist@example.com"])
        self.assertEqual((event["lists"], event["count"]), (["mylist@example.com"], 1))
        self.assertEqual(event["entry_ids"], [1])
        self.assertEqual(event["message_id"], "<badger@example.com>")
        self.assertFalse(any("interesting message" in repr(e) for e in events))

    def test_log_accepted_false(self):
        """With log_accepted=False the store logs what it did; the handler does not."""
        handler = InboundHandler(
            self.registry,
            self.spool,
            hostname="lists.example.com",
            clock=self.clock,
            log_accepted=False,
        )
        with capturedLogs() as events:
            self.successResultOf(handler.deliver(make_transaction()))
        self.assertEqual([e for e in events if e.get("code") == 250], [])
        self.assertEqual(len(self.spool.stored), 1)

    def test_rejects_bad_hostname(self):
        """The Message-ID host name must be a non-empty str."""
        with self.assertRaises(ValueError):
            InboundHandler(self.registry, self.spool, hostname=b"x", clock=self.clock)

    def test_on_stored_called_once_after_the_spool_fires(self):
        """on_stored runs once per stored message, only after the spool's Deferred
        fired (so the runner finds the entries), and not when storing failed."""
        calls = []
        handler = InboundHandler(
            self.registry,
            self.spool,
            hostname=HOSTNAME,
            clock=self.clock,
            on_stored=lambda: calls.append(len(self.spool.pending)),
        )
        self.spool.hold = True
        d = handler.deliver(make_transaction(recipients=[destination("mylist@example.com")] * 2))
        self.assertEqual(calls, [])
        pending, ids = self.spool.pending.pop()
        pending.callback(ids)
        self.successResultOf(d)
        self.assertEqual(calls, [0])
        self.spool.hold = False
        self.spool.error = SpoolError("database is locked")
        self.successResultOf(handler.deliver(make_transaction()))
        self.assertEqual(calls, [0])

    def test_on_stored_failure_still_acknowledges(self):
        """A failing on_stored hook is logged as a bug but the stored message still gets 250."""

        def broken():
            raise RuntimeError("bug in hook")

        handler = InboundHandler(
            self.registry, self.spool, hostname=HOSTNAME, clock=self.clock, on_stored=broken
        )
        replies = self.successResultOf(handler.deliver(make_transaction()))
        self.assertEqual([r.code for r in replies], [250])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_on_stored_must_be_callable(self):
        """A non-callable on_stored is refused at construction."""
        with self.assertRaises(TypeError):
            InboundHandler(
                self.registry, self.spool, hostname=HOSTNAME, clock=self.clock, on_stored="wake"
            )


class SeedScenarioTests(SynchronousTestCase):
    """The scenarios of Mailman's LMTP runner document, through the wire and the
    real policy, with mailrelay.testing.lmtp's client over an in-memory connection."""

    def setUp(self):
        self.registry = FakeRegistry()
        self.spool = FakeSpool()
        handler = InboundHandler(self.registry, self.spool, hostname=HOSTNAME, clock=task.Clock())
        factory = LMTPFactory(
            handler, hostname=b"lmtp.example.com", max_message_size=1 << 20, clock=task.Clock()
        )
        server = factory.buildProtocol(None)
        protocol = LMTPClientProtocol()
        self.pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)),
            protocol,
            iosim.FakeTransport(protocol, False),
        )
        greeting = self.settle(protocol.read_reply())
        self.assertEqual(greeting, (220, "lmtp.example.com LMTP server ready"))
        self.client = LMTPClient(protocol, greeting)
        code, text = self.settle(self.client.lhlo("remote.example.org"))
        self.assertEqual(code, 250)
        self.assertIn("PIPELINING", self.client.extensions)

    def settle(self, d):
        self.pump.flush()
        return self.successResultOf(d)

    def send(self, to, message_id):
        message = (
            f"From: anne.person@example.com\nTo: {to}\nSubject: Help\n"
            f"Message-ID: <{message_id}>\n\nPlease help me.\n"
        )
        return self.settle(self.client.sendmail("anne.person@example.com", [to], message))

    def test_posting_address(self):
        """A nonexistent list gets 550; once the list exists its posting address is accepted."""
        self.assertEqual(
            self.send("mylist@example.com", "aardvark"),
            [RecipientReply("mylist@example.com", 550, UNAVAILABLE_TEXT)],
        )
        self.registry.create_list("mylist@example.com")
        self.assertEqual(
            self.send("mylist@example.com", "badger"),
            [
                RecipientReply(
                    "mylist@example.com", 250, "2.0.0 <mylist@example.com> Ok: queued as 1"
                )
            ],
        )
        ((envelope, data),) = self.spool.stored
        self.assertEqual(envelope.message_id, "<badger>")
        self.assertIn(b"\r\nSubject: Help\r\n", data)

    def test_sub_addresses(self):
        """An invalid sub-address (-bogus) is refused, a valid one (-request) accepted."""
        self.registry.create_list("mylist@example.com")
        self.assertEqual(
            self.send("mylist-bogus@example.com", "cow"),
            [RecipientReply("mylist-bogus@example.com", 550, UNAVAILABLE_TEXT)],
        )
        (reply,) = self.send("mylist-request@example.com", "dog")
        self.assertEqual(reply.code, 250)
        self.assertEqual(self.spool.stored[0][0].destinations[0].subaddress, "request")

    def test_per_recipient_mixed(self):
        """Mixed RCPT outcomes: refused ones keep their RCPT reply, the accepted
        (a duplicate included) each get their own reply after DATA."""
        self.registry.create_list("mylist@example.com")
        results = self.settle(
            self.client.sendmail(
                "",
                [
                    "mylist@example.com",
                    "nolist@example.com",
                    "mylist-join@example.com",
                    "mylist@example.com",
                ],
                MESSAGE,
            )
        )
        self.assertEqual(
            [(r.recipient, r.code) for r in results],
            [
                ("mylist@example.com", 250),
                ("nolist@example.com", 550),
                ("mylist-join@example.com", 250),
                ("mylist@example.com", 250),
            ],
        )
        self.assertTrue(self.spool.stored[0][1].startswith(b"X-MailFrom: <>\r\n"))

    def test_registry_unavailable(self):
        """While the registry is unavailable RCPT gets 451 4.3.0 and nothing is sent."""
        self.registry.error = RegistryUnavailable("locked")
        self.assertEqual(
            self.send("mylist@example.com", "eel"),
            [RecipientReply("mylist@example.com", 451, PROCESSING_TEXT)],
        )

    def test_defects_one_reply_each(self):
        """A defective message gets 501 5.6.0 once per recipient (Mailman sends one in all)."""
        self.registry.create_list("mylist@example.com")
        results = self.settle(
            self.client.sendmail(
                "a@example.org",
                ["mylist@example.com", "mylist@example.com"],
                b"Subject: x\r\nnot a header\r\n\r\nbody\r\n",
            )
        )
        self.assertEqual(
            [(r.code, r.text) for r in results], [(501, "5.6.0 Message has defects")] * 2
        )

    def test_spool_failures(self):
        """Spool failure: 451 4.3.0 for each recipient; disk full: 452 4.3.1 for each."""
        self.registry.create_list("mylist@example.com")
        for error, expected in [
            (SpoolError("locked"), (451, PROCESSING_TEXT)),
            (
                SpoolError("full", disk_full=True),
                (452, "4.3.1 Requested action not taken: insufficient system storage"),
            ),
        ]:
            self.spool.error = error
            results = self.settle(
                self.client.sendmail(
                    "a@example.org", ["mylist@example.com", "mylist-owner@example.com"], MESSAGE
                )
            )
            self.assertEqual([(r.code, r.text) for r in results], [expected] * 2)

    def test_quit(self):
        """QUIT is answered 221 and the connection closes."""
        self.assertEqual(self.settle(self.client.quit()).code, 221)


class ClientEncodingTests(SynchronousTestCase):
    def test_encode_message(self):
        """The client sends CRLF lines, dot-stuffed, whatever the input line ends."""
        self.assertEqual(encode_message(b".a\nb\r\n..c"), b"..a\r\nb\r\n...c\r\n")
        self.assertEqual(encode_message("x\n"), b"x\r\n")
        self.assertEqual(encode_message(b""), b"")
        with self.assertRaises(TypeError):
            encode_message(42)


class LoopbackTests(TestCase):
    """The server and the test client over a real TCP socket on 127.0.0.1."""

    async def _session(self):
        from twisted.internet import reactor

        registry = FakeRegistry("mylist@example.com")
        spool = FakeSpool()
        handler = InboundHandler(registry, spool, hostname=HOSTNAME, clock=reactor)
        factory = LMTPFactory(
            handler, hostname=b"lmtp.example.com", max_message_size=1 << 20, clock=reactor
        )
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = await connect_lmtp(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        await client.lhlo("remote.example.org")
        results = await client.sendmail(
            "anne.person@example.com",
            ["mylist@example.com", "bogus@example.com", "mylist-request@example.com"],
            MESSAGE.replace(b"\r\n\r\n", b"\r\n\r\n.leading dot\r\n"),
        )
        quit_reply = await client.quit()
        return results, quit_reply, spool

    async def test_over_tcp(self):
        """A pipelined session over TCP: per-recipient results, stored message, clean close."""
        results, quit_reply, spool = await self._session()
        self.assertEqual([r.code for r in results], [250, 550, 250])
        self.assertEqual(quit_reply.code, 221)
        ((envelope, data),) = spool.stored
        self.assertEqual(
            [d.address for d in envelope.destinations],
            ["mylist@example.com", "mylist-request@example.com"],
        )
        self.assertIn(b"\r\n\r\n.leading dot\r\n", data)
        self.assertTrue(re.match(rb"X-MailFrom: anne.person@example.com\r\nFrom: ", data))
