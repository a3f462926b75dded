"""The lease rules: which queued job a claim is granted, what a heartbeat or a release does,
when a lease is fenced, over budget or expired, and what follows a lost attempt.

Every function here is pure: the state it decides on (a job, an agent, the last heartbeat seen),
the input, and the time are its arguments; the events it returns are drafts numbered by
`after`. The scheduler and the reconciler decide with them, and so do the checker, the applier
and the revoker (through `shared.lifecycle`), so a stale epoch or a spent attempt means the
same thing wherever it is seen.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from shared.aggregates import Agent, Job, Lease, project_job
from shared.decide import NEXT, Refusal, after
from shared.events import (
    Event,
    HeartbeatSeen,
    JobRequeued,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRevoked,
    MessageRejected,
    Usage,
)
from shared.messages import Accepted, Claim, HeartbeatAck, LeaseGrant, NoWork, Release, Reply, Standing
from shared.policy import Policy
from shared.task import PreviousAttempt

# An agent that claimed within this window counts as present when choosing who retries a job.
RECENT_CLAIM_S = 30.0

# How a lease ends by its holder's own doing (not expired, not revoked).
HOLDER_ENDED = frozenset({"completed", "released", "rejected", "failed"})

# What an enforcement found due: nothing, the job's deadline, the lease's TTL, a budget.
Cause = Literal["", "deadline", "expired", "budget"]


@dataclass(frozen=True)
class Outcome:
    """A decision carried out: the events to append (possibly none), then the reply."""

    events: list[Event]
    reply: Reply


# --- fencing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fenced:
    """Why a message was refused, and how its sender's lease stands now."""

    standing: Standing
    reason: str


def fence_reason(agent: str, job: Job, epoch: int) -> Fenced | None:
    """None when (agent, job, epoch) names the live lease; else why not."""
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


def fence(
    agent: str, verb: str, job: Job, epoch: int, input_seq: int, at: datetime
) -> tuple[Fenced, list[Event]] | None:
    """None when (agent, job, epoch) names the live lease; else why not, and the
    `message.rejected` that records it (fenced messages are recorded, never dropped)."""
    fenced = fence_reason(agent, job, epoch)
    if fenced is None:
        return None
    lease = job.lease
    rejected = MessageRejected(
        originator_id=job.id,
        originator_version=NEXT,
        timestamp=at,
        agent=agent,
        epoch=epoch,
        verb=verb,
        reason=fenced.reason,
        input_seq=input_seq,
        current_epoch=lease.epoch if lease else 0,
    )
    return fenced, list[Event](after(job, rejected))


def late_heartbeat(agent: str, job: Job, epoch: int) -> bool:
    """A heartbeat of a lease its own holder ended (by a proposal judged, a release): sent
    before the holder heard the verdict, or a copy delivered again after a broker restart lost
    its ack. It is answered ("ended") but not fenced: nothing was sent under a lost lease."""
    return any(
        lease.agent == agent and lease.epoch == epoch and lease.ended in HOLDER_ENDED for lease in job.leases
    )


# --- stopping conditions ---------------------------------------------------------------------


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


def after_lost_attempt(
    job: Job, reason: str, at: datetime, by: str = "reconciler"
) -> JobRequeued | JobTombstoned:
    """What follows a lost attempt: the next epoch, or a tombstone when none is left (no attempt
    or no time); `by` is the service that decided it. A draft: number it after the lease's end."""
    deadline = job.contract.stopping.deadline
    if deadline is not None and deadline <= at:
        return JobTombstoned(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            reason=f"deadline {deadline.isoformat()} passed; last attempt: {reason}",
            attempts=job.attempts,
            by=by,
        )
    if job.attempts_left <= 0:
        return JobTombstoned(
            originator_id=job.id,
            originator_version=NEXT,
            timestamp=at,
            reason=f"max attempts ({job.contract.stopping.max_attempts}) reached; last attempt: {reason}",
            attempts=job.attempts,
            by=by,
        )
    return JobRequeued(originator_id=job.id, originator_version=NEXT, timestamp=at, reason=reason, by=by)


def since_progress_ms(seen: HeartbeatSeen | None, detected_at: datetime) -> float | None:
    """What a stall cost: from the work's last sign of progress (as its last heartbeat reported
    it, never later than that heartbeat) to the expiry's detection; None when not reported."""
    if seen is None or seen.progress_at is None:
        return None
    progressed = min(seen.progress_at, seen.at)
    return max(0.0, (detected_at - progressed).total_seconds() * 1000)


