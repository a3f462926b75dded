"""Rules of a job's lifecycle that several services apply: fencing, budgets, what follows an attempt.

The reconciler (heartbeats, releases), the checker (proposals) and the revoker all decide with
these, so a stale epoch or a spent attempt means the same thing wherever it is seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg

from shared import telemetry
from shared.aggregates import Job, Lease
from shared.events import Event, HeartbeatSeen, JobRequeued, JobTombstoned, MessageRejected, Usage
from shared.handling import input_seq
from shared.messages import Standing
from shared.runtime import Context


def budget_breach(job: Job, usage: Usage, lease: Lease, at: datetime) -> str:
    """What budget this usage exceeds, or "" when within the contract."""
    budgets = job.contract.stopping.budgets
    if budgets.steps is not None and usage.steps > budgets.steps:
        return f"steps {usage.steps} > budget {budgets.steps}"
    if budgets.tokens is not None and usage.tokens > budgets.tokens:
        return f"tokens {usage.tokens} > budget {budgets.tokens}"
    if budgets.cost is not None and usage.cost > budgets.cost:
        return f"cost {usage.cost} > budget {budgets.cost}"
    if budgets.wall_clock_s is not None:
        used = (at - lease.granted_at).total_seconds()
        if used > budgets.wall_clock_s:
            return f"wall clock {used:.3f}s > budget {budgets.wall_clock_s:g}s"
    return ""


def after_attempt(job: Job, version: int, reason: str, at: datetime, by: str = "reconciler") -> Event:
    """What follows a lost attempt: the next epoch, or a tombstone when none is left; `by` is
    the service that decided it."""
    deadline = job.contract.stopping.deadline
    if deadline is not None and deadline <= at:
        return JobTombstoned(
            originator_id=job.id,
            originator_version=version,
            reason=f"deadline {deadline.isoformat()} passed; last attempt: {reason}",
            attempts=job.attempts,
            by=by,
        )
    if job.attempts_left <= 0:
        return JobTombstoned(
            originator_id=job.id,
            originator_version=version,
            reason=f"max attempts ({job.contract.stopping.max_attempts}) reached; last attempt: {reason}",
            attempts=job.attempts,
            by=by,
        )
    return JobRequeued(originator_id=job.id, originator_version=version, reason=reason, by=by)


@dataclass(frozen=True)
class Fenced:
    """Why a message was refused, and how its sender's lease stands now."""

    standing: Standing
    reason: str


def fence_reason(agent: str, job: Job, epoch: int) -> Fenced | None:
    """None when (agent, job, epoch) names the live lease; else why not (pure, records nothing)."""
    lease = job.lease
    if lease is not None and lease.agent == agent and lease.epoch == epoch and not lease.ended:
        return None
    standing: Standing
    if lease is None or lease.epoch != epoch or lease.agent != agent:
        current = f"current epoch {lease.epoch} held by {lease.agent}" if lease else "no lease"
        reason = f"stale lease: {agent} sent epoch {epoch}; {current}"
        standing = "expired"
    else:
        reason = f"lease {epoch} already {lease.ended}"
        standing = (
            "revoked" if lease.ended == "revoked" else ("expired" if lease.ended == "expired" else "ended")
        )
    if job.terminal and standing == "expired" and lease and lease.epoch == epoch:
        standing = "ended"
    if job.status == "cancelled":
        standing = "revoked"
    return Fenced(standing=standing, reason=reason)


async def fence(ctx: Context, msg: Msg, agent: str, verb: str, job: Job, epoch: int) -> Fenced | None:
    """None when (agent, job, epoch) names the live lease; else record `message.rejected`.

    Raises IntegrityError when the job moved meanwhile: reload it and fence again.
    """
    fenced = fence_reason(agent, job, epoch)
    if fenced is None:
        return None
    lease = job.lease
    await ctx.save(
        MessageRejected(
            originator_id=job.id,
            originator_version=job.version + 1,
            agent=agent,
            epoch=epoch,
            verb=verb,
            reason=fenced.reason,
            input_seq=input_seq(msg),
            current_epoch=lease.epoch if lease else 0,
        )
    )
    telemetry.instruments().rejected_inputs.add(1, {"subject": verb, "fenced": "yes"})
    return fenced


def late_heartbeat(agent: str, job: Job, epoch: int) -> bool:
    """A heartbeat of a lease its own holder ended (by a proposal judged, a release): sent
    before the holder heard the verdict, or a copy delivered again after a broker restart lost
    its ack. It is answered ("ended") but not fenced: nothing was sent under a lost lease."""
    return any(
        lease.agent == agent and lease.epoch == epoch and lease.ended in HOLDER_ENDED for lease in job.leases
    )


# How a lease ends by its holder's own doing (not expired, not revoked).
HOLDER_ENDED = frozenset({"completed", "released", "rejected", "failed"})


def since_progress_ms(seen: HeartbeatSeen | None, detected_at: datetime) -> float | None:
    """What a stall cost: from the work's last sign of progress (as its last heartbeat reported
    it, never later than that heartbeat) to the expiry's detection; None when not reported."""
    if seen is None or seen.progress_at is None:
        return None
    progressed = min(seen.progress_at, seen.at)
    return max(0.0, (detected_at - progressed).total_seconds() * 1000)
