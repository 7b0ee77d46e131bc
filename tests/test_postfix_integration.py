"""A real Postfix on both sides of mailrelay.

One private Postfix instance (its own config, queue and port, started as root)
plays both roles in a single chain:

    client --SMTP--> Postfix --LMTP (transport map from `mailrelay postfix-maps`)--> mailrelay
    mailrelay --SMTP (smarthost)--> Postfix --SMTP--> FakeMTA (the members' mail server)
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.mta import Connection
from mailrelay.testing import FakeMTA
from tests.daemon import poll
from tests.mta_postfix import require_postfix, start_chain
from tests.support import as_deferred, temp_dir


class PostfixChainTests(TestCase):
    timeout = 120

    def setUp(self):
        require_postfix()

    def test_post_through_postfix_both_ways(self):
        """A post sent to Postfix reaches mailrelay over LMTP through the generated transport map,
        and mailrelay's copies reach the members through Postfix as smarthost."""

        async def go():
            tmp = temp_dir(self)
            members_mx = FakeMTA(reactor)
            await members_mx.start()
            self.addCleanup(members_mx.stop)
            chain = await start_chain(
                self,
                reactor,
                tmp,
                members_mx,
                "test@lists.test",
                ["bart@members.test", "cate@members.test"],
            )
            postfix = chain.postfix

            client = Connection("127.0.0.1", postfix.port, 0, reactor=reactor)
            self.addCleanup(client.quit)
            refused = await client.sendmail(
                "anne@elsewhere.test",
                ["test@lists.test", "nolist@lists.test"],
                "From: anne@elsewhere.test\nTo: test@lists.test\nSubject: via postfix\n"
                "Message-ID: <pf1@elsewhere.test>\n\nHello through Postfix.\n",
            )
            # Postfix itself refuses an address that is not in mailrelay's map.
            self.assertEqual(list(refused), ["nolist@lists.test"])
            self.assertEqual(refused["nolist@lists.test"][0] // 100, 5)

            await poll(
                reactor,
                lambda: (
                    {r for t in members_mx.transactions for r in t.rcpts}
                    >= {"bart@members.test", "cate@members.test"}
                ),
                "the post at both members",
                details=lambda: f"Postfix log:\n{postfix.log()}",
            )
            message = members_mx.messages[0]
            self.assertEqual(message["Subject"], "via postfix")
            self.assertEqual(message["List-Id"].split("<")[-1].rstrip(">"), "test.lists.test")
            self.assertEqual(members_mx.transactions[0].mail_from, "test-bounces@lists.test")
            self.assertIn("status=sent", postfix.log())

        return as_deferred(go())