def deadline_of(lease: Lease, seen: HeartbeatSeen | None) -> datetime:
    """When the lease expires: one TTL after its last heartbeat, never before its grant's."""
    if seen is None:
        return lease.expires_at
    return max(lease.expires_at, seen.at + timedelta(seconds=lease.ttl_s))


def next_check(job: Job, seen: HeartbeatSeen | None) -> datetime | None:
    """When a stopping condition of this job next falls due (None: none can)."""
    if job.terminal or job.status == "accepted":
        return None  # decided: what remains is Warden's own effect, not the agent's
    times: list[datetime] = []
    if job.contract.stopping.deadline is not None:
        times.append(job.contract.stopping.deadline)
    lease = job.live_lease
    if lease is not None and job.pending_proposal is None:
        times.append(deadline_of(lease, seen))
        wall = job.contract.stopping.budgets.wall_clock_s
        if wall is not None:
            times.append(lease.granted_at + timedelta(seconds=wall))
    return min(times) if times else None


@dataclass(frozen=True)
class Enforced:
    """What the clock says is due on a job: the events, and how its live lease now stands."""

    standing: Standing | None
    events: list[Event] = field(default_factory=list)
    cause: Cause = ""


def _revoke(job: Job, lease: Lease, reason: str, signal: str, at: datetime, by: str) -> LeaseRevoked:
    return LeaseRevoked(
        originator_id=job.id,
        originator_version=NEXT,
        timestamp=at,
        agent=lease.agent,
        epoch=lease.epoch,
        reason=reason,
        signal=signal,
        by=by,
        signal_at=at,
    )


def expiry_reason(lease: Lease, seen: HeartbeatSeen | None) -> str:
    return f"lease {lease.epoch} of {lease.agent} expired: no heartbeat for {lease.ttl_s}s " + (
        f"(last at {seen.at.isoformat()})" if seen else "(none ever received)"
    )


def enforce(job: Job, seen: HeartbeatSeen | None, at: datetime, by: str = "reconciler") -> Enforced:
    """The job's deadline (tombstone), its lease's TTL (expiry, then requeue or tombstone) and its
    budgets (revocation), as due at `at`; `seen` is the live lease's last heartbeat."""
    if job.terminal:
        return Enforced(standing=None)
    lease = job.live_lease
    if job.status == "accepted":
        return Enforced(standing="extended")
    deadline = job.contract.stopping.deadline
    if deadline is not None and deadline <= at:
        drafts: list[Event] = []
        if lease is not None:
            drafts.append(
                _revoke(job, lease, f"job deadline {deadline.isoformat()} passed", "deadline", at, by)
            )
        drafts.append(
            JobTombstoned(
                originator_id=job.id,
                originator_version=NEXT,
                timestamp=at,
                reason=f"deadline {deadline.isoformat()} passed",
                attempts=job.attempts,
            )
        )
        return Enforced(standing="expired", events=after(job, *drafts), cause="deadline")
    if lease is None:
        return Enforced(standing=None)
    if job.pending_proposal is not None:
        # The agent's part is done once it proposed: a check (CI, an operator's approval)
        # may outlast its TTL, and the attempt's fate is now the decision's.
        return Enforced(standing="extended")
    lease_deadline = deadline_of(lease, seen)
    if lease_deadline <= at:
        expired = LeaseExpired(
            originator_id=job.id,
            originator_version=NEXT,
            agent=lease.agent,
            epoch=lease.epoch,
            deadline=lease_deadline,
            detected_at=at,
            detection_latency_ms=(at - lease_deadline).total_seconds() * 1000,
            last_heartbeat=seen,
            since_progress_ms=since_progress_ms(seen, at),
            timestamp=at,
        )
        then = after_lost_attempt(job, expiry_reason(lease, seen), at, by)
        return Enforced(standing="expired", events=after(job, expired, then), cause="expired")
    breach = budget_breach(job, seen.usage if seen else Usage(), lease, at)
    if breach:
        revoke = _revoke(job, lease, f"budget exceeded: {breach}", "budget", at, by)
        then = after_lost_attempt(job, revoke.reason, at, by)
        return Enforced(standing="budget_exceeded", events=after(job, revoke, then), cause="budget")
    return Enforced(standing="extended")


# --- agent messages under a lease ------------------------------------------------------------


@dataclass(frozen=True)
class Beat:
    """A heartbeat decided: events, the reply, and the heartbeat to keep as its lease's last
    (None when it was not under the live lease)."""

    events: list[Event]
    reply: HeartbeatAck
    seen: HeartbeatSeen | None = None
    cause: Cause = ""


