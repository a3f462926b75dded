"""`warden backtest`: run a new or changed invariant over every past proposal in the log.

Each past proposal is rebuilt from the record alone into the same `Subject` the checker hands an
invariant (shared/invariants): the proposal exactly as the agent sent it (the input stream at
`input_seq`, merged with its object-store payload when it was large), the job and the agent as
the log had folded them when it was submitted, its lease, when it was stored, and the branch
it would land on. The invariant judges it afresh, and the report sets that verdict against what
was recorded then: the same invariant's old verdict where it ran, otherwise the decision.

Nothing is appended. Two things are not in the log and come from now: the autonomy policy
(only `subject.policy` and the branch of an undecided proposal depend on it) and whatever an
invariant reads outside the subject (a repository's current head, for base_drift and ci_gate).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec
from msgspec import Struct
from nats.js import JetStreamContext

from shared import invariants, proposals, topology
from shared.aggregates import Agent, Job, Lease
from shared.events import (
    InvariantChecked,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
)
from shared.forensics import log
from shared.messages import Propose
from shared.policy import Policy, load_policy
from shared.validation import InvalidInput
from shared.views import Views

VerdictName = Literal["pass", "fail", "error"]
Decision = Literal["pending", "accepted", "rejected"]


class BacktestError(ValueError):
    """Raised when the invariant named cannot be found or loaded (the message says what to fix)."""


class Verdict(Struct, frozen=True, kw_only=True):
    verdict: VerdictName
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One past proposal, rebuilt from the log: what the invariant is asked to judge."""

    job: Job  # as folded when the proposal was submitted
    agent: Agent | None
    submitted: ProposalSubmitted
    proposal: Propose | None  # None when the stored bytes no longer make a proposal
    problem: str  # why `proposal` is None
    received_at: datetime
    branch: str  # recorded at acceptance; else where the policy would put it
    recorded: list[InvariantChecked] = field(default_factory=list)
    decision: Decision = "pending"

    @property
    def job_id(self) -> UUID:
        return self.job.id

    @property
    def lease(self) -> Lease | None:
        return next((lease for lease in self.job.leases if lease.epoch == self.submitted.epoch), None)


class CaseResult(Struct, frozen=True, kw_only=True):
    job_id: UUID
    proposal_id: UUID
    agent: str
    submitted_at: datetime
    decision: Decision
    recorded_verdict: str | None  # the same invariant's verdict at the time, if it ran then
    verdict: VerdictName
    evidence: dict[str, Any]
    # caught: fails now, was let through then; let_through: passes now, was stopped by it then;
    # also_rejected: fails now, was rejected then for other reasons; agrees; error.
    outcome: Literal["caught", "let_through", "also_rejected", "agrees", "error"]


class BacktestReport(Struct, frozen=True, kw_only=True):
    invariant: str
    version: str
    proposals: int
    caught: int
    let_through: int
    also_rejected: int
    agreed: int
    errors: int
    results: list[CaseResult]


