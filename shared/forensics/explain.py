"""`warden explain JOB`: the causal chain from request to outcome, from the log alone.

`collect` reads what the record holds about one job (its events, the events of the agents that
touched it, the heartbeats, proposals and releases its agents stored naming it); `explain` turns
that into a story (who held it, how each attempt ended, what each proposal showed, what was
decided, applied, revoked) and one line of cause. Nothing is re-run and no live state is read:
an explanation of yesterday's job reads the same today.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import msgspec
from msgspec import Struct
from nats.js import JetStreamContext

from shared import topology
from shared.aggregates import project_job
from shared.events import (
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    AnyEvent,
    EffectApplied,
    EffectRolledBack,
    InvariantChecked,
    JobCancelled,
    JobCompleted,
    JobRequested,
    JobRequeued,
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
    agent_id_for,
    tag_of,
)
from shared.forensics import ledger, log
from shared.messages import Heartbeat, Propose, decode_input
from shared.validation import InvalidInput

AGENT_VERBS_NAMING_JOBS = ("heartbeat", "propose", "release")
# Input stored a little after the job's last event can still be about it (a late heartbeat is
# fenced and recorded); past this margin a scan of an agent's subjects stops.
SCAN_MARGIN = timedelta(seconds=5)
EVIDENCE_TEXT = 2000


class JobNotFound(LookupError):
    """Raised when the event stream holds nothing for the job asked about."""


class _Names(Struct, kw_only=True):
    """The two fields that say which job and lease an agent message is about (all else ignored)."""

    job_id: UUID | None = None
    epoch: int | None = None


_names = msgspec.json.Decoder(_Names)


def _about(data: bytes) -> _Names | None:
    try:
        return _names.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass
class JobLog:
    """Everything the streams hold about one job, as stored."""

    job_id: UUID
    events: list[log.LoggedEvent]
    agent_events: dict[str, list[log.LoggedEvent]] = field(default_factory=dict)
    # Heartbeats, proposals and releases its agents stored naming this job, in stream order.
    agent_inputs: list[log.Stored] = field(default_factory=list)
    # Other input messages the events name by sequence (the request, claims, fenced messages).
    referenced: dict[int, log.Stored] = field(default_factory=dict)

    def input_at(self, seq: int) -> log.Stored | None:
        found = self.referenced.get(seq)
        if found is not None:
            return found
        for record in self.agent_inputs:
            if record.seq == seq:
                return record
        return None


def agents_of(events: Iterable[log.LoggedEvent]) -> list[str]:
    names: list[str] = []
    for item in events:
        name = getattr(item.event, "agent", None)
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return names


def referenced_seqs(events: Iterable[log.LoggedEvent]) -> set[int]:
    """Input stream sequences the job's events cite as evidence."""
    seqs: set[int] = set()
    for item in events:
        event = item.event
        for name in ("input_seq", "claim_seq"):
            value = getattr(event, name, 0)
            if isinstance(value, int) and value > 0:
                seqs.add(value)
        if isinstance(event, LeaseExpired) and event.last_heartbeat is not None:
            seqs.add(event.last_heartbeat.input_seq)
    return seqs


async def collect(js: JetStreamContext, job_id: UUID, *, all_inputs: bool = False) -> JobLog:
    """Read one job's record; `all_inputs` also fetches every input message its events cite."""
    events = await log.job_events(js, job_id)
    if not events:
        raise JobNotFound(f"no events for job {job_id} in stream {topology.EVENT_STREAM}")
    job_log = JobLog(job_id=job_id, events=events)
    requested = next((e.event for e in events if isinstance(e.event, JobRequested)), None)
    start = requested.input_seq if requested is not None and requested.input_seq > 0 else 1
    cited = referenced_seqs(events)
    last_time = events[-1].time + SCAN_MARGIN
    last_cited = max(cited, default=0)

    folded = project_job(None, [e.event for e in events if e.event is not None])
    finished = folded is not None and folded.terminal

    def after_the_job(record: log.Stored) -> bool:
        # Whatever an agent sent about a finished job after its last event was either fenced
        # (and so cited) or not yet processed: past both bounds there is nothing more to find.
        # A live job's accepted heartbeats append nothing, so its scan runs to the end.
        return finished and record.time > last_time and record.seq > last_cited

    def names_this_job(record: log.Stored) -> bool:
        if record.subject.rsplit(".", 1)[-1] not in AGENT_VERBS_NAMING_JOBS:
            return False
        about = _about(record.data)
        return about is not None and about.job_id == job_id

    for name in agents_of(events):
        try:
            topology.check_agent_name(name)
        except topology.BadAgentName:
            continue
        job_log.agent_events[name] = await log.read_events(js, topology.event_subject(agent_id_for(name)))
        job_log.agent_inputs.extend(
            await log.scan(
                js,
                topology.INPUT_STREAM,
                topology.agent_input_root(name).replace(">", "*"),
                start_seq=start,
                keep=names_this_job,
                stop=after_the_job,
            )
        )
    job_log.agent_inputs.sort(key=lambda r: r.seq)
    have = {r.seq for r in job_log.agent_inputs}
    if all_inputs:
        wanted = cited - have
    else:  # explain needs only the request and proposals' evidence
        wanted = {start} if requested is not None and requested.input_seq > 0 else set()
        wanted |= {e.event.input_seq for e in events if isinstance(e.event, ProposalSubmitted)} - have
    job_log.referenced = await log.get_many(js, topology.INPUT_STREAM, wanted)
    return job_log


