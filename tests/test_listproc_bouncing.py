"""Tests for :mod:`mailrelay.listproc.bouncing`: Mailman 3's bounce score, the
``-bounces`` handler, re-enable tokens and the time-driven warnings and removals.

In memory (MemoryRegistry, MemorySpool) on a ``task.Clock``; the fixtures are
those of ``tests/test_listproc_bounces.py``.
"""

from __future__ import annotations

import email

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listproc.bouncing import (
    BounceHandler,
    BounceRules,
    BounceScorer,
    BounceWarnings,
    ReenableAction,
    Scored,
    reenable_member,
    score_bounce,
)
from mailrelay.listproc.membership import Confirmation, list_templates
from mailrelay.listproc.processor import Handled, ListMail
from mailrelay.listproc.tokens import PendingAction, new_pending
from mailrelay.model import (
    Bounce,
    Destination,
    DisabledReason,
    EntryKind,
    EntryState,
    MemberRecord,
    SpoolEntry,
)
from mailrelay.registry import MemoryRegistry
from mailrelay.spool import MemorySpool
from tests.test_listproc_bounces import fixture

LIST = "test@example.com"
ANNE = "anne@example.org"
DAY = 86400.0
START = 1_736_000_000.0  # a fixed moment, mid-day UTC


def verp(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"test-bounces+{local}={domain}@example.com"


BOUNCE = (
    b"From: MAILER-DAEMON@mx.example.net\r\nTo: test-bounces@example.com\r\n"
    b"Subject: failure\r\n\r\nSomething went wrong.\r\n"
)


class Case(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START)
        self.registry = MemoryRegistry()
        self.registry.create_list(LIST, "Test", ["owner@example.com"])
        self.registry.add_members(LIST, [ANNE, "gone@example.org", "full@example.org"])
        self.spool = MemorySpool(self.clock)
        self.scorer = BounceScorer(self.registry)
        self.handler = BounceHandler(self.registry, self.scorer)

    def mail(self, message: bytes, recipient: str = "test-bounces@example.com") -> ListMail:
        entry = SpoolEntry(
            1,
            1,
            "",
            Destination(LIST, "bounces", recipient),
            EntryState.INFLIGHT,
            self.clock.seconds(),
            message_id="<b@mx.example.net>",
        )
        return ListMail(entry, message, self.registry.get_list(LIST), self.clock.seconds())

    def bounce(self, address: str = ANNE, message: bytes = BOUNCE) -> Handled:
        return self.handler.handle(self.mail(message, verp(address)))

    def record(self, address: str = ANNE) -> MemberRecord:
        return self.registry.get_member(LIST, address)

    def bounce_daily(self, days: int, address: str = ANNE) -> None:
        for _ in range(days):
            self.bounce(address)
            self.clock.advance(DAY)


class ScoreTests(SynchronousTestCase):
    rules = BounceRules()

    def test_first_bounce_counts_one(self):
        """A permanent bounce of an enabled member adds one and records when."""
        result, changes = score_bounce(MemberRecord(ANNE), START, self.rules)
        self.assertEqual(
            (result, changes), (Scored.COUNTED, {"bounce_score": 1.0, "last_bounce_at": START})
        )

    def test_at_most_one_increase_per_day(self):
        """A second bounce on the same UTC day changes nothing (Mailman's rule)."""
        record = MemberRecord(ANNE, bounce_score=2.0, last_bounce_at=START)
        self.assertEqual(score_bounce(record, START + 3600, self.rules), (Scored.SAME_DAY, {}))

    def test_stale_score_starts_again(self):
        """After bounce_info_stale_after without bounces, the score restarts at one."""
        record = MemberRecord(ANNE, bounce_score=4.0, last_bounce_at=START)
        result, changes = score_bounce(record, START + 8 * DAY, self.rules)
        self.assertEqual((result, changes["bounce_score"]), (Scored.COUNTED, 1.0))

    def test_threshold_disables_delivery(self):
        """Reaching bounce_score_threshold disables delivery by bounces, warnings afresh."""
        record = MemberRecord(ANNE, bounce_score=4.0, last_bounce_at=START - DAY)
        result, changes = score_bounce(record, START, self.rules)
        self.assertEqual(result, Scored.DISABLED)
        self.assertEqual(
            changes,
            {
                "bounce_score": 5.0,
                "last_bounce_at": START,
                "delivery_enabled": False,
                "disabled_reason": "by_bounces",
                "warnings_sent": 0,
                "last_warning_at": None,
            },
        )

    def test_disabled_member_is_not_scored(self):
        """A residual bounce of a member already disabled changes nothing."""
        record = MemberRecord(ANNE, delivery_enabled=False, bounce_score=5.0)
        self.assertEqual(score_bounce(record, START, self.rules), (Scored.ALREADY_DISABLED, {}))

    def test_list_settings_override_site_rules(self):
        """A list's own bounce settings win over the site's; unset ones keep the site's."""
        from mailrelay.listsettings import settings_from_text

        site = BounceRules(threshold=7, warnings=2)
        own = settings_from_text(
            {"bounce_score_threshold": "2", "forward_unrecognized_bounces_to": "none"}
        )
        rules = site.for_list(own)
        self.assertEqual((rules.threshold, rules.warnings), (2, 2))
        self.assertFalse(rules.forward_unrecognised)


class HandlerTests(Case):
    def test_verp_bounce_scores_the_member(self):
        """A VERP bounce names the member; its score rises once per day."""
        handled = self.bounce()
        self.assertEqual(handled.state, EntryState.DONE)
        self.assertIn(f"{ANNE}: counted", handled.note)
        self.bounce()
        self.assertEqual(self.record().bounce_score, 1.0)

    def test_five_daily_bounces_disable_delivery(self):
        """At the threshold the member stays subscribed with delivery disabled by bounces,
        and no longer gets posts (members(enabled_only=True), what routing reads)."""
        self.bounce_daily(5)
        record = self.record()
        self.assertEqual(
            (record.delivery_enabled, record.disabled_reason, record.bounce_score),
            (False, DisabledReason.BY_BOUNCES.value, 5.0),
        )
        self.assertIn(ANNE, [m.address for m in self.registry.members(LIST)])
        self.assertNotIn(ANNE, [m.address for m in self.registry.members(LIST, enabled_only=True)])

    def test_dsn_counts_permanent_and_only_logs_temporary(self):
        """A Postfix DSN: the failed recipient is scored, the delayed one is not."""
        handled = self.handler.handle(self.mail(fixture("postfix-failed.eml")))
        self.assertEqual(self.record("gone@example.org").bounce_score, 1.0)
        self.assertEqual(self.record("full@example.org").bounce_score, 0.0)
        self.assertIn("full@example.org: temporary, not counted", handled.note)

    def test_bounce_of_a_non_member_changes_nothing(self):
        """A recognised bounce naming a non-member is done with, nothing changes."""
        handled = self.bounce("stranger@example.net")
        self.assertEqual(handled.state, EntryState.DONE)
        self.assertIn("not a member", handled.note)

    def test_unrecognised_bounce_is_held_and_copied_to_owners(self):
        """A bounce naming nobody is HELD (kept), counted, and copied to the owners
        with the bounce attached unchanged and the loop-guard header."""
        handled = self.handler.handle(self.mail(BOUNCE))
        self.assertEqual(handled.state, EntryState.HELD)
        self.assertIn("unrecognised bounce", handled.note)
        self.assertEqual(self.handler.unrecognised, 1)
        (copy,) = handled.outgoing
        self.assertEqual(copy.recipients, ("owner@example.com",))
        self.assertEqual(copy.sender, "test-bounces@example.com")
        msg = email.message_from_bytes(copy.message)
        self.assertEqual(msg["X-Mailrelay-Unrecognised-Bounce"], "yes")
        self.assertEqual(msg["Auto-Submitted"], "auto-generated")
        attachment = [p for p in msg.walk() if p.get_filename() == "bounce.eml"][0]
        self.assertEqual(attachment.get_payload(decode=True), BOUNCE)

    def test_unrecognised_not_forwarded_when_configured_none(self):
        """forward_unrecognized_bounces_to = none: kept HELD, nothing sent."""
        self.registry.update_list_settings(LIST, {"forward_unrecognized_bounces_to": "none"})
        handled = self.handler.handle(self.mail(BOUNCE))
        self.assertEqual((handled.state, handled.outgoing), (EntryState.HELD, ()))

    def test_bounce_of_a_forwarded_copy_is_not_forwarded_again(self):
        """An unrecognised bounce carrying our forward's marker is kept, not forwarded
        (an owner whose mailbox bounces must not start a loop)."""
        first = self.handler.handle(self.mail(BOUNCE)).outgoing[0].message
        handled = self.handler.handle(self.mail(b"Subject: returned\r\n\r\n" + first))
        self.assertEqual((handled.state, handled.outgoing), (EntryState.HELD, ()))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        data=st.one_of(
            st.binary(max_size=3000),
            st.sampled_from(["postfix-failed.eml", "exim-failed.eml", "qmail.eml"]).flatmap(
                lambda name: st.integers(0, len(fixture(name))).map(lambda n: fixture(name)[:n])
            ),
            st.binary(max_size=200).map(lambda junk: fixture("postfix-failed.eml") + junk),
        )
    )
    def test_any_bytes_fail_safe(self, data):
        """Random, truncated and non-UTF-8 bounces never raise: the result is DONE
        (something recognised) or HELD (kept as unrecognised)."""
        handled = self.handler.handle(self.mail(data))
        self.assertIn(handled.state, (EntryState.DONE, EntryState.HELD))

    def test_huge_bounce_is_capped_and_kept(self):
        """A 5 MB bounce naming nobody is read only up to the cap and kept; the owners'
        copy carries at most the forwarding cap."""
        from mailrelay.listproc.bouncing import MAX_FORWARDED

        huge = BOUNCE + b"\xff\xfe junk " * 500_000
        handled = self.handler.handle(self.mail(huge))
        self.assertEqual(handled.state, EntryState.HELD)
        self.assertLess(len(handled.outgoing[0].message), MAX_FORWARDED * 2)


