"""The Job and Agent aggregates: immutable state folded from events by explicit evolve functions.

These are eventsourcing aggregates in the library's immutable style: `Repository.get(id,
projector_func=project_job)` rebuilds one from the store, and services fold the same functions
over the live event stream. `evolve_*` is the only place that says what an event means.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from msgspec import Struct
from msgspec.structs import replace

from shared.contract import Contract
from shared.events import (
    AgentLevelChanged,
    AgentRegistered,
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    AnyEvent,
    EffectApplied,
    EffectFailed,
    EffectRolledBack,
    Event,
    InputRejected,
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
    ReplyRefused,
    RollbackRequested,
    digest,
)

JobStatus = Literal["queued", "leased", "proposed", "accepted", "completed", "tombstoned", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "tombstoned", "cancelled"})
# How a lease ended ("" while it lives).
LeaseEnd = Literal["", "expired", "released", "revoked", "completed", "rejected", "failed"]
# How far a rollback of an applied proposal went ("" when none was asked for).
RollbackState = Literal["", "requested", "done", "failed"]


class Lease(Struct, frozen=True, kw_only=True):
    agent: str
    epoch: int
    granted_at: datetime
    expires_at: datetime
    ttl_s: float
    ended: LeaseEnd = ""
    trace: str = ""  # the grant's traceparent: the agent's inputs and the timers under it are its children
    claim_seq: int = 0  # the input sequence of the claim it answered


class CheckRecord(Struct, frozen=True, kw_only=True):
    invariant: str
    version: str
    verdict: str


ProposalStatus = Literal["submitted", "accepted", "rejected", "applied", "failed"]


class ProposalState(Struct, frozen=True, kw_only=True):
    """One proposal as the record has it: where its bytes are, what was checked, what came of it."""

    id: UUID
    agent: str
    epoch: int
    effect: str
    input_seq: int
    content_hash: str
    submitted_at: datetime
    payload_object: str = ""
    payload_hash: str = ""
    # The record kept in `proposal.submitted`, held until the proposal is applied or rejected
    # (the applier reads it; nothing after does), so live proposals bound what it costs.
    record: str = ""
    checks: tuple[CheckRecord, ...] = ()
    status: ProposalStatus = "submitted"
    decided_by: str = ""
    branch: str = ""
    receipt: dict[str, Any] | None = None
    rollback: RollbackState = ""
    rollback_reason: str = ""
    rollback_receipt: dict[str, Any] | None = None
    # The traceparent of the span that last moved it (submitted, accepted, applied, rollback
    # requested): the parent of whoever takes its next step (an approval, the applier, a rollback).
    trace: str = ""

    def check(self, invariant: str) -> CheckRecord | None:
        return next((c for c in self.checks if c.invariant == invariant), None)


class Job(Struct, frozen=True, kw_only=True):
    id: UUID
    version: int
    created_on: datetime
    modified_on: datetime
    idempotency_key: str
    kind: str
    contract: Contract
    submitter: str
    status: JobStatus = "queued"
    attempts: int = 0
    # Attempts before the last operator requeue: a requeued tombstone gets max_attempts afresh.
    attempt_base: int = 0
    lease: Lease | None = None
    leases: tuple[Lease, ...] = ()
    proposals: tuple[UUID, ...] = ()
    pending_proposal: UUID | None = None
    reason: str = ""
    last_hash: str = ""
    proposal_log: tuple[ProposalState, ...] = ()
    # The traceparent of the span that last made it runnable (its request, a requeue): a grant's parent.
    trace: str = ""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def attempts_left(self) -> int:
        return self.contract.stopping.max_attempts - (self.attempts - self.attempt_base)

    @property
    def live_lease(self) -> Lease | None:
        return self.lease if self.lease is not None and not self.lease.ended else None

    def proposal(self, proposal_id: UUID) -> ProposalState | None:
        return next((p for p in self.proposal_log if p.id == proposal_id), None)

    def trace_of(self, epoch: int | None = None) -> str:
        """The traceparent an input about this job runs under: lease `epoch`'s grant if there is
        one, else what last made the job runnable."""
        lease = next((lease for lease in self.leases if lease.epoch == epoch), None)
        return lease.trace if lease is not None and lease.trace else self.trace


def _with_proposal(job: Job, proposal_id: UUID, **changes: Any) -> Job:
    log = tuple(replace(p, **changes) if p.id == proposal_id else p for p in job.proposal_log)
    return replace(job, proposal_log=log)


def _end_attempt_of(job: Job, proposal_id: UUID, how: LeaseEnd) -> Job:
    """A decided-against proposal ends the lease it was made under: the attempt is spent."""
    state = job.proposal(proposal_id)
    lease, leases = job.lease, job.leases
    if state is not None and job.live_lease is not None and job.live_lease.epoch == state.epoch:
        lease, leases = _end_lease(job, how)
    pending = None if job.pending_proposal == proposal_id else job.pending_proposal
    return replace(job, lease=lease, leases=leases, pending_proposal=pending)


def _end_lease(job: Job, how: LeaseEnd) -> tuple[Lease | None, tuple[Lease, ...]]:
    if job.lease is None:
        return None, job.leases
    ended = replace(job.lease, ended=how)
    return ended, (*job.leases[:-1], ended)


def evolve_job(job: Job | None, event: Event) -> Job | None:
    """Fold one event into a job's state (None before `job.requested`)."""
    if isinstance(event, JobRequested):
        return Job(
            id=event.originator_id,
            version=event.originator_version,
            created_on=event.timestamp,
            modified_on=event.timestamp,
            idempotency_key=event.idempotency_key,
            kind=event.kind,
            contract=event.contract,
            submitter=event.submitter,
            last_hash=digest(event),
            trace=event.trace,
        )
    if job is None:
        return None
    job = replace(job, version=event.originator_version, modified_on=event.timestamp, last_hash=digest(event))
    match event:
        case LeaseGranted():
            granted = Lease(
                agent=event.agent,
                epoch=event.epoch,
                granted_at=event.timestamp,
                expires_at=event.expires_at,
                ttl_s=event.ttl_s,
                trace=event.trace,
                claim_seq=event.claim_seq,
            )
            return replace(
                job,
                status="leased",
                attempts=event.epoch,
                lease=granted,
                leases=(*job.leases, granted),
            )
        case LeaseExpired():
            lease, leases = _end_lease(job, "expired")
            return replace(job, lease=lease, leases=leases)
        case LeaseReleased():
            lease, leases = _end_lease(job, "released")
            return replace(job, lease=lease, leases=leases)
        case LeaseRevoked():
            lease, leases = _end_lease(job, "revoked")
            return replace(job, lease=lease, leases=leases, reason=event.reason)
        case JobRequeued():
            base = job.attempts if event.fresh_attempts else job.attempt_base
            return replace(
                job,
                status="queued",
                pending_proposal=None,
                reason=event.reason,
                attempt_base=base,
                trace=event.trace or job.trace,
            )
        case JobTombstoned():
            lease, leases = _end_lease(job, job.lease.ended if job.lease and job.lease.ended else "expired")
            return replace(job, status="tombstoned", reason=event.reason, lease=lease, leases=leases)
        case JobCancelled():
            lease, leases = _end_lease(job, "revoked") if job.live_lease else (job.lease, job.leases)
            return replace(job, status="cancelled", reason=event.reason, lease=lease, leases=leases)
        case ProposalSubmitted():
            state = ProposalState(
                id=event.proposal_id,
                agent=event.agent,
                epoch=event.epoch,
                effect=event.effect,
                input_seq=event.input_seq,
                content_hash=event.content_hash,
                submitted_at=event.timestamp,
                payload_object=event.payload_object,
                payload_hash=event.payload_hash,
                record=event.record,
                trace=event.trace,
            )
            return replace(
                job,
                status="proposed",
                proposals=(*job.proposals, event.proposal_id),
                pending_proposal=event.proposal_id,
                proposal_log=(*job.proposal_log, state),
            )
        case InvariantChecked():
            checked = job.proposal(event.proposal_id)
            if checked is None:
                return job
            check = CheckRecord(invariant=event.invariant, version=event.version, verdict=event.verdict)
            return _with_proposal(job, event.proposal_id, checks=(*checked.checks, check))
        case ProposalAccepted():
            job = _with_proposal(
                job,
                event.proposal_id,
                status="accepted",
                decided_by=event.by,
                branch=event.branch,
                trace=event.trace,
            )
            return replace(job, status="accepted" if not job.terminal else job.status)
        case ProposalRejected():
            job = _with_proposal(job, event.proposal_id, status="rejected", decided_by=event.by, record="")
            return _end_attempt_of(job, event.proposal_id, "rejected")
        case EffectApplied():
            return _with_proposal(
                job, event.proposal_id, status="applied", receipt=event.receipt, trace=event.trace, record=""
            )
        case EffectFailed():
            if event.phase == "rollback":
                return _with_proposal(job, event.proposal_id, rollback="failed")
            job = _with_proposal(job, event.proposal_id, status="failed")
            return _end_attempt_of(job, event.proposal_id, "failed")
        case RollbackRequested():
            asked = job.proposal(event.proposal_id)
            if asked is None or asked.rollback == "done":
                return job
            return _with_proposal(
                job, event.proposal_id, rollback="requested", rollback_reason=event.reason, trace=event.trace
            )
        case EffectRolledBack():
            return _with_proposal(job, event.proposal_id, rollback="done", rollback_receipt=event.receipt)
        case JobCompleted():
            lease, leases = _end_lease(job, "completed")
            return replace(job, status="completed", lease=lease, leases=leases, pending_proposal=None)
        case MessageRejected():
            return job
    return job


