"""Tests for :mod:`mailrelay.listproc.processor` and the runner's side of list processing:
dispatch by sub-address, replies stored with the request's end, NOTICE entries delivered as
written, held mail released at start, failures kept for the operator.

In memory, on a ``task.Clock``, with the runner tests' scripted sender.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent

from mailrelay.errors import RegistryUnavailable, SpoolError
from mailrelay.listproc.processor import Handled, ListMail, ListProcessor
from mailrelay.model import Destination, EntryKind, EntryState, EntryUpdate, Outgoing
from tests.test_runner import LIST, MESSAGE, RunnerCase

REQUEST = Destination(LIST, "request", "test-request@example.com")
CONFIRM = Destination(LIST, "confirm", "test-confirm+abc123@example.com")
BOUNCES = Destination(LIST, "bounces", "test-bounces@example.com")
REPLY = b"From: test-request@example.com\r\nAuto-Submitted: auto-replied\r\n\r\nDone.\r\n"


class RecordingHandler:
    """Records the mail it gets and answers with ``result`` (a Handled, or an
    exception to raise, or a function of the mail)."""

    def __init__(self, result=None):
        self.mails: list[ListMail] = []
        self.result = result if result is not None else Handled(note="ok")

    def handle(self, mail):
        self.mails.append(mail)
        result = self.result(mail) if callable(self.result) else self.result
        if isinstance(result, Exception):
            raise result
        return result


def _reply(*recipients, sender="test-bounces@example.com"):
    return Outgoing(sender, recipients or ("poster@example.org",), REPLY, LIST, "<r@example.com>")


class ProcessorCase(RunnerCase):
    """A runner with a processor for -request and -confirm (and none for -bounces)."""

    def make_runner(self, **options):
        self.request = RecordingHandler()
        self.confirm = RecordingHandler()
        self.processor = ListProcessor(
            self.spool,
            self.registry,
            clock=self.clock,
            handlers={"request": self.request, "confirm": self.confirm},
        )
        return super().make_runner(processor=self.processor, **options)

    def inbound(self, entry_id):
        (entry,) = [e for e in self.spool.entries() if e.entry_id == entry_id]
        return entry


class DispatchTests(ProcessorCase):
    def test_mail_to_a_handled_subaddress_goes_to_its_handler(self):
        """Mail to -request reaches the request handler with the stored message, the list,
        the envelope sender and the clock's time; the entry is DONE with the handler's note;
        nothing is sent to members."""
        (entry_id,) = self.enqueue(REQUEST)
        (mail,) = self.request.mails
        self.assertEqual(
            (mail.message, mail.mlist.posting_address, mail.sender, mail.subaddress, mail.now),
            (MESSAGE, LIST, "poster@example.org", "request", self.clock.seconds()),
        )
        self.assertEqual(self.confirm.mails, [])
        entry = self.inbound(entry_id)
        self.assertEqual((entry.state, entry.last_error), (EntryState.DONE, "ok"))
        self.assertEqual(self.sender.sent, [])

    def test_token_suffix_reaches_the_handler(self):
        """The +suffix of -confirm+TOKEN is the mail's suffix; without one it is ""."""
        self.enqueue(CONFIRM, REQUEST)
        self.assertEqual(self.confirm.mails[0].suffix, "abc123")
        self.assertEqual(self.request.mails[0].suffix, "")

    def test_routed_while_stored_goes_to_its_handler(self):
        """Mail stored through the runner (as LMTP does) is processed at once."""
        envelope = self.envelope(REQUEST)
        self.successResultOf(self.runner.enqueue(envelope, MESSAGE))
        self.settle()
        self.assertEqual(len(self.request.mails), 1)
        self.assertEqual(self.spool.counts()[EntryState.DONE], 1)

    def test_subaddress_without_handler_stays_held(self):
        """-bounces mail, with no handler plugged in, is HELD as before."""
        (entry_id,) = self.enqueue(BOUNCES)
        self.assertEqual(self.inbound(entry_id).state, EntryState.HELD)

    def envelope(self, *destinations):
        from tests.test_runner import _post_envelope

        return _post_envelope(self.clock, *destinations)


