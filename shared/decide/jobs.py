"""The scheduler's rules for jobs and agents that are not about a lease: admitting a request,
registering an agent, and the operator's requeue and cancel. Pure, like `leases`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from shared.aggregates import Agent, Job
from shared.contract import semantic_errors
from shared.decide import NEXT, Refusal, after
from shared.decide.leases import Outcome
from shared.events import (
    AgentRegistered,
    Event,
    JobCancelled,
    JobRequested,
    JobRequeued,
    agent_id_for,
    job_id_for,
)
from shared.messages import Accepted, JobRequest, OperatorCommand, Register, request_digest
from shared.validation import FieldError, missing


def admit(
    request: JobRequest, existing: Job | None, *, max_level: int, input_seq: int, at: datetime
) -> Outcome | Refusal:
    """A job request: a new job, the same job again (same key, same body: a retry), or refused
    (a contract that cannot be enforced; the same key with another body). `existing` is the
    job its idempotency key names, if any."""
    errors = [
        FieldError(path=p, message=m) for p, m in semantic_errors(request.contract, at, max_level=max_level)
    ]
    if errors:
        return Refusal(errors=errors)
    digest = request_digest(request)
    if existing is None:
        job_id = job_id_for(request.idempotency_key)
        requested = JobRequested(
            originator_id=job_id,
            originator_version=NEXT,
            timestamp=at,
            idempotency_key=request.idempotency_key,
            kind=request.kind,
            contract=request.contract,
            submitter=request.submitter,
            input_seq=input_seq,
            request_digest=digest,
        )
        return Outcome(events=list[Event](after(None, requested)), reply=Accepted(job_id=job_id))
    # Recomputed from the job as recorded, so events from before digests were kept compare too.
    recorded = request_digest(
        JobRequest(
            idempotency_key=existing.idempotency_key,
            kind=existing.kind,
            contract=existing.contract,
            submitter=existing.submitter,
        )
    )
    if recorded == digest:
        return Outcome(events=[], reply=Accepted(job_id=existing.id, duplicate=True))
    return Refusal.of(
        "$.idempotency_key",
        f"idempotency key {request.idempotency_key!r} already names job {existing.id}, "
        f"requested with a different body (sha256 {recorded[:16]}, this one {digest[:16]})",
        job_id=existing.id,
    )


def register(agent: Agent | None, name: str, reg: Register, at: datetime) -> Outcome:
    """An agent (re-)registers: its limits and kinds are updated, never its level or standing."""
    registered = AgentRegistered(
        originator_id=agent_id_for(name),
        originator_version=NEXT,
        timestamp=at,
        name=name,
        max_concurrent=reg.max_concurrent,
        kinds=reg.kinds,
        level=agent.level if agent else 0,
    )
    return Outcome(
        events=list[Event](after(agent, registered)), reply=Accepted(detail=f"agent {name} registered")
    )


def requeue(job: Job, cmd: OperatorCommand, at: datetime) -> Outcome | Refusal:
    """An operator gives a dead job max_attempts afresh."""
    if job.status not in ("tombstoned", "cancelled"):
        return Refusal.of("$.job_id", f"job is {job.status}; only a dead job is requeued")
    requeued = JobRequeued(
        originator_id=job.id,
        originator_version=NEXT,
        timestamp=at,
        reason=cmd.reason,
        by=cmd.operator,
        fresh_attempts=True,
    )
    return Outcome(
        events=list[Event](after(job, requeued)), reply=Accepted(job_id=job.id, detail="requeue recorded")
    )


def cancel(job: Job, cmd: OperatorCommand, at: datetime) -> Outcome | Refusal:
    """An operator cancels a job that has not ended (its live lease, if any, is revoked with it)."""
    if job.terminal:
        return Refusal.of("$.job_id", f"job is already {job.status}")
    cancelled = JobCancelled(
        originator_id=job.id, originator_version=NEXT, timestamp=at, reason=cmd.reason, by=cmd.operator
    )
    return Outcome(
        events=list[Event](after(job, cancelled)), reply=Accepted(job_id=job.id, detail="cancel recorded")
    )


OperatorRule = Callable[[Job, OperatorCommand, datetime], Outcome | Refusal]

# The operator verbs the scheduler decides (the revoker decides the others).
OPERATOR_VERBS: dict[str, OperatorRule] = {"requeue": requeue, "cancel": cancel}


def operate(verb: str, job: Job | None, cmd: OperatorCommand, at: datetime) -> Outcome | Refusal:
    """An operator's `verb` on the job its command names (`job`: as the store has it)."""
    if cmd.job_id is None:
        return Refusal.of("$.job_id", f"{verb} needs a job_id")
    if job is None:
        return Refusal(errors=[missing("$.job_id", f"job {cmd.job_id}")])
    rule = OPERATOR_VERBS.get(verb)
    if rule is None:
        return Refusal.of("$", f"the scheduler decides no operator verb {verb!r}")
    return rule(job, cmd, at)
