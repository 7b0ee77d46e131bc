"""``mailrelay status``: what the relay is doing, at a glance or as JSON for scripts.

Reads only the spool and the registry, so it works whether the daemon runs or
not.  Whether it runs is told from the record the daemon publishes in the
spool's status table (:data:`mailrelay.service.DAEMON_STATUS_KEY`): its pid,
version, start time and a heartbeat renewed every ``heartbeat_interval``
seconds.  The daemon is *running* when that record exists and its pid is a
live process (a record left by a daemon killed with SIGKILL names a dead pid);
running but without a heartbeat for three intervals it is reported as not
responding.  The command never takes the daemon's lock on ``var_dir``, so it
cannot keep a daemon from starting.

:func:`collect` gathers the figures as one JSON-ready mapping (its keys are
documented in README.rst and are kept stable); :func:`render` words them.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from typing import Any

from mailrelay import __version__
from mailrelay.cli.context import EXIT_OK, Context
from mailrelay.cli.output import format_time, one_line, rough_duration, table
from mailrelay.cli.parser import add_command
from mailrelay.model import EntryState
from mailrelay.runner.breaker import CIRCUIT_STATUS_KEY
from mailrelay.service import DAEMON_STATUS_KEY

# Heartbeats missed before a live daemon is reported as not responding.
_MISSED_HEARTBEATS = 3


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (owned by any user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def daemon_state(record: str | None, now: float) -> dict[str, Any]:
    """The ``daemon`` part of the status from the daemon's published ``record``."""
    state: dict[str, Any] = {
        "running": False,
        "responding": False,
        "pid": None,
        "version": None,
        "started_at": None,
        "uptime_seconds": None,
        "heartbeat_at": None,
        "stale_pid": None,
    }
    if not record:
        return state
    try:
        published = json.loads(record)
        pid = int(published["pid"])
    except (ValueError, TypeError, KeyError):
        return state
    if not process_alive(pid):
        # Killed without stopping (SIGKILL, a crash): its record remains.
        state["stale_pid"] = pid
        return state
    started_at = published.get("started_at")
    heartbeat_at = published.get("heartbeat_at")
    interval = published.get("heartbeat_interval")
    responding = True
    if isinstance(heartbeat_at, int | float) and isinstance(interval, int | float):
        responding = now - heartbeat_at <= _MISSED_HEARTBEATS * interval
    state.update(
        running=True,
        responding=responding,
        pid=pid,
        version=published.get("version"),
        started_at=started_at,
        uptime_seconds=(
            max(0.0, now - started_at) if isinstance(started_at, int | float) else None
        ),
        heartbeat_at=heartbeat_at if isinstance(heartbeat_at, int | float) else None,
    )
    return state


def _start_of_day(now: float) -> float:
    """Local midnight before ``now``: where "today" starts for the operator."""
    local = datetime.fromtimestamp(now).astimezone()
    return local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def collect(spool: Any, registry: Any, now: float) -> dict[str, Any]:
    """Every figure ``mailrelay status`` shows, as one JSON-ready mapping."""
    counts = spool.counts()
    spool_counts = {state.value: counts.get(state, 0) for state in EntryState}
    spool_counts["total"] = sum(counts.values())
    oldest = spool.oldest_entry(EntryState.RETRY)
    deferred = None
    if oldest is not None:
        deferred = {
            "entry_id": oldest.entry_id,
            "message_id": oldest.message_id,
            "list": oldest.destination.list_address,
            "recipient": oldest.destination.address,
            "received_at": oldest.received_at,
            "attempts": oldest.attempts,
            "first_attempt_at": oldest.first_attempt_at,
            "next_attempt_at": oldest.next_attempt_at,
            "last_reply": one_line(oldest.last_error),
        }
    circuit = spool.get_status(CIRCUIT_STATUS_KEY)
    today = _start_of_day(now)
    posts_today = spool.posts_since(today)
    lists = []
    for mailing_list in registry.lists():
        address = mailing_list.posting_address
        bounces = registry.bounces(address)
        lists.append(
            {
                "address": address,
                "members": registry.member_count(address),
                "posts_today": posts_today.get(address, 0),
                "bounces": len(bounces),
                "bounces_today": sum(1 for bounce in bounces if bounce.at >= today),
            }
        )
    return {
        "version": __version__,
        "generated_at": now,
        "daemon": daemon_state(spool.get_status(DAEMON_STATUS_KEY), now),
        "spool": spool_counts,
        "oldest_deferred": deferred,
        "breaker": {"state": "open" if circuit else "closed", "reason": circuit or None},
        "deliveries": {
            "last_minute": spool.delivered_since(now - 60),
            "last_hour": spool.delivered_since(now - 3600),
        },
        "lists": lists,
    }