def heartbeat(job: Job, agent: str, epoch: int, seen: HeartbeatSeen, at: datetime) -> Beat:
    """A heartbeat `seen` from `agent` under lease `epoch`: answered "ended" when its holder
    ended that lease, fenced when it is not the live lease, else the lease is extended, or
    whatever is due (deadline, expiry, budget) is enforced and the reply says so."""
    if late_heartbeat(agent, job, epoch):
        return Beat(events=[], reply=HeartbeatAck(standing="ended", reason=job.reason))
    fenced = fence(agent, "heartbeat", job, epoch, seen.input_seq, at)
    if fenced is not None:
        why, events = fenced
        return Beat(events=events, reply=HeartbeatAck(standing=why.standing, reason=job.reason))
    lease = job.live_lease
    assert lease is not None  # not fenced: it is the live lease
    enforced = enforce(job, seen, at)
    if enforced.standing == "extended":
        reply = HeartbeatAck(standing="extended", expires_at=deadline_of(lease, seen))
    else:
        then = project_job(job, enforced.events)
        reason = then.reason if then is not None else job.reason
        reply = HeartbeatAck(standing=enforced.standing or "ended", reason=reason)
    return Beat(events=enforced.events, reply=reply, seen=seen, cause=enforced.cause)


def release(job: Job, agent: str, rel: Release, input_seq: int, at: datetime) -> Outcome:
    """An agent gives its lease back: the attempt is spent (requeue or tombstone)."""
    fenced = fence(agent, "release", job, rel.epoch, input_seq, at)
    if fenced is not None:
        why, events = fenced
        return Outcome(events=events, reply=HeartbeatAck(standing=why.standing, reason=job.reason))
    lease = job.live_lease
    assert lease is not None  # not fenced: it is the live lease
    released = LeaseReleased(
        originator_id=job.id,
        originator_version=NEXT,
        timestamp=at,
        agent=agent,
        epoch=lease.epoch,
        reason=rel.reason,
    )
    then = after_lost_attempt(job, f"released by {agent}: {rel.reason or 'no reason given'}", at)
    return Outcome(
        events=list[Event](after(job, released, then)), reply=Accepted(job_id=job.id, detail="lease released")
    )


# --- claims and grants -----------------------------------------------------------------------


def claim_too_late(claim: Claim, at: datetime) -> bool:
    """Its sender stopped waiting: a grant now would be a lease nobody holds."""
    return claim.sent_at is not None and claim.sent_at + timedelta(seconds=claim.wait_s) < at


# A waiting claim is answered this long before its sender stops waiting (at most a fifth of
# its wait), so the "no work" arrives while the agent still listens.
WAIT_MARGIN_S = 1.0
# However long a claim says it may wait, it waits here at most this long: a waiting claim
# holds a place in the scheduler's bounded book, and claiming again costs one stored input.
# No longer than a claim counts as presence, so an agent waiting for work is always present
# (a retry prefers it to the agent that failed the job).
MAX_WAIT_S = RECENT_CLAIM_S


def wait_until(claim: Claim, at: datetime) -> datetime | None:
    """Until when a claim that found no work (arriving at `at`) may wait for some, or None when
    its wait leaves no time to wait in (answer "no work" now). Its sender's wait began when it
    sent the claim (never later than its arrival: a sender's clock may run ahead)."""
    began = min(claim.sent_at, at) if claim.sent_at is not None else at
    margin = min(WAIT_MARGIN_S, claim.wait_s / 5)
    until = min(began + timedelta(seconds=claim.wait_s - margin), at + timedelta(seconds=MAX_WAIT_S))
    return until if until > at else None


def may_bring_work(job: Job, waiting: Container[str]) -> bool:
    """Could what just happened to `job` let a waiting claim be granted? It is runnable (new,
    requeued), or a lease of an agent that waits changed (ended, say: a place under its limit)."""
    if job.status == "queued":
        return True
    lease = job.lease
    return lease is not None and lease.agent in waiting


def claimant_refusal(name: str, agent: Agent | None) -> Refusal | None:
    """Why `name` may not claim (never registered, suspended, revoked), or None."""
    if agent is None:
        return Refusal.of("$", f"agent {name} is not registered (the store has no such agent)")
    if agent.standing != "active":
        return Refusal.of("$", f"agent {name} is {agent.standing}: {agent.standing_reason}")
    return None


def unknown_to(job: Job, name: str, claim: Claim, seq: int) -> bool:
    """Does `name` hold this job's live lease without knowing it? Granted on this very claim
    (delivered again after a broker restart lost its ack), or on an earlier claim whose answer
    never reached it (the claim says it does not hold it); never once something was proposed."""
    lease = job.live_lease
    if job.status != "leased" or lease is None or lease.agent != name:
        return False
    if lease.claim_seq == seq:
        return True
    return claim.holding is not None and job.id not in claim.holding and lease.claim_seq < seq


