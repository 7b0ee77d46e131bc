"""The outbound Connection against Postfix's smtp-sink (an independent C implementation).

smtp-sink offers PIPELINING (or not, with -p), AUTH, and rejects commands on
demand (-f hard, -r soft); -D dumps each transaction to a file.
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.model import MailingList
from mailrelay.mta import AuthenticationFailed, BulkDelivery, Connection, SenderRefused
from tests.support import as_deferred, free_port, require_program, wait_for_port

MESSAGE = "From: anne@example.com\nSubject: sink\n\n.leading dot\nline\n.\n"


class SmtpSinkTests(TestCase):
    def setUp(self):
        self.smtp_sink = require_program("smtp-sink")

    async def sink(self, *options: str) -> int:
        port = free_port()
        self.dumps = tempfile.mkdtemp()
        os.chmod(self.dumps, 0o777)  # smtp-sink drops privileges to nobody
        argv = [
            self.smtp_sink,
            "-u",
            "nobody",
            "-D",
            os.path.join(self.dumps, "dump"),
            *options,
            f"127.0.0.1:{port}",
            "32",
        ]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def stop():
            process.kill()
            process.wait()
            process.stderr.close()

        self.addCleanup(stop)
        await wait_for_port(reactor, port)
        return port

    def connection(self, port, *args, **kw):
        conn = Connection("127.0.0.1", port, *(args or (0,)), reactor=reactor, **kw)
        self.addCleanup(conn.quit)
        return conn

    def dumped(self) -> bytes:
        data = b""
        for path in sorted(glob.glob(os.path.join(self.dumps, "dump*"))):
            with open(path, "rb") as f:
                data += f.read()
        return data

    def test_many_messages_pipelined_and_lockstep(self):
        """20 messages over one reused connection, with and without PIPELINING; dots survive."""

        async def go():
            for options in ((), ("-p",)):
                port = await self.sink(*options)
                connection = self.connection(port)
                for i in range(20):
                    result = await connection.sendmail(
                        "anne@example.com", [f"r{i}@example.com", "other@example.org"], MESSAGE
                    )
                    self.assertEqual(result, {})
                await connection.quit()
                dumped = self.dumped()
                self.assertEqual(dumped.count(b"Subject: sink"), 20)
                self.assertIn(b"\n.leading dot", dumped)

        return as_deferred(go())

    def test_hard_rejected_recipients(self):
        """-f rcpt: every RCPT is hard-rejected; each recipient gets its 5xx, no exception."""

        async def go():
            port = await self.sink("-f", "rcpt")
            result = await self.connection(port).sendmail(
                "anne@example.com", ["a@example.com", "b@example.com"], MESSAGE
            )
            self.assertEqual(sorted(result), ["a@example.com", "b@example.com"])
            self.assertTrue(all(500 <= code < 600 for code, _ in result.values()))

        return as_deferred(go())

    def test_soft_rejected_sender(self):
        """-r mail: a soft MAIL rejection is SenderRefused with a 4xx, temporary; BulkDelivery maps it per recipient."""

        async def go():
            port = await self.sink("-r", "mail")
            connection = self.connection(port)
            with self.assertRaises(SenderRefused) as cm:
                await connection.sendmail("anne@example.com", ["a@example.com"], MESSAGE)
            self.assertTrue(400 <= cm.exception.code < 500)
            self.assertFalse(cm.exception.permanent)
            result = await BulkDelivery(connection).deliver(
                MailingList("test@example.com"),
                MESSAGE,
                {"recipients": ["a@example.com", "b@example.org"]},
            )
            self.assertEqual({code // 100 for code, _ in result.values()}, {4})

        return as_deferred(go())

    def test_nonstandard_auth_reply(self):
        """smtp-sink answers AUTH with 250 instead of 235 (RFC 4954): a clear site-problem error, no mail sent."""

        async def go():
            port = await self.sink()
            connection = self.connection(port, 0, "user", "secret")
            with self.assertRaises(AuthenticationFailed) as cm:
                await connection.sendmail("anne@example.com", ["a@example.com"], MESSAGE)
            self.assertIn(b"Unexpected reply to AUTH: 250", cm.exception.response)
            self.assertTrue(cm.exception.site_problem)
            self.assertNotIn(b"Subject: sink", self.dumped())

        return as_deferred(go())
