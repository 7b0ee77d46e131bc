"""Posting policy and moderation, end to end: posts over LMTP to the running
service (``makeService`` with its SQLite stores), decisions by reply mail and by
``mailrelay held``, and what the recording smarthost receives.
"""

from __future__ import annotations

import email
import re
from email.header import decode_header, make_header

from twisted.internet import reactor
from twisted.logger import capturedLogs, formatEvent

from mailrelay.listproc.tokens import Pending, PendingAction, new_token
from mailrelay.model import Destination, EntryKind, EntryState, Envelope, Route
from mailrelay.spool import SQLiteSpool
from tests.support import as_deferred
from tests.test_listproc_e2e import ANNE, LIST, ListProcessingCase, message

MEMBER = "member@example.org"
OWNER = "owner@example.com"
CONFIRM = re.compile(r"test-confirm\+([0-9a-f]{40})@example\.com")


def post(subject="hello list", body="the post\n", sender=ANNE, headers="") -> bytes:
    return message(subject, body, sender=sender, headers=headers, to=LIST)


class ModerationCase(ListProcessingCase):
    """The relay, with helpers for posts, notices and held entries."""

    async def post(self, data: bytes = None, sender: str = ANNE) -> None:
        await self.send(LIST, post(sender=sender) if data is None else data, sender=sender)

    def posts_received(self, recipient=MEMBER):
        return [m for m in self.received(recipient) if m["List-Id"] is not None]

    def notices(self):
        return [m for m in self.received(OWNER) if "needs approval" in m["Subject"]]

    def notice_token(self, notice) -> str:
        match = CONFIRM.search(notice["Reply-To"])
        self.assertIsNotNone(match, notice["Reply-To"])
        return match.group(1)

    def held(self):
        return [
            e
            for e in self.entries()
            if e.kind is EntryKind.INBOUND
            and e.destination.subaddress is None
            and e.state is EntryState.HELD
        ]

    def post_entry(self):
        (entry,) = [
            e
            for e in self.entries()
            if e.kind is EntryKind.INBOUND and e.destination.subaddress is None
        ]
        return entry

    async def reply_to_notice(self, token: str, body: str, subject="Re: needs approval"):
        await self.send(
            f"test-confirm+{token}@example.com",
            message(subject, body, sender=OWNER, to=f"test-confirm+{token}@example.com"),
            sender=OWNER,
        )

    async def admin_then_settle(self, *argv):
        code, out, err = self.admin(*argv)
        # The daemon finds what another process queued at its next spool
        # poll (poll_interval); the test does not wait for it.
        self.runner.wake()
        await self.settle()
        return code, out, err


