"""Graduated autonomy: each agent's authority record, folded from the log, and what the policy
makes of it.

`fold` keeps per agent only the evidence the policy's rules read (the last N clean completions,
the last N lease expiries in a row, ...) and per live job only what ends with it, so the record
stays bounded however long the log grows; it is a msgspec Struct, so it can be snapshotted with
the view it is folded beside. `due` turns a record into the actions the policy calls for, and
`revoke`, `change_level`, `revoke_lease` and `rollback` turn an action (the policy's or an
operator's) into events. All of it is pure: the revoker appends what they return, and because
each appended event folds back into the record, deciding again after a crash or a redelivery
asks for nothing twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from msgspec import Struct, field

from shared.aggregates import Agent, Job, is_agent_event
from shared.decide import NEXT, Refusal, after, numbered
from shared.events import (
    AgentLevelChanged,
    AgentRegistered,
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    EffectApplied,
    EffectRolledBack,
    Event,
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
    ProposalSubmitted,
    RollbackRequested,
    ref,
)
from shared.lifecycle import after_attempt
from shared.policy import Policy
from shared.validation import missing

Standing = Literal["active", "suspended", "revoked"]

# Evidence lists whose rule fires on the first signal (a revoking or demoting check) keep this
# many: what arrives together before the action folds back is cited, nothing older is needed.
EVIDENCE_WINDOW = 16
# Rollback on revocation "since_level_change" reaches at most this many of an agent's latest
# applied effects: the bound on what an agent that never changes level makes the revoker keep.
MAX_APPLIED = 1000


class Signal(Struct, frozen=True, kw_only=True):
    """A piece of evidence about an agent: the event that carries it, and when it happened."""

    ref: str
    at: datetime
    what: str


class AgentRecord(Struct, kw_only=True):
    name: str
    version: int = 0  # the agent aggregate's last version folded
    level: int = 0
    standing: Standing = "active"
    # Since the last change of level: jobs completed cleanly (evidence for promotion).
    clean: list[Signal] = field(default_factory=list)
    violations: list[Signal] = field(default_factory=list)  # anything that blocks promotion
    demoting: list[Signal] = field(default_factory=list)  # failed checks the policy demotes on
    revoking: list[Signal] = field(default_factory=list)  # violations that revoke outright
    consecutive_expiries: list[Signal] = field(default_factory=list)
    budget_breaches: list[Signal] = field(default_factory=list)
    # Effects applied since its last change of level that the policy's rollback may reach, and
    # are neither rolled back nor asked to be: the rollback targets of a revocation.
    applied: dict[UUID, UUID] = field(default_factory=dict)  # proposal -> its job, oldest first
    offending: list[UUID] = field(default_factory=list)  # proposals whose checks revoked it
    live_leases: dict[UUID, int] = field(default_factory=dict)  # job -> epoch
    # Traceparents: of the event that last changed the record, and of its revocation. What an
    # action answers: a lease revocation or a rollback answers the revocation, whatever was
    # folded since (the lease's own grant, seen late).
    cause: str = ""
    revoked_by: str = ""


class ProposalRef(Struct, frozen=True, kw_only=True):
    job_id: UUID
    agent: str


class JobEntry(Struct, kw_only=True):
    """What the record keeps of a live job; dropped when the job ends."""

    version: int = 0  # the job aggregate's last version folded
    proposals: list[UUID] = field(default_factory=list)


class Authority(Struct, kw_only=True):
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    jobs: dict[UUID, JobEntry] = field(default_factory=dict)
    # The proposals of live jobs, and the applied ones a rollback may still reach.
    proposals: dict[UUID, ProposalRef] = field(default_factory=dict)

    def record(self, name: str) -> AgentRecord:
        rec = self.agents.get(name)
        if rec is None:
            rec = self.agents[name] = AgentRecord(name=name)
        return rec

    def folded(self, aggregate_id: UUID, name: str = "") -> int:
        """The last version of an aggregate folded (0: none, or a job that ended)."""
        if name:
            rec = self.agents.get(name)
            return rec.version if rec is not None else 0
        entry = self.jobs.get(aggregate_id)
        return entry.version if entry is not None else 0


def behind(state: Authority, reloaded: Job | Agent) -> tuple[int, int] | None:
    """The versions (after, up to] that a state reloaded from the store moved past without the
    record folding them (another replica wrote them), or None when the record lacks nothing.

    An ended job the record no longer holds was folded to its end already."""
    if isinstance(reloaded, Agent):
        folded = state.folded(reloaded.id, reloaded.name)
    else:
        folded = state.folded(reloaded.id)
        if not folded and reloaded.terminal:
            return None
    return (folded, reloaded.version) if reloaded.version > folded else None


ActionKind = Literal["promote", "demote", "revoke", "revoke_lease", "rollback"]


class Action(Struct, frozen=True, kw_only=True):
    kind: ActionKind
    agent: str
    reason: str
    evidence: list[str] = field(default_factory=list)
    signal_at: datetime | None = None
    level: int = 0
    job_id: UUID | None = None
    epoch: int = 0
    proposal_id: UUID | None = None


# --- the fold -------------------------------------------------------------------------------

_ENDS_JOB = (JobCompleted, JobTombstoned, JobCancelled)
# Events only a live job has: the others (a rollback, a fenced late message) may come after the
# job ended, and never bring its entry back.
_STARTS_ENTRY = (JobRequested, JobRequeued, LeaseGranted, ProposalSubmitted)


def _keep(signals: list[Signal], signal: Signal, window: int) -> list[Signal]:
    return [*signals, signal][-max(window, 1) :]


def fold(state: Authority, event: Event, policy: Policy) -> str | None:
    """Fold one event (each version once, in order per aggregate); returns the agent whose
    record changed, if any."""
    if is_agent_event(event):  # type: ignore[arg-type]
        return _fold_agent(state, event)
    changed = _fold_job_event(state, event, policy)
    if isinstance(event, _ENDS_JOB):
        _end_job(state, event.originator_id)
    elif isinstance(event, _STARTS_ENTRY) or event.originator_id in state.jobs:
        entry = state.jobs.get(event.originator_id)
        if entry is None:
            entry = state.jobs[event.originator_id] = JobEntry()
        entry.version = max(entry.version, event.originator_version)
    if changed is not None and event.trace:
        state.agents[changed].cause = event.trace
    return changed


def _fold_agent(state: Authority, event: Event) -> str | None:
    name: str = getattr(event, "name", "")
    if not name:
        return None
    rec = state.record(name)
    rec.version = max(rec.version, event.originator_version)
    match event:
        case AgentRegistered():
            # Re-registration updates limits, never level (the record may have seen a change first).
            if event.originator_version == 1:
                rec.level = event.level
        case AgentLevelChanged():
            rec.level = event.level
            # A change of level starts a new period of evidence.
            rec.clean, rec.violations, rec.demoting = [], [], []
            applied, rec.applied = rec.applied, {}
            for proposal_id in applied:
                _forget_applied(state, proposal_id)
        case AgentRevoked():
            rec.standing = "revoked"
            rec.revoking, rec.consecutive_expiries, rec.budget_breaches = [], [], []
            if event.trace:
                rec.revoked_by = event.trace
        case AgentSuspended():
            rec.standing = "suspended"
        case AgentReinstated():
            rec.standing = "active"
            rec.revoking, rec.consecutive_expiries, rec.budget_breaches = [], [], []
    if event.trace:
        rec.cause = event.trace
    return name


def _fold_job_event(state: Authority, event: Event, policy: Policy) -> str | None:
    revocation, demotion, promotion = policy.revocation, policy.demotion, policy.promotion
    match event:
        case LeaseGranted():
            state.record(event.agent).live_leases[event.originator_id] = event.epoch
            return event.agent
        case LeaseExpired():
            rec = state.record(event.agent)
            rec.live_leases.pop(event.originator_id, None)
            signal = Signal(ref=ref(event), at=event.timestamp, what=f"lease {event.epoch} expired")
            rec.consecutive_expiries = _keep(
                rec.consecutive_expiries, signal, revocation.repeated_lease_expiries
            )
            rec.violations = _keep(rec.violations, signal, 1)
            rec.clean = []
            return event.agent
        case LeaseReleased():
            state.record(event.agent).live_leases.pop(event.originator_id, None)
            return event.agent
        case LeaseRevoked():
            rec = state.record(event.agent)
            rec.live_leases.pop(event.originator_id, None)
            if event.signal == "budget":
                signal = Signal(ref=ref(event), at=event.timestamp, what=event.reason)
                rec.budget_breaches = _keep(rec.budget_breaches, signal, revocation.budget_breaches)
                rec.violations = _keep(rec.violations, signal, 1)
                rec.clean = []
            return event.agent
        case ProposalSubmitted():
            state.proposals[event.proposal_id] = ProposalRef(job_id=event.originator_id, agent=event.agent)
            entry = state.jobs.get(event.originator_id)
            if entry is None:
                entry = state.jobs[event.originator_id] = JobEntry()
            entry.proposals.append(event.proposal_id)
            return None
        case InvariantChecked() if event.verdict == "fail":
            known = state.proposals.get(event.proposal_id)
            if known is None:
                return None
            rec = state.record(known.agent)
            signal = Signal(ref=ref(event), at=event.timestamp, what=f"{event.invariant} failed")
            if event.invariant in revocation.on_failed_invariants:
                rec.revoking = _keep(rec.revoking, signal, EVIDENCE_WINDOW)
                if event.proposal_id not in rec.offending:
                    rec.offending.append(event.proposal_id)
            elif event.invariant in demotion.on_failed_invariants:
                rec.demoting = _keep(rec.demoting, signal, EVIDENCE_WINDOW)
            rec.violations = _keep(rec.violations, signal, 1)
            rec.clean = []
            return known.agent
        case JobCompleted():
            rec = state.record(event.agent)
            rec.live_leases.pop(event.originator_id, None)
            rec.consecutive_expiries = []
            completed = Signal(ref=ref(event), at=event.timestamp, what="completed")
            rec.clean = _keep(rec.clean, completed, promotion.clean_completions)
            return event.agent
        case EffectApplied():
            known = state.proposals.get(event.proposal_id)
            if known is None:
                return None
            rec = state.record(known.agent)
            mode = policy.rollback.on_revoke
            reachable = mode == "since_level_change" or (
                mode == "offending" and event.proposal_id in rec.offending
            )
            if reachable and event.proposal_id not in rec.applied:
                rec.applied[event.proposal_id] = event.originator_id
                while len(rec.applied) > MAX_APPLIED:
                    oldest = next(iter(rec.applied))
                    del rec.applied[oldest]
                    _forget_applied(state, oldest)
            return known.agent
        case RollbackRequested() | EffectRolledBack():
            known = state.proposals.get(event.proposal_id)
            if known is None:
                return None
            rec = state.record(known.agent)
            if rec.applied.pop(event.proposal_id, None) is not None:
                _forget_applied(state, event.proposal_id)
            return known.agent
        case JobTombstoned() | JobCancelled():
            # The lease the job ended with is no live lease any more.
            for rec in state.agents.values():
                rec.live_leases.pop(event.originator_id, None)
            return None
    return None


def _forget_applied(state: Authority, proposal_id: UUID) -> None:
    """An applied proposal no rollback will reach: keep it only while its job is live."""
    known = state.proposals.get(proposal_id)
    if known is not None and known.job_id not in state.jobs:
        del state.proposals[proposal_id]


def _end_job(state: Authority, job_id: UUID) -> None:
    entry = state.jobs.pop(job_id, None)
    if entry is None:
        return
    for proposal_id in entry.proposals:
        known = state.proposals.get(proposal_id)
        if known is None:
            continue
        rec = state.agents.get(known.agent)
        if rec is not None and proposal_id in rec.applied:
            continue  # a rollback may still reach it
        del state.proposals[proposal_id]
        if rec is not None and proposal_id in rec.offending:
            rec.offending.remove(proposal_id)


# --- automatic triggers: what the policy calls for -------------------------------------------


def due(rec: AgentRecord | None, policy: Policy) -> list[Action]:
    """What the policy calls for now, given everything folded into the record."""
    if rec is None:
        return []
    if rec.standing == "revoked":
        return after_revocation(rec, policy)
    revoke_for = revocation_signals(rec, policy)
    if revoke_for:
        return [
            Action(
                kind="revoke",
                agent=rec.name,
                reason="; ".join(s.what for s in revoke_for),
                evidence=[s.ref for s in revoke_for],
                signal_at=revoke_for[-1].at,
            )
        ]
    if rec.demoting and rec.level > policy.bottom_level:
        return [
            Action(
                kind="demote",
                agent=rec.name,
                reason=f"demoted: {rec.demoting[-1].what}",
                evidence=[s.ref for s in rec.demoting],
                signal_at=rec.demoting[-1].at,
                level=rec.level - 1,
            )
        ]
    if (
        rec.standing == "active"
        and not rec.violations
        and len(rec.clean) >= policy.promotion.clean_completions
        and rec.level < policy.promotion.max_level
    ):
        return [
            Action(
                kind="promote",
                agent=rec.name,
                reason=f"{len(rec.clean)} clean completions with no violation",
                evidence=[s.ref for s in rec.clean],
                signal_at=rec.clean[-1].at,
                level=rec.level + 1,
            )
        ]
    return []


def revocation_signals(rec: AgentRecord, policy: Policy) -> list[Signal]:
    """The evidence that revokes the agent now: a revoking check, repeated lease loss, or
    repeated budget breaches (empty when none does)."""
    if rec.revoking:
        return rec.revoking
    if len(rec.consecutive_expiries) >= policy.revocation.repeated_lease_expiries:
        return rec.consecutive_expiries
    if len(rec.budget_breaches) >= policy.revocation.budget_breaches:
        return rec.budget_breaches
    return []


def after_revocation(rec: AgentRecord, policy: Policy) -> list[Action]:
    """A revoked agent keeps no lease, and the policy's rollback reaches its effects."""
    actions = [
        Action(
            kind="revoke_lease",
            agent=rec.name,
            reason=f"agent {rec.name} revoked",
            job_id=job_id,
            epoch=epoch,
        )
        for job_id, epoch in rec.live_leases.items()
    ]
    mode = policy.rollback.on_revoke
    if mode == "none":
        return actions
    actions.extend(
        Action(
            kind="rollback",
            agent=rec.name,
            reason=f"agent {rec.name} revoked; policy rolls back {mode.replace('_', ' ')}",
            job_id=job_id,
            proposal_id=proposal_id,
        )
        for proposal_id, job_id in rec.applied.items()
        if mode == "since_level_change" or proposal_id in rec.offending
    )
    return actions