# --- the explanation ---------------------------------------------------------------------------


class HeartbeatSummary(Struct, frozen=True, kw_only=True):
    count: int = 0  # heartbeats stored under this lease and not fenced
    fenced: int = 0  # heartbeats under this lease after it ended (rejected and recorded)
    first_at: datetime | None = None
    last_at: datetime | None = None
    max_gap_s: float | None = None  # longest silence between grant/heartbeats while it lived
    last_note: str = ""
    last_progress: float | None = None
    last_usage: Usage | None = None


class Attempt(Struct, frozen=True, kw_only=True):
    epoch: int
    agent: str
    granted_at: datetime
    ttl_s: float
    claim_seq: int = 0
    heartbeats: HeartbeatSummary
    ended: str = ""  # "", expired, released, revoked, completed, cancelled, tombstoned
    ended_at: datetime | None = None
    end_detail: str = ""
    detection_latency_ms: float | None = None
    signal: str = ""  # for a revocation: budget, deadline, operator, violation, agent-revoked
    by: str = ""


class Check(Struct, frozen=True, kw_only=True):
    invariant: str
    version: str
    verdict: str
    at: datetime
    evidence: dict[str, Any]


class Effect(Struct, frozen=True, kw_only=True):
    kind: str
    at: datetime
    what: Literal["applied", "rolled_back", "failed", "rollback_requested"]
    receipt: dict[str, Any] = msgspec.field(default_factory=dict)
    reused_receipt: bool = False
    reason: str = ""
    by: str = ""


class ProposalStory(Struct, frozen=True, kw_only=True):
    proposal_id: UUID
    agent: str
    epoch: int
    effect: str
    size: int
    content_hash: str
    submitted_at: datetime
    input_seq: int
    # What the agent offered as evidence, from the proposal exactly as stored (text shortened).
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)
    checks: list[Check] = msgspec.field(default_factory=list)
    decision: Literal["pending", "accepted", "rejected"] = "pending"
    decided_at: datetime | None = None
    decided_by: str = ""
    violations: list[str] = msgspec.field(default_factory=list)
    effects: list[Effect] = msgspec.field(default_factory=list)


class Fenced(Struct, frozen=True, kw_only=True):
    """Messages refused because their lease was stale or over, grouped by who, lease and verb."""

    agent: str
    epoch: int
    verb: str
    current_epoch: int
    count: int
    first_at: datetime
    last_at: datetime
    reason: str
    input_seqs: list[int]


class Revocation(Struct, frozen=True, kw_only=True):
    at: datetime
    what: str  # "lease", "agent", "agent-suspended", "agent-reinstated"
    agent: str
    epoch: int | None
    signal: str
    by: str
    reason: str


class Line(Struct, frozen=True, kw_only=True):
    at: datetime
    seq: int
    text: str


class Explanation(Struct, frozen=True, kw_only=True):
    job_id: UUID
    kind: str
    submitter: str
    status: str
    requested_at: datetime | None
    ended_at: datetime | None
    outcome: str
    # One line naming why it failed (or what failure was contained); "" when nothing failed.
    cause: str
    attempts_used: int
    max_attempts: int
    events: int
    attempts: list[Attempt]
    proposals: list[ProposalStory]
    fenced: list[Fenced]
    revocations: list[Revocation]
    requeues: list[Line]
    timeline: list[Line]
    ledger: ledger.LedgerReport


def _ms(delta: timedelta) -> float:
    return delta.total_seconds() * 1000


def _secs(value: float) -> str:
    return f"{value:g}s"


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > EVIDENCE_TEXT:
        return value[:EVIDENCE_TEXT] + f"... ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip(v) for v in value[:50]]
    return value


def _heartbeats(job_log: JobLog) -> dict[int, list[tuple[log.Stored, Heartbeat]]]:
    by_epoch: dict[int, list[tuple[log.Stored, Heartbeat]]] = {}
    for record in job_log.agent_inputs:
        if not record.subject.endswith(".heartbeat"):
            continue
        try:
            hb = decode_input(record.data, Heartbeat)
        except InvalidInput:
            continue
        by_epoch.setdefault(hb.epoch, []).append((record, hb))
    return by_epoch


def _summarise(
    beats: Sequence[tuple[log.Stored, Heartbeat]],
    agent: str,
    granted_at: datetime,
    fenced_seqs: set[int],
    ended_at: datetime | None,
) -> HeartbeatSummary:
    mine = [(r, hb) for r, hb in beats if r.subject == topology.agent_subject(agent, "heartbeat")]
    live = [(r, hb) for r, hb in mine if r.seq not in fenced_seqs]
    fenced = len(mine) - len(live)
    if not live:
        gap = ((ended_at - granted_at).total_seconds()) if ended_at else None
        return HeartbeatSummary(fenced=fenced, max_gap_s=gap)
    times = [granted_at, *(r.time for r, _ in live)]
    if ended_at is not None:
        times.append(ended_at)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    last_record, last = live[-1]
    return HeartbeatSummary(
        count=len(live),
        fenced=fenced,
        first_at=live[0][0].time,
        last_at=last_record.time,
        max_gap_s=max(gaps) if gaps else None,
        last_note=last.note,
        last_progress=last.progress,
        last_usage=last.usage,
    )