class ReplyTests(ProcessorCase):
    def test_replies_delivered_exactly_as_written_from_the_stored_sender(self):
        """A handler's replies are stored with the request's DONE, then sent exactly as
        written (no list headers), from the envelope sender given, to each recipient."""
        self.request.result = Handled((_reply("poster@example.org", "bart@example.org"),), note="x")
        (entry_id,) = self.enqueue(REQUEST)
        self.assertEqual(self.inbound(entry_id).state, EntryState.DONE)
        (sent,) = self.sender.sent
        self.assertEqual(sent.sender, "test-bounces@example.com")
        self.assertEqual(sorted(sent.rcpts), ["bart@example.org", "poster@example.org"])
        self.assertEqual(sent.message.data, REPLY)
        notices = self.entries(EntryKind.NOTICE)
        self.assertEqual(
            {a: e.state for a, e in notices.items()},
            dict.fromkeys(["bart@example.org", "poster@example.org"], EntryState.DONE),
        )

    def test_null_sender_notice(self):
        """A notice stored with the null sender (a DSN) goes out with MAIL FROM:<>."""
        self.request.result = Handled((_reply(sender=""),))
        self.enqueue(REQUEST)
        self.assertEqual([s.sender for s in self.sender.sent], [""])

    def test_notice_refused_is_not_a_bounce(self):
        """A permanent refusal of a notice's recipient fails that entry but is not recorded
        as a member bounce."""
        self.sender.replies["anne@example.com"] = [(550, b"no such user")]
        self.request.result = Handled((_reply("anne@example.com"),))
        self.enqueue(REQUEST)
        self.assertEqual(self.states(EntryKind.NOTICE), {"anne@example.com": EntryState.FAILED})
        self.assertEqual(self.registry.bounces(LIST), ())

    def test_notice_sent_for_a_deleted_list(self):
        """A notice is sent even if its list was deleted meanwhile (it names the list only)."""
        self.successResultOf(self.spool.store_outgoing([_reply("a@example.org")]))
        self.registry.delete_list(LIST)
        self.runner.wake()
        self.settle()
        self.assertEqual([s.rcpts for s in self.sender.sent], [("a@example.org",)])

    def test_spool_failure_while_storing_replies_retries_the_request(self):
        """If the replies cannot be stored, nothing is: the request is tried again later."""
        self.request.result = Handled((_reply(),))
        original = self.spool.store_outgoing
        self.spool.store_outgoing = lambda *a, **k: defer.fail(SpoolError("disk full"))
        (entry_id,) = self.enqueue(REQUEST)
        entry = self.inbound(entry_id)
        self.assertEqual(entry.state, EntryState.RETRY)
        self.assertIn("disk full", entry.last_error)
        self.spool.store_outgoing = original
        self.advance(61)
        self.assertEqual(len(self.request.mails), 2)
        self.assertEqual(self.inbound(entry_id).state, EntryState.DONE)
        self.assertEqual(len(self.sender.sent), 1)


