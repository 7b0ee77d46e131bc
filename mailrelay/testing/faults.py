"""Fault injection for the fake MTA: which replies to replace, hold or cut off.

:class:`FaultPlan` is the queue of faults a test arms through
:class:`~mailrelay.testing.fakemta.FakeMTA` (``reject``, ``disconnect``,
``drop_during_data``, ``delay``).  The SMTP server protocol
(:mod:`mailrelay.testing.smtpserver`) asks it at every stage of a session
whether a fault fires there (:meth:`FaultPlan.take`); each fault fires a given
number of times and is then forgotten.  Nothing here touches a connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

from mailrelay._checks import check_count

__all__ = ["DISCONNECT_STAGES", "REJECT_STAGES", "Fault", "FaultPlan"]

_log = Logger()

REJECT_STAGES = frozenset({"ehlo", "starttls", "auth", "mail", "rcpt", "data", "eom", "rset"})
# A connection can also be dropped or held before the greeting and at QUIT.
DISCONNECT_STAGES = REJECT_STAGES | {"greeting", "quit"}

# Mailman's fake MTA answers injected errors with these texts; tests written
# against it compare them.
_DEFAULT_REJECT_TEXT = b"Error: SMTPResponseException"
_DEFAULT_RCPT_REJECT_TEXT = b"Error: SMTPRecipientsRefused"


@dataclass
class Fault:
    """One armed fault: what happens (``kind``) at which ``stage``, how often more."""

    kind: str  # "reject", "disconnect", "delay" or "drop"
    stage: str
    remaining: int
    code: int = 0
    text: bytes = b""
    match: str | None = None
    seconds: float = 0.0
    with_421: bool = True
    after_bytes: int = 0


class FaultPlan:
    """The faults armed and not yet spent, in the order they were armed.

    The arming methods check their arguments and raise ``ValueError`` for a
    stage, code, count or duration that makes no sense; their behaviour is
    documented on the :class:`~mailrelay.testing.fakemta.FakeMTA` methods of
    the same names.
    """

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def reject(
        self, stage: str, code: int, text: bytes | str | None, count: int, match: str | None
    ) -> None:
        """Arm a ``code text`` reply instead of the next ``count`` ``stage`` replies."""
        _check_stage(stage, REJECT_STAGES)
        if not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError(f"reject code must be a 4xx or 5xx int, not {code!r}")
        if match is not None and stage != "rcpt":
            raise ValueError("match only applies to the 'rcpt' stage")
        if text is None:
            text = _DEFAULT_RCPT_REJECT_TEXT if stage == "rcpt" else _DEFAULT_REJECT_TEXT
        elif isinstance(text, str):
            text = text.encode("utf-8")
        self._faults.append(
            Fault("reject", stage, check_count("count", count), code=code, text=text, match=match)
        )

    def disconnect(self, stage: str, with_421: bool, count: int) -> None:
        """Arm closing the connection at the next ``count`` occurrences of ``stage``."""
        _check_stage(stage, DISCONNECT_STAGES)
        self._faults.append(
            Fault("disconnect", stage, check_count("count", count), with_421=with_421)
        )

    def drop_during_data(self, after_bytes: int, count: int) -> None:
        """Arm closing the connection ``after_bytes`` into the next ``count`` DATA."""
        if not isinstance(after_bytes, int) or after_bytes < 0:
            raise ValueError(f"after_bytes must be an int >= 0, not {after_bytes!r}")
        self._faults.append(
            Fault("drop", "data", check_count("count", count), after_bytes=after_bytes)
        )

    def delay(self, stage: str, seconds: float, count: int) -> None:
        """Arm holding the next ``count`` replies of ``stage`` for ``seconds``."""
        _check_stage(stage, DISCONNECT_STAGES)
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds!r}")
        self._faults.append(Fault("delay", stage, check_count("count", count), seconds=seconds))

    def clear(self) -> None:
        """Forget every fault that has not fired yet."""
        self._faults.clear()

    def take(self, kind: str, stage: str, address: str | None = None) -> Fault | None:
        """The first armed ``kind`` fault for ``stage`` (and RCPT ``address``), spending one use.

        None when no such fault is armed; a fault whose uses are spent is forgotten.
        """
        for fault in self._faults:
            if fault.kind != kind or fault.stage != stage:
                continue
            if fault.match is not None and (
                address is None or address.casefold() != fault.match.casefold()
            ):
                continue
            fault.remaining -= 1
            if not fault.remaining:
                self._faults.remove(fault)
            _log.debug("Fake MTA injects {kind} at {stage}", kind=kind, stage=stage)
            return fault
        return None


def _check_stage(stage: str, allowed: frozenset[str]) -> None:
    if stage not in allowed:
        raise ValueError(f"stage must be one of {sorted(allowed)}, not {stage!r}")