def _proposal_evidence(job_log: JobLog, submitted: ProposalSubmitted) -> dict[str, Any]:
    record = job_log.input_at(submitted.input_seq)
    if record is None:
        return {"unavailable": f"input message {submitted.input_seq} not found"}
    try:
        body = decode_input(record.data, Propose)
    except InvalidInput as exc:
        return {"undecodable": str(exc)}
    if body.payload_object:  # a large proposal: its evidence is in the object, not read here
        return {"payload_object": body.payload_object}
    evidence: dict[str, Any] = dict(_clip(body.evidence))
    if body.usage != Usage():
        evidence.setdefault("usage", msgspec.to_builtins(body.usage))
    return evidence


def explain(job_log: JobLog) -> Explanation:
    """The story of one job, from its record (pure: the same record always says the same)."""
    events = [e for e in job_log.events if e.event is not None]
    requested = next((e.event for e in events if isinstance(e.event, JobRequested)), None)
    beats = _heartbeats(job_log)
    fenced_items = [e for e in events if isinstance(e.event, MessageRejected)]
    fenced_seqs = {e.event.input_seq for e in fenced_items if isinstance(e.event, MessageRejected)}

    attempts: list[dict[str, Any]] = []
    proposals: dict[UUID, dict[str, Any]] = {}
    revocations: list[Revocation] = []
    requeues: list[Line] = []
    # Status as the services' own fold says (shared/aggregates.py), never a second opinion.
    folded = project_job(None, [e.event for e in events if e.event is not None])
    status = folded.status if folded is not None else "unknown"
    reason = ""
    ended_at: datetime | None = None
    outcome_by = ""
    max_attempts = requested.contract.stopping.max_attempts if requested else 0

    def current() -> dict[str, Any] | None:
        return attempts[-1] if attempts else None

    def end(how: str, at: datetime, detail: str = "", **extra: Any) -> None:
        attempt = current()
        if attempt is not None and not attempt["ended"]:
            attempt.update(ended=how, ended_at=at, end_detail=detail, **extra)

    for item in events:
        event = item.event
        at = event.timestamp if event is not None else item.time
        match event:
            case LeaseGranted():
                attempts.append(
                    {
                        "epoch": event.epoch,
                        "agent": event.agent,
                        "granted_at": event.timestamp,
                        "ttl_s": event.ttl_s,
                        "claim_seq": event.claim_seq,
                        "ended": "",
                        "ended_at": None,
                        "end_detail": "",
                    }
                )
            case LeaseExpired():
                end(
                    "expired",
                    event.detected_at,
                    _lost_lease(event, current()),
                    detection_latency_ms=event.detection_latency_ms,
                )
            case LeaseReleased():
                end("released", at, f"released by {event.agent}: {event.reason or 'no reason given'}")
            case LeaseRevoked():
                end(
                    "revoked",
                    at,
                    f"lease {event.epoch} of {event.agent} revoked by {event.by} ({event.signal}): {event.reason}",
                    signal=event.signal,
                    by=event.by,
                )
                revocations.append(
                    Revocation(
                        at=at,
                        what="lease",
                        agent=event.agent,
                        epoch=event.epoch,
                        signal=event.signal,
                        by=event.by,
                        reason=event.reason,
                    )
                )
            case JobRequeued():
                requeues.append(Line(at=at, seq=item.seq, text=f"requeued by {event.by}: {event.reason}"))
                # An operator's requeue of a dead job revives it: the old ending is history now.
                reason, ended_at, outcome_by = "", None, ""
            case JobTombstoned():
                end("tombstoned", at, event.reason)
                reason, ended_at, outcome_by = event.reason, at, event.by
            case JobCancelled():
                attempt = current()
                live = attempt is not None and not attempt["ended"]
                end(
                    "cancelled",
                    at,
                    f"cancelled by {event.by}: {event.reason}",
                    by=event.by,
                    signal="operator",
                )
                if live and attempt is not None:
                    revocations.append(
                        Revocation(
                            at=at,
                            what="lease",
                            agent=attempt["agent"],
                            epoch=attempt["epoch"],
                            signal="operator",
                            by=event.by,
                            reason=f"job cancelled: {event.reason}",
                        )
                    )
                reason, ended_at, outcome_by = event.reason, at, event.by
            case ProposalSubmitted():
                proposals[event.proposal_id] = {
                    "proposal_id": event.proposal_id,
                    "agent": event.agent,
                    "epoch": event.epoch,
                    "effect": event.effect,
                    "size": event.size,
                    "content_hash": event.content_hash,
                    "submitted_at": at,
                    "input_seq": event.input_seq,
                    "evidence": _proposal_evidence(job_log, event),
                    "checks": [],
                    "effects": [],
                }
            case InvariantChecked():
                story = proposals.get(event.proposal_id)
                if story is not None:
                    story["checks"].append(
                        Check(
                            invariant=event.invariant,
                            version=event.version,
                            verdict=event.verdict,
                            at=at,
                            evidence=_clip(event.evidence),
                        )
                    )
            case ProposalAccepted():
                story = proposals.get(event.proposal_id)
                if story is not None:
                    story.update(decision="accepted", decided_at=at, decided_by=getattr(event, "by", ""))
            case ProposalRejected():
                story = proposals.get(event.proposal_id)
                if story is not None:
                    story.update(
                        decision="rejected",
                        decided_at=at,
                        decided_by=getattr(event, "by", ""),
                        violations=list(event.violations),
                    )
                    attempt = current()
                    if attempt is not None and attempt["epoch"] == story["epoch"]:
                        # A rejected proposal spends its attempt (the lease ends with it).
                        end(
                            "rejected",
                            at,
                            f"proposal {event.proposal_id} rejected: {'; '.join(event.violations)}",
                        )
            case EffectApplied():
                _add_effect(
                    proposals,
                    event.proposal_id,
                    Effect(
                        kind=event.kind,
                        at=at,
                        what="applied",
                        receipt=_clip(event.receipt),
                        reused_receipt=event.reused_receipt,
                    ),
                )
            case RollbackRequested():
                _add_effect(
                    proposals,
                    event.proposal_id,
                    Effect(kind="", at=at, what="rollback_requested", reason=event.reason, by=event.by),
                )
                revocations.append(
                    Revocation(
                        at=at,
                        what="rollback",
                        agent=str(proposals.get(event.proposal_id, {}).get("agent", "")),
                        epoch=None,
                        signal="rollback",
                        by=event.by,
                        reason=event.reason,
                    )
                )
            case EffectRolledBack():
                _add_effect(
                    proposals,
                    event.proposal_id,
                    Effect(
                        kind=event.kind,
                        at=at,
                        what="rolled_back",
                        receipt=_clip(event.receipt),
                        reason=event.reason,
                        reused_receipt=bool(getattr(event, "reused_receipt", False)),
                    ),
                )
            case JobCompleted():
                end("completed", at, f"completed with proposal {event.proposal_id}")
                ended_at, outcome_by = at, event.agent
            case _ if event is not None and tag_of(event) == "effect.failed":
                # Newer event (applier): read by name so this module works across versions.
                pid = getattr(event, "proposal_id", None)
                if isinstance(pid, UUID):
                    _add_effect(
                        proposals,
                        pid,
                        Effect(
                            kind=str(getattr(event, "kind", "")),
                            at=at,
                            what="failed",
                            reason=str(getattr(event, "reason", "")),
                            receipt=_clip(dict(getattr(event, "evidence", {}) or {})),
                        ),
                    )
                    story = proposals.get(pid)
                    attempt = current()
                    if (
                        getattr(event, "phase", "apply") == "apply"
                        and story is not None
                        and attempt is not None
                        and attempt["epoch"] == story["epoch"]
                    ):
                        end("failed", at, f"effect of proposal {pid} failed: {getattr(event, 'reason', '')}")

    revocations.extend(_agent_revocations(job_log, requested, ended_at))
    revocations.sort(key=lambda r: r.at)

    built_attempts = []
    for attempt in attempts:
        summary = _summarise(
            beats.get(attempt["epoch"], []),
            attempt["agent"],
            attempt["granted_at"],
            fenced_seqs,
            attempt["ended_at"],
        )
        built_attempts.append(Attempt(heartbeats=summary, **attempt))
    stories = [ProposalStory(**p) for p in proposals.values()]
    fenced = _group_fenced(fenced_items)
    cause = _cause(status, reason, outcome_by, built_attempts, stories, fenced, events, max_attempts)
    outcome = _outcome(status, reason, outcome_by, ended_at, built_attempts)
    return Explanation(
        job_id=job_log.job_id,
        kind=requested.kind if requested else "",
        submitter=requested.submitter if requested else "",
        status=status,
        requested_at=requested.timestamp if requested else None,
        ended_at=ended_at,
        outcome=outcome,
        cause=cause,
        attempts_used=len(built_attempts),
        max_attempts=max_attempts,
        events=len(job_log.events),
        attempts=built_attempts,
        proposals=stories,
        fenced=fenced,
        revocations=revocations,
        requeues=requeues,
        timeline=_timeline(job_log.events, beats, fenced_seqs),
        ledger=ledger.verify(ledger.entries_of(job_log.events), f"job {job_log.job_id}"),
    )