class FailureTests(ProcessorCase):
    def test_handler_bug_fails_the_entry_with_the_reason(self):
        """A handler that raises leaves the entry FAILED with the error, for `mailrelay
        queue`; the failure is logged."""
        self.request.result = ZeroDivisionError("oops")
        with capturedLogs() as events:
            (entry_id,) = self.enqueue(REQUEST)
        entry = self.inbound(entry_id)
        self.assertEqual(entry.state, EntryState.FAILED)
        self.assertIn("ZeroDivisionError: oops", entry.last_error)
        self.assertTrue(any(e.get("log_failure") is not None for e in events))
        self.flushLoggedErrors(ZeroDivisionError)

    def test_registry_unavailable_retries(self):
        """A registry that cannot answer makes the request RETRY, without counting an attempt."""
        self.request.result = RegistryUnavailable("locked")
        (entry_id,) = self.enqueue(REQUEST)
        entry = self.inbound(entry_id)
        self.assertEqual((entry.state, entry.attempts), (EntryState.RETRY, 0))

    def test_handler_may_fail_or_hold(self):
        """A handler's FAILED or HELD is recorded with its note."""
        self.request.result = Handled(state=EntryState.HELD, note="kept for later")
        (entry_id,) = self.enqueue(REQUEST)
        entry = self.inbound(entry_id)
        self.assertEqual((entry.state, entry.last_error), (EntryState.HELD, "kept for later"))

    def test_log_names_the_address_written_to(self):
        """The log line of a processed message names the address it was sent to: the
        sub-address without its +suffix (a token is a credential), and for a post handed
        to a handler (a held post) the posting address, never a "-None" sub-address."""
        self.confirm.result = Handled(note="confirmed")
        with capturedLogs() as events:
            self.enqueue(CONFIRM)
        (line,) = [formatEvent(e) for e in events if "replies" in formatEvent(e)]
        self.assertIn(" to test-confirm@example.com: done, 0 replies", line)
        self.assertNotIn("abc123", line)

        (post_id,) = self.enqueue(wake=False)
        entry = self.inbound(post_id)
        held = RecordingHandler(Handled(state=EntryState.HELD, note="held for moderation"))
        with capturedLogs() as events:
            self.successResultOf(
                defer.Deferred.fromCoroutine(self.processor.process(entry, handler=held))
            )
        (line,) = [formatEvent(e) for e in events if "replies" in formatEvent(e)]
        self.assertIn(f" to {LIST}: held, 0 replies: held for moderation", line)
        self.assertNotIn("None", line)

    def test_handler_returning_a_deferred(self):
        """A handler may answer with a Deferred (or a coroutine)."""
        self.request.result = lambda mail: None
        self.request.handle = lambda mail: defer.succeed(Handled(note="later"))

        async def confirm(mail):
            return Handled(note="coroutine")

        self.confirm.handle = confirm
        ids = self.enqueue(REQUEST, CONFIRM)
        self.assertEqual([self.inbound(i).last_error for i in ids], ["later", "coroutine"])

    def test_list_gone(self):
        """Mail to a list deleted before processing is FAILED with that reason."""
        (entry_id,) = self.enqueue(REQUEST, wake=False)
        self.registry.delete_list(LIST)
        self.runner.wake()
        self.settle()
        self.assertEqual(self.inbound(entry_id).last_error, "the list no longer exists")

    def test_bad_values_refused(self):
        """Handled refuses states other than DONE, FAILED and HELD; the processor
        refuses a handler without handle()."""
        self.assertRaises(ValueError, Handled, state=EntryState.QUEUED)
        self.assertRaises(
            TypeError,
            ListProcessor,
            self.spool,
            self.registry,
            clock=self.clock,
            handlers={"request": object()},
        )


class HeldAtStartTests(ProcessorCase):
    def setUp(self):
        super().setUp()
        self.stop()

    def test_held_mail_from_an_earlier_release_is_processed_at_start(self):
        """Mail an earlier release HELD for -request is processed when the runner starts;
        HELD -bounces mail (no handler) stays HELD."""
        ids = self.successResultOf(self.spool.enqueue(self.envelope_of(REQUEST, BOUNCES), MESSAGE))
        self.successResultOf(self.spool.update([EntryUpdate(i, EntryState.HELD) for i in ids]))
        self.runner = self.make_runner()
        self.runner.startService()
        self.settle()
        self.assertEqual(len(self.request.mails), 1)
        self.assertEqual([self.inbound(i).state for i in ids], [EntryState.DONE, EntryState.HELD])

    def envelope_of(self, *destinations):
        from tests.test_runner import _post_envelope

        return _post_envelope(self.clock, *destinations)