class HoldAndApproveTests(ModerationCase):
    def test_nonmember_post_held_then_approved_by_mail(self):
        """A non-member's post (default posting = members, nonmember_action = hold) is
        acknowledged, stays HELD with its reason, reaches no member, and each owner gets one
        notice with sender, subject and size from -confirm+TOKEN; the owner's reply
        "approve" sends it to the members as any post, and the owner is told."""

        async def go():
            data = post("Hello from outside")
            await self.post(data)
            self.assertEqual(self.posts_received(), [])
            (entry,) = self.held()
            self.assertIn("not a member", entry.last_error)
            (notice,) = self.notices()
            self.assert_written_by_mailrelay(notice, "auto-generated")
            token = self.notice_token(notice)
            self.assertIn(f"test-confirm+{token}@example.com", notice["From"])
            body = notice.get_payload(decode=True).decode()
            self.assertIn(ANNE, body)
            self.assertIn("Hello from outside", body)
            stored = self.service.getServiceNamed("mailrelay-stores")._spool.get_message(
                entry.message_key
            )
            self.assertGreater(len(stored), len(data))  # with mailrelay's X-MailFrom
            self.assertRegex(body, rf"Size:\s+{len(stored)} bytes")
            (pending,) = self.registry.pending(LIST)
            self.assertEqual(
                (pending.action, pending.reference), (PendingAction.MODERATE, str(entry.entry_id))
            )
            self.assertAlmostEqual(pending.expires_at - pending.created_at, 14 * 86400)

            await self.reply_to_notice(token, "approve\n\n> quoted notice\n")
            (delivered,) = self.posts_received()
            self.assertEqual(delivered["Subject"], "Hello from outside")
            # The smarthost saw the list's -bounces (its X-MailFrom comes after mailrelay's).
            self.assertEqual(delivered.get_all("X-MailFrom")[-1], "test-bounces@example.com")
            self.assertEqual(self.held(), [])
            self.assertIn("approved by owner@example.com", self.post_entry().last_error)
            answer = self.received(OWNER)[-1]
            self.assert_written_by_mailrelay(answer)
            self.assertIn(b"approved", answer.get_payload(decode=True))
            self.assertEqual(self.registry.pending(LIST), ())

        return as_deferred(go())

    def test_held_then_approved_by_cli(self):
        """`mailrelay held LIST` lists the held post (id, poster, subject, reason);
        `mailrelay held approve ID` sends it to the members and spends the notice's token."""

        async def go():
            await self.post(post("CLI subject"))
            (entry,) = self.held()
            code, out, _ = self.admin("held", LIST)
            self.assertEqual(code, 0)
            self.assertIn(f"{entry.entry_id}  {LIST}  from {ANNE}", out)
            self.assertIn("Subject: CLI subject", out)
            self.assertIn("not a member", out)
            self.assertIn("1 held post", out)
            code, out, _ = await self.admin_then_settle("held", "approve", str(entry.entry_id))
            self.assertEqual(code, 0, out)
            self.assertIn("approved", out)
            self.assertEqual(len(self.posts_received()), 1)
            self.assertEqual(self.registry.pending(LIST), ())
            code, _, err = self.admin("held", "approve", str(entry.entry_id))
            self.assertEqual(code, 1)
            self.assertIn("not a held post", err)
            self.assertEqual(self.admin("held")[1].strip(), "no held posts")

        return as_deferred(go())

    def test_cli_usage_errors(self):
        """Bad `mailrelay held` command lines are usage errors that say what is expected."""
        self.assertEqual(self.admin("held", "approve")[0], 2)
        code, _, err = self.admin("held", "approve", "x")
        self.assertEqual(code, 2)
        self.assertIn("named by its id", err)
        self.assertEqual(self.admin("held", "--reason", "r", "discard", "1")[0], 2)
        code, _, err = self.admin("held", "nolist@example.com")
        self.assertEqual(code, 1)
        self.assertIn("no such list", err)


class RejectAndDiscardTests(ModerationCase):
    def test_rejected_by_mail_tells_the_poster_once(self):
        """An owner's "reject REASON" sends the poster one reply with the reason (from the
        list, Auto-Submitted, -bounces envelope); the post reaches nobody."""

        async def go():
            await self.post(post("Buy now"))
            token = self.notice_token(self.notices()[0])
            await self.reply_to_notice(token, "reject off topic here\n")
            self.assertEqual(self.posts_received(), [])
            (reply,) = self.received(ANNE)
            self.assert_written_by_mailrelay(reply)
            self.assertEqual(reply["X-RcptTo"], ANNE)
            body = reply.get_payload(decode=True).decode()
            self.assertIn("off topic here", body)
            self.assertIn("Buy now", body)
            self.assertEqual(self.post_entry().state, EntryState.DONE)
            self.assertIn("rejected by owner@example.com", self.post_entry().last_error)

        return as_deferred(go())

    def test_discarded_by_mail(self):
        """An owner's "discard" (in the Subject here) drops the post: nobody but the owner
        (the outcome) gets mail."""

        async def go():
            await self.post()
            token = self.notice_token(self.notices()[0])
            await self.reply_to_notice(token, "", subject="discard")
            self.assertEqual(self.posts_received(), [])
            self.assertEqual(self.received(ANNE), [])
            self.assertEqual(self.post_entry().state, EntryState.DONE)
            self.assertIn("discarded by", self.post_entry().last_error)

        return as_deferred(go())

    def test_reject_and_discard_by_cli(self):
        """`held reject --reason TEXT ID` tells the poster; `held discard ID` tells nobody."""

        async def go():
            await self.post(post("first"))
            await self.post(post("second", sender="bart@example.net"), sender="bart@example.net")
            first, second = self.held()
            code, out, _ = await self.admin_then_settle(
                "held", "reject", "--reason", "not here", str(first.entry_id)
            )
            self.assertEqual(code, 0, out)
            (reply,) = self.received(ANNE)
            self.assertIn(b"not here", reply.get_payload(decode=True))
            code, out, _ = await self.admin_then_settle("held", "discard", str(second.entry_id))
            self.assertEqual(code, 0, out)
            self.assertEqual(self.received("bart@example.net"), [])
            self.assertEqual(self.held(), [])
            self.assertEqual(self.posts_received(), [])

        return as_deferred(go())


