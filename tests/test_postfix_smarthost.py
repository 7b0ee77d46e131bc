"""Postfix as mailrelay's smarthost: STARTTLS and AUTH PLAIN checked by Dovecot.

    mailrelay (twistd) --SMTP, STARTTLS, AUTH PLAIN--> Postfix --SMTP--> members' FakeMTA
                                                          |
                                                Dovecot auth (SASL socket)

A private Postfix (:class:`tests.mta_postfix.PrivatePostfix`) requires
STARTTLS (a certificate from :class:`mailrelay.testing.ThrowawayCA`, which
mailrelay verifies with that CA) and relays only for clients that
authenticated through a private Dovecot (:class:`tests.mta_postfix.PrivateDovecot`).
Skipped locally without Postfix, Dovecot or root; never under
``MAILRELAY_REQUIRE_PEERS=1``.
"""

from __future__ import annotations

import os
import re

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.testing import FakeMTA, ThrowawayCA
from mailrelay.testing.lmtp import connect_lmtp
from tests.daemon import RelayProcess, delivered_copies, poll, wait_for_copies
from tests.mta_postfix import PrivateDovecot, PrivatePostfix, require_dovecot, require_postfix
from tests.support import as_deferred, free_port, temp_dir

LIST = "test@lists.test"
MEMBERS = ["bart@members.test", "cate@members.test"]
USER, PASSWORD = "relay@lists.test", "correct horse battery"

# Added to the base main.cf of tests/mta_postfix.py: nobody relays without
# SASL, not even from 127.0.0.1, and AUTH is offered only after STARTTLS.
SMARTHOST_MAIN_CF = """\
mynetworks =
smtpd_tls_chain_files = {conf}/server.pem
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_loglevel = 1
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {sasl_socket}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
"""


def _post(message_id: str) -> bytes:
    return (
        f"From: anne@elsewhere.test\r\nTo: {LIST}\r\nSubject: via the smarthost\r\n"
        f"Message-ID: {message_id}\r\n\r\nHello through Postfix and Dovecot.\r\n"
    ).encode()


def _rows(queue_output: str) -> list[dict[str, str]]:
    """The entry table of ``mailrelay queue``: one dict per row, keyed by column title."""
    lines = queue_output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ID  "))
    titles = re.split(r"\s{2,}", lines[start].strip())
    return [
        dict(zip(titles, re.split(r"\s{2,}", line.strip()), strict=False))
        for line in lines[start + 1 :]
        if line.strip()
    ]


