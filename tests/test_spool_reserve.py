"""The spool's space reserve: held while there is room, given back to delivery when the
file system fills, and new messages refused until twice the reserve is free again."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailrelay.errors import SpoolError
from mailrelay.interfaces import IMessageStore
from mailrelay.model import Destination, Envelope
from mailrelay.spool import MemorySpool, ReservedStore, SpaceReserve
from mailrelay.spool.reserve import available_bytes
from tests.support import temp_dir

SIZE = 64 * 1024


class FreeSpace:
    """A file system's free bytes as the test sets them; records the directories asked."""

    def __init__(self, free: int):
        self.free = free
        self.asked: list[str] = []

    def __call__(self, directory: str) -> int:
        self.asked.append(directory)
        if isinstance(self.free, OSError):
            raise self.free
        return self.free


class SpaceReserveTests(SynchronousTestCase):
    def make(self, free: int) -> tuple[SpaceReserve, FreeSpace]:
        self.directory = temp_dir(self)
        self.path = os.path.join(self.directory, "space-reserve")
        space = FreeSpace(free)
        return SpaceReserve(self.path, SIZE, free_space=space), space

    def file_size(self) -> int:
        return os.stat(self.path).st_size

    def test_taken_when_there_is_room(self):
        """With twice the reserve free, the first check creates the reserve file at its
        full size (mode 600, in the measured directory) and allows a message."""
        reserve, space = self.make(free=10 * SIZE)
        self.assertTrue(reserve.check())
        self.assertEqual((reserve.held, self.file_size()), (SIZE, SIZE))
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(space.asked, [self.directory])

    def test_given_back_when_space_runs_low(self):
        """Once less than the reserve is free the file is emptied for deliveries and
        messages are refused, with one warning naming the free bytes and the way back."""
        reserve, space = self.make(free=10 * SIZE)
        reserve.check()
        space.free = SIZE - 1
        with capturedLogs() as events:
            self.assertFalse(reserve.check())
            space.free = SIZE + 100  # the bytes given back
            self.assertFalse(reserve.check())
        self.assertEqual((reserve.held, self.file_size()), (0, 0))
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(
            (warnings[0]["free"], warnings[0]["reserve"], warnings[0]["wanted"]),
            (SIZE - 1, SIZE, 2 * SIZE),
        )

    def test_taken_again_once_twice_the_reserve_is_free(self):
        """After a refusal, messages are refused until twice the reserve is free; then the
        reserve is taken back and messages are allowed again (logged once)."""
        reserve, space = self.make(free=10 * SIZE)
        reserve.check()
        space.free = 0
        reserve.check()
        space.free = 2 * SIZE - 1
        self.assertFalse(reserve.check())
        self.assertEqual(reserve.held, 0)
        space.free = 2 * SIZE
        with capturedLogs() as events:
            self.assertTrue(reserve.check())
            self.assertTrue(reserve.check())
        self.assertEqual((reserve.held, self.file_size()), (SIZE, SIZE))
        self.assertEqual([e["log_level"].name for e in events], ["info"])

    def test_not_taken_at_start_without_room(self):
        """A file system with less than twice the reserve free at start refuses messages
        and creates no reserve file."""
        reserve, _space = self.make(free=2 * SIZE - 1)
        self.assertFalse(reserve.check())
        self.assertFalse(os.path.exists(self.path))

    def test_existing_reserve_file_is_adopted(self):
        """A reserve file left by an earlier run counts as held: with the reserve
        itself free besides, messages are allowed."""
        directory = temp_dir(self)
        path = os.path.join(directory, "space-reserve")
        SpaceReserve(path, SIZE, free_space=FreeSpace(10 * SIZE)).check()
        reserve = SpaceReserve(path, SIZE, free_space=FreeSpace(SIZE))
        self.assertEqual(reserve.held, SIZE)
        self.assertTrue(reserve.check())

    def test_message_larger_than_the_room_left(self):
        """A message that would eat into the reserve is refused, but the reserve is kept
        and a smaller message is then allowed."""
        reserve, _space = self.make(free=3 * SIZE)
        reserve.check()  # takes SIZE: the fake still says 3 * SIZE free
        self.assertFalse(reserve.check(needed=2 * SIZE + 1))
        self.assertEqual(reserve.held, SIZE)
        self.assertTrue(reserve.check(needed=2 * SIZE))

    def test_reserve_that_cannot_be_created(self):
        """A reserve file that cannot be created is logged with the reason, and
        messages are refused as if space were short."""
        directory = temp_dir(self)
        path = os.path.join(directory, "missing", "space-reserve")
        reserve = SpaceReserve(path, SIZE, free_space=FreeSpace(10 * SIZE))
        with capturedLogs() as events:
            self.assertFalse(reserve.check())
        self.assertEqual(reserve.held, 0)
        self.assertIn("No such file or directory", " ".join(str(e.get("error")) for e in events))

    def test_unmeasurable_file_system_allows_messages(self):
        """When free space cannot be measured the message is allowed (the spool then
        reports a full disk itself) and the failure is logged."""
        reserve, space = self.make(free=0)
        space.free = OSError(5, "Input/output error")
        with capturedLogs() as events:
            self.assertTrue(reserve.check())
        self.assertEqual(events[0]["error"], "Input/output error")

    def test_bad_size(self):
        """The size must be a whole number of bytes above 0."""
        for size in (0, -1, 1.5, True):
            with self.subTest(size=size):
                self.assertRaises(ValueError, SpaceReserve, "/nonexistent/reserve", size)

    def test_available_bytes(self):
        """available_bytes measures a real directory's file system."""
        self.assertGreater(available_bytes(temp_dir(self)), 0)


class ReservedStoreTests(SynchronousTestCase):
    def setUp(self):
        directory = temp_dir(self)
        self.space = FreeSpace(10 * SIZE)
        self.reserve = SpaceReserve(
            os.path.join(directory, "space-reserve"), SIZE, free_space=self.space
        )
        self.spool = MemorySpool(Clock())
        self.store = ReservedStore(self.spool, self.reserve)
        self.envelope = Envelope(
            sender="anne@example.org",
            destinations=(Destination("test@example.com", None, "test@example.com"),),
            received_at=0.0,
        )

    def test_provides_message_store(self):
        """A ReservedStore is an IMessageStore."""
        verifyObject(IMessageStore, self.store)

    def test_stores_while_there_is_room(self):
        """With room besides the reserve the message is stored by the store behind."""
        ids = self.successResultOf(self.store.enqueue(self.envelope, b"Subject: x\r\n\r\nhi\r\n"))
        self.assertEqual(len(ids), 1)
        self.assertEqual(len(self.spool.entries()), 1)

    def test_refusal_is_a_disk_full_spool_error(self):
        """Without room the message fails with a disk-full SpoolError naming the setting
        (LMTP answers 452 4.3.1) and the store behind never sees it."""
        self.space.free = 0
        failure = self.failureResultOf(
            self.store.enqueue(self.envelope, b"Subject: x\r\n\r\nhi\r\n"), SpoolError
        )
        self.assertTrue(failure.value.disk_full)
        self.assertIn("[mta] spool_reserve", str(failure.value))
        self.assertEqual(self.spool.entries(), [])
