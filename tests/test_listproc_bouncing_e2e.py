"""Bounce processing end to end: LMTP in, the running service (``makeService`` with
its SQLite stores), the recording smarthost out.

Bounces are real messages sent over LMTP to the list's ``-bounces`` address (VERP
and RFC 3464); what the members, the owner and the bouncing address receive is read
from the FakeMTA.  The service runs on the real reactor seen through a clock that a
test can move forward by days (the score counts at most once a day, warnings are a
week apart), and the warnings service's check is run after each move, as its hourly
LoopingCall would.
"""

from __future__ import annotations

import re

from twisted.internet import reactor
from zope.interface import directlyProvides, providedBy

from mailrelay.model import EntryState
from mailrelay.service import makeService
from tests.support import as_deferred
from tests.test_listproc_bounces import fixture
from tests.test_listproc_e2e import LIST, ListProcessingCase, message

ANNE = "anne@example.org"
DAY = 86400.0
REENABLE = re.compile(r"confirm ([0-9a-f]{40})")


class ShiftedReactor:
    """The real reactor, with ``seconds()`` moved forward by ``offset`` (the test's
    "days pass"); everything else, interfaces included, is the reactor's."""

    def __init__(self, real):
        self._real = real
        self.offset = 0.0
        directlyProvides(self, *providedBy(real))

    def seconds(self):
        return self._real.seconds() + self.offset

    def callLater(self, delay, f, *args, **kw):  # noqa: N802
        return _ShiftedCall(self, self._real.callLater(delay, f, *args, **kw))

    def __getattr__(self, name):
        return getattr(self._real, name)


class _ShiftedCall:
    """A real DelayedCall whose ``getTime`` is on the shifted clock's scale."""

    def __init__(self, clock, call):
        self._clock, self._call = clock, call

    def getTime(self):  # noqa: N802
        return self._call.getTime() + self._clock.offset

    def __getattr__(self, name):
        return getattr(self._call, name)


