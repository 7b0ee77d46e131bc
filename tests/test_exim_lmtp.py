"""A real Exim as mailrelay's LMTP client, over TCP and over a unix socket.

    sender --exim -odi--> Exim --LMTP (smtp transport, protocol = lmtp; or the lmtp
        transport's socket)--> mailrelay (twistd) --SMTP--> FakeMTA (members, poster)

Exim routes the list domain to mailrelay and everything else to a recording
FakeMTA, which stands for the members' and the poster's mail servers: it gets
mailrelay's copies for the members and Exim's bounce for the poster.  Exim
runs from the prefix ``scripts/test`` unpacks it into (see
:mod:`tests.mta_exim`); skipped locally without it or root, failed in CI.
"""

from __future__ import annotations

import email
import os
import re
import shutil
from email import policy

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.testing import FakeMTA
from tests.daemon import RelayProcess, delivered_copies, poll
from tests.mta_exim import EXIM_USER, PrivateExim, require_exim
from tests.support import as_deferred, fill_file_system, free_port, mount_tmpfs, temp_dir

LIST = "test@lists.test"
MEMBERS = ["bart@members.test", "cate@members.test"]
POSTER = "anne@elsewhere.test"
# Exim's log line for the list address delivered (the lmtp transport logs "test <...>").
DELIVERED = rf"=> (test <)?{re.escape(LIST)}>? R=mailrelay T=mailrelay_lmtp_\w+ .*C=\"250 2\.0\.0"

ROUTES = """
begin routers

# Mail for the list domains goes to mailrelay over LMTP.
mailrelay:
  driver = accept
  domains = +mailrelay_domains
  transport = {transport}

# Everything else (members, the poster's bounces) to the recording FakeMTA.
elsewhere:
  driver = manualroute
  domains = ! +mailrelay_domains
  route_list = * 127.0.0.1 byname
  self = send
  transport = sink

begin transports

mailrelay_lmtp_tcp:
  driver = smtp
  protocol = lmtp
  hosts = 127.0.0.1
  port = {lmtp_port}
  allow_localhost

mailrelay_lmtp_socket:
  driver = lmtp
  socket = {socket}
  # One LMTP transaction for all of a message's list recipients.
  batch_max = 100
  user = {user}

sink:
  driver = smtp
  port = {sink_port}
  allow_localhost
"""


