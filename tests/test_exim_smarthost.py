"""A real Exim as mailrelay's smarthost: STARTTLS, AUTH, and the DSN it writes.

    test --LMTP--> mailrelay (twistd) --SMTP, STARTTLS, AUTH PLAIN--> Exim --SMTP--> FakeMTA
    Exim's DSN to test-bounces@lists.test --LMTP (smtp transport, protocol = lmtp)--> mailrelay

Exim presents a certificate from :class:`~mailrelay.testing.tls.ThrowawayCA`;
mailrelay verifies it (the default) against that CA.  Exim offers AUTH (PLAIN
and LOGIN, a fixed test user) only over TLS and relays only for authenticated
clients.  One member's address is refused by an Exim router (``:fail:``), so
Exim accepts that copy and bounces it later, to the list's ``-bounces``
address, the way a smarthost does.  Skipped locally without Exim or root
(:mod:`tests.mta_exim`); failed in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import connect_lmtp
from mailrelay.testing.tls import ThrowawayCA
from tests.daemon import RelayProcess, delivered_copies, poll
from tests.mta_exim import PrivateExim, require_exim
from tests.support import as_deferred, free_port, temp_dir

LIST = "test@lists.test"
MEMBERS = ["bart@members.test", "cate@members.test"]
REFUSED = "bart@members.test"
USER, PASSWORD = "lists", "s3cret-for-tests"

SMARTHOST = """
tls_advertise_hosts = *
tls_certificate = {tmp}/tls/server.pem
tls_privatekey = {tmp}/tls/server.pem
# AUTH only inside TLS: the password never crosses the wire in clear.
auth_advertise_hosts = ${if def:tls_in_cipher {*}{}}
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  accept authenticated = *
  deny   message = 5.7.1 Relaying requires authentication

begin routers

# DSNs (and any mail) for the list domain go back to mailrelay over LMTP.
mailrelay:
  driver = accept
  domains = +mailrelay_domains
  transport = mailrelay_lmtp

# The member whose address "does not exist": Exim accepts the copy, then bounces it.
unknown_member:
  driver = redirect
  domains = members.test
  local_parts = bart
  allow_fail
  data = :fail: no mailbox here by that name

members:
  driver = manualroute
  domains = ! +mailrelay_domains
  route_list = * 127.0.0.1 byname
  self = send
  transport = members_smtp

begin transports

mailrelay_lmtp:
  driver = smtp
  protocol = lmtp
  hosts = 127.0.0.1
  port = {lmtp_port}
  allow_localhost

members_smtp:
  driver = smtp
  port = {members_port}
  allow_localhost

begin authenticators

plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and {{eq{$auth2}{{user}}}{eq{$auth3}{{password}}}}}
  server_set_id = $auth2

login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = <| Username: | Password:
  server_condition = ${if and {{eq{$auth1}{{user}}}{eq{$auth2}{{password}}}}}
  server_set_id = $auth1
"""


def _post(message_id: str) -> bytes:
    return (
        f"From: anne@elsewhere.test\r\nTo: {LIST}\r\nSubject: via exim {message_id}\r\n"
        f"Message-ID: {message_id}\r\n\r\nHello through Exim.\r\n"
    ).encode()


def mailrelay(relay, *argv: str) -> str:
    """Run ``mailrelay -C CONFIG argv...`` as the operator does, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "mailrelay.cli", "-C", relay.config, *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"mailrelay {' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


