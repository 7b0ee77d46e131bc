"""The posting policy's rules (mailrelay.listproc.posting), without storage."""

from __future__ import annotations

from email.parser import BytesHeaderParser

from twisted.trial.unittest import SynchronousTestCase

from mailrelay.listproc.posting import (
    PostAction,
    PostingPolicy,
    decide_post,
    loop_reason,
    poster_addresses,
)
from mailrelay.listsettings import ListSettings, NonmemberAction, Posting
from mailrelay.model import MailingList, MemberRecord
from mailrelay.registry import MemoryRegistry

MLIST = MailingList("test@example.com", "Test", ("owner@example.com",))


def headers(text: str):
    return BytesHeaderParser().parsebytes(text.encode())


class DecideTests(SynchronousTestCase):
    def decide(self, members=(), loop=None, **settings):
        return decide_post(ListSettings(**settings), ["anne@example.org"], list(members), loop)

    def test_defaults_accept_members_and_hold_others(self):
        """posting = members (the default): a member's post is accepted, a non-member's
        held (nonmember_action = hold), the reason naming the poster."""
        member = MemberRecord("anne@example.org")
        self.assertIs(self.decide([member]).action, PostAction.ACCEPT)
        decision = self.decide()
        self.assertEqual(
            (decision.action, decision.reason, decision.poster),
            (PostAction.HOLD, "anne@example.org is not a member of the list", "anne@example.org"),
        )

    def test_nonmember_actions(self):
        """Each nonmember_action maps to its own outcome for a non-member."""
        for action, expected in [
            (NonmemberAction.HOLD, PostAction.HOLD),
            (NonmemberAction.REJECT, PostAction.REJECT),
            (NonmemberAction.DISCARD, PostAction.DISCARD),
            (NonmemberAction.ACCEPT, PostAction.ACCEPT),
        ]:
            self.assertIs(self.decide(nonmember_action=action).action, expected)

    def test_moderated_member_held_whatever_the_posting(self):
        """A member with the moderated flag is held on members, open and moderated lists."""
        member = MemberRecord("anne@example.org", moderated=True)
        for posting in Posting:
            decision = self.decide([member], posting=posting)
            self.assertIs(decision.action, PostAction.HOLD)
            self.assertIn("is moderated", decision.reason)

    def test_open_and_moderated(self):
        """open accepts anyone (even with nonmember_action = reject); moderated holds members."""
        self.assertIs(
            self.decide(posting=Posting.OPEN, nonmember_action=NonmemberAction.REJECT).action,
            PostAction.ACCEPT,
        )
        member = MemberRecord("anne@example.org")
        self.assertIs(self.decide([member], posting=Posting.MODERATED).action, PostAction.HOLD)

    def test_loop_wins(self):
        """A loop is discarded before anything else, even a member's post to an open list."""
        decision = self.decide([MemberRecord("anne@example.org")], "loop: x", posting=Posting.OPEN)
        self.assertEqual((decision.action, decision.reason), (PostAction.DISCARD, "loop: x"))


class LoopTests(SynchronousTestCase):
    def test_own_list_id_and_x_beenthere(self):
        """The list's own List-Id (any display name, any case) and an X-BeenThere naming its
        posting address (the whole value) are loops; another list's are not, even one whose
        name ends in this one's; no headers, no loop."""
        for text in [
            "List-Id: Test <test.example.com>\n",
            "List-Id: <TEST.Example.COM>\n",
            "List-Id: test.example.com\n",
            "X-BeenThere: Test@Example.com\n",
            "X-BeenThere: <test@example.com>\n",
            "List-Id: <other.example.com>\nList-Id: <test.example.com>\n",
        ]:
            self.assertIsNotNone(loop_reason(headers(text), MLIST), text)
        for text in [
            "List-Id: <other.example.com>\n",
            "List-Id: <test.example.com.evil>\n",
            "X-BeenThere: other@example.com\n",
            "X-BeenThere: alltest@example.com\n",
            "X-BeenThere: test@example.com.evil\n",
            "Subject: test.example.com\n",
        ]:
            self.assertIsNone(loop_reason(headers(text), MLIST), text)
        self.assertIsNone(loop_reason(None, MLIST))


class PosterTests(SynchronousTestCase):
    def test_from_then_envelope(self):
        """Posters are the From addresses, then the envelope sender, lower-cased, each
        once; invalid addresses and the null sender are left out."""
        found = poster_addresses(
            "Bounce@Relay.example", headers("From: Anne <Anne@Example.org>, junk\n")
        )
        self.assertEqual(found, ("anne@example.org", "bounce@relay.example"))
        self.assertEqual(poster_addresses("", headers("Subject: x\n")), ())
        self.assertEqual(poster_addresses("a@b.example", None), ("a@b.example",))


class PolicyTests(SynchronousTestCase):
    def test_reads_settings_and_members_from_the_registry(self):
        """PostingPolicy finds the member by From or envelope sender and sees a settings
        change at the next decision."""
        registry = MemoryRegistry()
        registry.create_list(MLIST.posting_address, owners=MLIST.owners)
        registry.add_members(MLIST.posting_address, ["anne@example.org"])
        policy = PostingPolicy(registry)
        post = b"From: anne@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
        self.assertIs(policy.decide(MLIST, "x@relay.example", post).action, PostAction.ACCEPT)
        stranger = b"From: bart@example.net\r\n\r\nbody\r\n"
        self.assertIs(policy.decide(MLIST, "bart@example.net", stranger).action, PostAction.HOLD)
        registry.update_list_settings(MLIST.posting_address, {"nonmember_action": "discard"})
        self.assertIs(policy.decide(MLIST, "bart@example.net", stranger).action, PostAction.DISCARD)