def verp(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"test-bounces+{local}={domain}@example.com"


def bounce(to: str, body: str = "Delivery failed.") -> bytes:
    return (
        f"From: MAILER-DAEMON@mx.example.org\r\nTo: {to}\r\nSubject: Undeliverable\r\n"
        f"Auto-Submitted: auto-replied\r\n\r\n{body}\r\n"
    ).encode()


class BounceCase(ListProcessingCase):
    async def start(self, **lists):
        await super().start(**lists)
        self.registry.add_members(LIST, [ANNE, "gone@example.org"])
        self.clock = ShiftedReactor(reactor)

    def start_service(self):
        self.service = makeService(self.settings, self.clock)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.runner = self.service.getServiceNamed("mailrelay-delivery")
        self.warnings = self.service.getServiceNamed("mailrelay-bounce-warnings")

    async def days_pass(self, days: float) -> None:
        """Move the clock ``days`` forward and run the warnings check."""
        self.clock.offset += days * DAY
        if not hasattr(self, "service"):
            self.start_service()
        await self.warnings.check()
        await self.settle()

    async def bounce_daily(self, times: int, address: str = ANNE) -> None:
        for _ in range(times):
            await self.send(verp(address), bounce(verp(address)), sender="")
            await self.days_pass(1)

    def record(self, address: str = ANNE):
        return self.registry.get_member(LIST, address)

    async def post(self, subject: str = "a post") -> None:
        await self.send(
            LIST,
            message(subject, "hello list", sender="member@example.org", to=LIST),
            sender="member@example.org",
        )

    def posts_to(self, address: str, subject: str = "a post"):
        return [m for m in self.received(address) if m["Subject"] == subject]


class DisableTests(BounceCase):
    def test_verp_bounces_disable_at_threshold_and_posts_skip_the_member(self):
        """Five VERP bounces on five days disable delivery (the member stays subscribed);
        a post then reaches the other members but not the disabled one."""

        async def go():
            await self.bounce_daily(4)
            self.assertEqual(self.record().bounce_score, 4.0)
            self.assertTrue(self.record().delivery_enabled)
            # A second bounce on one day counts once.
            await self.send(verp(ANNE), bounce(verp(ANNE)), sender="")
            await self.send(verp(ANNE), bounce(verp(ANNE)), sender="")
            record = self.record()
            self.assertEqual(
                (record.bounce_score, record.delivery_enabled, record.disabled_reason),
                (5.0, False, "by_bounces"),
            )
            self.assertIn(ANNE, self.members())
            self.smarthost.clear()
            await self.post()
            self.assertEqual(len(self.posts_to("member@example.org")), 1)
            self.assertEqual(self.posts_to(ANNE), [])

        return as_deferred(go())

    def test_dsn_bounce_scores_the_failed_recipient(self):
        """An RFC 3464 report to the plain -bounces address scores the recipient it
        reports failed, and only logs the one it reports delayed."""

        async def go():
            self.registry.add_members(LIST, ["full@example.org"])
            await self.send("test-bounces@example.com", fixture("postfix-failed.eml"), sender="")
            self.assertEqual(self.record("gone@example.org").bounce_score, 1.0)
            self.assertEqual(self.record("full@example.org").bounce_score, 0.0)
            (entry,) = [e for e in self.entries() if e.destination.subaddress == "bounces"]
            self.assertEqual(entry.state, EntryState.DONE)

        return as_deferred(go())

    def test_smarthost_refusal_counts_toward_the_score(self):
        """A member the smarthost refuses permanently at RCPT gets a bounce score, as
        from a bounce message, and `members show` reports it."""

        async def go():
            self.smarthost.reject("rcpt", 550, "5.1.1 no such user", match=ANNE)
            await self.post()
            self.assertEqual(self.record().bounce_score, 1.0)
            code, out, _ = self.admin("members", "show", LIST, ANNE)
            self.assertEqual(code, 0)
            self.assertIn("bounce score:", out)
            self.assertIn("1 (delivery disabled at 5)", out)
            self.assertIn("smarthost refusals: 1", out)

        return as_deferred(go())


class WarningTests(BounceCase):
    def warnings_received(self):
        return [m for m in self.received(ANNE) if "is disabled" in m["Subject"]]

    def disable_notices(self):
        return [m for m in self.received("owner@example.com") if "disabled" in m["Subject"]]

    def test_warnings_then_removal_with_owner_notice(self):
        """A disabled member gets a warning at the next check and every 7 days (three,
        each with a -confirm+TOKEN to re-enable), and the owner one notice of the disable
        with the first warning; 7 days after the last warning the member is removed and
        the owner is told."""

        async def go():
            await self.bounce_daily(5)
            self.assertFalse(self.record().delivery_enabled)
            (disabled,) = self.disable_notices()
            self.assertEqual(disabled["Auto-Submitted"], "auto-generated")
            self.assertEqual(disabled["X-MailFrom"], "test-bounces@example.com")
            self.assertIsNone(disabled["List-Id"])
            self.assertIn(ANNE, disabled["Subject"])
            (first,) = self.warnings_received()
            self.assertEqual(first["Auto-Submitted"], "auto-generated")
            self.assertEqual(first["X-MailFrom"], "test-bounces@example.com")
            self.assertRegex(first["Reply-To"], r"test-confirm\+[0-9a-f]{40}@example.com")
            await self.days_pass(3)
            self.assertEqual(len(self.warnings_received()), 1)
            await self.days_pass(4)
            await self.days_pass(7)
            self.assertEqual(len(self.warnings_received()), 3)
            tokens = {m["Reply-To"] for m in self.warnings_received()}
            self.assertEqual(len(tokens), 3)
            self.assertIn(ANNE, self.members())
            await self.days_pass(7)
            self.assertNotIn(ANNE, self.members())
            (notice,) = [m for m in self.received("owner@example.com") if "removed" in m["Subject"]]
            self.assertIn(ANNE, notice.get_payload(decode=True).decode())
            self.assertEqual(len(self.warnings_received()), 3)
            self.assertEqual(len(self.disable_notices()), 1)

        return as_deferred(go())

    def test_disable_notice_set_off_for_the_site_and_on_for_a_list(self):
        """[lists] bounce_notify_owner_on_disable = no silences the owners' notice of a
        disable (the member is still warned); `mailrelay lists set LIST
        bounce_notify_owner_on_disable=yes` turns it on for that list; a bad value is
        refused naming the key."""

        async def go():
            await self.start(bounce_notify_owner_on_disable="no")
            await self.bounce_daily(5)
            self.assertEqual(len(self.warnings_received()), 1)
            self.assertEqual(self.disable_notices(), [])
            code, _, err = self.admin("lists", "set", LIST, "bounce_notify_owner_on_disable=often")
            self.assertEqual(code, 1)
            self.assertIn("bounce_notify_owner_on_disable = 'often': not a boolean", err)
            code, out, err = self.admin("lists", "set", LIST, "bounce_notify_owner_on_disable=yes")
            self.assertEqual(code, 0, out + err)
            await self.bounce_daily(5, "gone@example.org")
            (notice,) = self.disable_notices()
            self.assertIn("gone@example.org", notice["Subject"])

        return as_deferred(go())

    def test_reenable_by_replying_to_a_warning(self):
        """A reply to the warning's -confirm+TOKEN address turns delivery back on; the
        member gets the next post again."""

        async def go():
            await self.bounce_daily(5)
            (warning,) = self.warnings_received()
            await self.send(warning["Reply-To"], message("Re: warning", "yes", sender=ANNE))
            record = self.record()
            self.assertEqual((record.delivery_enabled, record.bounce_score), (True, 0.0))
            self.assertIn("enabled again", self.received(ANNE)[-1]["Subject"])
            await self.post("after")
            self.assertEqual(len(self.posts_to(ANNE, "after")), 1)
            # The spent token re-enables nothing a second time: a neutral reply.
            await self.send(warning["Reply-To"], message("Re: warning", "again", sender=ANNE))
            self.assertIn("not", self.received(ANNE)[-1].get_payload(decode=True).decode())

        return as_deferred(go())

    def test_members_enable_from_the_command_line(self):
        """`mailrelay members enable` re-enables a member disabled by bounces; `members
        show` reports the disabled reason before and enabled after."""

        async def go():
            await self.bounce_daily(5)
            code, out, _ = self.admin("members", "show", LIST, ANNE)
            self.assertIn("delivery:           disabled (by_bounces)", out)
            self.assertIn("warnings sent:      1 of 3", out)
            code, out, err = self.admin("members", "enable", LIST, ANNE)
            self.assertEqual(code, 0, err)
            self.assertIn("enabled again", out)
            self.assertTrue(self.record().delivery_enabled)
            code, _, err = self.admin("members", "show", LIST, "nobody@example.org")
            self.assertEqual(code, 1)
            self.assertIn("not a member", err)

        return as_deferred(go())


class UnrecognisedTests(BounceCase):
    def test_unrecognised_bounce_is_kept_and_forwarded(self):
        """A bounce naming nobody stays in the spool as a HELD entry, and the owner gets
        a copy with the bounce attached byte for byte."""

        async def go():
            data = bounce("test-bounces@example.com", "Something \xe9 went wrong.")
            await self.send("test-bounces@example.com", data, sender="")
            (entry,) = [e for e in self.entries() if e.destination.subaddress == "bounces"]
            self.assertEqual(entry.state, EntryState.HELD)
            self.assertIn("unrecognised bounce", entry.last_error)
            (copy,) = self.received("owner@example.com")
            self.assertIn("Unrecognised bounce", copy["Subject"])
            (attached,) = [p for p in copy.walk() if p.get_filename() == "bounce.eml"]
            self.assertIn(b"Something \xc3\xa9 went wrong.", attached.get_payload(decode=True))

        return as_deferred(go())

    def test_non_utf8_dsn_is_kept(self):
        """A DSN whose report names its recipients in 8-bit non-UTF-8 bytes is kept as
        unrecognised (HELD, forwarded), never a crash.  (A DSN with MIME defects, such as
        a truncated one, is refused at LMTP with 501 like any defective message, so the
        sending MTA keeps it; the parser's own fail-safety is pinned in memory.)"""

        async def go():
            data = fixture("postfix-failed.eml")
            for address in (b"gone@example.org", b"full@example.org", b"decoy@example.org"):
                data = data.replace(address, b"\xff\xfe@\xe9xample.org")
            data = data.replace(b"Gone@Example.org", b"\xff@\xfe")
            await self.send("test-bounces@example.com", data, sender="")
            (entry,) = [e for e in self.entries() if e.destination.subaddress == "bounces"]
            self.assertEqual(entry.state, EntryState.HELD)
            self.assertEqual(len(self.received("owner@example.com")), 1)

        return as_deferred(go())