class EximSmarthostTests(TestCase):
    timeout = 60

    def setUp(self):
        require_exim()

    async def chain(self, password: str = PASSWORD):
        """mailrelay delivering through Exim (STARTTLS, AUTH) to a FakeMTA for the members."""
        tmp = temp_dir(self)
        members_mx = FakeMTA(reactor)
        await members_mx.start()
        self.addCleanup(members_mx.stop)
        ca = ThrowawayCA()
        os.mkdir(os.path.join(tmp, "tls"))
        ca.write_server_cert(os.path.join(tmp, "tls"))
        ca_file = ca.write_ca_file(tmp)
        exim_port, lmtp_port = free_port(), free_port()
        exim = PrivateExim(
            self,
            reactor,
            tmp,
            SMARTHOST.replace("{lmtp_port}", str(lmtp_port))
            .replace("{members_port}", str(members_mx.port))
            .replace("{user}", USER)
            .replace("{password}", PASSWORD),
        )
        pass_file = os.path.join(tmp, "smtp-password")
        relay = RelayProcess(
            self,
            reactor,
            tmp,
            tcp_port=lmtp_port,
            lmtp_hostname="lists.test",
            smtp_port=exim_port,
            smtp_secure_mode="starttls",
            smtp_ca_file=ca_file,
            smtp_user=USER,
            smtp_pass_file=pass_file,
            retry_min_backoff="1s",
            retry_max_backoff="2s",
        )
        self.write_password(pass_file, password)
        relay.cli("lists", "create", LIST, "--owner", "owner@members.test")
        relay.cli("lists", "set", LIST, "posting=open")  # the poster is no member
        relay.cli("members", "add", LIST, *MEMBERS)
        await exim.start_daemon(exim_port)
        await relay.start()
        return relay, exim, members_mx, pass_file

    @staticmethod
    def write_password(path: str, password: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")

    async def post(self, relay, message_id: str) -> None:
        client = await connect_lmtp(relay.endpoint())
        await client.lhlo("mx.elsewhere.test")
        (reply,) = await client.sendmail("anne@elsewhere.test", [LIST], _post(message_id))
        await client.quit()
        self.assertEqual(reply.code, 250, reply)

    def test_members_reached_through_exim_with_starttls_and_auth(self):
        """mailrelay's copies reach the members through Exim after STARTTLS (Exim's
        certificate verified against the test CA) and AUTH PLAIN as the test user: Exim
        logs the TLS cipher and the authenticated id for the message, and each reachable
        member gets one copy with its Message-ID, sent by the list's -bounces address."""

        async def go():
            relay, exim, members_mx, _ = await self.chain()
            message_id = "<exim-smarthost@elsewhere.test>"
            await self.post(relay, message_id)
            wanted = (message_id, "cate@members.test")
            await poll(
                reactor,
                lambda: wanted in delivered_copies(members_mx),
                "cate's copy through Exim",
                20,
                details=lambda: exim.log() + relay.log(),
            )
            self.assertEqual(delivered_copies(members_mx)[wanted], 1)
            (transaction,) = members_mx.transactions
            self.assertEqual(transaction.mail_from, "test-bounces@lists.test")
            self.assertEqual(members_mx.messages[0]["Message-ID"], message_id)
            received = [
                line for line in exim.log("main").splitlines() if " <= test-bounces@" in line
            ]
            self.assertEqual(len(received), 1, exim.log())
            self.assertIn(f"A=plain:{USER}", received[0])
            self.assertIn(" X=TLS", received[0])
            self.assertIn(f"id={message_id[1:-1]}", received[0])

        return as_deferred(go())

    def test_wrong_password_pauses_delivery_and_bounces_nothing(self):
        """Exim refuses mailrelay's password (535): delivery pauses (`mailrelay queue`
        says so), the members' entries wait, none fails, no member's bounce score moves
        and nobody gets a DSN; once the relay restarts with the right password, the post
        reaches the member Exim can deliver to."""

        async def go():
            relay, exim, members_mx, pass_file = await self.chain(password="wrong")
            message_id = "<exim-wrongpass@elsewhere.test>"
            await self.post(relay, message_id)

            def queue() -> str:
                return mailrelay(relay, "queue")

            await poll(
                reactor,
                lambda: "DELIVERY PAUSED" in queue(),
                "mailrelay queue to show the pause",
                20,
                details=lambda: queue() + exim.log() + relay.log(),
            )
            self.assertIn("535", exim.log("main") + relay.log())
            shown = queue()
            self.assertIn("failed: 0", shown)
            self.assertNotIn("anne@elsewhere.test", shown)  # no DSN to the poster queued
            # Each member's copy is listed (not done) and waits: queued or retry.
            waiting = {
                cells[4]: cells[1]
                for cells in (line.split() for line in shown.splitlines())
                if len(cells) > 4 and cells[4] in MEMBERS
            }
            self.assertEqual(set(waiting), set(MEMBERS), shown)
            self.assertLessEqual(set(waiting.values()), {"queued", "retry", "inflight"}, shown)
            self.assertEqual(members_mx.transactions, [])
            self.assertEqual(await exim.queued(), [])  # Exim accepted nothing to bounce
            show = mailrelay(relay, "members", "show", LIST, "cate@members.test")
            self.assertRegex(show, r"bounce score:\s+0 ")

            # The operator's fix: stop, correct the password, make the waiting copies due
            # now (a running relay would find them within its 30 s spool poll), start.
            await relay.terminate(10)
            self.write_password(pass_file, PASSWORD)
            mailrelay(relay, "queue", "retry", "--all")
            await relay.start()
            wanted = {(message_id, "cate@members.test")}
            await poll(
                reactor,
                lambda: wanted <= delivered_copies(members_mx).keys(),
                "delivery once the password is right",
                20,
                details=lambda: queue() + exim.log() + relay.log(),
            )
            self.assertEqual(dict(delivered_copies(members_mx)), dict.fromkeys(wanted, 1))

        return as_deferred(go())

    def test_exim_dsn_scores_the_member(self):
        """Exim accepts the copy for a member whose address it cannot deliver (a :fail:
        router), writes an RFC 3464 DSN to the list's -bounces address and delivers it to
        mailrelay over LMTP; mailrelay reads it as a permanent failure for that member,
        whose bounce score becomes 1 (`mailrelay members show`), and the other member is
        untouched."""

        async def go():
            relay, exim, members_mx, _ = await self.chain()
            message_id = "<exim-dsn@elsewhere.test>"
            await self.post(relay, message_id)

            def score(member: str) -> str:
                return mailrelay(relay, "members", "show", LIST, member)

            def scored() -> bool:
                # Exim logs the DSN's delivery once mailrelay's 250 is read: a moment
                # after mailrelay may have scored it.
                return re.search(r"bounce score:\s+1 ", score(REFUSED)) is not None and (
                    "=> test-bounces@lists.test" in exim.log("main")
                )

            await poll(
                reactor,
                scored,
                "the DSN to raise bart's bounce score",
                20,
                details=lambda: score(REFUSED) + exim.log() + relay.log(),
            )
            self.assertRegex(score("cate@members.test"), r"bounce score:\s+0 ")
            log = exim.log("main")
            self.assertIn(f"** {REFUSED}", log)
            self.assertIn("no mailbox here by that name", log)
            # The DSN: from <>, to the list's -bounces address, delivered to mailrelay.
            self.assertRegex(log, r"<= <> R=\S+ U=\S+ P=local .*for test-bounces@lists.test")
            self.assertRegex(log, r"=> test-bounces@lists.test R=mailrelay T=mailrelay_lmtp")
            # Read as an RFC 3464 report, not by the heuristic detectors.
            self.assertIn(f"Bounce of {REFUSED} on {LIST} (dsn): counted", relay.log(20000))
            self.assertEqual(
                {r for t in members_mx.transactions for r in t.rcpts}, {"cate@members.test"}
            )

        return as_deferred(go())