# --- rules: an action (the policy's or an operator's) as events --------------------------------


def revoke(
    agent: Agent,
    leases: list[Job],
    *,
    reason: str,
    by: str,
    at: datetime,
    evidence: list[str] | None = None,
    signal_at: datetime | None = None,
    enforcer: str = "revoker",
) -> list[Event] | Refusal:
    """Revoke an agent and, in the same save, each live lease it holds in `leases`: it learns
    of the revocation on its next heartbeat, and nothing it sends later under them is accepted.

    `by` revokes the agent; the leases end as the consequence `enforcer` (the service) draws, so
    a lease's end reads as "revoked in flight" of whoever revoked its agent."""
    if agent.standing == "revoked":
        return Refusal.of("$.agent", f"agent {agent.name} is already revoked")
    drafts: list[Event] = [
        AgentRevoked(
            originator_id=agent.id,
            originator_version=NEXT,
            name=agent.name,
            reason=reason,
            by=by,
            evidence=list(evidence or []),
            signal_at=signal_at,
            timestamp=at,
        )
    ]
    versions: dict[UUID, int] = {agent.id: agent.version}
    for job in leases:
        lease = job.live_lease
        if job.terminal or lease is None or lease.agent != agent.name:
            continue
        reason_for_lease = f"agent {agent.name} revoked"
        drafts.extend(_lease_revocation(job, lease.epoch, reason_for_lease, enforcer, signal_at, at))
        versions[job.id] = job.version
    return numbered(drafts, versions)