def _add_effect(proposals: dict[UUID, dict[str, Any]], proposal_id: UUID, effect: Effect) -> None:
    story = proposals.get(proposal_id)
    if story is not None:
        story["effects"].append(effect)


def _agent_revocations(
    job_log: JobLog, requested: JobRequested | None, ended_at: datetime | None
) -> list[Revocation]:
    """Revocations and suspensions of the job's agents while the job lived."""
    start = requested.timestamp if requested else None
    out: list[Revocation] = []
    for name, items in job_log.agent_events.items():
        for item in items:
            event = item.event
            if not isinstance(event, AgentRevoked | AgentSuspended | AgentReinstated):
                continue
            if (start is not None and event.timestamp < start) or (
                ended_at is not None and event.timestamp > ended_at
            ):
                continue
            what = {
                AgentRevoked: "agent",
                AgentSuspended: "agent-suspended",
                AgentReinstated: "agent-reinstated",
            }[type(event)]
            out.append(
                Revocation(
                    at=event.timestamp,
                    what=what,
                    agent=name,
                    epoch=None,
                    signal="agent",
                    by=event.by,
                    reason=event.reason,
                )
            )
    return out


def _group_fenced(items: Sequence[log.LoggedEvent]) -> list[Fenced]:
    groups: dict[tuple[str, int, str, int], list[MessageRejected]] = {}
    for item in items:
        event = item.event
        assert isinstance(event, MessageRejected)
        groups.setdefault((event.agent, event.epoch, event.verb, event.current_epoch), []).append(event)
    return [
        Fenced(
            agent=agent,
            epoch=epoch,
            verb=verb,
            current_epoch=current,
            count=len(group),
            first_at=group[0].timestamp,
            last_at=group[-1].timestamp,
            reason=group[0].reason,
            input_seqs=[e.input_seq for e in group[:20]],
        )
        for (agent, epoch, verb, current), group in groups.items()
    ]