class PolicyTests(ModerationCase):
    def test_member_posts_and_moderated_member(self):
        """A member's post goes out at once; a member with the moderated flag is held like a
        non-member, with the reason saying so."""

        async def go():
            await self.post(sender=MEMBER)
            self.assertEqual(len(self.posts_received()), 1)
            self.registry.update_member(LIST, MEMBER, {"moderated": True})
            await self.post(post("moderated", sender=MEMBER), sender=MEMBER)
            self.assertEqual(len(self.posts_received()), 1)
            (entry,) = self.held()
            self.assertIn(f"the member {MEMBER} is moderated", entry.last_error)
            self.assertEqual(len(self.notices()), 1)

        return as_deferred(go())

    def test_member_by_from_header(self):
        """The From: address counts as the poster even when the envelope sender differs
        (a member writing through another relay)."""

        async def go():
            await self.send(LIST, post(sender=MEMBER), sender="bounce-123@relay.example.net")
            self.assertEqual(len(self.posts_received()), 1)

        return as_deferred(go())

    def test_open_and_moderated_lists(self):
        """posting = open delivers a non-member's post; posting = moderated holds even a
        member's post."""

        async def go():
            self.registry.update_list_settings(LIST, {"posting": "open"})
            await self.post()
            self.assertEqual(len(self.posts_received()), 1)
            self.registry.update_list_settings(LIST, {"posting": "moderated"})
            await self.post(sender=MEMBER)
            self.assertEqual(len(self.posts_received()), 1)
            (entry,) = self.held()
            self.assertIn("every post to this list is moderated", entry.last_error)

        return as_deferred(go())

    def test_nonmember_actions(self):
        """nonmember_action: reject answers the poster once (nothing held), discard drops
        silently, accept delivers."""

        async def go():
            self.registry.update_list_settings(LIST, {"nonmember_action": "reject"})
            await self.post(post("rejected at once"))
            (reply,) = self.received(ANNE)
            self.assert_written_by_mailrelay(reply)
            self.assertIn(b"rejected at once", reply.get_payload(decode=True))
            self.assertEqual(self.held(), [])
            self.assertEqual(self.notices(), [])
            self.registry.update_list_settings(LIST, {"nonmember_action": "discard"})
            await self.post()
            self.assertEqual(len(self.received()), 1)
            self.registry.update_list_settings(LIST, {"nonmember_action": "accept"})
            await self.post()
            self.assertEqual(len(self.posts_received()), 1)
            self.assertEqual(self.held(), [])

        return as_deferred(go())

    def test_rejection_is_loop_safe(self):
        """A rejected post that must not be answered (Precedence: bulk, a null sender) gets
        no reply; beyond the daily reply limit, silence too."""

        async def go():
            self.registry.update_list_settings(
                LIST, {"nonmember_action": "reject", "max_autoresponses_per_day": "1"}
            )
            await self.post(post(headers="Precedence: bulk\r\n"))
            await self.send(LIST, post(), sender="")
            self.assertEqual(self.received(), [])
            await self.post()
            await self.post()
            self.assertEqual(len(self.received(ANNE)), 1)

        return as_deferred(go())

    def test_list_without_owners_still_holds(self):
        """A list without owners holds the post all the same (no notice can go out);
        `mailrelay held` decides it."""

        async def go():
            self.registry.update_list(LIST, owners=[])
            await self.post()
            self.assertEqual(self.received(), [])
            self.assertEqual(len(self.held()), 1)

        return as_deferred(go())


