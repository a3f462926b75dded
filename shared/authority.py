"""Graduated autonomy: each agent's record folded from the log, and what the policy makes of it.

`AuthorityBook.apply` folds every event into per-agent records (clean completions, violations,
expiries, budget breaches, applied effects). `AuthorityBook.decide` turns a record into the
actions the policy calls for. Both are pure: the revoker service appends the actions, and
because each action's own event folds back into the record, deciding again after a crash or a
redelivery asks for nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

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
    JobCompleted,
    LeaseExpired,
    LeaseGranted,
    LeaseRevoked,
    MessageRejected,
    ProposalSubmitted,
    RollbackRequested,
    ref,
)
from shared.policy import Policy


@dataclass
class Signal:
    """A piece of evidence against an agent: the event that carries it, and when it happened."""

    ref: str
    at: datetime
    what: str


@dataclass
class AgentRecord:
    name: str
    level: int = 0
    standing: Literal["active", "suspended", "revoked"] = "active"
    # Since the last change of level: jobs completed cleanly (evidence for promotion).
    clean: list[Signal] = field(default_factory=list)
    violations: list[Signal] = field(default_factory=list)  # anything that blocks promotion
    demoting: list[Signal] = field(default_factory=list)  # failed checks the policy demotes on
    revoking: list[Signal] = field(default_factory=list)  # violations that revoke outright
    consecutive_expiries: list[Signal] = field(default_factory=list)
    budget_breaches: list[Signal] = field(default_factory=list)
    # Effects applied for this agent since its last change of level: (proposal, job, signal).
    applied_since_change: list[tuple[UUID, UUID]] = field(default_factory=list)
    offending: list[UUID] = field(default_factory=list)  # proposals whose checks revoked it
    live_leases: dict[UUID, int] = field(default_factory=dict)  # job -> epoch


@dataclass
class Action:
    kind: Literal["promote", "demote", "revoke", "revoke_lease", "rollback"]
    agent: str
    reason: str
    evidence: list[str]
    signal_at: datetime | None = None
    level: int = 0
    job_id: UUID | None = None
    epoch: int = 0
    proposal_id: UUID | None = None


class AuthorityBook:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.agents: dict[str, AgentRecord] = {}
        self.proposal_agent: dict[UUID, str] = {}
        self.proposal_job: dict[UUID, UUID] = {}
        self.rollback_requested: set[UUID] = set()
        self.rolled_back: set[UUID] = set()

    def record(self, name: str) -> AgentRecord:
        rec = self.agents.get(name)
        if rec is None:
            rec = self.agents[name] = AgentRecord(name=name)
        return rec

    def apply(self, event: Event) -> str | None:
        """Fold one event; returns the agent whose record changed, if any."""
        match event:
            case AgentRegistered():
                rec = self.record(event.name)
                rec.level = max(rec.level, event.level) if rec.level else event.level
                return event.name
            case AgentLevelChanged():
                rec = self.record(event.name)
                rec.level = event.level
                # A change of level starts a new period of evidence.
                rec.clean, rec.violations, rec.demoting = [], [], []
                rec.applied_since_change = []
                return event.name
            case AgentRevoked():
                rec = self.record(event.name)
                rec.standing = "revoked"
                rec.revoking, rec.consecutive_expiries, rec.budget_breaches = [], [], []
                return event.name
            case AgentSuspended():
                self.record(event.name).standing = "suspended"
                return event.name
            case AgentReinstated():
                rec = self.record(event.name)
                rec.standing = "active"
                rec.revoking, rec.consecutive_expiries, rec.budget_breaches = [], [], []
                return event.name
            case LeaseGranted():
                self.record(event.agent).live_leases[event.originator_id] = event.epoch
                return event.agent
            case LeaseExpired():
                rec = self.record(event.agent)
                rec.live_leases.pop(event.originator_id, None)
                signal = Signal(ref(event), event.timestamp, f"lease {event.epoch} expired")
                rec.consecutive_expiries.append(signal)
                rec.violations.append(signal)
                rec.clean = []
                return event.agent
            case LeaseRevoked():
                rec = self.record(event.agent)
                rec.live_leases.pop(event.originator_id, None)
                if event.signal == "budget":
                    signal = Signal(ref(event), event.timestamp, event.reason)
                    rec.budget_breaches.append(signal)
                    rec.violations.append(signal)
                    rec.clean = []
                return event.agent
            case ProposalSubmitted():
                self.proposal_agent[event.proposal_id] = event.agent
                self.proposal_job[event.proposal_id] = event.originator_id
                return None
            case InvariantChecked() if event.verdict == "fail":
                agent = self.proposal_agent.get(event.proposal_id)
                if agent is None:
                    return None
                rec = self.record(agent)
                signal = Signal(ref(event), event.timestamp, f"{event.invariant} failed")
                if event.invariant in self.policy.revocation.on_failed_invariants:
                    rec.revoking.append(signal)
                    rec.offending.append(event.proposal_id)
                elif event.invariant in self.policy.demotion.on_failed_invariants:
                    rec.demoting.append(signal)
                rec.violations.append(signal)
                rec.clean = []
                return agent
            case JobCompleted():
                rec = self.record(event.agent)
                rec.live_leases.pop(event.originator_id, None)
                rec.consecutive_expiries = []
                rec.clean.append(Signal(ref(event), event.timestamp, "completed"))
                return event.agent
            case EffectApplied():
                agent = self.proposal_agent.get(event.proposal_id)
                if agent is not None:
                    self.record(agent).applied_since_change.append((event.proposal_id, event.originator_id))
                return agent
            case RollbackRequested():
                self.rollback_requested.add(event.proposal_id)
                return self.proposal_agent.get(event.proposal_id)
            case EffectRolledBack():
                self.rolled_back.add(event.proposal_id)
                return None
            case MessageRejected():
                return None
        return None

    def decide(self, name: str) -> list[Action]:
        """What the policy calls for now, given everything folded so far."""
        rec = self.agents.get(name)
        if rec is None:
            return []
        policy = self.policy
        if rec.standing == "revoked":
            return self._after_revocation(rec)
        revoke_for: list[Signal] = []
        if rec.revoking:
            revoke_for = rec.revoking
        elif len(rec.consecutive_expiries) >= policy.revocation.repeated_lease_expiries:
            revoke_for = rec.consecutive_expiries
        elif len(rec.budget_breaches) >= policy.revocation.budget_breaches:
            revoke_for = rec.budget_breaches
        if revoke_for:
            return [
                Action(
                    kind="revoke",
                    agent=name,
                    reason="; ".join(s.what for s in revoke_for),
                    evidence=[s.ref for s in revoke_for],
                    signal_at=revoke_for[-1].at,
                )
            ]
        demoting = rec.demoting
        if demoting and rec.level > 0:
            return [
                Action(
                    kind="demote",
                    agent=name,
                    reason=f"demoted: {demoting[-1].what}",
                    evidence=[s.ref for s in demoting],
                    signal_at=demoting[-1].at,
                    level=rec.level - 1,
                )
            ]
        need = policy.promotion.clean_completions
        if (
            rec.standing == "active"
            and not rec.violations
            and len(rec.clean) >= need
            and rec.level < policy.promotion.max_level
        ):
            return [
                Action(
                    kind="promote",
                    agent=name,
                    reason=f"{len(rec.clean)} clean completions with no violation",
                    evidence=[s.ref for s in rec.clean],
                    signal_at=rec.clean[-1].at,
                    level=rec.level + 1,
                )
            ]
        return []

    def _after_revocation(self, rec: AgentRecord) -> list[Action]:
        """A revoked agent keeps no lease, and the policy's rollback reaches its effects."""
        actions = [
            Action(
                kind="revoke_lease",
                agent=rec.name,
                reason=f"agent {rec.name} revoked",
                evidence=[],
                job_id=job_id,
                epoch=epoch,
            )
            for job_id, epoch in rec.live_leases.items()
        ]
        mode = self.policy.rollback.on_revoke
        if mode == "none":
            return actions
        targets = [p for p, _job in rec.applied_since_change]
        if mode == "offending":
            targets = [p for p in targets if p in rec.offending]
        for proposal_id in targets:
            if proposal_id in self.rollback_requested or proposal_id in self.rolled_back:
                continue
            actions.append(
                Action(
                    kind="rollback",
                    agent=rec.name,
                    reason=f"agent {rec.name} revoked; policy rolls back {mode.replace('_', ' ')}",
                    evidence=[],
                    job_id=self.proposal_job.get(proposal_id),
                    proposal_id=proposal_id,
                )
            )
        return actions


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
        event = written.event_of(stored.subject, stored.headers, stored.data)
        if not isinstance(event, str):  # a message Warden did not write is no evidence
            events.append(event)
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
        inputs = await log.scan(js, topology.INPUT_STREAM, topology.agent_input_root(event.name))
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