def _lost_lease(event: LeaseExpired, attempt: dict[str, Any] | None) -> str:
    ttl = attempt["ttl_s"] if attempt else None
    silence = _secs(ttl) if ttl is not None else "its TTL"
    if event.last_heartbeat is not None:
        seen = event.last_heartbeat
        last = f"last heartbeat at {seen.at:%H:%M:%S.%f}"[:-3]
        last += f", note {seen.note!r}" if seen.note else ""
    else:
        last = "none ever received"
    return (
        f"lease {event.epoch} expired with no heartbeat for {silence} ({last}), "
        f"detected {event.detection_latency_ms:.0f} ms after deadline"
    )


def _spoke_after(agent: str, epoch: int, at: datetime, events: Sequence[log.LoggedEvent]) -> datetime | None:
    """When the agent next sent anything under a lease it had lost (proof it was alive)."""
    for item in events:
        event = item.event
        if (
            isinstance(event, MessageRejected)
            and event.agent == agent
            and event.epoch == epoch
            and event.timestamp > at
        ):
            return event.timestamp
    return None


def _attempt_cause(attempt: Attempt, events: Sequence[log.LoggedEvent]) -> str:
    match attempt.ended:
        case "expired":
            spoke = (
                _spoke_after(attempt.agent, attempt.epoch, attempt.ended_at, events)
                if attempt.ended_at
                else None
            )
            if spoke is not None and attempt.ended_at is not None:
                later = (spoke - attempt.ended_at).total_seconds()
                who = f"agent {attempt.agent} hung (it spoke again {later:.1f}s after losing its lease)"
            else:
                who = f"agent {attempt.agent} crashed or hung"
            return f"{who}: {attempt.end_detail}"
        case "revoked":
            detail = attempt.end_detail.split(": ", 1)[-1]
            if attempt.signal == "budget":
                what = detail.removeprefix("budget exceeded: ")
                return f"budget breach: {what} (lease {attempt.epoch} of {attempt.agent} revoked by {attempt.by})"
            if attempt.signal == "deadline":
                return f"deadline passed while agent {attempt.agent} held lease {attempt.epoch}: {detail}"
            if attempt.signal == "agent-revoked":
                return f"agent {attempt.agent} revoked: {detail} (lease {attempt.epoch} revoked in flight)"
            if attempt.signal == "violation":
                return f"violation by agent {attempt.agent}: {detail}"
            return f"lease {attempt.epoch} of {attempt.agent} revoked by {attempt.by}: {detail}"
        case "released":
            return f"agent {attempt.agent} gave up: {attempt.end_detail.split(': ', 1)[-1]}"
        case "rejected" | "failed":
            return attempt.end_detail
    return ""


def _check_cause(check: Check) -> str:
    name = check.invariant.lower()
    evidence = check.evidence
    reason = str(evidence.get("reason") or "")
    if "scope" in name:
        outside = evidence.get("outside")
        if isinstance(outside, list) and outside:
            globs = evidence.get("globs")
            listed = ", ".join(str(p) for p in outside[:10]) + (" ..." if len(outside) > 10 else "")
            return f"scope breach: {listed} outside contract globs" + (f" {globs}" if globs else "")
        return f"scope breach: {reason or 'the change leaves the contract scope'}"
    if "ci" in name or "test" in name:
        code = evidence.get("exit_code", evidence.get("returncode"))
        if evidence.get("timed_out"):
            return f"tests failed: {check.invariant} timed out" + (f" ({reason})" if reason else "")
        if code is not None:
            return f"tests failed: {check.invariant} exit {code}"
        return f"tests failed: {check.invariant}" + (f": {reason}" if reason else "")
    summary = reason or evidence.get("message") or evidence.get("detail") or ""
    return f"invariant {check.invariant} {check.verdict}" + (f": {summary}" if summary else "")


