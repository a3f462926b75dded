"""The rules of a proposal's life, from its arrival to its effect and its rollback.

The checker admits a proposal (or fences it), records it, judges it by the verdicts of its
invariants and decides: accepted, rejected (the attempt is spent), or waiting for an operator
who approves or denies it. The applier records what came of the effect: applied (the job
completes), failed (the attempt is spent), or rolled back. Each rule is a function of the job,
what was measured (verdicts, receipts, the agent as it stands) and the time; it returns the
events to append, numbered by `after`, or a `Refusal`. Nothing here reads a clock or a store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from msgspec import Struct

from shared.aggregates import Agent, Job, ProposalState
from shared.decide import NEXT, Refusal, after
from shared.decide.leases import after_lost_attempt, fence
from shared.events import (
    EffectApplied,
    EffectFailed,
    EffectRolledBack,
    Event,
    InvariantChecked,
    JobCompleted,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
)
from shared.policy import Policy
from shared.validation import missing

CHECKER = "checker"
APPLIER = "applier"

# --- propose -------------------------------------------------------------------------------


class Fenced(Struct, frozen=True, kw_only=True):
    """A proposal refused *and recorded* on its job: `events` are saved, `refusal` answered."""

    events: list[Event]
    refusal: Refusal
    # "lease": sent under a lease that is not the sender's live one; "pending": its lease
    # already has a proposal waiting for its decision.
    why: Literal["lease", "pending"]


def admit(
    job: Job | None, job_id: UUID, agent: str, epoch: int, *, input_seq: int, at: datetime
) -> Fenced | Refusal | None:
    """None when `agent` may propose on `job` under lease `epoch` now; else why not.

    An unknown job is a refusal of the input (there is no job to record it on); a stale,
    revoked or ended lease, another agent's lease, or a second proposal under one lease is
    recorded on the job as `message.rejected`.
    """
    if job is None:
        return Refusal.of("$.job_id", f"no job {job_id} (the store has none)")
    fenced = fence(agent, "propose", job, epoch, input_seq, at)
    if fenced is not None:
        why, events = fenced
        return Fenced(events=events, refusal=Refusal.of("$.epoch", why.reason), why="lease")
    if job.pending_proposal is not None:
        reason = f"proposal {job.pending_proposal} is already pending under lease {epoch}"
        rejected = MessageRejected(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            agent=agent,
            epoch=epoch,
            verb="propose",
            reason=reason,
            input_seq=input_seq,
            current_epoch=epoch,
        )
        return Fenced(events=after(job, rejected), refusal=Refusal.of("$", reason), why="pending")
    return None


class Received(Struct, frozen=True, kw_only=True):
    """What the checker measured of a proposal before interpreting it."""

    proposal_id: UUID
    agent: str
    epoch: int
    input_seq: int
    content_hash: str
    size: int
    effect: str
    payload_object: str = ""
    payload_hash: str = ""
    record: str = ""


def submit(job: Job, received: Received, at: datetime) -> list[Event]:
    """The proposal stored as received, before anything interprets it (admit it first)."""
    return after(
        job,
        ProposalSubmitted(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            proposal_id=received.proposal_id,
            agent=received.agent,
            epoch=received.epoch,
            content_hash=received.content_hash,
            size=received.size,
            input_seq=received.input_seq,
            effect=received.effect,
            payload_object=received.payload_object,
            payload_hash=received.payload_hash,
            record=received.record,
        ),
    )


# --- check and decide ------------------------------------------------------------------------

Outcome = Literal["accepted", "rejected", "awaiting approval"]


class Decision(Struct, frozen=True, kw_only=True):
    """What was decided about a proposal, and the events that record it."""

    outcome: Outcome
    events: list[Event]
    # What the operator is told, or the violations joined for the log.
    detail: str = ""


class Judgement(Struct, frozen=True, kw_only=True):
    """One required invariant's verdict on a proposal, as the decision counts it."""

    invariant: str
    # "pass", "fail", "error" (as recorded), or "not run".
    verdict: str
    reason: str = ""
    # Recorded on an earlier delivery (its evidence is in the record, not here).
    recorded: bool = False

    @property
    def violation(self) -> str:
        """ "" when it passed; else the line the rejection names it by."""
        if self.verdict == "pass":
            return ""
        if self.verdict == "not run":
            return f"{self.invariant}: not run, an earlier invariant already failed"
        if self.recorded:
            return f"{self.invariant}: {self.verdict} (recorded)"
        return f"{self.invariant}: {self.reason or self.verdict}"


