"""A real Postfix on both sides of mailrelay.

One private Postfix instance (its own config, queue and port, started as root)
plays both roles in a single chain:

    client --SMTP--> Postfix --LMTP (transport map from `mailrelay postfix-maps`)--> mailrelay
    mailrelay --SMTP (smarthost)--> Postfix --SMTP--> FakeMTA (the members' mail server)
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile

from twisted.internet import reactor, task
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay import cli
from mailrelay.mta import Connection
from mailrelay.testing import FakeMTA
from tests.support import as_deferred, free_port, peers_required, require_program, wait_for_port

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {tmp}/queue
data_directory = {tmp}/data
maillog_file = {tmp}/maillog
maillog_file_prefixes = {tmp}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = hash:{tmp}/conf/domains
transport_maps = hash:{tmp}/conf/transport
relay_recipient_maps = hash:{tmp}/conf/transport
recipient_delimiter = +
smtputf8_enable = no
biff = no
"""


class PrivatePostfix:
    """A Postfix master process with its own configuration under ``tmp``."""

    def __init__(self, tmp: str, port: int):
        self.tmp, self.port = tmp, port
        os.chmod(tmp, 0o755)  # Postfix daemons run as the postfix user
        self.conf = os.path.join(tmp, "conf")
        for d in ("conf", "queue", "data"):
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        shutil.chown(os.path.join(tmp, "data"), "postfix")
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(tmp=tmp))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=port))

    def postmap(self, name: str):
        subprocess.run(
            [require_program("postmap"), "-c", self.conf, os.path.join(self.conf, name)], check=True
        )

    def command(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [require_program("postfix"), "-c", self.conf, action],
            capture_output=True,
            text=True,
            check=False,
        )

    def log(self) -> str:
        try:
            with open(os.path.join(self.tmp, "maillog")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""


class PostfixChainTests(TestCase):
    timeout = 120

    def setUp(self):
        require_program("postfix")
        if os.geteuid() != 0:
            message = "a private Postfix master must be started as root"
            if peers_required():
                raise AssertionError(message)
            raise SkipTest(message)

    def test_post_through_postfix_both_ways(self):
        """A post sent to Postfix reaches mailrelay over LMTP through the generated transport map,
        and mailrelay's copies reach the members through Postfix as smarthost."""

        async def go():
            tmp = tempfile.mkdtemp()
            members_mx = FakeMTA(reactor)
            await members_mx.start()
            self.addCleanup(members_mx.stop)

            postfix = PrivatePostfix(tmp, free_port())
            lmtp_port = free_port()
            config = os.path.join(tmp, "mailrelay.ini")
            with open(config, "w") as f:
                f.write(
                    f"[paths]\nvar_dir = {tmp}/var\n[mta]\nlmtp_port = {lmtp_port}\n"
                    f"lmtp_hostname = lists.test\nsmtp_host = 127.0.0.1\nsmtp_port = {postfix.port}\n"
                )
            out = io.StringIO()
            for argv in (
                ["lists", "create", "test@lists.test", "--owner", "owner@members.test"],
                ["lists", "set", "test@lists.test", "posting=open"],  # the poster is no member
                ["members", "add", "test@lists.test", "bart@members.test", "cate@members.test"],
                ["postfix-maps", "-o", os.path.join(postfix.conf, "transport")],
                ["postfix-maps", "--domains", "-o", os.path.join(postfix.conf, "domains")],
            ):
                self.assertEqual(
                    cli.main(["-C", config, *argv], stdout=out, stderr=out), 0, out.getvalue()
                )
            with open(os.path.join(postfix.conf, "transport"), "a") as f:
                f.write(f"members.test smtp:[127.0.0.1]:{members_mx.port}\n")
            postfix.postmap("transport")
            postfix.postmap("domains")

            from mailrelay.config import load_settings
            from mailrelay.service import makeService

            relay = makeService(load_settings(config), reactor)
            relay.startService()
            self.addCleanup(relay.stopService)

            started = postfix.command("start")
            self.addCleanup(postfix.command, "stop")
            self.assertEqual(started.returncode, 0, started.stderr + postfix.log())
            await wait_for_port(reactor, postfix.port)

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

            for _ in range(1500):
                got = {r for t in members_mx.transactions for r in t.rcpts}
                if got >= {"bart@members.test", "cate@members.test"}:
                    break
                await task.deferLater(reactor, 0.02, lambda: None)
            else:
                self.fail(f"members did not receive the post; Postfix log:\n{postfix.log()}")
            message = members_mx.messages[0]
            self.assertEqual(message["Subject"], "via postfix")
            self.assertEqual(message["List-Id"].split("<")[-1].rstrip(">"), "test.lists.test")
            self.assertEqual(members_mx.transactions[0].mail_from, "test-bounces@lists.test")
            self.assertIn("status=sent", postfix.log())

        return as_deferred(go())