def _proposal_cause(story: ProposalStory) -> str:
    failed = [c for c in story.checks if c.verdict != "pass"]
    if failed:
        return _check_cause(failed[0])
    if story.violations:
        return f"proposal rejected: {'; '.join(story.violations)}"
    return "proposal rejected"


def _cause(
    status: str,
    reason: str,
    by: str,
    attempts: Sequence[Attempt],
    proposals: Sequence[ProposalStory],
    fenced: Sequence[Fenced],
    events: Sequence[log.LoggedEvent],
    max_attempts: int,
) -> str:
    # A proposal under a lease that is over: had it been taken, the effect would have happened twice.
    ended_at = {a.epoch: a.ended_at for a in attempts}

    def stale(f: Fenced) -> bool:
        end = ended_at.get(f.epoch)
        return f.epoch != f.current_epoch or (end is not None and end <= f.first_at)

    stale_proposals = [f for f in fenced if f.verb == "propose" and stale(f)]
    reused = [(p, e) for p in proposals for e in p.effects if e.what == "applied" and e.reused_receipt]
    failed_effects = [(p, e) for p in proposals for e in p.effects if e.what == "failed"]
    last = attempts[-1] if attempts else None
    last_rejected = next((p for p in reversed(proposals) if p.decision == "rejected"), None)
    if status == "cancelled":
        live = last is not None and last.ended == "cancelled"
        return f"cancelled by operator {by}: {reason}" + (
            f" (lease {last.epoch} of {last.agent} revoked in flight)" if live and last else ""
        )
    if status == "tombstoned":
        return _tombstone_cause(reason, attempts, last_rejected, events, max_attempts)
    if stale_proposals:
        f = stale_proposals[0]
        return (
            f"repeated side effect prevented: late proposal under stale epoch {f.epoch} from {f.agent} "
            f"fenced ({f.reason})"
        )
    if reused:
        p, e = reused[0]
        return (
            f"repeated side effect prevented: {e.kind} of proposal {p.proposal_id} was already applied "
            "(its receipt was found), so the retry recorded it instead of applying it again"
        )
    if failed_effects:
        p, e = failed_effects[-1]
        return f"effect {e.kind} of proposal {p.proposal_id} failed: {e.reason}"
    if status == "completed":
        return ""
    if last is not None and last.ended == "rejected" and last_rejected is not None:
        return f"proposal rejected, job {status}: {_proposal_cause(last_rejected)}"
    if last is not None and last.ended not in ("", "completed"):
        return f"attempt {last.epoch} lost, job {status}: {_attempt_cause(last, events)}"
    if last_rejected is not None:
        return f"proposal rejected, job {status}: {_proposal_cause(last_rejected)}"
    return ""


def _tombstone_cause(
    reason: str,
    attempts: Sequence[Attempt],
    last_rejected: ProposalStory | None,
    events: Sequence[log.LoggedEvent],
    max_attempts: int,
) -> str:
    final = attempts[-1] if attempts else None
    if final is None:
        return reason
    if reason.startswith("deadline"):
        if final.ended == "revoked" and final.signal == "deadline":
            return _attempt_cause(final, events)
        deadline = reason.split(";", 1)[0]
        if final.ended in ("expired", "revoked", "released", "failed", "rejected"):
            return f"{deadline}; last attempt: {_attempt_cause(final, events)}"
        return deadline
    rejected = last_rejected if last_rejected is not None and last_rejected.epoch == final.epoch else None
    if rejected is not None and final.ended != "expired":
        # A rejected proposal is what ended the attempt (the revocation or release followed it).
        why = _proposal_cause(rejected)
    elif final.ended in ("expired", "revoked", "released", "failed", "rejected"):
        why = _attempt_cause(final, events)
    else:
        why = reason
    lost = [a for a in attempts if a.ended not in ("", "tombstoned", "completed")]
    if "max attempts" in reason and max_attempts > 1 and len(lost) > 1:
        how = ", ".join(sorted({a.ended for a in lost}))
        return f"max attempts ({max_attempts}) reached, every lease lost ({how}); last: {why}"
    return why


def _outcome(
    status: str, reason: str, by: str, ended_at: datetime | None, attempts: Sequence[Attempt]
) -> str:
    when = f" at {ended_at.isoformat()}" if ended_at else ""
    if status == "completed":
        last = attempts[-1] if attempts else None
        holder = f" by agent {last.agent} (lease {last.epoch})" if last else ""
        return f"completed{when}{holder}"
    if status == "tombstoned":
        return f"tombstoned{when} by {by}: {reason}"
    if status == "cancelled":
        return f"cancelled{when} by {by}: {reason}"
    return f"{status} (not finished)"


# --- timeline ---------------------------------------------------------------------------------