def render(status: dict[str, Any]) -> list[str]:
    """The lines ``mailrelay status`` prints for ``status`` (from :func:`collect`)."""
    now = status["generated_at"]
    daemon = status["daemon"]
    lines = []
    if daemon["running"]:
        uptime = daemon["uptime_seconds"]
        up = f", up {rough_duration(uptime)}" if uptime is not None else ""
        lines.append(
            f"daemon:      running, pid {daemon['pid']}, version {daemon['version'] or '?'}{up}"
        )
        if not daemon["responding"]:
            lines.append(
                f"             NOT RESPONDING: last heartbeat "
                f"{format_time(daemon['heartbeat_at'], now)}"
            )
    else:
        lines.append("daemon:      not running")
        if daemon["stale_pid"] is not None:
            lines.append(
                f"             (its last run, pid {daemon['stale_pid']}, ended without "
                f"stopping: killed or crashed)"
            )
    spool = status["spool"]
    lines.append(
        "spool:       "
        + "  ".join(f"{state.value} {spool[state.value]:,}" for state in EntryState)
        + f"  (total {spool['total']:,})"
    )
    deferred = status["oldest_deferred"]
    if deferred is None:
        lines.append("deferred:    none")
    else:
        lines.append(
            f"deferred:    oldest is entry {deferred['entry_id']} to {deferred['recipient']} "
            f"({deferred['list']}), received {format_time(deferred['received_at'], now)}"
        )
        lines.append(
            f"             {deferred['attempts']} attempts, next "
            f"{format_time(deferred['next_attempt_at'], now)}; last reply: "
            f"{deferred['last_reply'] or '-'}"
        )
    breaker = status["breaker"]
    if breaker["state"] == "open":
        lines.append(f"delivery:    PAUSED (circuit breaker open): {breaker['reason']}")
    else:
        lines.append("delivery:    circuit breaker closed")
    deliveries = status["deliveries"]
    lines.append(
        f"delivered:   {deliveries['last_minute']:,} in the last minute, "
        f"{deliveries['last_hour']:,} in the last hour"
    )
    lists = status["lists"]
    lines.append("")
    if not lists:
        lines.append("no lists")
        return lines
    rows = [("LIST", "MEMBERS", "POSTS TODAY", "BOUNCES TODAY", "BOUNCES")]
    rows.extend(
        (
            entry["address"],
            f"{entry['members']:,}",
            f"{entry['posts_today']:,}",
            f"{entry['bounces_today']:,}",
            f"{entry['bounces']:,}",
        )
        for entry in lists
    )
    lines.extend(table(rows))
    return lines


def _status(ctx: Context) -> int:
    with ctx.spool() as (spool, _bridge), ctx.registry(create=False) as registry:
        status = collect(spool, registry, time.time())
    if ctx.args.json:
        ctx.out(json.dumps(status, sort_keys=True))
    else:
        for line in render(status):
            ctx.out(line)
    return EXIT_OK


def add_parser(commands: Any) -> None:
    """Register ``status`` in the top-level collection ``commands``."""
    parser = add_command(
        commands,
        "status",
        _status,
        "show what the relay is doing: daemon, spool, deferred mail, breaker, lists",
        description="Show whether the daemon runs (pid, version, uptime), the spool's "
        "entries by state, the oldest deferred entry and its last reply, whether the "
        "circuit breaker has paused delivery, the copies delivered in the last minute "
        "and hour, and per list its members, posts today, and bounces.  Works with the "
        "daemon stopped too: it reads the spool and the registry.",
        epilog="--json prints one JSON object; its keys are listed in README.rst.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object, for scripts and monitoring"
    )
