"""OpenSMTPD as mailrelay's LMTP client, end to end.

A private OpenSMTPD (:mod:`tests.mta_opensmtpd`) accepts a post over SMTP and
hands it to a real ``twistd mailrelay`` with its ``lmtp`` action, over TCP or
a unix socket; mailrelay's copies go to a :class:`~mailrelay.testing.FakeMTA`
as smarthost (the members' server), and OpenSMTPD relays what it sends back to
the poster (its bounces) to a second one (the poster's server):

    poster --SMTP--> OpenSMTPD --LMTP--> mailrelay --SMTP--> members' FakeMTA
                     OpenSMTPD --SMTP (bounce)--> poster's FakeMTA

Each check is per Message-ID and per recipient.  Skipped locally without the
unpacked OpenSMTPD or root; never under ``MAILRELAY_REQUIRE_PEERS=1``.
"""

from __future__ import annotations

import email
import email.message
import os
import shutil

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.mta import Connection
from mailrelay.testing import FakeMTA
from tests.daemon import RelayProcess, delivered_copies, poll, wait_for_copies
from tests.mta_opensmtpd import PrivateOpenSMTPD, require_opensmtpd
from tests.support import as_deferred, fill_file_system, free_port, mount_tmpfs, temp_dir

LIST = "test@lists.test"
MEMBERS = ["bart@members.test", "cate@members.test"]
POSTER = "anne@elsewhere.test"
# Larger than the 4 MB SQLite's WAL grows to (see test_reliability_diskfull).
RESERVE = 6 * 2**20

SMTPD_CONF = """\
# Every address of the lists' domain goes to mailrelay, which refuses those
# that are no list over LMTP; rcpt-to keeps the whole address in LMTP's RCPT TO
# (without it OpenSMTPD sends the local user), and the delivery agent runs as
# an unprivileged user.
table lists {{ "@" = "nobody" }}
listen on 127.0.0.1 port {port}
action "mailrelay" lmtp "{lmtp}" rcpt-to virtual <lists> user nobody {ttl}
action "outbound" relay host smtp://127.0.0.1:{poster_mx}
match from any for domain "lists.test" action "mailrelay"
match from any for domain "elsewhere.test" action "outbound"
"""


def _report(bounce: email.message.Message) -> dict:
    """What an OpenSMTPD bounce says: its text, the failed recipients, the returned Message-ID."""
    parts = {part.get_content_type(): part for part in bounce.get_payload()}
    status = parts["message/delivery-status"].get_payload()
    returned = email.message_from_string(parts["text/rfc822-headers"].get_payload())
    return {
        "notification": parts["text/plain"].get_payload(),
        "recipients": [
            block["Final-Recipient"].split(";")[1].strip()
            for block in status
            if block["Final-Recipient"]
        ],
        "returned_message_id": returned["Message-ID"],
    }


def _post(message_id: str) -> str:
    return (
        f"From: {POSTER}\nTo: {LIST}\nSubject: via OpenSMTPD\nMessage-ID: {message_id}\n\n"
        "Hello through OpenSMTPD.\n"
    )