def _describe(
    event: AnyEvent,
    beats: dict[int, list[tuple[log.Stored, Heartbeat]]],
    fenced: set[int],
    ttls: dict[int, float],
) -> str:
    match event:
        case JobRequested():
            scope = ", ".join(event.contract.scope.paths)
            stop = event.contract.stopping
            return (
                f"requested by {event.submitter or 'an unnamed client'}: kind {event.kind}, scope [{scope}], "
                f"max {stop.max_attempts} attempts, lease TTL {_secs(stop.lease_ttl_s)}"
            )
        case LeaseGranted():
            ttls[event.epoch] = event.ttl_s
            return f"{event.agent} claimed it: lease {event.epoch} granted for {_secs(event.ttl_s)}"
        case LeaseExpired():
            hb = beats.get(event.epoch, [])
            count = sum(1 for r, _ in hb if r.seq not in fenced)
            return f"lease {event.epoch} of {event.agent} lost after {count} heartbeats: " + _lost_lease(
                event, {"ttl_s": ttls[event.epoch]} if event.epoch in ttls else None
            )
        case LeaseReleased():
            return f"{event.agent} released lease {event.epoch}: {event.reason or 'no reason given'}"
        case LeaseRevoked():
            return (
                f"lease {event.epoch} of {event.agent} revoked by {event.by} ({event.signal}): {event.reason}"
            )
        case MessageRejected():
            return f"{event.verb} from {event.agent} under lease {event.epoch} fenced: {event.reason}"
        case JobRequeued():
            return f"requeued by {event.by}: {event.reason}"
        case JobTombstoned():
            return f"tombstoned by {event.by} after {event.attempts} attempts: {event.reason}"
        case JobCancelled():
            return f"cancelled by {event.by}: {event.reason}"
        case ProposalSubmitted():
            return f"{event.agent} proposed {event.proposal_id} under lease {event.epoch}: {event.effect}, {event.size} bytes"
        case InvariantChecked():
            return f"invariant {event.invariant}@{event.version}: {event.verdict}"
        case ProposalAccepted():
            return f"proposal {event.proposal_id} accepted" + (
                f" by {event.by}" if getattr(event, "by", "") else ""
            )
        case ProposalRejected():
            return f"proposal {event.proposal_id} rejected: {'; '.join(event.violations)}"
        case EffectApplied():
            reused = " (receipt already present: not applied again)" if event.reused_receipt else ""
            return f"effect {event.kind} applied{reused}: receipt {_clip(event.receipt)}"
        case RollbackRequested():
            return f"rollback of {event.proposal_id} requested by {event.by}: {event.reason}"
        case EffectRolledBack():
            return f"effect {event.kind} rolled back: receipt {_clip(event.receipt)}"
        case JobCompleted():
            return f"completed by {event.agent} (lease {event.epoch}) with proposal {event.proposal_id}"
    fields = msgspec.to_builtins(event)
    for key in ("originator_id", "originator_version", "timestamp", "trace", "prev_hash", "type"):
        fields.pop(key, None)
    return f"{tag_of(event)} " + " ".join(
        f"{k}={v}" for k, v in fields.items() if v not in (None, "", [], {})
    )


def _timeline(
    items: Sequence[log.LoggedEvent], beats: dict[int, list[tuple[log.Stored, Heartbeat]]], fenced: set[int]
) -> list[Line]:
    """One line per event, with runs of fenced messages folded into one line each."""
    lines: list[Line] = []
    ttls: dict[int, float] = {}
    run: list[MessageRejected] = []
    run_seq = 0

    def flush() -> None:
        if not run:
            return
        first = run[0]
        text = _describe(first, beats, fenced, ttls)
        if len(run) > 1:
            text = f"{len(run)} messages ({first.verb}) from {first.agent} under lease {first.epoch} fenced: {first.reason}"
        lines.append(Line(at=first.timestamp, seq=run_seq, text=text))
        run.clear()

    for item in items:
        event = item.event
        if event is None:
            flush()
            lines.append(Line(at=item.time, seq=item.seq, text="undecodable record (see ledger verify)"))
            continue
        if isinstance(event, MessageRejected):
            if run and (run[0].agent, run[0].epoch, run[0].verb) != (event.agent, event.epoch, event.verb):
                flush()
            if not run:
                run_seq = item.seq
            run.append(event)
            continue
        flush()
        lines.append(Line(at=event.timestamp, seq=item.seq, text=_describe(event, beats, fenced, ttls)))
    flush()
    return lines


