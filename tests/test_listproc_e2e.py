"""Commands and confirmations by mail, end to end: LMTP in, the running service
(``makeService`` with its SQLite stores), the recording smarthost out.

Each test sends real messages over LMTP to a list's command addresses and reads
what the FakeMTA receives: confirmation requests, command results, welcome and
goodbye texts, neutral replies, and silence where loop safety demands it.
"""

from __future__ import annotations

import io
import os
import re
import tempfile

from twisted.internet import endpoints, reactor, task
from twisted.trial.unittest import TestCase

from mailrelay import cli
from mailrelay.config import Settings, load_settings
from mailrelay.listproc.tokens import Pending, PendingAction, new_token
from mailrelay.model import Destination, EntryState, Envelope, Route
from mailrelay.registry import SQLiteRegistry
from mailrelay.service import makeService
from mailrelay.spool import SQLiteSpool
from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import LMTPClient, connect_lmtp
from tests.support import as_deferred, temp_dir

LIST = "test@example.com"
ANNE = "anne@example.org"
TOKEN = re.compile(r"confirm ([0-9a-f]{40})")


def message(
    subject: str = "hello",
    body: str = "",
    sender: str = ANNE,
    headers: str = "",
    to: str = "test-request@example.com",
) -> bytes:
    text = f"From: Anne <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n{headers}\r\n{body}"
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