def failed_by(job: Job, name: str) -> bool:
    """Did `name` lose an attempt at this job since its last fresh start?"""
    return any(
        lease.agent == name and lease.ended not in ("", "completed") and lease.epoch > job.attempt_base
        for lease in job.leases
    )


def can_take(agent: Agent, job: Job) -> bool:
    """Is `agent` (active, of the job's level, of its kind) one that could be granted `job`?"""
    return (
        agent.standing == "active"
        and agent.level >= job.contract.required_level
        and (not agent.kinds or job.kind in agent.kinds)
    )


def someone_else_for(job: Job, name: str, present: Iterable[Agent]) -> bool:
    """Is another agent, asking for work lately (`present`), able to take this job? A retry
    prefers it: the agent that failed a job tends to fail it the same way (the liar keeps
    lying). With no one else around, the same agent gets it again, so no job starves."""
    return any(
        other.name != name and can_take(other, job) and not failed_by(job, other.name) for other in present
    )


def occupies(job: Job, name: str) -> bool:
    """Does this job take up one of `name`'s leases? Its live lease does until something is
    proposed under it: the agent's part is then done (checks, an approval and the effect are
    Warden's), so it may work its next job meanwhile. The lease itself still lives: messages
    under it are fenced by it, its heartbeats answered, it can be revoked."""
    lease = job.live_lease
    return not job.terminal and lease is not None and lease.agent == name and job.pending_proposal is None


def held(jobs: Iterable[Job], name: str) -> int:
    """How many of `name`'s leases count against its limit."""
    return sum(1 for job in jobs if occupies(job, name))


def lease_limit(agent: Agent, policy: Policy) -> int:
    """The agent's own limit, capped by what its autonomy level allows."""
    return min(agent.max_concurrent, policy.at(agent.level).max_leases)


def grantable(job: Job, agent: Agent, kinds: set[str], present: Sequence[Agent], at: datetime) -> bool:
    """May this claim of `agent` (for `kinds`; empty: any) be granted `job` now?"""
    if job.status != "queued":
        return False
    if kinds and job.kind not in kinds:
        return False
    if job.contract.required_level > agent.level:
        return False
    if failed_by(job, agent.name) and someone_else_for(job, agent.name, present):
        return False
    deadline = job.contract.stopping.deadline
    return deadline is None or deadline > at  # past it, the reconciler tombstones it


@dataclass(frozen=True)
class Granted:
    """The job a claim is granted and its `lease.granted`."""

    job: Job
    event: LeaseGranted


def claim_kinds(agent: Agent, claim: Claim) -> set[str]:
    """The kinds this claim takes (the claim's, else its agent's; empty: any kind)."""
    return set(claim.kinds or agent.kinds)


def grant(
    candidates: Iterable[Job],
    agent: Agent,
    claim: Claim,
    *,
    policy: Policy,
    held: int,
    present: Sequence[Agent],
    at: datetime,
    claim_seq: int,
) -> Granted | NoWork:
    """The first of `candidates` (oldest first) this claim may take, and its grant; or why none.

    `held` is how many of its leases count against its limit (see `held`); `present` the others that claimed
    lately (a retry prefers one of them to the agent that failed it).
    """
    limit = lease_limit(agent, policy)
    if held >= limit:
        return NoWork(detail=f"agent {agent.name} holds {held} of {limit} leases (level {agent.level})")
    kinds = claim_kinds(agent, claim)
    for job in candidates:
        if not grantable(job, agent, kinds, present, at):
            continue
        stopping = job.contract.stopping
        (event,) = after(
            job,
            LeaseGranted(
                originator_id=job.id,
                originator_version=NEXT,
                agent=agent.name,
                epoch=job.attempts + 1,
                ttl_s=stopping.lease_ttl_s,
                expires_at=at + timedelta(seconds=stopping.lease_ttl_s),
                claim_seq=claim_seq,
                timestamp=at,
            ),
        )
        return Granted(job=job, event=event)
    return NoWork(detail="no runnable job for this agent")


def lease_grant(job: Job, lease: Lease | LeaseGranted, previous: list[PreviousAttempt]) -> LeaseGrant:
    """The reply that hands `lease` of `job` to its agent (a new grant, or one handed back)."""
    return LeaseGrant(
        job_id=job.id,
        kind=job.kind,
        epoch=lease.epoch,
        expires_at=lease.expires_at,
        ttl_s=lease.ttl_s,
        heartbeat_interval_s=job.contract.stopping.heartbeat_interval_s,
        contract=job.contract,
        previous_attempts=previous,
    )
