"""The cause rules: why an attempt failed, and what ended (or what was contained in) a job.

Pure functions of the typed story (shared/forensics/model.py) and the typed events: the same
record always gives the same causes, and tests/unit/ checks them without a server. Each rule
names its failure class (`CauseClass`) and the evidence the log holds for it; where the log
cannot decide (a silent agent: dead, or stopped with its connection open?), the sentence says so
instead of guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared import topology
from shared.aggregates import Job
from shared.contract import Budgets
from shared.events import AgentRegistered, AgentRevoked, MessageRejected, Usage, proposal_id_for
from shared.forensics.model import Attempt, Cause, Check, Fenced, ProposalStory
from shared.forensics.story import clock

# Who appends on Warden's own behalf; any other `by` is a person (an operator command).
SERVICES = frozenset({"scheduler", "reconciler", "checker", "applier", "revoker", "policy", "warden"})


@dataclass(frozen=True)
class Facts:
    """What the rules may consult besides the attempt itself (all from the record)."""

    job: Job | None
    proposals: Sequence[ProposalStory] = ()
    fenced: Sequence[Fenced] = ()
    # Every message refused under a lease that was over, in stream order.
    late: Sequence[MessageRejected] = ()
    # When each agent (re-)registered, and its revocations, from the agents' own subjects.
    registered: dict[str, list[datetime]] = field(default_factory=dict)
    agent_revocations: dict[str, list[AgentRevoked]] = field(default_factory=dict)

    @staticmethod
    def of_agent_events(
        events: dict[str, list[Any]],
    ) -> tuple[dict[str, list[datetime]], dict[str, list[AgentRevoked]]]:
        registered = {
            n: [e.timestamp for e in es if isinstance(e, AgentRegistered)] for n, es in events.items()
        }
        revoked = {n: [e for e in es if isinstance(e, AgentRevoked)] for n, es in events.items()}
        return registered, revoked


def is_person(by: str) -> bool:
    return bool(by) and by not in SERVICES


# --- one attempt ---------------------------------------------------------------------------------


def _silent(a: Attempt, facts: Facts) -> Cause:
    """An expired lease: hung when the agent spoke again under it, crashed when a new process of
    it registered and nothing came under the lease again; otherwise the log cannot tell."""
    hb = a.heartbeats
    last = f"last heartbeat at {clock(hb.last_at)}" if hb.last_at else "no heartbeat ever received"
    if hb.last_note:
        last += f" (note {hb.last_note!r})"
    evidence: dict[str, Any] = {
        "last_heartbeat_at": hb.last_at.isoformat() if hb.last_at else None,
        "heartbeats": hb.count,
        "ttl_s": a.ttl_s,
        "detection_latency_ms": a.detection_latency_ms,
    }
    ended = a.ended_at
    later = [
        m
        for m in facts.late
        if m.agent == a.agent and m.epoch == a.epoch and (ended is None or m.timestamp >= ended)
    ]
    if later and ended is not None:
        first = later[0]
        after = (first.timestamp - ended).total_seconds()
        evidence.update(spoke_again_at=first.timestamp.isoformat(), spoke_again_verb=first.verb)
        return Cause(
            cls="hung",
            agent=a.agent,
            epoch=a.epoch,
            evidence=evidence,
            text=(
                f"agent {a.agent} hung (it spoke again {after:.3f}s after losing its lease: "
                f"{first.verb} under lease {a.epoch}, fenced): {a.end_detail}"
            ),
        )
    since = hb.last_at or a.granted_at
    restarted = [t for t in facts.registered.get(a.agent, []) if t > since]
    if restarted:
        evidence["registered_again_at"] = restarted[0].isoformat()
        return Cause(
            cls="crashed",
            agent=a.agent,
            epoch=a.epoch,
            evidence=evidence,
            text=(
                f"agent {a.agent} crashed: {last}, then a new process of it registered at "
                f"{clock(restarted[0])} and nothing more came under lease {a.epoch}; {a.end_detail}"
            ),
        )
    return Cause(
        cls="crashed_or_hung",
        agent=a.agent,
        epoch=a.epoch,
        evidence=evidence,
        text=(
            f"agent {a.agent} crashed or hung: {a.end_detail}; undecidable from the log (the agent "
            "never spoke again and its NATS connection state is not recorded)"
        ),
    )


def _num(value: float) -> str:
    return f"{value:g}"


def budget_overrun(
    budgets: Budgets, usage: Usage | None, wall_clock_s: float | None, which: str = ""
) -> tuple[str, dict[str, Any]]:
    """The exact overrun of the first budget exceeded (or of `which`), as text and evidence."""
    used = usage or Usage()
    rows: list[tuple[str, float | None, float | None, str]] = [
        ("steps", used.steps, budgets.steps, ""),
        ("tokens", used.tokens, budgets.tokens, ""),
        ("cost", used.cost, budgets.cost, ""),
        ("wall clock", wall_clock_s, budgets.wall_clock_s, "s"),
    ]
    for name, value, limit, unit in rows:
        if which and name != which:
            continue
        if value is None or limit is None or value <= limit:
            continue
        over = value - limit
        if unit == "s":
            text = f"wall clock {value:.3f}s > budget {_num(limit)}s (over by {over * 1000:.0f} ms)"
        else:
            text = f"{name} {_num(value)} > budget {_num(limit)} (over by {_num(round(over, 6))})"
        return text, {"budget": name, "used": value, "limit": limit, "over": over}
    return "", {}


def _budget_name(reason: str) -> str:
    breach = reason.split("budget exceeded: ", 1)[-1]
    return "wall clock" if breach.startswith("wall clock") else breach.split(" ", 1)[0]


def _revoked(a: Attempt, facts: Facts) -> Cause:
    detail = a.end_detail.split("): ", 1)[-1]
    base = {"signal": a.signal, "by": a.by, "reason": detail}
    if a.signal == "budget" and facts.job is not None:
        wall = (a.ended_at - a.granted_at).total_seconds() if a.ended_at else None
        text, numbers = budget_overrun(
            facts.job.contract.stopping.budgets, a.heartbeats.last_usage, wall, _budget_name(detail)
        )
        what = text or detail.removeprefix("budget exceeded: ")
        return Cause(
            cls="budget",
            agent=a.agent,
            epoch=a.epoch,
            evidence={**base, **numbers},
            text=f"budget breach: {what} (lease {a.epoch} of {a.agent} revoked by {a.by})",
        )
    if a.signal == "deadline":
        return Cause(
            cls="deadline",
            agent=a.agent,
            epoch=a.epoch,
            evidence=base,
            text=f"deadline passed while agent {a.agent} held lease {a.epoch}: {detail}",
        )
    if a.signal == "operator" or is_person(a.by):
        return Cause(
            cls="operator",
            agent=a.agent,
            epoch=a.epoch,
            evidence=base,
            text=f"lease {a.epoch} of {a.agent} revoked by operator {a.by}: {detail}",
        )
    revoked = [
        r for r in facts.agent_revocations.get(a.agent, []) if a.ended_at is None or r.timestamp <= a.ended_at
    ]
    if a.signal == "agent-revoked" and revoked and is_person(revoked[-1].by):
        who = revoked[-1]
        return Cause(
            cls="operator",
            agent=a.agent,
            epoch=a.epoch,
            evidence={**base, "agent_revoked_by": who.by},
            text=f"operator {who.by} revoked agent {a.agent}: {who.reason} (lease {a.epoch} revoked in flight)",
        )
    if a.signal == "agent-revoked":
        text = f"agent {a.agent} revoked: {detail} (lease {a.epoch} revoked in flight)"
    else:
        text = (
            f"violation by agent {a.agent}: {detail}"
            if a.signal == "violation"
            else (f"lease {a.epoch} of {a.agent} revoked by {a.by}: {detail}")
        )
    return Cause(cls="revocation", agent=a.agent, epoch=a.epoch, evidence=base, text=text)


def check_cause(check: Check, job: Job | None = None) -> Cause:
    """What a failing (or erroring) invariant says, by the invariant's name."""
    name = check.invariant.lower()
    evidence = check.evidence
    reason = str(evidence.get("reason") or "")
    kept = {k: v for k, v in evidence.items() if k not in ("stdout_tail", "stderr_tail")}
    kept["invariant"] = check.invariant
    if "scope" in name:
        outside = evidence.get("outside")
        if isinstance(outside, list) and outside:
            globs = evidence.get("globs")
            listed = ", ".join(str(p) for p in outside[:10]) + (" ..." if len(outside) > 10 else "")
            text = f"scope breach: {listed} outside contract globs" + (f" {globs}" if globs else "")
        else:
            text = f"scope breach: {reason or 'the change leaves the contract scope'}"
        return Cause(cls="scope_breach", text=text, evidence=kept)
    if "drift" in name or "base" in name:
        since = evidence.get("commits_since_base")
        commits = [str(c) for c in since] if isinstance(since, list) else []
        text = f"stale base: {reason}" if reason else "stale base"
        if commits:
            text += "; commits since: " + ", ".join(commits[:5]) + (" ..." if len(commits) > 5 else "")
        return Cause(cls="stale_base", text=text, evidence=kept)
    if "ci" in name or "test" in name:
        code = evidence.get("exit_code", evidence.get("returncode"))
        if evidence.get("timed_out"):
            text = f"tests failed: {check.invariant} timed out" + (f" ({reason})" if reason else "")
        elif code is not None:
            text = f"tests failed: {check.invariant} exit {code}"
        else:
            text = f"tests failed: {check.invariant}" + (f": {reason}" if reason else "")
        return Cause(cls="ci_failure", text=text, evidence=kept)
    if name == "budget" and job is not None and check.verdict == "fail":
        usage = evidence.get("usage")
        declared = Usage(**usage) if isinstance(usage, dict) else None
        wall = evidence.get("wall_clock_s")
        text, numbers = budget_overrun(
            job.contract.stopping.budgets, declared, float(wall) if isinstance(wall, int | float) else None
        )
        return Cause(cls="budget", text=f"budget breach: {text or reason}", evidence={**kept, **numbers})
    summary = reason or evidence.get("message") or evidence.get("detail") or ""
    return Cause(
        cls="invariant_failed",
        text=f"invariant {check.invariant} {check.verdict}" + (f": {summary}" if summary else ""),
        evidence=kept,
    )