def not_run(invariant: str, expensive: bool, so_far: Sequence[Judgement]) -> Judgement | None:
    """An expensive check (a CI run) is not spent on a proposal already failed by a cheap one."""
    if expensive and any(j.violation for j in so_far):
        return Judgement(invariant=invariant, verdict="not run")
    return None


def verdict(
    job: Job,
    proposal_id: UUID,
    invariant: str,
    version: str,
    outcome: Literal["pass", "fail", "error"],
    evidence: dict[str, Any],
    *,
    trace: str,
    at: datetime,
) -> InvariantChecked:
    """One check's record, a draft numbered with whatever it is saved with."""
    return InvariantChecked(
        originator_id=job.id,
        originator_version=NEXT,
        timestamp=at,
        trace=trace,
        proposal_id=proposal_id,
        invariant=invariant,
        version=version,
        verdict=outcome,
        evidence=evidence,
    )


def before_checks(
    job: Job, state: ProposalState, payload_problem: str | None, at: datetime
) -> Decision | None:
    """A rejection that needs no invariant (its job has ended, its payload is unusable: None
    when it is usable), or None."""
    if job.terminal:
        return reject(job, state, [f"job is {job.status}: {job.reason}"], by=CHECKER, at=at)
    if payload_problem is not None:
        return reject(job, state, [f"payload: {payload_problem}"], by=CHECKER, at=at)
    return None


def check_and_decide(
    job: Job,
    state: ProposalState,
    judgements: Sequence[Judgement],
    *,
    agent: Agent | None,
    policy: Policy,
    at: datetime,
    unsaved: Sequence[InvariantChecked] = (),
) -> Decision:
    """Decide a proposal once every required invariant is judged: rejected naming every
    violation; else waiting when its contract wants an operator's approval; else accepted
    unless the agent's authority at this moment forbids the effect.

    `unsaved` are verdicts not yet appended: they go in the same write as the decision.
    """
    violations = [j.violation for j in judgements if j.violation]
    if violations:
        return reject(job, state, violations, by=CHECKER, prefix=unsaved, at=at)
    if job.contract.approval_required:
        return Decision(outcome="awaiting approval", events=after(job, *unsaved))
    checks = list(dict.fromkeys([*(c.invariant for c in state.checks), *(c.invariant for c in unsaved)]))
    return accept(
        job,
        state,
        agent=agent,
        policy=policy,
        by=CHECKER,
        reason="every required invariant passed",
        checks=checks,
        prefix=unsaved,
        at=at,
    )


def authority_refusals(job: Job, state: ProposalState, policy: Policy, agent: Agent | None) -> list[str]:
    """What the agent's standing and level say against the proposal's effect ([] when nothing)."""
    if agent is None:
        return [f"authority: agent {state.agent} is not registered (the store has no such agent)"]
    refusals: list[str] = []
    if agent.standing != "active":
        refusals.append(f"authority: agent {agent.name} is {agent.standing}: {agent.standing_reason}")
    refusal = policy.effect_refusal(agent.level, state.effect)
    if refusal:
        refusals.append(f"authority: {refusal}")
    if job.contract.required_level > agent.level:
        refusals.append(
            f"authority: the job needs level {job.contract.required_level}, {agent.name} is at {agent.level}"
        )
    return refusals


def branch(policy: Policy, level: int, agent: str, job: Job) -> str:
    """Where a git change by `agent` at `level` lands (fixed at acceptance)."""
    return policy.branch_for(level, agent, job.id, job.contract.target.branch)