class LoopTests(ModerationCase):
    def test_own_list_id_or_x_beenthere_is_discarded(self):
        """A post carrying this list's own List-Id or X-BeenThere is discarded (DONE, logged
        with the reason), even from a member; another list's List-Id is no loop."""

        async def go():
            await self.post(post(headers="List-Id: Test <test.example.com>\r\n"), sender=MEMBER)
            await self.post(post(headers="X-BeenThere: test@example.com\r\n"), sender=MEMBER)
            self.assertEqual(self.received(), [])
            notes = [e.last_error for e in self.entries() if e.kind is EntryKind.INBOUND]
            self.assertEqual(len(notes), 2)
            self.assertTrue(all(n.startswith("discarded: loop") for n in notes), notes)
            await self.post(post(headers="List-Id: <other.example.com>\r\n"), sender=MEMBER)
            self.assertEqual(len(self.posts_received()), 1)

        return as_deferred(go())

    def test_a_delivered_post_coming_back_is_discarded(self):
        """The copy a member's mail server sends back to the list (with the List-Id the
        relay added) is not delivered again."""

        async def go():
            await self.post(sender=MEMBER)
            (delivered,) = self.posts_received()
            await self.post(delivered.as_bytes(), sender=MEMBER)
            self.assertEqual(len(self.posts_received()), 1)

        return as_deferred(go())


class LoopRoundTripTests(ModerationCase):
    def as_sent(self, received) -> bytes:
        """A message the smarthost received, without the envelope fields it recorded."""
        copy = email.message_from_bytes(received.as_bytes())
        del copy["X-MailFrom"], copy["X-RcptTo"]
        return copy.as_bytes()

    def test_post_back_through_another_list_is_discarded_by_x_beenthere(self):
        """Posts going out carry X-BeenThere: LIST@DOMAIN.  A post that went out and comes
        back through another list, which replaced the List-Id with its own but kept the
        X-BeenThere (as Mailman and mailrelay do), is discarded and logged; nothing is
        delivered again."""

        async def go():
            other = "other@example.com"
            self.registry.add_members(LIST, [other])
            self.registry.add_members(other, [LIST])
            self.admin("lists", "set", other, "posting=open")
            await self.post(sender=MEMBER)
            (out,) = self.received(other)
            self.assertEqual(out.get_all("X-BeenThere"), [LIST])
            # The other list gets the copy and sends it on to its member, this list.
            await self.send(other, self.as_sent(out), sender=out["X-MailFrom"])
            (back,) = self.received(LIST)
            self.assertEqual(back["List-Id"], "<other.example.com>")
            self.assertEqual(back.get_all("X-BeenThere"), [other, LIST])
            before = len(self.received())
            with capturedLogs() as events:
                await self.send(LIST, self.as_sent(back), sender=back["X-MailFrom"])
            self.assertEqual(len(self.received()), before)
            (entry,) = [
                e
                for e in self.entries()
                if e.kind is EntryKind.INBOUND
                and e.destination.address == LIST
                and e.last_error.startswith("discarded")
            ]
            self.assertEqual(entry.state, EntryState.DONE)
            self.assertEqual(
                entry.last_error, "discarded: loop: the post carries this list's own X-BeenThere"
            )
            logged = [formatEvent(e) for e in events]
            self.assertTrue(
                any(
                    "discarded (loop: the post carries this list's own X-BeenThere)" in line
                    for line in logged
                ),
                logged,
            )

        return as_deferred(go())

    def test_x_beenthere_of_a_longer_list_name_is_no_loop(self):
        """X-BeenThere names one list exactly: a post that went through
        alltest@example.com is no loop for test@example.com."""

        async def go():
            await self.post(post(headers="X-BeenThere: alltest@example.com\r\n"), sender=MEMBER)
            (received,) = self.posts_received()
            self.assertEqual(received.get_all("X-BeenThere"), [LIST, "alltest@example.com"])

        return as_deferred(go())


