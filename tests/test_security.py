"""Security from outside: no open relay, no credentials in logs or output, no STARTTLS injection.

* RCPT to anything but a list address or its sub-addresses is ``550 5.1.1``:
  foreign domains, source routes, ``%`` hacks, bang paths and quoted local
  parts (the real server and policy, in memory).
* A real ``twistd mailrelay`` authenticates over STARTTLS to a FakeMTA with
  the password from a file, then meets a smarthost that refuses it; its log
  and the output of ``mailrelay queue`` and ``check-config`` never hold the
  password, in clear or base64 (as AUTH PLAIN and LOGIN send it).
* A smarthost that answers STARTTLS with ``220 ready`` and ``250 injected`` in
  one packet is not believed: the client stops instead of sending mail on
  the strength of the injected reply.
"""

from __future__ import annotations

import base64
import os

from twisted.internet import protocol, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailrelay.mta import Connection, SecureMode, TLSFailed
from mailrelay.testing import FakeMTA
from tests.daemon import RelayProcess, delivered_copies, poll, record_figures, run_cli
from tests.support import as_deferred, temp_dir
from tests.test_lmtp_fuzz import Harness

FOREIGN = [
    "victim@elsewhere.example",
    "test@example.com.elsewhere.example",
    "test@elsewhere.example",
    "@example.com:victim@elsewhere.example",
    "@example.com,@lists.example:victim@elsewhere.example",
    "victim%elsewhere.example@example.com",
    "test%elsewhere.example@example.com",
    "elsewhere.example!victim@example.com",
    '"victim@elsewhere.example"@example.com',
    '"test@example.com"@elsewhere.example',
    '"victim"@example.com',
    "postmaster@elsewhere.example",
    "test-owner@elsewhere.example",
    "nobody@example.com",
]
PASSWORD = "Zq8-relay-s3cret-pw"
USER = "relayuser"


class OpenRelayTests(SynchronousTestCase):
    def test_foreign_recipients_are_550_5_1_1(self):
        """Foreign domains, source routes, % hacks, bang paths and quoted local parts are all
        550 5.1.1; DATA then finds no recipient and nothing is stored."""
        harness = Harness(self)
        commands = b"".join(b"RCPT TO:<" + r.encode() + b">\r\n" for r in FOREIGN)
        lines = harness.feed(
            [b"LHLO a.example\r\nMAIL FROM:<a@example.org>\r\n" + commands + b"DATA\r\n"]
        )
        replies = [line for line in lines if not line.startswith(b"250")][1:]  # after 220
        self.assertEqual(
            replies,
            [b"550 5.1.1 Requested action not taken: mailbox unavailable"] * len(FOREIGN)
            + [b"503 5.5.1 Need RCPT command: no valid recipients"],
        )
        self.assertEqual(harness.spool.entries(), [])
        record_figures("open_relay", foreign_recipients_refused=len(FOREIGN), code="550 5.1.1")


def _secret_forms() -> dict[str, bytes]:
    """The password as it could leak: in clear, and as AUTH PLAIN and LOGIN encode it."""
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    return {
        "clear": PASSWORD.encode(),
        "AUTH PLAIN": plain,
        "AUTH PLAIN without padding": plain.rstrip(b"="),
        "AUTH LOGIN": base64.b64encode(PASSWORD.encode()).rstrip(b"="),
    }