def render(expl: Explanation) -> str:
    """The explanation as plain text for an operator's terminal."""
    out = [f"job {expl.job_id} ({expl.kind}): {expl.outcome}"]
    if expl.cause:
        out.append(f"cause: {expl.cause}")
    out.append(
        f"{expl.attempts_used} of {expl.max_attempts} attempts, {expl.events} events; "
        + ("ledger intact" if expl.ledger.ok else f"LEDGER BROKEN: {expl.ledger.breaks[0].detail}")
    )
    for a in expl.attempts:
        hb = a.heartbeats
        beats = f"{hb.count} heartbeats"
        if hb.last_at is not None:
            beats += f", last {hb.last_at:%H:%M:%S.%f}"[:-3]
        if hb.last_note:
            beats += f" ({hb.last_note!r})"
        if hb.fenced:
            beats += f", {hb.fenced} more fenced after the lease ended"
        end = a.ended or "live"
        out.append(f"  lease {a.epoch} to {a.agent} at {a.granted_at:%H:%M:%S.%f}"[:-3] + f": {beats}; {end}")
        if a.end_detail and a.ended not in ("completed",):
            out.append(f"      {a.end_detail}")
    for p in expl.proposals:
        out.append(f"  proposal {p.proposal_id} by {p.agent} (lease {p.epoch}, {p.effect}): {p.decision}")
        if p.evidence:
            shown = {k: v for k, v in p.evidence.items() if k not in ("stdout", "stderr")}
            out.append(f"      evidence: {shown}")
        for c in p.checks:
            out.append(
                f"      {c.invariant}@{c.version}: {c.verdict} {c.evidence if c.verdict != 'pass' else ''}".rstrip()
            )
        for v in p.violations:
            out.append(f"      violation: {v}")
        for e in p.effects:
            out.append(f"      effect {e.kind} {e.what}: {e.receipt or e.reason}")
    for f in expl.fenced:
        out.append(f"  fenced: {f.count} {f.verb} from {f.agent} under lease {f.epoch}: {f.reason}")
    for r in expl.revocations:
        out.append(f"  revocation ({r.what}) of {r.agent} by {r.by}: {r.reason}")
    out.append("timeline:")
    for line in expl.timeline:
        out.append(f"  {line.at:%H:%M:%S.%f}"[:-3] + f" #{line.seq} {line.text}")
    return "\n".join(out)


class Phase(Struct, frozen=True, kw_only=True):
    """One phase transition of the job as the ledger holds it, with the evidence behind it."""

    version: int | None
    seq: int
    stored_at: datetime
    type: str
    hash: str
    prev_hash: str
    linked: bool  # prev_hash names the previous event as stored
    text: str
    evidence: dict[str, Any]


def _phase_evidence(job_log: JobLog, event: AnyEvent) -> dict[str, Any]:
    """What the transition rests on: the agent's own words where it gave any."""
    match event:
        case JobRequested():
            return {"request_input_seq": event.input_seq, "submitter": event.submitter}
        case LeaseGranted():
            return {"claim_input_seq": event.claim_seq, "expires_at": event.expires_at.isoformat()}
        case LeaseExpired():
            out: dict[str, Any] = {
                "deadline": event.deadline.isoformat(),
                "detected_at": event.detected_at.isoformat(),
                "detection_latency_ms": event.detection_latency_ms,
            }
            if event.last_heartbeat is not None:
                out["last_heartbeat"] = msgspec.to_builtins(event.last_heartbeat)
            return out
        case ProposalSubmitted():
            return {
                "proposal_input_seq": event.input_seq,
                "agent_evidence": _proposal_evidence(job_log, event),
            }
        case InvariantChecked():
            return {"verdict": event.verdict, **_clip(event.evidence)}
        case ProposalAccepted():
            return {"checks": list(event.checks), "by": getattr(event, "by", "")}
        case ProposalRejected():
            return {"violations": list(event.violations)}
        case EffectApplied():
            return {"receipt": _clip(event.receipt), "reused_receipt": event.reused_receipt}
        case MessageRejected():
            return {"input_seq": event.input_seq, "reason": event.reason}
        case LeaseRevoked():
            return {"signal": event.signal, "by": event.by}
    return {}


def phases(job_log: JobLog) -> list[Phase]:
    """The job's phase ledger: each transition, its link in the hash chain, and its evidence."""
    beats = _heartbeats(job_log)
    fenced = {e.event.input_seq for e in job_log.events if isinstance(e.event, MessageRejected)}
    ttls: dict[int, float] = {}
    out: list[Phase] = []
    previous = ""
    for item in job_log.events:
        event = item.event
        prev_hash = event.prev_hash if event is not None else ""
        out.append(
            Phase(
                version=event.originator_version if event is not None else None,
                seq=item.seq,
                stored_at=item.time,
                type=tag_of(event) if event is not None else "(undecodable)",
                hash=item.hash,
                prev_hash=prev_hash,
                linked=event is not None and prev_hash == previous,
                text=_describe(event, beats, fenced, ttls) if event is not None else "undecodable record",
                evidence=_phase_evidence(job_log, event) if event is not None else {},
            )
        )
        previous = item.hash
    return out


def render_phases(items: Sequence[Phase]) -> str:
    lines = []
    for p in items:
        link = "linked" if p.linked else "BROKEN LINK"
        lines.append(
            f"v{p.version} #{p.seq} {p.type:<18} {p.hash[:12]} <- {p.prev_hash[:12] or '(first)':<12} {link}"
        )
        lines.append(f"    {p.text}")
        for key, value in p.evidence.items():
            lines.append(f"    {key}: {value}")
    return "\n".join(lines)


async def explain_job(js: JetStreamContext, job_id: UUID) -> Explanation:
    return explain(await collect(js, job_id))


def parse_job_id(text: str) -> UUID:
    with contextlib.suppress(ValueError):
        return UUID(text)
    raise ValueError(f"{text!r} is not a job id")