class SubjectPrefixTests(ModerationCase):
    def last_subject(self) -> str:
        """The decoded Subject of the last post a member received."""
        return str(make_header(decode_header(self.posts_received()[-1]["Subject"])))

    def test_subject_prefix_set_live_added_once(self):
        """No prefix by default; `mailrelay lists set LIST subject_prefix=...` puts it in
        front of the Subject of the next posts (one space, once: a reply keeps one, with
        its Re: after it), and an encoded Subject is decoded and encoded again."""

        async def go():
            await self.post(sender=MEMBER)
            self.assertEqual(self.last_subject(), "hello list")
            code, out, err = self.admin("lists", "set", LIST, "subject_prefix=[test] ")
            self.assertEqual(code, 0, out + err)
            self.assertEqual(self.registry.list_settings(LIST).subject_prefix, "[test]")
            _, out, _ = self.admin("lists", "show", LIST)
            self.assertIn("subject_prefix = [test]", out)
            await self.post(sender=MEMBER)
            self.assertEqual(self.last_subject(), "[test] hello list")
            await self.post(post(subject="Re: [test] hello list"), sender=MEMBER)
            self.assertEqual(self.last_subject(), "[test] Re: hello list")
            await self.post(post(subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?="), sender=MEMBER)
            self.assertEqual(self.last_subject(), "[test] Grüße")
            code, _, err = self.admin("lists", "set", LIST, "subject_prefix=[a]\x07")
            self.assertEqual(code, 1)
            self.assertIn("subject_prefix = '[a]\\x07': must be one line of text", err)
            self.admin("lists", "set", LIST, "subject_prefix=")
            await self.post(sender=MEMBER)
            self.assertEqual(self.last_subject(), "hello list")

        return as_deferred(go())


class LiveSettingsTests(ModerationCase):
    def test_lists_set_is_seen_by_the_running_daemon(self):
        """`mailrelay lists set` changes what the running daemon does with the next post:
        posting policy and owners, without a restart; bad values are refused by name."""

        async def go():
            await self.post()
            self.assertEqual(len(self.held()), 1)
            code, out, _ = self.admin("lists", "set", LIST, "posting=open")
            self.assertEqual(code, 0, out)
            await self.post()
            self.assertEqual(len(self.posts_received()), 1)
            self.admin("lists", "set", LIST, "posting=members", "owners=boss@example.net")
            await self.post()
            self.assertEqual(len(self.held()), 2)
            (notice,) = [m for m in self.received("boss@example.net")]
            self.assertIn("needs approval", notice["Subject"])
            code, _, err = self.admin("lists", "set", LIST, "nonmember_action=bounce")
            self.assertEqual(code, 1)
            self.assertIn("nonmember_action = 'bounce': must be one of hold, reject", err)
            code, _, err = self.admin("lists", "set", LIST, "colour=red")
            self.assertEqual(code, 2)
            self.assertIn("unknown list setting 'colour'", err)
            code, _, err = self.admin("lists", "set", LIST, "posting=open", "owners=not-an-address")
            self.assertEqual(code, 1)
            self.assertEqual(self.registry.list_settings(LIST).posting.value, "members")

        return as_deferred(go())


class TokenTests(ModerationCase):
    def test_forged_replayed_and_foreign_tokens_change_nothing(self):
        """A forged token, another list's moderation token, a reply that decides nothing
        (token kept) and a replayed token after the decision change nothing: the post is
        held until a real decision, and sent once."""

        async def go():
            await self.post()
            token = self.notice_token(self.notices()[0])
            await self.reply_to_notice(new_token(), "approve\n")
            foreign = Pending(
                new_token(),
                "other@example.com",
                ANNE,
                PendingAction.MODERATE,
                0.0,
                4e9,
                reference=str(self.held()[0].entry_id),
            )
            self.registry.add_pending(foreign)
            await self.reply_to_notice(foreign.token, "approve\n")
            await self.reply_to_notice(token, "thanks, will look later\n")
            self.assertEqual(len(self.held()), 1)
            self.assertEqual(self.posts_received(), [])
            self.assertIn(b"nothing done", self.received(OWNER)[-1].get_payload(decode=True))
            self.assertIsNotNone(self.registry.get_pending(token))
            await self.reply_to_notice(token, "approve\n")
            self.assertEqual(len(self.posts_received()), 1)
            before = len(self.received(OWNER))
            await self.reply_to_notice(token, "approve\n")
            await self.reply_to_notice(token, "reject replayed\n")
            self.assertEqual(len(self.posts_received()), 1)
            self.assertEqual(self.received(ANNE), [])
            replies = self.received(OWNER)[before:]
            self.assertEqual(len(replies), 2)
            self.assertTrue(all(b"Nothing" in r.get_payload(decode=True) for r in replies))

        return as_deferred(go())

    def test_moderation_token_does_not_confirm_a_join(self):
        """A moderation token sent as `confirm TOKEN` to -request decides nothing (there is
        no decision in that mail) and subscribes nobody."""

        async def go():
            await self.post()
            token = self.notice_token(self.notices()[0])
            await self.send("test-request@example.com", message(f"confirm {token}"))
            self.assertEqual(len(self.held()), 1)
            self.assertEqual([m.address for m in self.registry.members(LIST)], [MEMBER])

        return as_deferred(go())


class ExpiryAndUpgradeTests(ModerationCase):
    async def store_held_post(self, age: float, subject="old post") -> int:
        spool = SQLiteSpool(self.settings.paths.spool_path, reactor)
        envelope = Envelope(
            ANNE,
            (Destination(LIST, None, LIST),),
            reactor.seconds() - age,
            message_id=f"<{subject.replace(' ', '-')}@x>",
        )
        stored = await spool.store(
            envelope, post(subject), [Route(EntryState.HELD, error="held for moderation: x")]
        )
        await spool.close()
        return stored.entry_ids[0]

    def test_expired_held_posts_are_discarded_at_start(self):
        """A post held longer than [lists] held_post_life is discarded (DONE, noted) by the
        periodic expiry, which runs at start; nobody is told; a younger one stays held."""

        async def go():
            await self.start(held_post_life="2d")
            old = await self.store_held_post(3 * 86400, "old post")
            young = await self.store_held_post(86400, "young post")
            self.start_service()
            await self.settle()
            states = {e.entry_id: (e.state, e.last_error) for e in self.entries()}
            self.assertEqual(states[old][0], EntryState.DONE)
            self.assertIn("held longer than held_post_life (2 days)", states[old][1])
            self.assertEqual(states[young][0], EntryState.HELD)
            self.assertEqual(self.received(), [])

        return as_deferred(go())

    def test_held_post_without_a_notice_can_be_decided(self):
        """A post held before its notice could go out (or by another release) is listed by
        `mailrelay held` and can be approved."""

        async def go():
            entry_id = await self.store_held_post(60)
            self.start_service()
            await self.settle()
            self.assertIn(str(entry_id), self.admin("held")[1])
            code, out, _ = await self.admin_then_settle("held", "approve", str(entry_id))
            self.assertEqual(code, 0, out)
            self.assertEqual(len(self.posts_received()), 1)

        return as_deferred(go())