class RunnerFailureTests(Case):
    def test_smarthost_refusals_feed_the_same_score(self):
        """The runner's recorded refusals go through the same rules: once a day, then disabled."""
        for day in range(5):
            at = START + day * DAY
            self.scorer.register_failures([Bounce(LIST, ANNE, 550, "5.1.1 no such user", at)])
            self.scorer.register_failures([Bounce(LIST, ANNE, 550, "again", at + 60)])
        self.assertEqual(self.record().bounce_score, 5.0)
        self.assertFalse(self.record().delivery_enabled)

    def test_bounced_event(self):
        """Scoring a refusal logs event "bounced" with the list, the member, what
        scoring did, the score, and the smarthost's code and one-line response."""
        with capturedLogs() as events:
            self.scorer.register_failures([Bounce(LIST, ANNE, 550, "5.1.1 no\r\n such", START)])
        (event,) = [e for e in events if e.get("event") == "bounced"]
        self.assertEqual(
            (event["list"], event["recipient"], event["result"], event["score"]),
            (LIST, ANNE, "counted", 1.0),
        )
        self.assertEqual((event["code"], event["response"]), (550, "5.1.1 no such"))

    def test_bounce_message_event(self):
        """A bounce message to -bounces logs event "bounced" too, without a code."""
        with capturedLogs() as events:
            self.bounce()
        (event,) = [e for e in events if e.get("event") == "bounced"]
        self.assertEqual((event["recipient"], event["list"]), (ANNE, LIST))
        self.assertNotIn("code", event)

    def test_registry_trouble_is_logged_not_raised(self):
        """A refusal for a list deleted meanwhile is logged; delivery goes on."""
        self.scorer.register_failures([Bounce("gone@example.com", ANNE, 550, "x", START)])


