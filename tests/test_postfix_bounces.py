"""A real Postfix writes the bounce: its DSN reaches mailrelay's ``-bounces`` and scores
the member.

The chain of :mod:`tests.test_postfix_integration`, with the members' mail server
refusing one member:

    mailrelay --SMTP--> Postfix (smarthost) --SMTP--> FakeMTA: 550 for bart
    Postfix's DSN to test-bounces@lists.test --LMTP (transport map)--> mailrelay -bounces

Postfix accepts bart's copy from mailrelay, so mailrelay's own delivery succeeds; the
refusal comes later, from the next hop, and only Postfix's RFC 3464 report tells
mailrelay about it.  Skipped locally without Postfix or root; never with CI=true.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.listproc.bounces import Recognition, parse_bounce
from mailrelay.model import EntryState
from mailrelay.mta import Connection
from mailrelay.testing import FakeMTA
from tests.daemon import poll
from tests.mta_postfix import require_postfix, start_chain
from tests.support import as_deferred, temp_dir

LIST = "test@lists.test"


class PostfixDSNTests(TestCase):
    timeout = 120

    def setUp(self):
        require_postfix()

    def test_postfix_dsn_scores_the_refused_member(self):
        """Postfix's DSN for a member the next hop refused (550 5.1.1) arrives over LMTP
        at -bounces, is read as an RFC 3464 report naming that member as failed, and adds
        one to the member's bounce score; the other member is untouched."""

        async def go():
            tmp = temp_dir(self)
            members_mx = FakeMTA(reactor)
            await members_mx.start()
            self.addCleanup(members_mx.stop)
            members_mx.reject(
                "rcpt",
                550,
                "5.1.1 <bart@members.test>: no such user",
                count=5,
                match="bart@members.test",
            )
            # anne is not a member: the test is about bounces, not the posting policy.
            chain = await start_chain(
                self, reactor, tmp, members_mx, LIST, ["bart@members.test", "cate@members.test"]
            )
            postfix, relay = chain.postfix, chain.relay

            client = Connection("127.0.0.1", postfix.port, 0, reactor=reactor)
            self.addCleanup(client.quit)
            await client.sendmail(
                "anne@elsewhere.test",
                [LIST],
                "From: anne@elsewhere.test\nTo: test@lists.test\nSubject: will bounce\n"
                "Message-ID: <pfb1@elsewhere.test>\n\nHello.\n",
            )

            registry, spool = chain.registry, chain.spool
            await poll(
                reactor,
                lambda: registry.get_member(LIST, "bart@members.test").bounce_score >= 1,
                "the DSN to score bart",
                timeout=50,
                details=lambda: f"Postfix log:\n{postfix.log()}",
            )
            self.assertEqual(registry.get_member(LIST, "cate@members.test").bounce_score, 0.0)
            # The handler has scored; the entry's DONE is written just after.
            await relay.getServiceNamed("mailrelay-delivery").when_idle()
            (entry,) = [e for e in spool.entries() if e.destination.subaddress == "bounces"]
            self.assertEqual(entry.state, EntryState.DONE)
            self.assertEqual(entry.sender, "")
            dsn = spool.get_message(entry.message_key)
            self.assertIn(b"message/delivery-status", dsn)
            report = parse_bounce(LIST, entry.destination.address, dsn)
            self.assertEqual(report.how, Recognition.DSN)
            self.assertEqual(report.permanent, frozenset({"bart@members.test"}))
            self.assertIn("status=bounced", postfix.log())

        return as_deferred(go())