def proposal_cause(story: ProposalStory, job: Job | None = None) -> Cause:
    """Why a rejected proposal was rejected: its first failing check, or the person who denied it."""
    if is_person(story.decided_by):
        why = "; ".join(story.violations) or "no reason given"
        return Cause(
            cls="operator",
            text=f"proposal {story.proposal_id} denied by operator {story.decided_by}: {why}",
            evidence={"by": story.decided_by},
            proposal_id=story.proposal_id,
            agent=story.agent,
            epoch=story.epoch,
        )
    failed = [c for c in story.checks if c.verdict != "pass"]
    if failed:
        found = check_cause(failed[0], job)
        return Cause(
            cls=found.cls,
            text=found.text,
            evidence=found.evidence,
            proposal_id=story.proposal_id,
            agent=story.agent,
            epoch=story.epoch,
        )
    text = f"proposal rejected: {'; '.join(story.violations)}" if story.violations else "proposal rejected"
    return Cause(
        cls="invariant_failed",
        text=text,
        evidence={"violations": story.violations},
        proposal_id=story.proposal_id,
        agent=story.agent,
        epoch=story.epoch,
    )


def attempt_cause(a: Attempt, facts: Facts) -> Cause | None:
    """Why this attempt failed, or None when it did not (completed, or still live)."""
    match a.ended:
        case "" | "completed":
            return None
        case "expired":
            return _silent(a, facts)
        case "revoked":
            return _revoked(a, facts)
        case "cancelled":
            return Cause(
                cls="operator",
                agent=a.agent,
                epoch=a.epoch,
                evidence={"by": a.by},
                text=f"{a.end_detail} (lease {a.epoch} of {a.agent} revoked in flight)",
            )
        case "released":
            return Cause(
                cls="released",
                agent=a.agent,
                epoch=a.epoch,
                text=f"agent {a.agent} gave up: {a.end_detail.split(': ', 1)[-1]}",
            )
        case "rejected":
            rejected = [p for p in facts.proposals if p.epoch == a.epoch and p.decision == "rejected"]
            if rejected:
                return proposal_cause(rejected[-1], facts.job)
            return Cause(cls="invariant_failed", agent=a.agent, epoch=a.epoch, text=a.end_detail)
        case "failed":
            failed = [
                p for p in facts.proposals if p.epoch == a.epoch for e in p.effects if e.what == "failed"
            ]
            return Cause(
                cls="effect_failed",
                agent=a.agent,
                epoch=a.epoch,
                proposal_id=failed[-1].proposal_id if failed else None,
                text=a.end_detail,
            )
        case "tombstoned":
            deadline = a.end_detail.startswith("deadline")
            return Cause(
                cls="deadline" if deadline else "unknown",
                agent=a.agent,
                epoch=a.epoch,
                text=f"lease {a.epoch} of {a.agent} ended with the job: {a.end_detail}",
            )
    return Cause(cls="unknown", agent=a.agent, epoch=a.epoch, text=a.end_detail or a.ended)


