"""Revocation figures from the log: how fast each revocation took hold.

(The authority record and the policy's triggers are shared/decide/agents.py.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.events import AgentReinstated, AgentRevoked, MessageRejected


@dataclass
class RevocationFigures:
    """How fast a revocation took hold: signal → revocation event → last message accepted."""

    agent: str
    revoked_at: datetime
    by: str
    reason: str
    signal_at: datetime | None
    latency_ms: float | None
    last_accepted_at: datetime | None
    last_accepted_subject: str
    # How long after the signal the agent could still get a message accepted (0: nothing was).
    exposure_ms: float | None


async def revocation_figures(js: Any) -> list[RevocationFigures]:
    """Revocation latency from the log alone: every agent.revoked, with its agent's inputs."""
    from shared import bus, topology
    from shared.events import InputRejected
    from shared.forensics import log
    from shared.persistence import written

    events = []
    for stored in await bus.read_subject(js, topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.*"):
        found = written.events_of(stored.subject, stored.headers, stored.data)
        if not isinstance(found, str):  # a message Warden did not write is no evidence
            events.extend(found)
    fenced = {e.input_seq for e in events if isinstance(e, MessageRejected | InputRejected)}
    figures = []
    for i, event in enumerate(events):
        if not isinstance(event, AgentRevoked):
            continue
        # The revocation's reach ends where a reinstatement begins a new period.
        until = next(
            (e.timestamp for e in events[i + 1 :] if isinstance(e, AgentReinstated) and e.name == event.name),
            None,
        )
        # Direct gets (log.scan): the operator credential may create no consumer on the input stream.
        inputs = await log.scan(js, topology.AGENT_INPUT_STREAM, topology.agent_input_root(event.name))
        accepted = [
            m
            for m in inputs
            if m.seq not in fenced
            and not m.subject.endswith(".register")  # re-registering grants nothing
            and (until is None or m.time < until)
        ]
        last = accepted[-1] if accepted else None
        latency = exposure = None
        if event.signal_at is not None:
            latency = (event.timestamp - event.signal_at).total_seconds() * 1000
            exposure = 0.0
            if last is not None and last.time > event.signal_at:
                exposure = (last.time - event.signal_at).total_seconds() * 1000
        figures.append(
            RevocationFigures(
                agent=event.name,
                revoked_at=event.timestamp,
                by=event.by,
                reason=event.reason,
                signal_at=event.signal_at,
                latency_ms=latency,
                last_accepted_at=last.time if last else None,
                last_accepted_subject=last.subject if last else "",
                exposure_ms=exposure,
            )
        )
    return figures