class CredentialLeakTests(TestCase):
    slow = True  # tests/conftest.py marks it for pytest -m "not slow"
    timeout = 120

    def test_password_never_in_logs_or_cli_output(self):
        """An authenticated STARTTLS delivery, then refused credentials: the daemon's log and
        the output of mailrelay queue and check-config never contain the password."""

        async def go():
            tmp = temp_dir(self)
            good = FakeMTA(
                reactor,
                users={USER: PASSWORD},
                mechanisms=("PLAIN", "LOGIN"),
                tls="starttls",
                require_tls=True,
            )
            await good.start()
            self.addCleanup(good.stop)
            ca_file = good.ca.write_ca_file(tmp)
            pass_file = os.path.join(tmp, "smtp-password")
            with open(pass_file, "w") as f:
                f.write(PASSWORD + "\n")
            os.chmod(pass_file, 0o600)
            relay = RelayProcess(
                self,
                reactor,
                tmp,
                smtp_port=good.port,
                smtp_secure_mode="starttls",
                smtp_ca_file=ca_file,
                smtp_user=USER,
                smtp_pass_file=pass_file,
                retry_min_backoff="1s",
            )
            relay.cli("lists", "create", "test@example.com")
            relay.cli("lists", "set", "test@example.com", "posting=open")
            relay.cli("members", "add", "test@example.com", "bart@members.example")
            await relay.start()
            await self.post(relay, "<auth1@example.org>")
            await poll(reactor, lambda: delivered_copies(good), "authenticated delivery", 30)
            self.assertEqual(good.auth_attempts, [("PLAIN", USER, True)])

            # The same port, now a smarthost that refuses the password.
            port = good.port
            await good.stop()
            bad = FakeMTA(
                reactor,
                users={USER: "another"},
                mechanisms=("PLAIN", "LOGIN"),
                tls="starttls",
                ca=good.ca,
            )
            await bad.start(port=port)
            self.addCleanup(bad.stop)
            await self.post(relay, "<auth2@example.org>")
            await poll(reactor, lambda: bad.auth_attempts, "a refused AUTH", 30)
            await poll(
                reactor,
                lambda: "DELIVERY PAUSED" in run_cli(relay.config, "queue")[1],
                "the breaker to pause delivery",
                30,
                interval=0.2,
            )
            outputs = {
                "twistd log": relay.log(tail=10**7).encode(),
                "mailrelay queue": run_cli(relay.config, "queue")[1].encode(),
                "mailrelay queue --state all": run_cli(relay.config, "queue", "--state", "all")[
                    1
                ].encode(),
                "mailrelay check-config": run_cli(relay.config, "check-config")[1].encode(),
            }
            leaks = [
                (where, form)
                for where, text in outputs.items()
                for form, secret in _secret_forms().items()
                if secret in text
            ]
            self.assertEqual(leaks, [])
            self.assertIn(b"DELIVERY PAUSED", outputs["mailrelay queue"])
            record_figures(
                "credentials",
                outputs_searched=sorted(outputs),
                log_bytes=len(outputs["twistd log"]),
                forms_searched=sorted(_secret_forms()),
                leaks=len(leaks),
                # twistd logs every level; mailrelay itself has no debug events.
                levels_in_log=sorted(
                    {
                        level
                        for level in ("debug", "info", "warn", "error", "critical")
                        if f"#{level}]".encode() in outputs["twistd log"]
                    }
                ),
            )

        return as_deferred(go())

    async def post(self, relay, message_id: str) -> None:
        from mailrelay.testing.lmtp import connect_lmtp

        client = await connect_lmtp(relay.endpoint())
        await client.lhlo("mx.example.org")
        message = f"From: anne@example.org\r\nMessage-ID: {message_id}\r\n\r\nHi.\r\n"
        replies = await client.sendmail("anne@example.org", ["test@example.com"], message)
        await client.quit()
        self.assertEqual([r.code for r in replies], [250])


class _InjectingSmarthost(protocol.Protocol):
    """Offers STARTTLS and answers it with "220 ready" plus an injected "250" in one write."""

    def connectionMade(self):  # noqa: N802
        self.factory.seen = self.seen = []
        self.transport.write(b"220 evil.example ESMTP\r\n")

    def dataReceived(self, data):  # noqa: N802
        for line in data.split(b"\r\n"):
            if not line:
                continue
            self.seen.append(line)
            verb = line.split()[0].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-evil.example\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                self.transport.write(b"220 ready\r\n250 injected\r\n")
            else:
                self.transport.write(b"250 ok\r\n")


class StartTLSInjectionTests(TestCase):
    def test_reply_injected_after_starttls_is_not_acted_upon(self):
        """STARTTLS answered by '220 ready' and '250 injected' in one packet: the client
        fails with a TLS error and sends nothing after STARTTLS (no MAIL, no AUTH)."""

        async def go():
            factory = protocol.ServerFactory.forProtocol(_InjectingSmarthost)
            factory.seen = []
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            tmp = temp_dir(self)
            ca = FakeMTA(reactor, tls="starttls").ca
            connection = Connection(
                "127.0.0.1",
                port.getHost().port,
                0,
                user=USER,
                password=PASSWORD,
                secure_mode=SecureMode.STARTTLS,
                ca_file=ca.write_ca_file(tmp),
                timeout=5,
                reactor=reactor,
            )
            self.addCleanup(connection.quit)
            with self.assertRaises(TLSFailed):
                await connection.sendmail(
                    "anne@example.org", ["bart@example.org"], "Subject: x\n\nhi\n"
                )
            verbs = [line.split()[0].upper() for line in factory.seen]
            self.assertEqual(verbs, [b"EHLO", b"STARTTLS"])
            record_figures("starttls_injection", commands_after_starttls=len(verbs) - 2)

        return as_deferred(go())