# --- incidents beside the attempts ---------------------------------------------------------------


def late_messages(facts: Facts, ends: dict[int, tuple[str, datetime | None]]) -> list[Cause]:
    """Fenced proposals and releases: each named, with the lease it came under and how that ended.

    Late heartbeats are not incidents of their own: they are the evidence that an agent hung.
    """
    out = []
    for f in facts.fenced:
        if f.verb == "heartbeat":
            continue
        how, at = ends.get(f.epoch, ("", None))
        lease = f"lease {f.epoch}" + (f" ({how} at {clock(at)})" if how and at else "")
        evidence: dict[str, Any] = {
            "verb": f.verb,
            "count": f.count,
            "input_seqs": f.input_seqs,
            "reason": f.reason,
        }
        pid = None
        if f.verb == "propose" and f.input_seqs:
            # The id the proposal would have had: the checker names proposals by their input.
            pid = proposal_id_for(topology.AGENT_INPUT_STREAM, f.input_seqs[0])
            what = f"late proposal {pid} (input #{f.input_seqs[0]})"
        else:
            what = f"late {f.verb} (input #{f.input_seqs[0]})" if f.input_seqs else f"late {f.verb}"
        more = f" and {f.count - 1} more" if f.count > 1 else ""
        out.append(
            Cause(
                cls="fenced_late_message",
                agent=f.agent,
                epoch=f.epoch,
                proposal_id=pid,
                evidence=evidence,
                text=(
                    f"repeated side effect prevented: {what}{more} from {f.agent} under {lease}, "
                    f"current lease {f.current_epoch or 'none'}, fenced ({f.reason})"
                ),
            )
        )
    return out