class PostfixSmarthostTests(TestCase):
    timeout = 60

    def setUp(self):
        require_postfix()
        require_dovecot()

    async def chain(self, password: str, trusted: ThrowawayCA | None = None):
        """Members' MX, Dovecot, Postfix and a mailrelay daemon logging in with ``password``.

        mailrelay trusts the CA that issued Postfix's certificate, or ``trusted``.
        """
        tmp = temp_dir(self)
        os.chmod(tmp, 0o755)
        members_mx = FakeMTA(reactor)
        await members_mx.start()
        self.addCleanup(members_mx.stop)

        dovecot = PrivateDovecot(self, os.path.join(tmp, "dovecot"), {USER: PASSWORD})
        await dovecot.start(reactor)

        ca = ThrowawayCA()
        postfix_dir = os.path.join(tmp, "postfix")
        os.mkdir(postfix_dir)
        conf = os.path.join(postfix_dir, "conf")
        main_cf = SMARTHOST_MAIN_CF.format(conf=conf, sasl_socket=dovecot.socket)
        postfix = PrivatePostfix(postfix_dir, free_port(), main_cf)
        ca.write_server_cert(conf, hostnames=("postfix.test", "127.0.0.1"))
        with open(os.path.join(conf, "transport"), "w") as f:
            f.write(f"members.test smtp:[127.0.0.1]:{members_mx.port}\n")
        await postfix.start(self, reactor)

        relay_dir = os.path.join(tmp, "relay")
        os.mkdir(relay_dir)
        pass_file = os.path.join(relay_dir, "smtp-password")
        with open(os.open(pass_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(password + "\n")
        relay = RelayProcess(
            self,
            reactor,
            relay_dir,
            lmtp_hostname="lists.test",
            smtp_port=postfix.port,
            smtp_secure_mode="starttls",
            smtp_ca_file=(trusted or ca).write_ca_file(relay_dir),
            smtp_user=USER,
            smtp_pass_file=pass_file,
        )
        relay.cli("lists", "create", LIST, "--owner", "owner@members.test")
        relay.cli("lists", "set", LIST, "posting=open")  # the poster is no member
        relay.cli("members", "add", LIST, *MEMBERS)
        await relay.start()
        return relay, postfix, dovecot, members_mx

    async def post(self, relay, message_id: str) -> None:
        client = await connect_lmtp(relay.endpoint())
        await client.lhlo("mx.example.org")
        replies = await client.sendmail("anne@elsewhere.test", [LIST], _post(message_id))
        await client.quit()
        self.assertEqual([r.code for r in replies], [250])

    def test_members_reached_through_postfix(self):
        """With the right password mailrelay starts TLS (verifying Postfix's certificate
        against the test CA), logs in with AUTH PLAIN, which Postfix checks with Dovecot,
        and every member gets one copy of the post through Postfix."""

        async def go():
            relay, postfix, dovecot, members_mx = await self.chain(PASSWORD)
            message_id = "<smarthost-ok@elsewhere.test>"
            await self.post(relay, message_id)
            wanted = {(message_id, member) for member in MEMBERS}
            await wait_for_copies(
                reactor,
                wanted,
                members_mx,
                what="the members' copies through Postfix",
                details=lambda: f"{relay.log()}\n{postfix.log()}\n{dovecot.log()}",
            )
            self.assertEqual(delivered_copies(members_mx), dict.fromkeys(wanted, 1))
            log = postfix.log()
            self.assertIn("sasl_method=PLAIN, sasl_username=relay@lists.test", log)
            self.assertRegex(log, r"TLS connection established from localhost\[127\.0\.0\.1\]")
            self.assertIn("status=sent", log)

        return as_deferred(go())

    async def assert_paused(self, relay, postfix, dovecot, members_mx, reason: str) -> None:
        """Delivery is paused for ``reason``; both copies wait; nothing bounced or sent."""

        def paused():
            return "DELIVERY PAUSED" in relay.cli("queue")

        await poll(
            reactor,
            paused,
            "the circuit breaker",
            details=lambda: f"{relay.log()}\n{postfix.log()}\n{dovecot.log()}",
        )
        shown = relay.cli("queue", "--state", "all")
        self.assertIn(reason, shown.splitlines()[0])
        # The post was routed (done); both members' copies wait for a retry, and
        # nothing else was queued: no DSN, no bounce notice, nothing failed.
        self.assertEqual(
            sorted((row["KIND"], row["RECIPIENT"], row["STATE"]) for row in _rows(shown)),
            [("member", member, "retry") for member in MEMBERS] + [("post", LIST, "done")],
        )
        self.assertEqual(members_mx.messages, [])
        self.assertIsNone(relay.process.poll())

    def test_wrong_password_pauses_and_bounces_nothing(self):
        """With a wrong password Postfix answers 535 5.7.8 (Dovecot refused it): mailrelay
        pauses delivery (``mailrelay queue`` says so), keeps every member's copy queued
        for a later attempt, and bounces nothing: no member is failed, no DSN is queued,
        nothing reaches the members."""

        async def go():
            relay, postfix, dovecot, members_mx = await self.chain("not the password")
            await self.post(relay, "<smarthost-badpass@elsewhere.test>")
            await self.assert_paused(relay, postfix, dovecot, members_mx, "535 5.7.8")
            self.assertIn("authentication failed", postfix.log())

        return as_deferred(go())

    def test_untrusted_certificate_pauses_and_bounces_nothing(self):
        """Verification is on: when Postfix's certificate is not from the CA mailrelay
        trusts, mailrelay gives up on that connection before AUTH (so no password is
        sent), pauses delivery and bounces nothing."""

        async def go():
            relay, postfix, dovecot, members_mx = await self.chain(PASSWORD, ThrowawayCA())
            await self.post(relay, "<smarthost-badcert@elsewhere.test>")
            await self.assert_paused(
                relay, postfix, dovecot, members_mx, "certificate verify failed"
            )
            self.assertNotIn("sasl_username", postfix.log())

        return as_deferred(go())
