"""A real Postfix routing a list created while it runs, with no manual step (issue 11
section 4): ``[postfix] transport_file``/``domains_file`` make ``mailrelay lists
create`` rewrite the maps and run postmap, and Postfix hands the new list's mail to
mailrelay over LMTP.

    client --SMTP--> Postfix --LMTP (maps kept by mailrelay)--> mailrelay
    mailrelay --SMTP--> Postfix --SMTP--> FakeMTA (the members' mail server)
"""

from __future__ import annotations

import io
import os
import shlex

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay import cli
from mailrelay.mta import Connection
from mailrelay.testing import FakeMTA
from tests.daemon import poll
from tests.mta_postfix import PrivatePostfix
from tests.support import (
    as_deferred,
    free_port,
    peers_required,
    require_program,
    temp_dir,
    wait_for_port,
)


class MapsFollowListsPostfixTests(TestCase):
    timeout = 120

    def setUp(self):
        require_program("postfix")
        if os.geteuid() != 0:
            message = "a private Postfix master must be started as root"
            if peers_required():
                raise AssertionError(message)
            raise SkipTest(message)

    def test_list_created_while_postfix_runs_receives_mail(self):
        """A list made with `mailrelay lists create` while Postfix and mailrelay run
        gets its post through Postfix to its members: the maps were rewritten and
        postmapped by the command itself."""

        async def go():
            tmp = temp_dir(self)
            members_mx = FakeMTA(reactor)
            await members_mx.start()
            self.addCleanup(members_mx.stop)

            conf = os.path.join(tmp, "conf")
            # mailrelay owns "transport"; the route to the members' server is the
            # site's own map, looked up after it.
            postfix = PrivatePostfix(
                tmp,
                free_port(),
                main_cf=f"transport_maps = hash:{conf}/transport, hash:{conf}/members\n",
            )
            with open(os.path.join(postfix.conf, "members"), "w") as f:
                f.write(f"members.test smtp:[127.0.0.1]:{members_mx.port}\n")
            postfix.postmap("members")
            postmap = shlex.join([require_program("postmap"), "-c", postfix.conf])
            config = os.path.join(tmp, "mailrelay.ini")
            with open(config, "w") as f:
                f.write(
                    f"[paths]\nvar_dir = {tmp}/var\n"
                    f"[mta]\nlmtp_endpoint = tcp:{free_port()}:interface=127.0.0.1\n"
                    f"lmtp_hostname = lists.test\nsmtp_host = 127.0.0.1\n"
                    f"smtp_port = {postfix.port}\n"
                    f"[postfix]\ntransport_file = {postfix.conf}/transport\n"
                    f"domains_file = {postfix.conf}/domains\npostmap_command = {postmap}\n"
                )

            from mailrelay.config import load_settings
            from mailrelay.service import makeService

            # The daemon writes the (empty) maps at start, so Postfix finds them.
            relay = makeService(load_settings(config), reactor)
            relay.startService()
            self.addCleanup(relay.stopService)
            started = postfix.command("start")
            self.addCleanup(postfix.command, "stop")
            self.assertEqual(started.returncode, 0, started.stderr + postfix.log())
            await wait_for_port(reactor, postfix.port)

            out = io.StringIO()
            for argv in (
                ["lists", "create", "new@lists.test", "--owner", "owner@members.test"],
                ["lists", "set", "new@lists.test", "posting=open"],
                ["members", "add", "new@lists.test", "bart@members.test", "cate@members.test"],
            ):
                self.assertEqual(
                    cli.main(["-C", config, *argv], stdout=out, stderr=out), 0, out.getvalue()
                )

            client = Connection("127.0.0.1", postfix.port, 0, reactor=reactor)
            self.addCleanup(client.quit)
            refused = await client.sendmail(
                "anne@elsewhere.test",
                ["new@lists.test"],
                "From: anne@elsewhere.test\nTo: new@lists.test\nSubject: new list\n"
                "Message-ID: <maps1@elsewhere.test>\n\nHello, new list.\n",
            )
            self.assertEqual(refused, {})
            await poll(
                reactor,
                lambda: (
                    {r for t in members_mx.transactions for r in t.rcpts}
                    >= {"bart@members.test", "cate@members.test"}
                ),
                "the post at both members",
                details=lambda: f"Postfix log:\n{postfix.log()}",
            )
            self.assertEqual(members_mx.messages[0]["Subject"], "new list")
            self.assertEqual(members_mx.transactions[0].mail_from, "new-bounces@lists.test")

        return as_deferred(go())