def effect_incidents(proposals: Sequence[ProposalStory]) -> list[Cause]:
    """Effects re-driven and found already done, failed rollbacks, rollbacks a person asked for."""
    out = []
    for p in proposals:
        for e in p.effects:
            if e.what in ("applied", "rolled_back") and e.reused_receipt:
                done = "applied" if e.what == "applied" else "rolled back"
                out.append(
                    Cause(
                        cls="receipt_reused",
                        evidence={"receipt": e.receipt, "what": e.what},
                        text=(
                            f"repeated side effect prevented: {e.kind} of proposal {p.proposal_id} was "
                            f"already {done} (its receipt was found), so the retry recorded it instead "
                            "of doing it again"
                        ),
                        proposal_id=p.proposal_id,
                        agent=p.agent,
                        epoch=p.epoch,
                    )
                )
            elif e.what == "failed" and e.phase == "rollback":
                out.append(
                    Cause(
                        cls="effect_failed",
                        text=f"rollback of {e.kind} of proposal {p.proposal_id} failed: {e.reason}",
                        evidence={"phase": "rollback"},
                        proposal_id=p.proposal_id,
                        agent=p.agent,
                        epoch=p.epoch,
                    )
                )
            elif e.what == "rollback_requested" and is_person(e.by):
                out.append(
                    Cause(
                        cls="operator",
                        text=f"operator {e.by} asked to roll back proposal {p.proposal_id}: {e.reason}",
                        evidence={"by": e.by},
                        proposal_id=p.proposal_id,
                        agent=p.agent,
                        epoch=p.epoch,
                    )
                )
    return out


