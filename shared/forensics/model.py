"""The typed vocabulary of an explanation: attempts, proposals, fenced messages, causes.

Plain frozen Structs with no behaviour, so the story builder, the cause rules, the renderer and
`--json` all speak the same types (the JSON shape of `warden explain --json` is these fields).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec
from msgspec import Struct

from shared.events import Usage
from shared.forensics import ledger

# What kind of failure a cause names: a stable, machine-readable string beside the sentence.
CauseClass = Literal[
    "crashed",  # the agent died holding the lease (it restarted and never spoke under it again)
    "hung",  # the agent went silent but was alive (it spoke again under the lost lease)
    "crashed_or_hung",  # silent until expiry, and the log cannot tell which (see the sentence)
    "released",  # the agent gave the lease back
    "scope_breach",
    "ci_failure",
    "stale_base",
    "invariant_failed",  # any other invariant's fail or error verdict
    "budget",
    "deadline",
    "revocation",  # the agent's authority was revoked (policy or violation) with the lease live
    "operator",  # a person's action: cancel, deny, revoke, rollback
    "effect_failed",
    "fenced_late_message",  # a message under a lease that was over: refused and recorded
    "receipt_reused",  # an effect re-driven after a crash found its receipt and was not repeated
    "unknown",
]


class Cause(Struct, frozen=True, kw_only=True):
    """One failure: its class, a sentence naming its evidence, and the evidence itself."""

    cls: CauseClass
    text: str
    epoch: int | None = None
    agent: str = ""
    proposal_id: UUID | None = None
    evidence: dict[str, Any] = msgspec.field(default_factory=dict)


class HeartbeatSummary(Struct, frozen=True, kw_only=True):
    count: int = 0  # heartbeats stored under this lease and not fenced
    fenced: int = 0  # heartbeats under this lease after it ended (rejected and recorded)
    first_at: datetime | None = None
    last_at: datetime | None = None
    max_gap_s: float | None = None  # longest silence between grant/heartbeats while it lived
    last_note: str = ""
    last_progress: float | None = None
    last_usage: Usage | None = None


AttemptEnd = Literal[
    "", "expired", "released", "revoked", "completed", "cancelled", "tombstoned", "rejected", "failed"
]


class Attempt(Struct, frozen=True, kw_only=True):
    epoch: int
    agent: str
    granted_at: datetime
    ttl_s: float
    claim_seq: int = 0
    heartbeats: HeartbeatSummary = msgspec.field(default_factory=HeartbeatSummary)
    ended: AttemptEnd = ""  # "" while the lease lives
    ended_at: datetime | None = None
    end_detail: str = ""
    detection_latency_ms: float | None = None
    signal: str = ""  # for a revocation: budget, deadline, operator, violation, agent-revoked
    by: str = ""
    # Why this attempt failed; None when it did not (completed, or still live).
    cause: Cause | None = None


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
    phase: str = "apply"


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


RevocationWhat = Literal["lease", "agent", "agent-suspended", "agent-reinstated", "rollback"]


class Revocation(Struct, frozen=True, kw_only=True):
    at: datetime
    what: RevocationWhat
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
    # One line: what ended the job, or else what failure was contained; "" when nothing failed.
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
    # The class of `cause` ("" when nothing failed): the fatal one, else the first contained one.
    cause_class: str = ""
    # What ended the job when it did not complete (None when it completed or still runs).
    ended_by: Cause | None = None
    # Every failure the job survived (or that came before the one that ended it), in order.
    contained: list[Cause] = msgspec.field(default_factory=list)
    # One line for a person: what was contained and what ended it.
    summary: str = ""