class ListProcessingCase(TestCase):
    """The relay with its SQLite stores in a fresh directory; a FakeMTA smarthost."""

    def setUp(self):
        return as_deferred(self.start())

    async def start(self, **lists):
        self.smarthost = FakeMTA(reactor, pipelining=True)
        await self.smarthost.start()
        self.addCleanup(self.smarthost.stop)
        self.tmp = temp_dir(self)
        self.socket = os.path.join(self.tmp, "lmtp.sock")
        self.config = os.path.join(self.tmp, "mailrelay.ini")
        with open(self.config, "w") as f:
            f.write(
                "[paths]\nvar_dir = var\n"
                f"[mta]\nlmtp_endpoint = unix:{self.socket}\nsmtp_host = 127.0.0.1\n"
                f"smtp_port = {self.smarthost.port}\n"
                "[lists]\n" + "".join(f"{k} = {v}\n" for k, v in lists.items())
            )
        self.settings: Settings = load_settings(self.config)
        os.makedirs(self.settings.paths.var_dir, exist_ok=True)
        self.registry = SQLiteRegistry(self.settings.paths.registry_path)
        self.addCleanup(self.registry.close)
        self.registry.create_list(LIST, "Test", ["owner@example.com"])
        self.registry.create_list("other@example.com")
        self.registry.add_members(LIST, ["member@example.org"])

    def start_service(self):
        self.service = makeService(self.settings, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.runner = self.service.getServiceNamed("mailrelay-delivery")

    async def send(self, recipient: str, data: bytes, sender: str = ANNE) -> None:
        if not hasattr(self, "service"):
            self.start_service()
        client: LMTPClient = await connect_lmtp(endpoints.UNIXClientEndpoint(reactor, self.socket))
        await client.lhlo("mx.example.com")
        replies = await client.sendmail(sender, [recipient], data)
        await client.quit()
        self.assertEqual([r.code for r in replies], [250])
        await self.settle()

    async def settle(self):
        """Wait (bounded) until the runner has processed and delivered everything."""
        spool = self.service.getServiceNamed("mailrelay-stores")._spool
        for _ in range(500):
            await self.runner.when_idle()
            counts = spool.counts()
            if not (counts[EntryState.QUEUED] or counts[EntryState.INFLIGHT]):
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        self.fail("the relay did not settle")

    def received(self, recipient: str | None = None):
        return [
            m for m in self.smarthost.messages if recipient is None or recipient in m["X-RcptTo"]
        ]

    def members(self) -> list[str]:
        return [m.address for m in self.registry.members(LIST)]

    def entries(self):
        return self.service.getServiceNamed("mailrelay-stores")._spool.entries()

    def token_of(self, msg) -> str:
        match = TOKEN.search(msg["Subject"])
        self.assertIsNotNone(match, msg["Subject"])
        return match.group(1)

    def assert_written_by_mailrelay(self, msg, auto_submitted="auto-replied"):
        """Every message mailrelay writes: Auto-Submitted, from the list's -bounces."""
        self.assertEqual(msg["Auto-Submitted"], auto_submitted)
        self.assertEqual(msg["X-MailFrom"], "test-bounces@example.com")
        self.assertIsNone(msg["List-Id"])

    def admin(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["-C", self.config, *argv], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()


class JoinTests(ListProcessingCase):
    def test_join_by_mail_with_confirmation_reply(self):
        """Mail to -join subscribes nobody by itself: one confirmation request goes to the
        requester (From), from LIST-confirm+TOKEN with Subject "confirm TOKEN"; a reply to
        that address with any content subscribes, and the new member is welcomed."""

        async def go():
            await self.send("test-join@example.com", message("please", "let me in"))
            self.assertNotIn(ANNE, self.members())
            (request,) = self.received()
            self.assert_written_by_mailrelay(request)
            self.assertEqual(request["X-RcptTo"], ANNE)
            token = self.token_of(request)
            self.assertEqual(request["Subject"], f"confirm {token}")
            self.assertIn(f"test-confirm+{token}@example.com", request["From"])
            self.assertEqual(request["Reply-To"], f"test-confirm+{token}@example.com")
            (pending,) = self.registry.pending(LIST)
            self.assertEqual((pending.address, pending.action), (ANNE, PendingAction.JOIN))
            self.assertAlmostEqual(pending.expires_at - pending.created_at, 3 * 86400)

            await self.send(f"test-confirm+{token}@example.com", message("Re: x", "whatever"))
            self.assertIn(ANNE, self.members())
            welcome = self.received()[-1]
            self.assertIn("Welcome", welcome["Subject"])
            self.assertEqual(welcome["X-RcptTo"], ANNE)
            self.assert_written_by_mailrelay(welcome)
            self.assertEqual(self.registry.pending(), ())

        return as_deferred(go())

    def test_join_and_confirm_by_commands_to_request(self):
        """``join`` in the body of mail to -request sends the confirmation request and a
        results reply; ``confirm TOKEN`` in the Subject of mail to -request completes it."""

        async def go():
            await self.send("test-request@example.com", message("", "join\n"))
            results, request = sorted(self.received(), key=lambda m: "confirm" in m["Subject"])
            self.assertIn("results of your email commands", results["Subject"])
            body = results.get_payload(decode=True).decode()
            self.assertIn("> join", body)
            self.assertIn(f"confirmation request has been sent to {ANNE}", body)
            self.assertIn("Help for the", body)
            token = self.token_of(request)
            await self.send(
                "test-request@example.com", message(f"Re: confirm {token}", "> quoted\n")
            )
            self.assertIn(ANNE, self.members())
            results = [m for m in self.received() if "results" in m["Subject"]]
            body = results[-1].get_payload(decode=True).decode()
            self.assertIn(f"> confirm {token}", body)
            self.assertEqual(len([m for m in self.received() if "Welcome" in m["Subject"]]), 1)
            self.assertIn("Confirmed.", body)

        return as_deferred(go())

    def test_join_for_another_address_asks_that_address(self):
        """``join address=X`` sends the confirmation request to X, never to the requester."""

        async def go():
            await self.send("test-request@example.com", message("join address=bart@example.net"))
            requests = [m for m in self.received() if m["Subject"].startswith("confirm ")]
            self.assertEqual([m["X-RcptTo"] for m in requests], ["bart@example.net"])
            (pending,) = self.registry.pending()
            self.assertEqual(pending.address, "bart@example.net")

        return as_deferred(go())

    def test_subscribe_alias(self):
        """-subscribe is -join."""

        async def go():
            await self.send("test-subscribe@example.com", message())
            self.assertEqual(self.registry.pending()[0].action, PendingAction.JOIN)

        return as_deferred(go())


class LeaveTests(ListProcessingCase):
    def test_leave_with_confirmation(self):
        """A member's mail to -leave asks for confirmation; confirming removes the member
        and sends the goodbye."""

        async def go():
            await self.send("test-leave@example.com", message(sender="member@example.org"))
            self.assertIn("member@example.org", self.members())
            (request,) = self.received()
            self.assert_written_by_mailrelay(request)
            await self.send(
                f"test-confirm+{self.token_of(request)}@example.com",
                message(sender="member@example.org"),
            )
            self.assertNotIn("member@example.org", self.members())
            self.assertIn("You have left", self.received()[-1]["Subject"])

        return as_deferred(go())

    def test_leave_does_not_reveal_membership(self):
        """A non-member's leave request gets the same confirmation text as a member's, and
        -request reports both the same way."""

        async def go():
            await self.send("test-leave@example.com", message(sender="member@example.org"))
            await self.send("test-leave@example.com", message(sender="stranger@example.org"))
            member, stranger = self.received()

            def shape(msg, address, token=True):
                text = msg.get_payload(decode=True).decode()
                if token:
                    text = text.replace(self.token_of(msg), "TOKEN")
                return text.replace(address, "ADDR")

            self.assertEqual(
                shape(member, "member@example.org"), shape(stranger, "stranger@example.org")
            )
            await self.send(
                "test-request@example.com", message("leave", sender="member@example.org")
            )
            await self.send(
                "test-request@example.com", message("leave", sender="stranger@example.org")
            )
            member_results, stranger_results = [
                m for m in self.received() if "results" in m["Subject"]
            ]
            self.assertEqual(
                shape(member_results, "member@example.org", token=False),
                shape(stranger_results, "stranger@example.org", token=False),
            )

        return as_deferred(go())

    def test_unsubscribe_alias(self):
        """-unsubscribe is -leave."""

        async def go():
            await self.send("test-unsubscribe@example.com", message(sender="member@example.org"))
            self.assertEqual(self.registry.pending()[0].action, PendingAction.LEAVE)

        return as_deferred(go())


class CommandTests(ListProcessingCase):
    def test_commands_in_subject_and_body(self):
        """Commands are read from the Subject, then the body; quoted lines, Re: prefixes and
        anything after the signature are ignored; each command and its result is listed."""

        async def go():
            body = "> join\nhelp\nfoo bar\n-- \njoin\n"
            await self.send("test-request@example.com", message("Re: join", body))
            results = [m for m in self.received() if "results" in m["Subject"]]
            (reply,) = results
            self.assert_written_by_mailrelay(reply)
            self.assertEqual(reply["X-RcptTo"], ANNE)
            text = reply.get_payload(decode=True).decode().replace("\r\n", "\n")
            self.assertEqual(re.findall(r"^> (.*)$", text, re.M), ["join", "help", "foo bar"])
            self.assertIn("No such command: foo", text)
            self.assertEqual(len(self.registry.pending()), 1)  # the join; not the signature's

        return as_deferred(go())

    def test_html_only_commands(self):
        """HTML-only mail: commands are read from its text, not its markup."""

        async def go():
            html = message(
                "",
                "<html><body><p>help</p><blockquote>join</blockquote></body></html>\n",
                headers="Content-Type: text/html; charset=utf-8\r\n",
            )
            await self.send("test-request@example.com", html)
            text = self.received()[0].get_payload(decode=True).decode().replace("\r\n", "\n")
            self.assertEqual(re.findall(r"^> (.*)$", text, re.M), ["help"])
            self.assertEqual(self.registry.pending(), ())

        return as_deferred(go())

    def test_replies_never_go_to_a_list(self):
        """``join address=`` naming a list address is refused, and nothing is sent there."""

        async def go():
            await self.send("test-request@example.com", message("join address=other@example.com"))
            self.assertEqual(self.registry.pending(), ())
            self.assertEqual([m["X-RcptTo"] for m in self.received()], [ANNE])

        return as_deferred(go())


class LoopSafetyTests(ListProcessingCase):
    CASES = [
        ("null envelope sender", {"sender": ""}),
        ("Auto-Submitted", {"headers": "Auto-Submitted: auto-replied\r\n"}),
        ("Precedence bulk", {"headers": "Precedence: bulk\r\n"}),
        ("Precedence junk", {"headers": "Precedence: junk\r\n"}),
        ("Precedence list", {"headers": "Precedence: list\r\n"}),
        ("List-Id", {"headers": "List-Id: <other.example.net>\r\n"}),
        ("From a list", {"from": "other@example.com"}),
        ("From a list's sub-address", {"from": "other-request@example.com"}),
        (
            "MAILER-DAEMON",
            {"from": "MAILER-DAEMON@example.net", "sender": "MAILER-DAEMON@example.net"},
        ),
    ]

    def test_every_loop_rule(self):
        """Mail that must not be answered (null sender, Auto-Submitted, bulk/junk/list
        Precedence, List-Id, a list or MAILER-DAEMON sender) to -join, -request and
        -confirm changes nothing and gets no reply; the queue says why."""

        async def go():
            self.start_service()
            self.registry.add_pending(
                Pending(new_token(), LIST, ANNE, PendingAction.JOIN, 0.0, 4e9)
            )
            (pending,) = self.registry.pending()
            for name, case in self.CASES:
                for rcpt in (
                    "test-join@example.com",
                    "test-request@example.com",
                    f"test-confirm+{pending.token}@example.com",
                ):
                    with self.subTest(case=name, rcpt=rcpt):
                        data = message(
                            "join",
                            "join\n",
                            sender=case.get("from", ANNE),
                            headers=case.get("headers", ""),
                        )
                        await self.send(rcpt, data, sender=case.get("sender", ANNE))
            self.assertEqual(self.received(), [])
            self.assertEqual(self.registry.pending(), (pending,))
            self.assertEqual(self.members(), ["member@example.org"])
            notes = [e.last_error for e in self.entries()]
            self.assertEqual(len(notes), 3 * len(self.CASES))
            self.assertTrue(all(n.startswith("ignored, not answered") for n in notes), notes)

        return as_deferred(go())

    def test_daily_reply_limit(self):
        """At most max_autoresponses_per_day replies per address and list per day (the
        list's setting here); beyond that, silence."""

        async def go():
            self.registry.update_list_settings(LIST, {"max_autoresponses_per_day": "2"})
            for _ in range(4):
                await self.send("test-request@example.com", message("help"))
            self.assertEqual(len(self.received(ANNE)), 2)
            # Another list counts on its own.
            await self.send("other-request@example.com", message("help"))
            self.assertEqual(len(self.received(ANNE)), 3)

        return as_deferred(go())

    def test_site_reply_limit(self):
        """The [lists] max_autoresponses_per_day applies where a list sets none."""

        async def go():
            await self.start(max_autoresponses_per_day="1")
            for _ in range(3):
                await self.send("test-join@example.com", message())
            self.assertEqual(len(self.received(ANNE)), 1)
            self.assertEqual(len(self.registry.pending()), 1)

        return as_deferred(go())


class TokenTests(ListProcessingCase):
    async def neutral(self, token: str, how: str = "address"):
        """Send ``token`` one way; return the replies it got."""
        before = len(self.received())
        if how == "address":
            await self.send(f"test-confirm+{token}@example.com", message())
        else:
            await self.send("test-request@example.com", message(f"confirm {token}"))
        return self.received()[before:]

    def test_forged_expired_replayed_and_other_list_tokens(self):
        """Forged, expired, used and other-list tokens change nothing and get one short
        neutral reply each (the same text for all)."""

        async def go():
            self.start_service()
            expired = Pending(new_token(), LIST, "x@example.org", PendingAction.JOIN, 0.0, 1.0)
            other = Pending(
                new_token(), "other@example.com", "y@example.org", PendingAction.JOIN, 0.0, 4e9
            )
            self.registry.add_pending(expired)
            self.registry.add_pending(other)
            bodies = []
            for token in ("0" * 40, "not-a-token", expired.token, other.token):
                (reply,) = await self.neutral(token)
                self.assert_written_by_mailrelay(reply)
                bodies.append(reply.get_payload(decode=True))
            self.assertEqual(len(set(bodies)), 1)
            self.assertIn(b"Nothing\nwas changed", bodies[0].replace(b"\r\n", b"\n"))
            self.assertEqual(self.members(), ["member@example.org"])
            self.assertIsNotNone(self.registry.get_pending(other.token))  # still usable there
            # Replayed: a token works once, by address or by command.
            await self.send("test-join@example.com", message())
            token = self.token_of(self.received()[-1])
            await self.neutral(token)
            self.assertIn(ANNE, self.members())
            self.registry.remove_members(LIST, [ANNE])
            (again,) = await self.neutral(token)
            self.assertEqual(again.get_payload(decode=True), bodies[0])
            replies = await self.neutral(token, how="request")
            self.assertIn(b"not valid", replies[0].get_payload(decode=True))
            self.assertNotIn(ANNE, self.members())

        return as_deferred(go())

    def test_expiry_configurable(self):
        """[lists] pending_request_life sets how long a token is valid; a list's own
        setting wins."""

        async def go():
            await self.start(pending_request_life="1h")
            await self.send("test-join@example.com", message())
            (pending,) = self.registry.pending()
            self.assertAlmostEqual(pending.expires_at - pending.created_at, 3600)
            self.registry.update_list_settings(LIST, {"pending_request_life": "2d"})
            await self.send("test-join@example.com", message(sender="b@example.org"))
            second = [p for p in self.registry.pending() if p.address == "b@example.org"][0]
            self.assertAlmostEqual(second.expires_at - second.created_at, 2 * 86400)

        return as_deferred(go())

    def test_tokens_survive_a_restart(self):
        """A confirmation requested before a restart is confirmed after it."""

        async def go():
            await self.send("test-join@example.com", message())
            token = self.token_of(self.received()[0])
            await self.service.stopService()
            self.start_service()
            await self.send(f"test-confirm+{token}@example.com", message())
            self.assertIn(ANNE, self.members())

        return as_deferred(go())


class UpgradeTests(ListProcessingCase):
    def test_held_mail_from_an_old_spool_is_processed_at_start(self):
        """Mail that an earlier release held in the spool (a -join and a -request) is
        processed when the relay starts; -bounces mail stays held."""

        async def go():
            spool = SQLiteSpool(self.settings.paths.spool_path, reactor)
            destinations = (
                Destination(LIST, "join", "test-join@example.com"),
                Destination(LIST, "request", "test-request@example.com"),
                Destination(LIST, "bounces", "test-bounces@example.com"),
            )
            envelope = Envelope(ANNE, destinations, reactor.seconds(), message_id="<old@x>")
            await spool.store(envelope, message("help", "join\n"), [Route(EntryState.HELD)] * 3)
            await spool.close()
            self.start_service()
            await self.settle()
            self.assertEqual(len(self.registry.pending()), 2)  # -join, and join in -request
            self.assertEqual(len(self.received(ANNE)), 3)  # two requests, one results reply
            states = {
                e.destination.subaddress: e.state
                for e in self.entries()
                if e.kind.value == "inbound"
            }
            self.assertEqual(
                states,
                {"join": EntryState.DONE, "request": EntryState.DONE, "bounces": EntryState.HELD},
            )

        return as_deferred(go())


class PendingCommandTests(ListProcessingCase):
    def test_pending_list_confirm_discard(self):
        """`mailrelay pending` lists pending confirmations; `pending confirm TOKEN` carries
        one out (subscribes), `pending discard TOKEN` drops one; unknown tokens fail."""

        async def go():
            await self.send("test-join@example.com", message())
            await self.send("test-join@example.com", message(sender="b@example.org"))
            code, out, _ = self.admin("pending")
            self.assertEqual(code, 0)
            tokens = {p.address: p.token for p in self.registry.pending()}
            for address, token in tokens.items():
                self.assertIn(token, out)
                self.assertIn(address, out)
            self.assertIn("join", out)
            self.assertEqual(self.admin("pending", LIST)[1], out)
            self.assertEqual(self.admin("pending", "other@example.com")[1].count("join"), 0)
            self.assertEqual(self.admin("pending", "confirm", tokens[ANNE])[0], 0)
            self.assertIn(ANNE, self.members())
            self.assertEqual(self.admin("pending", "discard", tokens["b@example.org"])[0], 0)
            self.assertEqual(self.registry.pending(), ())
            self.assertNotIn("b@example.org", self.members())
            code, _, err = self.admin("pending", "confirm", tokens[ANNE])
            self.assertEqual(code, 1)
            self.assertIn("no pending confirmation", err)

        return as_deferred(go())

    def test_pending_no_registry_yet(self):
        """`mailrelay pending` on a fresh site lists nothing and succeeds."""
        tmp = tempfile.mkdtemp(dir=temp_dir(self))
        config = os.path.join(tmp, "m.ini")
        with open(config, "w") as f:
            f.write("[paths]\nvar_dir = var\n")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["-C", config, "pending"], stdout=out, stderr=err), 0)
        self.assertIn("no pending confirmations", out.getvalue())


class TemplateTests(ListProcessingCase):
    def test_operator_templates_per_site_and_list(self):
        """Reply texts come from the operator's files first: the list's own directory under
        [lists] template_dir, then the site's, then the shipped texts."""

        async def go():
            site = os.path.join(self.settings.lists.template_dir, "en")
            own = os.path.join(self.settings.lists.template_dir, "lists", LIST, "en")
            os.makedirs(site)
            os.makedirs(own)
            with open(os.path.join(site, "help.txt"), "w") as f:
                f.write("Site help for $list_address.\n")
            with open(os.path.join(own, "confirm-join.txt"), "w") as f:
                f.write("Our own words: confirm $token for $address.\n")
            await self.send("test-join@example.com", message())
            request = self.received()[0]
            self.assertEqual(
                request.get_payload(decode=True).decode().strip(),
                f"Our own words: confirm {self.token_of(request)} for {ANNE}.",
            )
            await self.send("other-request@example.com", message("help"))
            body = self.received()[-1].get_payload(decode=True).decode()
            self.assertIn("Site help for other@example.com.", body)

        return as_deferred(go())
