"""The story of one job, built from the typed `Job` state and the events that moved it.

The attempts are the folded job's leases (shared/aggregates.py says what each event means, never
this module): folding event by event, the event at which a lease's `ended` turns set is the one
that ended the attempt, and it supplies the detail. Proposals are the folded `proposal_log`,
with the evidence of their checks and effects taken from the events naming them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from msgspec.structs import replace

from shared import topology
from shared.aggregates import Job, Lease, evolve_job
from shared.events import (
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    AnyEvent,
    EffectApplied,
    EffectFailed,
    EffectRolledBack,
    InvariantChecked,
    JobCancelled,
    JobCompleted,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    RollbackRequested,
    Usage,
)
from shared.forensics import log
from shared.forensics.collect import JobLog
from shared.forensics.model import (
    Attempt,
    AttemptEnd,
    Check,
    Effect,
    Fenced,
    HeartbeatSummary,
    ProposalStory,
    Revocation,
    RevocationWhat,
)
from shared.messages import Heartbeat, Propose, decode_input
from shared.validation import InvalidInput

EVIDENCE_TEXT = 2000

Beats = dict[int, list[tuple[log.Stored, Heartbeat]]]


def clip(value: Any) -> Any:
    """Evidence shortened for reading (long text cut, long lists capped)."""
    if isinstance(value, str) and len(value) > EVIDENCE_TEXT:
        return value[:EVIDENCE_TEXT] + f"... ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: clip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clip(v) for v in value[:50]]
    return value


def secs(value: float) -> str:
    return f"{value:g}s"


def clock(at: datetime) -> str:
    return f"{at:%H:%M:%S.%f}"[:-3]


def typed(job_log: JobLog) -> list[log.LoggedEvent]:
    return [e for e in job_log.events if e.event is not None]


def fold(items: Sequence[log.LoggedEvent]) -> tuple[Job | None, dict[int, log.LoggedEvent]]:
    """The job as the services fold it, and for each lease epoch the event that ended it."""
    job: Job | None = None
    endings: dict[int, log.LoggedEvent] = {}
    for item in items:
        assert item.event is not None
        before = {lease.epoch: lease.ended for lease in job.leases} if job is not None else {}
        job = evolve_job(job, item.event)
        if job is None:
            continue
        for lease in job.leases:
            if lease.ended and not before.get(lease.epoch) and lease.epoch not in endings:
                endings[lease.epoch] = item
    return job, endings


def heartbeats(job_log: JobLog) -> Beats:
    by_epoch: Beats = {}
    for record in job_log.agent_inputs:
        if not record.subject.endswith(".heartbeat"):
            continue
        try:
            hb = decode_input(record.data, Heartbeat)
        except InvalidInput:
            continue
        by_epoch.setdefault(hb.epoch, []).append((record, hb))
    return by_epoch


def fenced_seqs(items: Iterable[log.LoggedEvent]) -> set[int]:
    return {e.event.input_seq for e in items if isinstance(e.event, MessageRejected)}


def summarise_heartbeats(
    beats: Sequence[tuple[log.Stored, Heartbeat]],
    agent: str,
    granted_at: datetime,
    fenced: set[int],
    ended_at: datetime | None,
) -> HeartbeatSummary:
    mine = [(r, hb) for r, hb in beats if r.subject == topology.agent_subject(agent, "heartbeat")]
    live = [(r, hb) for r, hb in mine if r.seq not in fenced]
    late = len(mine) - len(live)
    if not live:
        gap = ((ended_at - granted_at).total_seconds()) if ended_at else None
        return HeartbeatSummary(fenced=late, max_gap_s=gap)
    times = [granted_at, *(r.time for r, _ in live)]
    if ended_at is not None:
        times.append(ended_at)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    last_record, last = live[-1]
    return HeartbeatSummary(
        count=len(live),
        fenced=late,
        first_at=live[0][0].time,
        last_at=last_record.time,
        max_gap_s=max(gaps) if gaps else None,
        last_note=last.note,
        last_progress=last.progress,
        last_usage=last.usage,
    )


def lost_lease(event: LeaseExpired, ttl_s: float | None) -> str:
    silence = secs(ttl_s) if ttl_s is not None else "its TTL"
    if event.last_heartbeat is not None:
        seen = event.last_heartbeat
        last = f"last heartbeat at {clock(seen.at)}"
        last += f", note {seen.note!r}" if seen.note else ""
    else:
        last = "none ever received"
    return (
        f"lease {event.epoch} expired with no heartbeat for {silence} ({last}), "
        f"detected {event.detection_latency_ms:.0f} ms after deadline"
    )


def _ending(
    lease: Lease, item: log.LoggedEvent | None
) -> tuple[AttemptEnd, datetime | None, str, dict[str, Any]]:
    """How an attempt ended, when, the detail, and extra Attempt fields, from its ending event."""
    if item is None:
        return "", None, "", {}
    event = item.event
    match event:
        case LeaseExpired():
            return (
                "expired",
                event.detected_at,
                lost_lease(event, lease.ttl_s),
                {"detection_latency_ms": event.detection_latency_ms},
            )
        case LeaseReleased():
            return (
                "released",
                event.timestamp,
                f"released by {event.agent}: {event.reason or 'no reason given'}",
                {},
            )
        case LeaseRevoked():
            detail = (
                f"lease {event.epoch} of {event.agent} revoked by {event.by} ({event.signal}): {event.reason}"
            )
            return "revoked", event.timestamp, detail, {"signal": event.signal, "by": event.by}
        case JobCancelled():
            detail = f"cancelled by {event.by}: {event.reason}"
            return "cancelled", event.timestamp, detail, {"signal": "operator", "by": event.by}
        case JobTombstoned():
            return "tombstoned", event.timestamp, event.reason, {"by": event.by}
        case ProposalRejected():
            detail = f"proposal {event.proposal_id} rejected: {'; '.join(event.violations)}"
            return "rejected", event.timestamp, detail, {"by": event.by}
        case EffectFailed():
            detail = f"effect of proposal {event.proposal_id} failed: {event.reason}"
            return "failed", event.timestamp, detail, {}
        case JobCompleted():
            return "completed", event.timestamp, f"completed with proposal {event.proposal_id}", {}
    assert event is not None
    return lease.ended, event.timestamp, "", {}


def attempts(job: Job | None, endings: dict[int, log.LoggedEvent], job_log: JobLog) -> list[Attempt]:
    if job is None:
        return []
    beats = heartbeats(job_log)
    fenced = fenced_seqs(job_log.events)
    claims = {e.event.epoch: e.event.claim_seq for e in job_log.events if isinstance(e.event, LeaseGranted)}
    out = []
    for lease in job.leases:
        how, at, detail, extra = _ending(lease, endings.get(lease.epoch))
        out.append(
            Attempt(
                epoch=lease.epoch,
                agent=lease.agent,
                granted_at=lease.granted_at,
                ttl_s=lease.ttl_s,
                claim_seq=claims.get(lease.epoch, 0),
                heartbeats=summarise_heartbeats(
                    beats.get(lease.epoch, []), lease.agent, lease.granted_at, fenced, at
                ),
                ended=how,
                ended_at=at,
                end_detail=detail,
                **extra,
            )
        )
    return out


def proposal_evidence(job_log: JobLog, submitted: ProposalSubmitted) -> dict[str, Any]:
    record = job_log.input_at(submitted.input_seq)
    data = record.data if record is not None else job_log.proposal_records.get(submitted.input_seq)
    if data is None:
        return {"unavailable": job_log.missing_input(submitted.input_seq)}
    try:
        body = decode_input(data, Propose)
    except InvalidInput as exc:
        return {"undecodable": str(exc)}
    if body.payload is not None:  # a large proposal: its evidence is in the object, not read here
        return {"payload_object": submitted.payload_object}
    evidence: dict[str, Any] = dict(clip(body.evidence))
    if body.usage != Usage():
        evidence.setdefault("usage", msgspec.to_builtins(body.usage))
    return evidence


def _effect(event: AnyEvent) -> Effect | None:
    match event:
        case EffectApplied():
            return Effect(
                kind=event.kind,
                at=event.timestamp,
                what="applied",
                receipt=clip(event.receipt),
                reused_receipt=event.reused_receipt,
            )
        case RollbackRequested():
            return Effect(
                kind="", at=event.timestamp, what="rollback_requested", reason=event.reason, by=event.by
            )
        case EffectRolledBack():
            return Effect(
                kind=event.kind,
                at=event.timestamp,
                what="rolled_back",
                receipt=clip(event.receipt),
                reason=event.reason,
                reused_receipt=event.reused_receipt,
            )
        case EffectFailed():
            return Effect(
                kind=event.kind,
                at=event.timestamp,
                what="failed",
                reason=event.reason,
                receipt=clip(event.evidence),
                phase=event.phase,
            )
    return None


def proposals(job: Job | None, job_log: JobLog) -> list[ProposalStory]:
    if job is None:
        return []
    about: dict[UUID, list[AnyEvent]] = {}
    for item in job_log.events:
        pid = getattr(item.event, "proposal_id", None)
        if item.event is not None and isinstance(pid, UUID):
            about.setdefault(pid, []).append(item.event)
    out = []
    for state in job.proposal_log:
        named = about.get(state.id, [])
        submitted = next((e for e in named if isinstance(e, ProposalSubmitted)), None)
        decided = next((e for e in named if isinstance(e, ProposalAccepted | ProposalRejected)), None)
        out.append(
            ProposalStory(
                proposal_id=state.id,
                agent=state.agent,
                epoch=state.epoch,
                effect=state.effect,
                size=submitted.size if submitted else 0,
                content_hash=state.content_hash,
                submitted_at=state.submitted_at,
                input_seq=state.input_seq,
                evidence=proposal_evidence(job_log, submitted) if submitted else {},
                checks=[
                    Check(
                        invariant=e.invariant,
                        version=e.version,
                        verdict=e.verdict,
                        at=e.timestamp,
                        evidence=clip(e.evidence),
                    )
                    for e in named
                    if isinstance(e, InvariantChecked)
                ],
                decision="accepted"
                if isinstance(decided, ProposalAccepted)
                else "rejected"
                if isinstance(decided, ProposalRejected)
                else "pending",
                decided_at=decided.timestamp if decided else None,
                decided_by=decided.by if decided else "",
                violations=list(decided.violations) if isinstance(decided, ProposalRejected) else [],
                effects=[effect for e in named if (effect := _effect(e)) is not None],
            )
        )
    return out


def fenced_groups(items: Iterable[log.LoggedEvent]) -> list[Fenced]:
    groups: dict[tuple[str, int, str, int], list[tuple[log.LoggedEvent, MessageRejected]]] = {}
    for item in items:
        if isinstance(item.event, MessageRejected):
            e = item.event
            groups.setdefault((e.agent, e.epoch, e.verb, e.current_epoch), []).append((item, e))
    return [
        Fenced(
            agent=agent,
            epoch=epoch,
            verb=verb,
            current_epoch=current,
            count=len(group),
            first_at=group[0][1].timestamp,
            last_at=group[-1][1].timestamp,
            reason=group[0][1].reason,
            input_seqs=[e.input_seq for _, e in group[:20]],
        )
        for (agent, epoch, verb, current), group in groups.items()
    ]


def revocations(
    job_log: JobLog,
    attempts_: Sequence[Attempt],
    proposals_: Sequence[ProposalStory],
    start: datetime | None,
    end: datetime | None,
) -> list[Revocation]:
    """Lease revocations, cancellations of a live lease, rollbacks, and the job's agents'
    revocations and suspensions while the job lived."""
    out: list[Revocation] = []
    for a in attempts_:
        if a.ended == "revoked" and a.ended_at is not None:
            reason = a.end_detail.split("): ", 1)[-1]
            out.append(
                Revocation(
                    at=a.ended_at,
                    what="lease",
                    agent=a.agent,
                    epoch=a.epoch,
                    signal=a.signal,
                    by=a.by,
                    reason=reason,
                )
            )
        if a.ended == "cancelled" and a.ended_at is not None:
            out.append(
                Revocation(
                    at=a.ended_at,
                    what="lease",
                    agent=a.agent,
                    epoch=a.epoch,
                    signal="operator",
                    by=a.by,
                    reason="job " + a.end_detail,
                )
            )
    authors = {p.proposal_id: p.agent for p in proposals_}
    for item in job_log.events:
        if isinstance(item.event, RollbackRequested):
            e = item.event
            out.append(
                Revocation(
                    at=e.timestamp,
                    what="rollback",
                    agent=authors.get(e.proposal_id, ""),
                    epoch=None,
                    signal="rollback",
                    by=e.by,
                    reason=e.reason,
                )
            )
    what_of: dict[type[AnyEvent], RevocationWhat] = {
        AgentRevoked: "agent",
        AgentSuspended: "agent-suspended",
        AgentReinstated: "agent-reinstated",
    }
    for name, items in job_log.agent_events.items():
        for item in items:
            event = item.event
            if not isinstance(event, AgentRevoked | AgentSuspended | AgentReinstated):
                continue
            if (start is not None and event.timestamp < start) or (end is not None and event.timestamp > end):
                continue
            out.append(
                Revocation(
                    at=event.timestamp,
                    what=what_of[type(event)],
                    agent=name,
                    epoch=None,
                    signal="agent",
                    by=event.by,
                    reason=event.reason,
                )
            )
    out.sort(key=lambda r: r.at)
    return out


def with_causes(items: Sequence[Attempt], causes: Sequence[Any]) -> list[Attempt]:
    return [replace(a, cause=c) for a, c in zip(items, causes, strict=True)]