def revoke_lease(
    job: Job | None,
    epoch: int,
    *,
    reason: str,
    by: str,
    at: datetime,
    signal_at: datetime | None = None,
) -> list[Event] | Refusal:
    """End a revoked agent's live lease, and requeue (or tombstone) its job."""
    lease = job.live_lease if job is not None else None
    if job is None or lease is None or lease.epoch != epoch:
        return Refusal.of("$.job_id", f"lease {epoch} is no longer live")
    return after(job, *_lease_revocation(job, epoch, reason, by, signal_at, at))


def _lease_revocation(
    job: Job, epoch: int, reason: str, by: str, signal_at: datetime | None, at: datetime
) -> list[Event]:
    assert job.live_lease is not None
    return [
        LeaseRevoked(
            originator_id=job.id,
            originator_version=NEXT,
            agent=job.live_lease.agent,
            epoch=epoch,
            reason=reason,
            signal="agent-revoked",
            by=by,
            signal_at=signal_at,
            timestamp=at,
        ),
        after_attempt(job, NEXT, reason, at, by=by),
    ]


def change_level(
    agent: Agent,
    level: int,
    policy: Policy,
    *,
    verb: Literal["promote", "demote"],
    reason: str,
    by: str,
    at: datetime,
    evidence: list[str] | None = None,
    signal_at: datetime | None = None,
) -> list[Event] | Refusal:
    """Move an agent to `level`: one of the policy's, and up for a promotion, down for a demotion."""
    refusal = policy.level_refusal(level)
    if refusal is None and ((verb == "promote") != (level > agent.level) or level == agent.level):
        refusal = f"a {verb} must go {'up' if verb == 'promote' else 'down'}"
    if refusal is not None:
        return Refusal.of(
            "$.level", f"cannot {verb} {agent.name} from level {agent.level} to {level}: {refusal}"
        )
    return after(
        agent,
        AgentLevelChanged(
            originator_id=agent.id,
            originator_version=NEXT,
            name=agent.name,
            level=level,
            previous=agent.level,
            reason=reason,
            evidence=list(evidence or []),
            by=by,
            signal_at=signal_at,
            timestamp=at,
        ),
    )


def rollback(
    job: Job,
    proposal_id: UUID,
    *,
    reason: str,
    by: str,
    at: datetime,
    signal_at: datetime | None = None,
    once: bool = False,
) -> list[Event] | Refusal:
    """Ask the applier to compensate a proposal's applied effect; `once` (the policy's own ask)
    refuses when a rollback was asked for already or is done, by anyone."""
    state = job.proposal(proposal_id)
    if state is None:
        return Refusal(errors=[missing("$.proposal_id", f"proposal {proposal_id}")])
    if once and state.rollback in ("requested", "done"):
        return Refusal.of("$.proposal_id", f"the rollback of proposal {proposal_id} is {state.rollback}")
    return after(
        job,
        RollbackRequested(
            originator_id=job.id,
            originator_version=NEXT,
            proposal_id=proposal_id,
            reason=reason,
            by=by,
            signal_at=signal_at,
            timestamp=at,
        ),
    )