def _post(message_id: str, subject: str, padding: int = 0) -> bytes:
    body = b"Hello through Exim.\n" + (b"x" * 76 + b"\n") * (padding // 77)
    return (
        f"From: {POSTER}\nTo: {LIST}\nSubject: {subject}\nMessage-ID: {message_id}\n\n"
    ).encode() + body


class EximLMTPClientTests(TestCase):
    timeout = 60

    def setUp(self):
        require_exim()

    async def chain(self, transport: str, *, var_tmpfs: str | None = None):
        """A relay, a FakeMTA for everyone else, and an Exim routing the list domain to the
        relay over ``transport`` ("tcp" or "socket")."""
        tmp = temp_dir(self)
        os.chmod(tmp, 0o755)
        sink = FakeMTA(reactor)
        await sink.start()
        self.addCleanup(sink.stop)
        lmtp_port = free_port()
        # Where an operator would make /run/mailrelay: setgid and of Exim's group, so
        # that the socket mailrelay makes there (mode=660) is Exim's to connect to.
        run_dir = os.path.join(tmp, "run")
        os.mkdir(run_dir)
        shutil.chown(run_dir, "root", EXIM_USER)
        os.chmod(run_dir, 0o2750)
        socket_path = os.path.join(run_dir, "lmtp.sock")
        if var_tmpfs is not None:
            os.mkdir(os.path.join(tmp, "var"))
            mount_tmpfs(self, os.path.join(tmp, "var"), var_tmpfs)
        relay_options = {"smtp_port": sink.port, "lmtp_hostname": "lists.test"}
        if var_tmpfs is not None:
            # No space reserve: SQLite's own disk-full error is the 452.
            relay_options["spool_reserve"] = 0
        if transport == "tcp":
            relay = RelayProcess(self, reactor, tmp, tcp_port=lmtp_port, **relay_options)
        else:
            relay = RelayProcess(
                self, reactor, tmp, lmtp_endpoint=f"unix:{socket_path}:mode=660", **relay_options
            )
            relay.socket = socket_path
        relay.cli("lists", "create", LIST, "--owner", "owner@members.test")
        relay.cli("lists", "set", LIST, "posting=open")  # the poster is no member
        relay.cli("members", "add", LIST, *MEMBERS)
        await relay.start()
        exim = PrivateExim(
            self,
            reactor,
            tmp,
            ROUTES.format(
                transport=f"mailrelay_lmtp_{transport}",
                lmtp_port=lmtp_port,
                socket=socket_path,
                user=EXIM_USER,
                sink_port=sink.port,
            ),
        )
        return relay, sink, exim

    async def mixed_recipients(self, transport: str):
        relay, sink, exim = await self.chain(transport)
        message_id = f"<exim-{transport}@elsewhere.test>"
        await exim.submit(
            POSTER,
            [LIST, "nolist@lists.test", "test-nosuch@lists.test"],
            _post(message_id, f"mixed over {transport}"),
        )

        def arrived():
            copies = delivered_copies(sink)
            return {(message_id, m) for m in MEMBERS} <= copies.keys() and any(
                t.mail_from == "" for t in sink.transactions
            )

        await poll(reactor, arrived, "the members' copies and Exim's bounce", 20, details=exim.log)
        copies = delivered_copies(sink)
        self.assertEqual(copies[(message_id, MEMBERS[0])], 1)
        self.assertEqual(copies[(message_id, MEMBERS[1])], 1)
        member_copy = next(
            m for t, m in zip(sink.transactions, sink.messages, strict=True) if t.mail_from
        )
        self.assertEqual(member_copy["List-Id"], "<test.lists.test>")

        # Exim's bounce, to the poster, names the two unknown addresses and only them.
        (bounce,) = [
            (t, m)
            for t, m in zip(sink.transactions, sink.raw_messages, strict=True)
            if t.mail_from == ""
        ]
        self.assertEqual(bounce[0].rcpts, (POSTER,))
        report = email.message_from_bytes(bounce[1], policy=policy.default)
        failed = {
            part.get("Final-Recipient", "").split(";")[-1].strip()
            for status in report.walk()
            if status.get_content_type() == "message/delivery-status"
            for part in status.get_payload()[1:]  # after the per-message fields
        }
        self.assertEqual(failed, {"nolist@lists.test", "test-nosuch@lists.test"})
        self.assertIn(message_id, bounce[1].decode("utf-8", "replace"))
        log = exim.log("main")
        self.assertIn("** nolist@lists.test", log)
        self.assertIn("550 5.1.1", log)
        self.assertRegex(log, DELIVERED)
        self.assertIn(f"T=mailrelay_lmtp_{transport}", log)
        self.assertEqual(await exim.queued(), [])

    def test_tcp_mixed_recipients(self):
        """Over TCP (smtp transport, protocol = lmtp), Exim delivers a message for the list
        and two unknown list-domain addresses: each member gets one copy with that
        Message-ID, and Exim bounces exactly the two addresses mailrelay refused (550 5.1.1)
        to the poster."""
        return as_deferred(self.mixed_recipients("tcp"))

    def test_socket_mixed_recipients(self):
        """The same over a unix socket (Exim's lmtp transport, mailrelay's unix: endpoint)."""
        return as_deferred(self.mixed_recipients("socket"))

    def test_452_from_a_full_spool_is_deferred_and_retried(self):
        """While the spool's file system is full mailrelay answers 452 4.3.1 after DATA;
        Exim keeps the message queued (no bounce), and its next queue run, once space is
        freed, delivers it: one copy per member, none for the poster."""

        async def go():
            relay, sink, exim = await self.chain("tcp", var_tmpfs="2m")
            filler = fill_file_system(os.path.join(relay.tmp, "var"))
            message_id = "<exim-full@elsewhere.test>"
            # Larger than any slack SQLite's files could still have.
            await exim.submit(POSTER, [LIST], _post(message_id, "while full", 256 * 1024))
            log = exim.log("main")
            self.assertIn(f"== {LIST}", log)
            self.assertIn("452 4.3.1", log)
            self.assertEqual(len(await exim.queued()), 2, "message and recipient still queued")
            self.assertEqual(sink.transactions, [])

            os.unlink(filler)
            await exim.queue_run()
            self.assertRegex(exim.log("main"), DELIVERED)
            self.assertEqual(await exim.queued(), [])
            wanted = {(message_id, m) for m in MEMBERS}
            await poll(reactor, lambda: wanted <= delivered_copies(sink).keys(), "copies", 20)
            self.assertEqual(dict(delivered_copies(sink)), dict.fromkeys(wanted, 1))
            self.assertNotIn(POSTER, {r for t in sink.transactions for r in t.rcpts})

        return as_deferred(go())
