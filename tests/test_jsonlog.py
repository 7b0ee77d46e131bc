"""``[log] format = json`` under a real ``twistd mailrelay``: a log shipper's view.

The daemon runs with its log in a file of JSON lines; one post to a list of
three members, one of whom the smarthost refuses permanently, is followed
through the file by its Message-ID, event by event, from ``accepted`` to
``delivered``, ``failed`` and ``bounced``.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.logs import EVENTS
from mailrelay.testing import FakeMTA
from mailrelay.testing.lmtp import connect_lmtp
from tests.daemon import RelayProcess, poll, wait_for_copies
from tests.support import as_deferred, temp_dir

LIST = "json@example.com"
MEMBERS = ["anne@members.example", "bart@members.example", "cris@members.example"]
REFUSED = "bart@members.example"
MESSAGE_ID = "<follow-me@example.org>"
BODY = "A body line that must never reach the log."
POST = (
    f"From: poster@example.org\r\nTo: {LIST}\r\nSubject: json log\r\n"
    f"Message-ID: {MESSAGE_ID}\r\n\r\n{BODY}\r\n"
).encode("ascii")


def _records(path: str) -> list[dict]:
    """Every line of ``path`` parsed as JSON (a line that is not fails the test)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # A line still being written is not complete yet.
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


class JSONLogTests(TestCase):
    timeout = 120

    def test_follow_one_message_through_the_json_log(self):
        """With [log] format = json every line twistd writes is one JSON object, and
        one message is followed by message_id through accepted, queued,
        delivered, failed (refused) and bounced, with the documented fields;
        the body never appears."""

        async def go():
            mta = FakeMTA(reactor)
            await mta.start()
            self.addCleanup(mta.stop)
            mta.reject("rcpt", 550, "5.1.1 No such user", match=REFUSED)
            relay = RelayProcess(
                self,
                reactor,
                temp_dir(self),
                smtp_port=mta.port,
                sections="[log]\nformat = json\n",
            )
            relay.cli("lists", "create", LIST)
            relay.cli("lists", "set", LIST, "posting=open")
            relay.cli("members", "add", LIST, *MEMBERS)
            log_path = os.path.join(relay.tmp, "events.json")
            await relay.start(f"--logfile={log_path}")

            client = await connect_lmtp(relay.endpoint())
            await client.lhlo("mx.example.org")
            replies = await client.sendmail("poster@example.org", [LIST], POST)
            self.assertEqual([r.code for r in replies], [250])
            await client.quit()
            await wait_for_copies(
                reactor,
                {(MESSAGE_ID, m) for m in MEMBERS if m != REFUSED},
                mta,
                what="the two accepted copies",
            )

            def ours() -> dict[str, list[dict]]:
                found: dict[str, list[dict]] = {}
                for record in _records(log_path):
                    if record.get("event") in EVENTS:
                        found.setdefault(record["event"], []).append(record)
                return found

            await poll(
                reactor,
                lambda: "bounced" in ours() and "delivered" in ours(),
                "the delivered and bounced events in the JSON log",
                details=relay.log,
            )
            await relay.terminate(30)

            records = _records(log_path)
            self.assertGreater(len(records), 5)
            for record in records:
                self.assertIn("log_time", record)
                self.assertIn("log_text", record)
            with open(log_path, encoding="utf-8") as f:
                self.assertNotIn(BODY, f.read())
            events = ours()
            self.assertEqual(sorted(events), sorted(EVENTS[:3] + ("failed", "bounced")))

            (accepted,) = events["accepted"]
            self.assertEqual(
                (accepted["message_id"], accepted["sender"], accepted["lists"]),
                (MESSAGE_ID, "poster@example.org", [LIST]),
            )
            self.assertEqual((accepted["count"], accepted["code"]), (1, 250))
            (queued,) = events["queued"]
            self.assertEqual(
                (queued["message_id"], queued["list"], queued["count"], queued["kind"]),
                (MESSAGE_ID, LIST, 3, "member"),
            )
            delivered = events["delivered"]
            self.assertEqual({d["message_id"] for d in delivered}, {MESSAGE_ID})
            self.assertEqual(sum(d["count"] for d in delivered), 2)
            self.assertEqual(
                sorted(r for d in delivered for r in d["recipients"]),
                sorted(m for m in MEMBERS if m != REFUSED),
            )
            (failed,) = events["failed"]
            self.assertEqual(
                (failed["message_id"], failed["list"], failed["outcome"], failed["code"]),
                (MESSAGE_ID, LIST, "refused", 550),
            )
            self.assertEqual((failed["count"], failed["recipients"]), (1, [REFUSED]))
            self.assertIn("No such user", failed["response"])
            (bounced,) = events["bounced"]
            self.assertEqual(
                (bounced["list"], bounced["recipient"], bounced["code"]), (LIST, REFUSED, 550)
            )
            # Copies are queued in the transaction that stores the post, so
            # "queued" may come just before "accepted" (the 250); both come
            # before any outcome.
            first_outcome = min(
                e["log_time"] for name in ("delivered", "failed", "bounced") for e in events[name]
            )
            self.assertLess(max(accepted["log_time"], queued["log_time"]), first_outcome)

        return as_deferred(go())
