"""The oracle: what must hold after any schedule of kills, as pure functions of what was
recorded (the log, the input stream, git, the replay and ledger reports).

Inputs are checked the way Jepsen's set checker does: every input whose publish the server
acknowledged must be in the input stream at the acknowledged sequence with the bytes sent
(else it is *lost*); nothing in this run's namespace may be stored that this run never sent
(*unexpected*); an input sent without an acknowledgement that is stored anyway is *recovered*
(allowed: the ack was lost, not the write).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.aggregates import TERMINAL
from shared.events import (
    AnyEvent,
    InputRejected,
    JobRequeued,
    LeaseExpired,
    MessageRejected,
    ProposalRejected,
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    violations: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Attempt:
    """One input this run sent: its body's sha256 and the sequence its publish ack named."""

    key: str
    sha256: str
    seq: int | None  # None: no ack came (timed out, or the broker was down)


def terminal(statuses: Mapping[str, str], expected: int) -> Check:
    """Every job this run submitted is in the log and terminal."""
    counts = Counter(statuses.values())
    stuck = [{"job": job, "status": s} for job, s in sorted(statuses.items()) if s not in TERMINAL]
    missing = expected - len(statuses)
    violations = stuck + ([{"missing_jobs": missing}] if missing else [])
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"
    if missing:
        detail += f"; {missing} never created"
    return Check("every job terminal", not violations, detail, violations)


def inputs(
    attempts: list[Attempt], stored_at: Mapping[int, str], namespace: Mapping[int, str]
) -> tuple[Check, dict[str, int]]:
    """`stored_at`: seq -> sha256 of what the input stream holds at each acked sequence (absent:
    nothing there); `namespace`: seq -> sha256 of every stored input in this run's namespace."""
    acked = [a for a in attempts if a.seq is not None]
    lost = [
        {"key": a.key, "seq": a.seq, "found": stored_at.get(a.seq, "nothing")}
        for a in acked
        if a.seq is not None and stored_at.get(a.seq) != a.sha256
    ]
    sent = {a.sha256 for a in attempts}
    unexpected = [{"seq": seq, "sha256": sha} for seq, sha in sorted(namespace.items()) if sha not in sent]
    acked_seqs = {a.seq for a in acked}
    recovered = [seq for seq, sha in namespace.items() if seq not in acked_seqs and sha in sent]
    figures = {
        "sent": len(attempts),
        "acked": len(acked),
        "unacked": len(attempts) - len(acked),
        "stored": len(namespace),
        "lost": len(lost),
        "unexpected": len(unexpected),
        "recovered": len(recovered),
    }
    detail = (
        f"{figures['acked']} acked of {figures['sent']} sent, {figures['lost']} lost, "
        f"{figures['unexpected']} unexpected, {figures['recovered']} recovered (stored without an ack)"
    )
    return Check(
        "no acknowledged input lost", not lost and not unexpected, detail, lost + unexpected
    ), figures


def exactly_once(
    accepted: Mapping[str, str],
    applied: Mapping[str, int],
    failed: Mapping[str, int],
    proposal_commits: Mapping[str, set[str]],
    job_commits: Mapping[str, set[str]],
    statuses: Mapping[str, str],
) -> tuple[Check, dict[str, int]]:
    """Every accepted proposal (id -> its job) landed in git at most once, and exactly when an
    `effect.applied` records it (never recorded failed once landed); every completed job has
    exactly one commit, every other job none."""
    violations: list[dict[str, Any]] = []
    for pid, job in sorted(accepted.items()):
        commits = len(proposal_commits.get(pid, set()))
        ok_count = applied.get(pid, 0)
        if commits > 1 or ok_count > 1 or commits != ok_count:
            violations.append(
                {
                    "proposal": pid,
                    "job": job,
                    "commits": commits,
                    "effect_applied": ok_count,
                    "effect_failed": failed.get(pid, 0),
                }
            )
    for job, status in sorted(statuses.items()):
        want = 1 if status == "completed" else 0
        got = len(job_commits.get(job, set()))
        if got != want:
            violations.append({"job": job, "status": status, "commits": got, "expected": want})
    figures = {
        "accepted": len(accepted),
        "applied": sum(applied.values()),
        "failed": sum(failed.values()),
        "commits": sum(len(c) for c in proposal_commits.values()),
        "violations": len(violations),
    }
    detail = (
        f"{figures['accepted']} accepted, {figures['applied']} applied, {figures['commits']} commits "
        f"with a Warden-Proposal trailer, {figures['failed']} effect.failed"
    )
    return Check("every accepted proposal applied exactly once", not violations, detail, violations), figures


DRIFT = ("base_drift:", "ci_gate: not run")


def drifted_only(violations: list[str]) -> bool:
    """A rejection for a stale base alone (the CI gate skipped because of it)."""
    return any(v.startswith(DRIFT[0]) for v in violations) and all(v.startswith(DRIFT) for v in violations)


def no_valid_rejection(
    events: list[tuple[str, AnyEvent]], jobs: set[str], agent_prefix: str
) -> tuple[Check, dict[str, Any]]:
    """This run's agents are well-behaved: none of their proposals may be rejected and none of
    their inputs (nor this run's requests) refused as malformed. `events`: (aggregate, event).
    A proposal rejected only for a stale base is not one: once agents earn the level that lands
    on the target branch, each landing makes the others' work in flight stale, and `base_drift`
    rejecting it (the retry builds on the new head) is the guarantee working.
    Lease expiries, fenced messages and requeues are what kills cost; they are counted, not
    violations (a killed agent's lease must expire; its replacement is a new agent)."""
    violations: list[dict[str, Any]] = []
    expired: Counter[str] = Counter()
    fenced: Counter[str] = Counter()
    requeued = drifted = 0
    for aggregate, event in events:
        ours = isinstance(event, InputRejected) and (
            event.sender.startswith(agent_prefix) or agent_prefix in event.subject
        )
        if isinstance(event, InputRejected) and ours:
            violations.append(
                {
                    "input_rejected": event.subject,
                    "seq": event.input_seq,
                    "errors": [e.message for e in event.errors],
                }
            )
        if aggregate not in jobs:
            continue
        if isinstance(event, ProposalRejected) and drifted_only(event.violations):
            drifted += 1
        elif isinstance(event, ProposalRejected):
            violations.append(
                {
                    "job": aggregate,
                    "proposal_rejected": str(event.proposal_id),
                    "violations": event.violations,
                }
            )
        elif isinstance(event, LeaseExpired):
            expired[event.agent] += 1
        elif isinstance(event, MessageRejected):
            fenced[f"{event.verb}: {event.reason}"] += 1
        elif isinstance(event, JobRequeued):
            requeued += 1
    figures: dict[str, Any] = {
        "lease_expired": sum(expired.values()),
        "fenced": dict(fenced),
        "requeued": requeued,
        "stale_base": drifted,
        "rejected": len(violations),
    }
    detail = (
        f"{len(violations)} rejected; fault costs: {figures['lease_expired']} leases expired, "
        f"{sum(fenced.values())} messages fenced, {requeued} requeues, {drifted} stale bases"
    )
    return Check("no valid input rejected", not violations, detail, violations), figures