def accept(
    job: Job,
    state: ProposalState,
    *,
    agent: Agent | None,
    policy: Policy,
    by: str,
    reason: str,
    at: datetime,
    checks: list[str] | None = None,
    prefix: Sequence[Event] = (),
) -> Decision:
    """Accepted unless the agent's authority forbids it now (then rejected, naming why)."""
    refusals = authority_refusals(job, state, policy, agent)
    if refusals or agent is None:
        return reject(job, state, refusals, by=by, reason=reason, prefix=prefix, at=at)
    accepted = ProposalAccepted(
        originator_id=job.id,
        originator_version=NEXT,
        timestamp=at,
        proposal_id=state.id,
        checks=checks if checks is not None else [c.invariant for c in state.checks],
        by=by,
        reason=reason,
        effect=state.effect,
        branch=branch(policy, agent.level, agent.name, job) if state.effect == "git.patch" else "",
    )
    return Decision(outcome="accepted", events=after(job, *prefix, accepted), detail=reason)


def reject(
    job: Job,
    state: ProposalState,
    violations: list[str],
    *,
    by: str,
    at: datetime,
    reason: str = "",
    prefix: Sequence[Event] = (),
) -> Decision:
    """Rejected, and the attempt spent: the job is requeued, or tombstoned when none is left."""
    events: list[Event] = [
        *prefix,
        ProposalRejected(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            proposal_id=state.id,
            violations=violations,
            by=by,
            reason=reason,
        ),
    ]
    if not job.terminal:
        why = f"proposal {state.id} rejected: {'; '.join(violations)}"
        events.append(after_lost_attempt(job, why, at, by=CHECKER))
    return Decision(outcome="rejected", events=after(job, *events), detail="; ".join(violations))


# --- what an operator's command names ----------------------------------------------------


def named(job: Job | None, proposal_id: UUID, job_id: UUID | None) -> ProposalState | Refusal:
    """The proposal an operator's command names, in the job loaded for it (`job_id`, when the
    command names one). That job_id is the client's word: a job that does not hold the
    proposal is refused, so a mismatched command never acts on the wrong job."""
    state = job.proposal(proposal_id) if job is not None else None
    if state is not None:
        return state
    if job_id is None:
        return Refusal(errors=[missing("$.proposal_id", f"proposal {proposal_id}")])
    if job is None:
        return Refusal(errors=[missing("$.job_id", f"job {job_id}")])
    return Refusal.of("$.job_id", f"proposal {proposal_id} is not one of job {job_id}'s")


# --- operator approval -----------------------------------------------------------------------


def _undecided(job: Job, state: ProposalState) -> Refusal | None:
    if state.status != "submitted":
        return Refusal.of("$.proposal_id", f"proposal {state.id} is already {state.status}")
    return None


def deny(job: Job, state: ProposalState, *, operator: str, reason: str, at: datetime) -> Decision | Refusal:
    """An operator's no: rejected naming who and why (at any point before its decision)."""
    refused = _undecided(job, state)
    if refused is not None:
        return refused
    decided = reject(job, state, [f"denied by {operator}: {reason}"], by=operator, reason=reason, at=at)
    return Decision(outcome="rejected", events=decided.events, detail=f"proposal {state.id} denied")


def approve(
    job: Job,
    state: ProposalState,
    *,
    operator: str,
    reason: str,
    required: Sequence[str],
    agent: Agent | None,
    policy: Policy,
    at: datetime,
) -> Decision | Refusal:
    """An operator's yes, on a proposal whose contract waits for one and whose checks all
    passed; still subject to the agent's authority at this moment."""
    refused = _undecided(job, state)
    if refused is not None:
        return refused
    if not job.contract.approval_required:
        return Refusal.of("$.proposal_id", f"job {job.id} does not wait for approval; the checker decides it")
    if job.terminal:
        return Refusal.of("$.proposal_id", f"job {job.id} is {job.status}")
    running = [name for name in required if state.check(name) is None]
    if running:
        return Refusal.of(
            "$.proposal_id", f"checks still running ({', '.join(running)}); approve once they have passed"
        )
    decided = accept(job, state, agent=agent, policy=policy, by=operator, reason=reason, at=at)
    if decided.outcome == "accepted":
        return Decision(
            outcome="accepted", events=decided.events, detail=f"proposal {state.id} approved by {operator}"
        )
    detail = f"proposal {state.id} rejected: the agent's authority no longer allows it"
    return Decision(outcome="rejected", events=decided.events, detail=detail)


