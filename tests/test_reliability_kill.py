"""Crash safety proven from outside: a real ``twistd mailrelay`` killed again and again.

2,000 posts go over LMTP to three lists of three members while the daemon is
killed with SIGKILL at random (seeded) moments and restarted each time; the
smarthost, a :class:`~mailrelay.testing.FakeMTA` in the test process, keeps
recording across the kills.  The posting client behaves like an MTA: what got
no 250 is sent again.  At the end every member of every list whose recipient
got 250 must hold a copy (lost = 0); duplicates are allowed (delivery is
at-least-once) and counted.  A SIGTERM while copies are on the wire must stop
the daemon within 10 s and lose nothing either.
"""

from __future__ import annotations

import random
import time

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.testing import FakeMTA
from tests.daemon import (
    PersistentPoster,
    RelayProcess,
    count_losses,
    delivered_copies,
    poll,
    record_figures,
    sleep,
    wait_for_copies,
)
from tests.support import as_deferred, temp_dir

LISTS = {
    f"list{n}@example.com": [f"m{n}{k}@members{k}.example" for k in range(3)] for n in range(3)
}
MESSAGES = 2000
KILLS = 7
SEED = 13


def _messages(rng: random.Random, count: int) -> dict[str, list[str]]:
    """Message-ID -> the one to three lists it is posted to."""
    names = sorted(LISTS)
    return {
        f"<kill{n}@example.org>": sorted(rng.sample(names, rng.choice((1, 1, 2, 3))))
        for n in range(count)
    }


class KillLoopTests(TestCase):
    slow = True  # tests/conftest.py marks it for pytest -m "not slow"
    timeout = 240

    async def relay(self, mta, **mta_keys) -> RelayProcess:
        relay = RelayProcess(
            self,
            reactor,
            temp_dir(self),
            smtp_port=mta.port,
            retry_min_backoff="1s",
            retry_max_backoff="2s",
            lmtp_max_sessions=200,
            **mta_keys,
        )
        for address, members in LISTS.items():
            relay.cli("lists", "create", address)
            relay.cli("lists", "set", address, "posting=open")
            relay.cli("members", "add", address, *members)
        return relay

    async def smarthost(self) -> FakeMTA:
        mta = FakeMTA(reactor)
        await mta.start()
        self.addCleanup(mta.stop)
        return mta

    def test_sigkill_loop_loses_nothing_acknowledged(self):
        """Posts acknowledged with 250 while the daemon is SIGKILLed 7 times reach every member."""

        async def go():
            rng = random.Random(SEED)
            mta = await self.smarthost()
            relay = await self.relay(mta)
            await relay.start()
            messages = _messages(rng, MESSAGES)
            poster = PersistentPoster(reactor, relay.endpoint, messages, sessions=8)
            started = time.monotonic()
            posting = poster.run()
            # Kill when a random share of the posts is in (so every kill lands
            # while posting and delivery both run), plus a random delay.
            total = sum(len(lists) for lists in messages.values())
            thresholds = sorted(rng.sample(range(total // 20, total * 9 // 10), KILLS))
            recoveries = []
            for threshold in thresholds:
                await poll(
                    reactor,
                    lambda t=threshold: len(poster.acknowledged) >= t or poster.done,
                    f"{threshold} acknowledged posts",
                    timeout=120,
                )
                await sleep(reactor, rng.uniform(0, 0.25))
                relay.kill()
                killed = time.monotonic()
                await relay.start()
                recoveries.append(time.monotonic() - killed)
            await posting
            posted = time.monotonic()
            expected = {
                (message_id, member)
                for message_id, address in poster.acknowledged
                for member in LISTS[address]
            }
            await wait_for_copies(
                reactor, expected, mta, what="delivery of every acknowledged post", timeout=120
            )
            drained = time.monotonic()
            missing, duplicates = count_losses(poster.acknowledged, LISTS, delivered_copies(mta))
            figures = {
                "messages": MESSAGES,
                "list_recipients": total,
                "member_copies_expected": len(expected),
                "kills": relay.starts - 1,
                "lost": len(missing),
                "duplicates": duplicates,
                "posts_sent_again": poster.attempts - MESSAGES,
                "broken_sessions": poster.failures,
                "reply_timeouts": poster.timeouts,
                "restart_seconds_max": round(max(recoveries), 2),
                "posting_seconds": round(posted - started, 1),
                "drain_seconds_after_posting": round(drained - posted, 1),
                "seed": SEED,
            }
            record_figures("sigkill_loop", **figures)
            self.assertEqual(poster.refusals, [])
            self.assertEqual(len(poster.acknowledged), total)
            self.assertEqual(relay.starts - 1, KILLS)
            self.assertEqual(missing, [])

        return as_deferred(go())

    def test_sigterm_during_delivery_stops_in_time_and_loses_nothing(self):
        """SIGTERM while the smarthost holds its replies: the daemon exits within 10 s and,
        after a restart, every acknowledged post reaches every member."""

        async def go():
            mta = await self.smarthost()
            relay = await self.relay(mta, smtp_timeout="60s")
            await relay.start()
            # Every copy sits on the wire: the smarthost holds its reply to the
            # end of data far longer than the 10 s the daemon has to stop.
            mta.delay("eom", 120, count=1000)
            messages = _messages(random.Random(SEED + 1), 40)
            poster = PersistentPoster(reactor, relay.endpoint, messages, sessions=4)
            await poster.run()
            await poll(
                reactor,
                lambda: sum(c.startswith(b"DATA") for c in mta.commands) >= 4,
                "DATA at the smarthost",
            )
            seconds = await relay.terminate(timeout=30)
            mta.clear_faults()
            copies_before_restart = sum(delivered_copies(mta).values())
            await relay.start()
            expected = {(m, member) for m, a in poster.acknowledged for member in LISTS[a]}
            await wait_for_copies(reactor, expected, mta, what="delivery after the restart")
            missing, duplicates = count_losses(poster.acknowledged, LISTS, delivered_copies(mta))
            record_figures(
                "sigterm_during_delivery",
                messages=len(messages),
                member_copies_expected=len(expected),
                stop_seconds=round(seconds, 2),
                lost=len(missing),
                duplicates=duplicates,
                copies_before_restart=copies_before_restart,
            )
            self.assertLess(seconds, 10, relay.log())
            self.assertEqual(missing, [])

        return as_deferred(go())
