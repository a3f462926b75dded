"""What `warden agent exec` tells the command it governs, and what the command tells it back.

The task file (`.warden/task.json` in the workspace, also named by WARDEN_TASK_FILE) carries the
job's inputs, scope, CI command, budgets, deadline and, on a retry, the previous attempts'
verdicts with their evidence. The command reports its usage by appending JSON lines to the file
named by WARDEN_USAGE_FILE; exec sends the figures on its heartbeats, so budgets stop it.
JSON Schema for both: schemas/agent/.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar
from uuid import UUID

import msgspec
from msgspec import Meta, Struct, field

from shared.contract import Budgets, CiGate, Scope
from shared.events import (
    InvariantChecked,
    LeaseExpired,
    LeaseReleased,
    LeaseRevoked,
    ProposalRejected,
    ProposalSubmitted,
    Usage,
)

TASK_FILE = ".warden/task.json"
MAX_EVIDENCE_CHARS = 4000
# A lease grant tells at most this many earlier attempts (the latest): a reply stays small.
MAX_ATTEMPTS_TOLD = 5


class Verdict(Struct, frozen=True, kw_only=True):
    """One invariant's verdict on a previous attempt's proposal."""

    invariant: str
    verdict: str
    evidence: dict[str, Any] = field(default_factory=dict)


class PreviousAttempt(Struct, frozen=True, kw_only=True):
    """How an earlier attempt at this job ended, and why: what to do better this time."""

    epoch: int
    agent: str = ""
    # rejected, expired, revoked or released. A str, not a Literal: this is part of the lease
    # grant reply, and an outcome added later must still decode in an older SDK.
    outcome: str
    reason: str = ""
    verdicts: list[Verdict] = field(default_factory=list)


class TaskFile(Struct, frozen=True, kw_only=True, tag="agent.task"):
    job_id: UUID
    kind: str
    epoch: int
    inputs: dict[str, Any] = field(default_factory=dict)
    scope: Scope = field(default_factory=Scope)
    ci: CiGate | None = None
    output_schema: dict[str, Any] | None = None
    budgets: Budgets = field(default_factory=Budgets)
    deadline: datetime | None = None
    lease_ttl_s: float = 30.0
    stall_s: float | None = None
    on_empty: str = "accept"
    # The commit the workspace holds (the target branch's head), or "" for a scratch workspace.
    base: str = ""
    usage_file: str = ""
    previous_attempts: list[PreviousAttempt] = field(default_factory=list)


NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]


class UsageLine(Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """One line of WARDEN_USAGE_FILE: running totals so far. A field left out keeps its last value;
    a total never goes down (a lower figure is ignored)."""

    __schema_name__: ClassVar[str] = "agent.usage"

    steps: NonNegInt | None = None
    tokens: NonNegInt | None = None
    cost: NonNegFloat | None = None
    progress: Annotated[float, Meta(ge=0, le=1)] | None = None
    note: Annotated[str, Meta(max_length=500)] | None = None


usage_line_decoder = msgspec.json.Decoder(UsageLine)


def merge_usage(usage: Usage, line: UsageLine) -> Usage:
    return Usage(
        steps=max(usage.steps, line.steps or 0),
        tokens=max(usage.tokens, line.tokens or 0),
        cost=max(usage.cost, line.cost or 0.0),
    )


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_EVIDENCE_CHARS:
        return value[-MAX_EVIDENCE_CHARS:]
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clip(v) for v in value[:50]]
    return value


def previous_attempts(events: list[Any], before_epoch: int) -> list[PreviousAttempt]:
    """The attempts before `before_epoch`, from a job's events: verdicts of its rejected proposals,
    and the lease ends that cost an attempt without a proposal (expiry, revocation, release)."""
    proposal_epoch: dict[UUID, tuple[int, str]] = {}
    verdicts: dict[UUID, list[Verdict]] = {}
    attempts: list[PreviousAttempt] = []
    for event in events:
        if isinstance(event, ProposalSubmitted):
            proposal_epoch[event.proposal_id] = (event.epoch, event.agent)
        elif isinstance(event, InvariantChecked):
            verdicts.setdefault(event.proposal_id, []).append(
                Verdict(invariant=event.invariant, verdict=event.verdict, evidence=_clip(event.evidence))
            )
        elif isinstance(event, ProposalRejected) and event.proposal_id in proposal_epoch:
            epoch, agent = proposal_epoch[event.proposal_id]
            failing = [v for v in verdicts.get(event.proposal_id, []) if v.verdict != "pass"]
            reason = event.reason or "; ".join(
                f"{v.invariant}: {v.evidence.get('reason', '')}" for v in failing
            )
            attempts.append(
                PreviousAttempt(
                    epoch=epoch,
                    agent=agent,
                    outcome="rejected",
                    reason=reason or "violations: " + ", ".join(event.violations),
                    verdicts=verdicts.get(event.proposal_id, []),
                )
            )
        elif isinstance(event, LeaseExpired):
            attempts.append(
                PreviousAttempt(
                    epoch=event.epoch, agent=event.agent, outcome="expired", reason="the lease expired"
                )
            )
        elif isinstance(event, LeaseRevoked):
            attempts.append(
                PreviousAttempt(epoch=event.epoch, agent=event.agent, outcome="revoked", reason=event.reason)
            )
        elif isinstance(event, LeaseReleased):
            attempts.append(
                PreviousAttempt(epoch=event.epoch, agent=event.agent, outcome="released", reason=event.reason)
            )
    earlier = [a for a in attempts if a.epoch < before_epoch]
    return earlier[-MAX_ATTEMPTS_TOLD:]