# --- apply, record, roll back ----------------------------------------------------------------

Work = Literal["apply", "rollback"]


def owed(job: Job) -> tuple[Work, ProposalState] | None:
    """What the applier owes a job: an accepted proposal's effect, or an asked-for rollback."""
    for state in job.proposal_log:
        if state.status == "accepted":
            return "apply", state
        if state.status == "applied" and state.rollback == "requested":
            return "rollback", state
    return None


class Perform(Struct, frozen=True):
    """No receipt is found and the job still wants the effect: carry it out, then record it."""


PERFORM = Perform()


def _unapplied(state: ProposalState) -> Refusal | None:
    if state.status != "accepted":
        return Refusal.of("$.proposal_id", f"proposal {state.id} is {state.status}, not accepted")
    return None


def _unrolled(state: ProposalState) -> Refusal | None:
    if state.status != "applied":
        return Refusal.of("$.proposal_id", f"proposal {state.id} was never applied (it is {state.status})")
    if state.rollback == "done":
        return Refusal.of("$.proposal_id", f"proposal {state.id} is already rolled back")
    if state.rollback != "requested":
        return Refusal.of("$.proposal_id", f"no rollback of proposal {state.id} was asked for")
    return None


def apply(
    job: Job, state: ProposalState, found: dict[str, Any] | None, at: datetime
) -> list[Event] | Refusal | Perform:
    """Before acting on an accepted proposal: a receipt found means the effect happened (by a
    replica, or before a crash) and is recorded, never made twice; a job that ended since its
    decision gets no effect; otherwise perform it."""
    refused = _unapplied(state)
    if refused is not None:
        return refused
    if found is not None:
        return applied(job, state, found, reused=True, at=at)
    if job.terminal:
        reason = f"job became {job.status} before the effect: {job.reason}"
        return failed(job, state, "apply", reason, {}, at=at)
    return PERFORM


def applied(
    job: Job, state: ProposalState, receipt: dict[str, Any], *, reused: bool, at: datetime
) -> list[Event] | Refusal:
    """The effect with its receipt, and the job completed by it (unless it ended already)."""
    refused = _unapplied(state)
    if refused is not None:
        return refused
    events: list[Event] = [
        EffectApplied(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            proposal_id=state.id,
            kind=state.effect,
            receipt=receipt,
            reused_receipt=reused,
        )
    ]
    if not job.terminal:
        events.append(
            JobCompleted(
                originator_id=job.id,
                originator_version=NEXT,
                timestamp=at,
                proposal_id=state.id,
                agent=state.agent,
                epoch=state.epoch,
            )
        )
    return after(job, *events)


def failed(
    job: Job,
    state: ProposalState,
    phase: Work,
    reason: str,
    evidence: dict[str, Any],
    *,
    at: datetime,
) -> list[Event] | Refusal:
    """The effect (or its rollback) could not be made and the world is unchanged; a failed
    effect spends the attempt (requeue or tombstone), a failed rollback leaves the job be."""
    refused = _unapplied(state) if phase == "apply" else _unrolled(state)
    if refused is not None:
        return refused
    events: list[Event] = [
        EffectFailed(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            proposal_id=state.id,
            kind=state.effect,
            reason=reason,
            phase=phase,
            evidence=evidence,
        )
    ]
    if phase == "apply" and not job.terminal:
        events.append(after_lost_attempt(job, f"effect failed: {reason}", at, by=APPLIER))
    return after(job, *events)


def rolled_back(
    job: Job, state: ProposalState, receipt: dict[str, Any], *, reused: bool, at: datetime
) -> list[Event] | Refusal:
    """The compensating effect with its receipt, on an applied proposal whose rollback was asked."""
    refused = _unrolled(state)
    if refused is not None:
        return refused
    return after(
        job,
        EffectRolledBack(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            proposal_id=state.id,
            kind=state.effect,
            receipt=receipt,
            reason=state.rollback_reason,
            reused_receipt=reused,
        ),
    )