# --- the job -------------------------------------------------------------------------------------


def job_ending(
    status: str, reason: str, by: str, attempts: Sequence[Attempt], max_attempts: int
) -> Cause | None:
    """What ended a job that did not complete; None when it completed or still runs."""
    final = attempts[-1] if attempts else None
    final_cause = final.cause if final is not None else None
    if status == "cancelled":
        live = final is not None and final.ended == "cancelled"
        tail = f" (lease {final.epoch} of {final.agent} revoked in flight)" if live and final else ""
        return Cause(
            cls="operator",
            text=f"cancelled by operator {by}: {reason}{tail}",
            epoch=final.epoch if live and final else None,
            agent=final.agent if live and final else "",
            evidence={"by": by},
        )
    if status != "tombstoned":
        return None
    if final_cause is None:
        return Cause(cls="deadline" if reason.startswith("deadline") else "unknown", text=reason)
    if reason.startswith("deadline"):
        if final_cause.cls == "deadline":
            return final_cause
        deadline = reason.split(";", 1)[0]
        return Cause(
            cls="deadline",
            agent=final_cause.agent,
            epoch=final_cause.epoch,
            evidence={"last_attempt": final_cause.cls},
            text=f"{deadline}; last attempt: {final_cause.text}",
        )
    lost = [a for a in attempts if a.cause is not None]
    if "max attempts" in reason and max_attempts > 1 and len(lost) > 1:
        how = ", ".join(sorted({a.ended for a in lost}))
        return Cause(
            cls=final_cause.cls,
            agent=final_cause.agent,
            epoch=final_cause.epoch,
            proposal_id=final_cause.proposal_id,
            evidence={**final_cause.evidence, "max_attempts": max_attempts},
            text=f"max attempts ({max_attempts}) reached, every lease lost ({how}); last: {final_cause.text}",
        )
    return final_cause


def contained(attempts: Sequence[Attempt], incidents: Sequence[Cause], ending: Cause | None) -> list[Cause]:
    """Every failure other than the one that ended the job, attempts first, then incidents."""
    final = attempts[-1] if attempts else None
    # The ending names the final attempt when it came from it (its epoch): not counted twice.
    named = final is not None and ending is not None and ending.epoch == final.epoch
    out = [a.cause for a in attempts if a.cause is not None and not (named and a is final)]
    return [*out, *incidents]


def summary(status: str, ending: Cause | None, survived: Sequence[Cause]) -> str:
    kept = f"{len(survived)} failure(s) contained ({', '.join(c.cls for c in survived)})" if survived else ""
    if ending is not None:
        return f"{status}: ended by {ending.cls}" + (f"; before that {kept}" if kept else "")
    if status == "completed":
        return "completed" + (f" after {kept}" if kept else " with no failure")
    return f"{status} (not finished)" + (f"; so far {kept}" if kept else "")