class OpenSMTPDClientTests(TestCase):
    timeout = 60

    def setUp(self):
        require_opensmtpd()

    async def chain(self, *, unix: bool, var_size: str | None = None, ttl: str = ""):
        """Start poster's MX, members' MX, mailrelay and OpenSMTPD; (smtpd, relay, mxes)."""
        tmp = temp_dir(self)
        os.chmod(tmp, 0o755)  # the LMTP client (user nobody) must reach the socket
        members_mx, poster_mx = FakeMTA(reactor), FakeMTA(reactor)
        for mx in (members_mx, poster_mx):
            await mx.start()
            self.addCleanup(mx.stop)
        relay_dir = os.path.join(tmp, "relay")
        os.mkdir(relay_dir)
        if var_size is not None:
            os.mkdir(os.path.join(relay_dir, "var"))
            mount_tmpfs(self, os.path.join(relay_dir, "var"), var_size)
        options = {"smtp_port": members_mx.port, "lmtp_hostname": "lists.test"}
        if var_size is not None:
            options["spool_reserve"] = RESERVE
        if unix:
            # The socket (mode 660) takes the group of its setgid directory: the
            # group of the user OpenSMTPD's lmtp action runs as.
            os.chmod(relay_dir, 0o2750)
            shutil.chown(relay_dir, group="nogroup")
            relay = RelayProcess(self, reactor, relay_dir, **options)
            lmtp = relay.socket
        else:
            relay = RelayProcess(self, reactor, relay_dir, tcp_port=free_port(), **options)
            lmtp = f"127.0.0.1:{relay.tcp_port}"
        relay.cli("lists", "create", LIST, "--owner", "owner@members.test")
        relay.cli("lists", "set", LIST, "posting=open")  # the poster is no member
        relay.cli("members", "add", LIST, *MEMBERS)
        await relay.start()

        port = free_port()
        conf = SMTPD_CONF.format(port=port, lmtp=lmtp, poster_mx=poster_mx.port, ttl=ttl)
        smtpd = PrivateOpenSMTPD(self, os.path.join(tmp, "opensmtpd"), port, conf)
        await smtpd.start(reactor)
        return smtpd, relay, members_mx, poster_mx

    async def send(self, smtpd, message_id: str, recipients: list[str]) -> None:
        client = Connection("127.0.0.1", smtpd.port, 0, reactor=reactor)
        self.addCleanup(client.quit)
        # OpenSMTPD takes every address of the lists' domain: the refusal comes from mailrelay.
        refused = await client.sendmail(POSTER, recipients, _post(message_id))
        self.assertEqual(dict(refused), {})

    async def mixed_recipients(self, *, unix: bool):
        smtpd, relay, members_mx, poster_mx = await self.chain(unix=unix, ttl="ttl 1s")
        message_id = "<os-mixed@elsewhere.test>"
        await self.send(smtpd, message_id, [LIST, "nolist@lists.test"])

        def details():
            return f"relay log:\n{relay.log()}\nsmtpd log:\n{smtpd.log()}"

        wanted = {(message_id, member) for member in MEMBERS}
        await wait_for_copies(reactor, wanted, members_mx, what="the members' copies")

        def bounced():
            smtpd.smtpctl("schedule", "all")
            return poster_mx.messages

        await poll(reactor, bounced, "OpenSMTPD's bounce", details=details, interval=0.2)
        # Once each, and only to the members.
        self.assertEqual(delivered_copies(members_mx), dict.fromkeys(wanted, 1))
        self.assertEqual(members_mx.transactions[0].mail_from, "test-bounces@lists.test")

        (transaction,) = poster_mx.transactions
        self.assertEqual((transaction.mail_from, transaction.rcpts), ("", (POSTER,)))
        report = _report(poster_mx.messages[0])
        self.assertEqual(report["recipients"], ["nolist@lists.test"])
        self.assertEqual(report["returned_message_id"], message_id)
        # Debian 12's OpenSMTPD (6.8) takes any LMTP error for a temporary one
        # (its mail.lmtp exits 1): the 550 is retried until the action's ttl,
        # then bounced as expired.  A later OpenSMTPD that bounces it at once
        # fails here; docs/mtas.rst ("OpenSMTPD") says which applies.
        self.assertIn("Envelope expired", report["notification"])
        self.assertRegex(
            smtpd.log(),
            r"to=<nolist@lists\.test> .*result=TempFail .*550 5\.1\.1",
        )
        await poll(reactor, lambda: not smtpd.envelopes(), "an empty OpenSMTPD queue")

    def test_lmtp_over_tcp_mixed_recipients(self):
        """Over TCP (``lmtp "127.0.0.1:PORT"``): the list recipient of a post is delivered
        to each member once; the unknown address in the same message, refused by mailrelay
        with 550 5.1.1, is reported to the poster by OpenSMTPD for that address alone (as
        expired once the action's ttl passes: OpenSMTPD 6.8 retries an LMTP 5xx), and
        OpenSMTPD's queue is left empty."""
        return as_deferred(self.mixed_recipients(unix=False))

    def test_lmtp_over_unix_socket_mixed_recipients(self):
        """Over a unix socket (``lmtp "/path/lmtp.sock"``, mailrelay on a ``unix:``
        endpoint): the same per-recipient results as over TCP."""
        return as_deferred(self.mixed_recipients(unix=True))

    def test_disk_full_is_deferred_and_retried(self):
        """While mailrelay's spool file system is full it answers 452 4.3.1; OpenSMTPD
        keeps the message queued (no bounce) and, once space is freed and the queue is
        run (``smtpctl schedule all``), delivers it: each member gets one copy."""

        async def go():
            smtpd, relay, members_mx, poster_mx = await self.chain(unix=False, var_size="24m")
            filler = fill_file_system(os.path.join(relay.tmp, "var"))
            message_id = "<os-full@elsewhere.test>"
            await self.send(smtpd, message_id, [LIST])

            def deferred():
                return any("452 4.3.1" in line for line in smtpd.envelopes())

            await poll(
                reactor,
                deferred,
                "a 452 in OpenSMTPD's queue",
                details=lambda: f"{smtpd.envelopes()}\n{smtpd.log()}\n{relay.log()}",
            )
            self.assertEqual(members_mx.messages, [])
            self.assertEqual(poster_mx.messages, [])

            os.unlink(filler)
            smtpd.smtpctl("schedule", "all")
            wanted = {(message_id, member) for member in MEMBERS}
            await wait_for_copies(
                reactor, wanted, members_mx, what="delivery after the retry", details=relay.log
            )
            self.assertEqual(delivered_copies(members_mx), dict.fromkeys(wanted, 1))
            await poll(reactor, lambda: not smtpd.envelopes(), "an empty OpenSMTPD queue")
            self.assertEqual(poster_mx.messages, [])

        return as_deferred(go())
