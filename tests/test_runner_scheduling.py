"""The runner's scheduler never forgets due work (found by tests/test_reliability_faults.py).

Retries came due while the runner had its maximum of batches in flight: the
timer that announced them was spent, the batches' own results were final, and
nothing ever claimed the retries again (until a restart).
"""

from __future__ import annotations

from mailrelay.model import EntryState, Envelope
from tests.test_runner import MEMBERS, MESSAGE, POST, RunnerCase, ScriptedSender


class DueWorkTests(RunnerCase):
    def test_retry_due_while_batches_are_full_is_claimed_when_one_finishes(self):
        """A retry that comes due while two batches wait on the smarthost is sent as soon
        as they finish, without a wake-up from outside."""
        self.sender.replies["anne@example.com"] = [(451, b"4.3.0 try later"), (250, b"ok")]
        self.enqueue()
        self.assertEqual(self.states()["anne@example.com"], EntryState.RETRY)
        self.sender.hold = True
        for n in (2, 3):
            self.enqueue(message=MESSAGE.replace(b"<post@", b"<post%d@" % n))
        self.assertGreaterEqual(len(self.sender.held), 2)
        self.advance(3 * 3600)  # the retry is due: its timer fires while both wait
        self.sender.hold = False
        while self.sender.held:
            self.sender.release()
            self.settle()
        retried = [s for s in self.sender.sent if "anne@example.com" in s.rcpts]
        first_post = [s for s in retried if b"<post@" in s.message.data]
        self.assertEqual(len(first_post), 2, self.sender.sent)
        self.assertEqual(
            {e.state for e in self.spool.entries() if e.destination.address == "anne@example.com"},
            {EntryState.DONE},
        )


class ConnectionUseTests(RunnerCase):
    """Posts arriving one at a time while the smarthost is slow to answer use every
    connection the runner may open (found by tests/test_reliability_kill.py).

    Each post made a batch of one transaction, and the batch cap was two: with
    two replies pending the other connections stayed unused, and every later
    post waited (stored QUEUED) until one of the two transactions ended, up to
    ``smtp_timeout`` later, though the sender had room for more.
    """

    def hold(self):
        """Hold every reply from now on; answer them all at the end of the test."""
        self.sender.hold = True
        self.addCleanup(self.release_all)

    def release_all(self):
        self.sender.hold = False
        while self.sender.held:
            self.sender.release()
            self.settle()

    def post(self, n):
        """Store post ``n`` through the runner (as LMTP does), routed and claimed inline."""
        envelope = Envelope(
            "poster@example.org", (POST,), self.clock.seconds(), message_id=f"<post{n}@example.org>"
        )
        message = MESSAGE.replace(b"<post@", b"<post%d@" % n)
        self.successResultOf(self.runner.enqueue(envelope, message))
        self.settle()

    def test_posts_stored_one_by_one_fill_every_connection(self):
        """With four connections and every reply held, four posts stored one after
        another are all on the wire; a fifth waits QUEUED, then goes out."""
        self.hold()
        for n in range(4):
            self.post(n)
        self.assertEqual(len(self.sender.held), 4)
        self.post(4)
        self.assertEqual(len(self.sender.held), 4)
        self.assertEqual(self.spool.counts()[EntryState.QUEUED], 3)
        self.release_all()
        self.assertEqual(self.spool.counts()[EntryState.DONE], 5 * (1 + len(MEMBERS)))

    def test_claimed_posts_fill_every_connection(self):
        """Posts stored straight in the spool and claimed one wake-up at a time fill
        the four connections too."""
        self.hold()
        for n in range(4):
            self.enqueue(message=MESSAGE.replace(b"<post@", b"<post%d@" % n))
        self.assertEqual(len(self.sender.held), 4)

    def test_one_connection_keeps_two_batches(self):
        """With one connection, a second batch still runs beside the first (its
        copies wait for the connection), and a third post waits QUEUED."""
        self.stop()
        self.sender = ScriptedSender(max_connections=1)
        self.runner = self.make_runner()
        self.runner.startService()
        self.hold()
        for n in range(3):
            self.post(n)
        self.assertEqual(len(self.sender.held), 1)
        counts = self.spool.counts()
        self.assertEqual((counts[EntryState.INFLIGHT], counts[EntryState.QUEUED]), (6, 3))