def project_job(job: Job | None, events: Iterable[Event]) -> Job | None:
    for event in events:
        job = evolve_job(job, event)
    return job


class Agent(Struct, frozen=True, kw_only=True):
    id: UUID
    version: int
    created_on: datetime
    modified_on: datetime
    name: str
    level: int = 0
    max_concurrent: int = 1
    kinds: tuple[str, ...] = ()
    standing: Literal["active", "suspended", "revoked"] = "active"
    standing_reason: str = ""
    last_hash: str = ""


def evolve_agent(agent: Agent | None, event: Event) -> Agent | None:
    if isinstance(event, AgentRegistered):
        if agent is not None:  # re-registration updates limits, never level or standing
            return replace(
                agent,
                version=event.originator_version,
                modified_on=event.timestamp,
                max_concurrent=event.max_concurrent,
                kinds=tuple(event.kinds),
                last_hash=digest(event),
            )
        return Agent(
            id=event.originator_id,
            version=event.originator_version,
            created_on=event.timestamp,
            modified_on=event.timestamp,
            name=event.name,
            level=event.level,
            max_concurrent=event.max_concurrent,
            kinds=tuple(event.kinds),
            last_hash=digest(event),
        )
    if agent is None:
        return None
    agent = replace(
        agent, version=event.originator_version, modified_on=event.timestamp, last_hash=digest(event)
    )
    match event:
        case AgentLevelChanged():
            return replace(agent, level=event.level)
        case AgentRevoked():
            return replace(agent, standing="revoked", standing_reason=event.reason)
        case AgentSuspended():
            return replace(agent, standing="suspended", standing_reason=event.reason)
        case AgentReinstated():
            return replace(agent, standing="active", standing_reason="")
    return agent


def project_agent(agent: Agent | None, events: Iterable[Event]) -> Agent | None:
    for event in events:
        agent = evolve_agent(agent, event)
    return agent


def is_agent_event(event: AnyEvent) -> bool:
    return isinstance(
        event, AgentRegistered | AgentLevelChanged | AgentRevoked | AgentSuspended | AgentReinstated
    )


def is_job_event(event: AnyEvent) -> bool:
    return not is_agent_event(event) and not isinstance(event, InputRejected | ReplyRefused)