class WarningTests(Case):
    def setUp(self):
        super().setUp()
        self.woken = 0
        self.warnings = BounceWarnings(
            self.registry, self.spool, self.scorer, clock=self.clock, wake=self.wake
        )

    def wake(self):
        self.woken += 1

    def start(self):
        self.warnings.startService()
        self.addCleanup(lambda: self.warnings.running and self.warnings.stopService())

    def notices(self):
        entries = [e for e in self.spool.entries() if e.kind is EntryKind.NOTICE]
        return [
            (e.destination.address, email.message_from_bytes(self.spool.get_message(e.message_key)))
            for e in entries
        ]

    def disable(self):
        self.bounce_daily(5)
        self.assertFalse(self.record().delivery_enabled)

    def warnings_to(self, address):
        return [m for to, m in self.notices() if to == address]

    def disable_notices(self):
        return [m for m in self.warnings_to("owner@example.com") if "disabled" in m["Subject"]]

    def test_owners_told_once_per_disable(self):
        """bounce_notify_owner_on_disable (default yes): the owners get one notice per
        disable, stored with the member's first warning, from -owner and loop-safe like
        the other notices; later warnings, and a restart, add none; a new disable after
        re-enabling is told again."""
        self.disable()
        self.start()
        (notice,) = self.disable_notices()
        self.assertEqual(notice["Subject"], f"Delivery to {ANNE} disabled on Test")
        self.assertEqual(notice["Auto-Submitted"], "auto-generated")
        self.assertIn("test-owner@example.com", notice["From"])
        body = notice.get_payload(decode=True).decode()
        self.assertIn(f"{ANNE}\nhas been bouncing", body.replace("\r\n", "\n"))
        self.assertIn("bounce score 5 reached the threshold of 5", body)
        (entry,) = [
            e
            for e in self.spool.entries()
            if e.kind is EntryKind.NOTICE and e.destination.address == "owner@example.com"
        ]
        self.assertEqual(entry.sender, "test-bounces@example.com")
        self.clock.advance(7 * DAY)
        self.assertEqual(len(self.warnings_to(ANNE)), 2)
        self.successResultOf(self.warnings.stopService())
        again = BounceWarnings(self.registry, self.spool, self.scorer, clock=self.clock)
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual(len(self.disable_notices()), 1)
        reenable_member(self.registry, LIST, ANNE)
        self.disable()
        self.clock.advance(3600)
        self.assertEqual(len(self.disable_notices()), 2)

    def test_disable_notice_off(self):
        """bounce_notify_owner_on_disable = no, for the site or the list: the warnings
        go, the owners hear nothing of the disable."""
        self.registry.update_list_settings(LIST, {"bounce_notify_owner_on_disable": "no"})
        self.disable()
        self.start()
        self.assertEqual(len(self.warnings_to(ANNE)), 1)
        self.assertEqual(self.disable_notices(), [])
        site_off = BounceScorer(self.registry, BounceRules(notify_owner_on_disable=False))
        self.registry.update_list_settings(LIST, {"bounce_notify_owner_on_disable": ""})
        self.assertFalse(site_off.rules(LIST).notify_owner_on_disable)
        self.assertTrue(self.scorer.rules(LIST).notify_owner_on_disable)

    def test_removed_at_once_gets_only_the_removal_notice(self):
        """With no warnings configured the member is removed at the first check: the
        owners get the removal notice, not a disable notice as well."""
        self.registry.update_list_settings(LIST, {"bounce_you_are_disabled_warnings": "0"})
        self.disable()
        self.start()
        self.assertIsNone(self.record())
        (removal,) = self.warnings_to("owner@example.com")
        self.assertIn("removed", removal["Subject"])

    def test_warnings_then_removal_on_the_clock(self):
        """Disabled by bounces: a warning at the next check and every 7 days, three in
        all, each with its own re-enable token; 7 days after the third the member is
        removed and the owner told."""
        self.disable()
        self.start()
        notices = self.warnings_to(ANNE)
        self.assertEqual(len(notices), 1)
        warning = notices[0]
        self.assertIn("test-confirm+", warning["Reply-To"])
        self.assertIn(
            "Warnings left before the address is removed from the list: 2",
            warning.get_payload(decode=True).decode(),
        )
        self.assertEqual(self.woken, 1)
        self.clock.advance(6 * DAY)
        self.assertEqual(len(self.warnings_to(ANNE)), 1)
        self.clock.advance(DAY)
        self.clock.advance(7 * DAY)
        self.assertEqual(len(self.warnings_to(ANNE)), 3)
        self.assertEqual(self.record().warnings_sent, 3)
        tokens = {p.token for p in self.registry.pending(LIST)}
        self.assertEqual(len(tokens), 3)
        self.assertTrue(
            all(p.action is PendingAction.REENABLE for p in self.registry.pending(LIST))
        )
        self.clock.advance(7 * DAY)
        self.assertIsNone(self.record())
        to, removal = self.notices()[-1]
        self.assertEqual(to, "owner@example.com")
        self.assertIn(ANNE, removal["Subject"])

    def test_no_owner_notice_when_configured_off(self):
        """bounce_notify_owner_on_removal = no: removed silently."""
        self.registry.update_list_settings(
            LIST, {"bounce_notify_owner_on_removal": "no", "bounce_you_are_disabled_warnings": "0"}
        )
        self.disable()
        self.start()
        self.assertIsNone(self.record())
        self.assertEqual(self.notices(), [])

    def test_restart_keeps_the_schedule(self):
        """The schedule lives in the member record: a new service (a restart) sends no
        second warning before the interval is over."""
        self.disable()
        self.start()
        self.successResultOf(self.warnings.stopService())
        again = BounceWarnings(self.registry, self.spool, self.scorer, clock=self.clock)
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual(len(self.warnings_to(ANNE)), 1)
        self.clock.advance(7 * DAY)
        self.assertEqual(len(self.warnings_to(ANNE)), 2)

    def test_reenable_by_token(self):
        """Confirming a warning's REENABLE token turns delivery on and clears the score;
        the member gets a short notice."""
        self.disable()
        pending = new_pending(LIST, ANNE, PendingAction.REENABLE, START, 7 * DAY)
        mail = self.mail(b"Subject: Re\r\n\r\nyes\r\n", "test-confirm+x@example.com")
        result = ReenableAction()(
            Confirmation(pending, mail, ANNE, list_templates("", LIST, "en")), self.registry
        )
        self.assertEqual(result.note, "delivery enabled")
        record = self.record()
        self.assertEqual(
            (record.delivery_enabled, record.bounce_score, record.disabled_reason), (True, 0.0, "")
        )
        (notice,) = result.replies
        self.assertEqual(notice.recipients, (ANNE,))

    def test_reenable_of_a_removed_member_changes_nothing(self):
        """A token confirmed after the removal adds nobody back."""
        self.registry.remove_members(LIST, [ANNE])
        self.assertIsNone(reenable_member(self.registry, LIST, ANNE))
        self.assertIsNone(self.record())