def load(spec: str) -> invariants.Invariant:
    """A registered invariant by name, or `module:callable` (anything the registry accepts)."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except ImportError as exc:
            raise BacktestError(f"cannot import {module_name!r}: {exc}") from exc
        except AttributeError:
            raise BacktestError(f"{module_name} has no {attr!r}") from None
        try:
            return invariants.coerce(target, spec)
        except invariants.InvariantConfigError as exc:
            raise BacktestError(str(exc)) from exc
    try:
        registry = invariants.load()
    except invariants.InvariantConfigError as exc:
        raise BacktestError(f"the invariant registry does not load: {exc}") from exc
    found = registry.get(spec)
    if found is None:
        raise BacktestError(f"no invariant named {spec!r}; registered: {', '.join(registry.names)}")
    return found


def normalise(result: Any) -> Verdict:
    """Any verdict-like answer as a Verdict; anything else is an error verdict, not a crash."""
    verdict = getattr(result, "verdict", None)
    evidence = getattr(result, "evidence", None) or {}
    if verdict not in ("pass", "fail", "error"):
        return Verdict(verdict="error", evidence={"reason": f"the invariant returned {result!r}"})
    if not isinstance(evidence, dict):
        evidence = {"evidence": evidence}
    return Verdict(verdict=verdict, evidence=msgspec.to_builtins(evidence))


async def judge(inv: invariants.Invariant, case: Case, policy: Policy) -> Verdict:
    if case.proposal is None:
        return Verdict(verdict="error", evidence={"reason": case.problem})
    subject = invariants.Subject(
        proposal_id=case.submitted.proposal_id,
        proposal=case.proposal,
        job=case.job,
        agent=case.agent,
        lease=case.lease,
        received_at=case.received_at,
        branch=case.branch,
        policy=policy,
    )
    try:
        return normalise(await inv.check(subject))
    except Exception as exc:  # the invariant's own failure is a verdict, not a crash of the backtest
        return Verdict(verdict="error", evidence={"reason": f"{type(exc).__name__}: {exc}"})


@dataclass(frozen=True)
class ProposalBytes:
    """A proposal as read back (proposals.read_recorded), or why it could not be, and when its
    input was stored (None once the input is gone: the submission's time stands in)."""

    proposal: Propose | None
    problem: str = ""
    time: datetime | None = None


def cases_from(
    events: Iterable[log.LoggedEvent], stored: dict[int, ProposalBytes], policy: Policy
) -> list[Case]:
    """Every past proposal with the state it was judged in, its checks and its decision (pure)."""
    views = Views()
    at_submission: dict[UUID, tuple[Job, Agent | None, ProposalSubmitted]] = {}
    checks: dict[UUID, list[InvariantChecked]] = {}
    decisions: dict[UUID, Decision] = {}
    branches: dict[UUID, str] = {}
    for item in events:
        event = item.event
        if event is None:
            continue
        views.on_stream_event(item.seq, event)
        if isinstance(event, ProposalSubmitted):
            job = views.jobs.get(event.originator_id)
            if job is not None:
                at_submission[event.proposal_id] = (job, views.agents.get(event.agent), event)
        elif isinstance(event, InvariantChecked):
            checks.setdefault(event.proposal_id, []).append(event)
        elif isinstance(event, ProposalAccepted):
            decisions[event.proposal_id] = "accepted"
            branches[event.proposal_id] = getattr(event, "branch", "")
        elif isinstance(event, ProposalRejected):
            decisions[event.proposal_id] = "rejected"
    cases: list[Case] = []
    for pid, (job, agent, sub) in at_submission.items():
        record = stored.get(sub.input_seq)
        proposal, problem = (record.proposal, record.problem) if record else (None, "not read")
        branch = branches.get(pid) or policy.branch_for(
            agent.level if agent else 0, sub.agent, job.id, job.contract.target.branch
        )
        cases.append(
            Case(
                job=job,
                agent=agent,
                submitted=sub,
                proposal=proposal,
                problem=problem,
                received_at=record.time if record and record.time else sub.timestamp,
                branch=branch,
                recorded=checks.get(pid, []),
                decision=decisions.get(pid, "pending"),
            )
        )
    return cases


def compare(inv: invariants.Invariant, case: Case, verdict: Verdict) -> CaseResult:
    recorded = next((c for c in reversed(case.recorded) if c.invariant == inv.name), None)
    outcome: Literal["caught", "let_through", "also_rejected", "agrees", "error"]
    if verdict.verdict == "error":
        outcome = "error"
    elif recorded is not None and recorded.verdict != "error":
        if recorded.verdict == verdict.verdict:
            outcome = "agrees"
        else:
            outcome = "caught" if verdict.verdict == "fail" else "let_through"
    elif verdict.verdict == "fail":
        outcome = "also_rejected" if case.decision == "rejected" else "caught"
    else:
        outcome = "agrees"
    return CaseResult(
        job_id=case.job_id,
        proposal_id=case.submitted.proposal_id,
        agent=case.submitted.agent,
        submitted_at=case.submitted.timestamp,
        decision=case.decision,
        recorded_verdict=recorded.verdict if recorded is not None else None,
        verdict=verdict.verdict,
        evidence=verdict.evidence,
        outcome=outcome,
    )


async def run(
    inv: invariants.Invariant, cases: Sequence[Case], policy: Policy | None = None
) -> BacktestReport:
    chosen = policy or load_policy()
    results = [compare(inv, case, await judge(inv, case, chosen)) for case in cases]

    def count(outcome: str) -> int:
        return sum(1 for r in results if r.outcome == outcome)

    return BacktestReport(
        invariant=inv.name,
        version=inv.version,
        proposals=len(results),
        caught=count("caught"),
        let_through=count("let_through"),
        also_rejected=count("also_rejected"),
        agreed=count("agrees"),
        errors=count("error"),
        results=results,
    )


async def past_cases(
    js: JetStreamContext,
    *,
    job: UUID | None = None,
    since: datetime | None = None,
    policy: Policy | None = None,
) -> list[Case]:
    """Every past proposal (of one job, or submitted since a time), rebuilt from the streams."""
    # Agents' events are folded too (their level and standing at the time are part of the subject).
    events = await log.read_events(js)
    wanted = {
        e.event.input_seq: e.event
        for e in events
        if isinstance(e.event, ProposalSubmitted)
        and (job is None or e.event.originator_id == job)
        and (since is None or e.event.timestamp >= since)
    }
    stored: dict[int, ProposalBytes] = {}
    if wanted:
        # The messages still in the agent stream give each proposal's arrival time; the proposal
        # itself is read from its record object, which outlives the stream's ring.
        records = await log.scan(
            js,
            topology.AGENT_INPUT_STREAM,
            topology.agent_subject_all("propose"),
            start_seq=min(wanted),
            keep=lambda r: r.seq in wanted,
        )
        messages = {r.seq: r for r in records if proposals.sha256(r.data) == wanted[r.seq].content_hash}
        for seq, sub in wanted.items():
            found = messages.get(seq)
            try:
                proposal = await proposals.read_recorded(
                    js,
                    agent=sub.agent,
                    input_seq=sub.input_seq,
                    content_hash=sub.content_hash,
                    payload_object=sub.payload_object,
                    payload_hash=sub.payload_hash,
                    message=found.data if found else None,
                    record=sub.record,
                )
            except (InvalidInput, proposals.PayloadProblem) as exc:
                stored[seq] = ProposalBytes(None, str(exc), found.time if found else None)
            else:
                stored[seq] = ProposalBytes(proposal, "", found.time if found else None)
    cases = cases_from(events, stored, policy or load_policy())
    return [c for c in cases if c.submitted.input_seq in wanted]


def render(report: BacktestReport, *, all_results: bool = False) -> str:
    lines = [
        f"backtest of {report.invariant}@{report.version} over {report.proposals} past proposals:",
        f"  would have caught       {report.caught:>5}  (fails now; let through then)",
        f"  would have let through  {report.let_through:>5}  (passes now; this invariant stopped it then)",
        f"  also rejected           {report.also_rejected:>5}  (fails now; rejected then for other reasons)",
        f"  agrees                  {report.agreed:>5}",
        f"  errors                  {report.errors:>5}",
    ]
    for r in report.results:
        if all_results or r.outcome in ("caught", "let_through", "error"):
            lines.append(
                f"  {r.outcome:<13} job {r.job_id} proposal {r.proposal_id} by {r.agent}: "
                f"now {r.verdict}, then {r.recorded_verdict or r.decision}"
                + (f" {r.evidence.get('reason')}" if r.evidence.get("reason") else "")
            )
    return "\n".join(lines)
