"""Reconciler: the live lease table. Answers heartbeats, fences stale messages, expires leases.

It enforces every stopping condition itself, on a timer per job (not JetStream's AckWait): a
lease whose TTL passes without a heartbeat gets `lease.expired` with the last heartbeat seen and
the detection latency, appended atomically with the job's requeue or tombstone. A hung agent
(connected, silent) and a dead one look the same here: silence past the deadline.
"""

from __future__ import annotations

import heapq
import logging
from datetime import datetime, timedelta
from functools import partial
from uuid import UUID

import anyio
from anyio.abc import TaskStatus
from eventsourcing.persistence import IntegrityError, OperationalError
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from shared import bus, telemetry, throttle, topology
from shared.aggregates import Job, Lease
from shared.events import (
    Event,
    HeartbeatSeen,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRevoked,
    Usage,
    now,
)
from shared.handling import answer, decode_or_reject, give_up, input_seq, known_job
from shared.lifecycle import after_attempt, budget_breach, fence, late_heartbeat, since_progress_ms
from shared.messages import Accepted, Heartbeat, HeartbeatAck, Release, Standing, decode_input
from shared.runtime import Context
from shared.validation import InvalidInput

log = logging.getLogger("warden.reconciler")
# How soon a check that could not reach the store runs again.
RETRY_S = 1.0
# Timers follow the events the view folds; a lease the view adopted another way (reloaded after
# a lost race whose winning write had an unknown outcome, e.g. during a cluster failover) would
# have none and never expire. This often, every live job's next check is derived again.
SWEEP_S = 5.0


class Reconciler:
    name = "reconciler"

    def __init__(self) -> None:
        self.heartbeats: dict[tuple[UUID, int], HeartbeatSeen] = {}
        self._timers: list[tuple[datetime, UUID]] = []
        # The one live check time per job; heap entries that disagree with it are stale.
        self._due: dict[UUID, datetime] = {}
        self._wake = anyio.Event()
        self._locks: dict[UUID, anyio.Lock] = {}
        self.ctx: Context

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        await self._recover_heartbeats()
        for job in ctx.views.jobs.values():
            self._schedule(job)
        ctx.views.listeners.append(self._on_event)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._timer_loop, tg)
            tg.start_soon(self._sweep)
            handler = throttle.guard(ctx, topology.RECONCILER_CONSUMER.durable, self.handle)
            await tg.start(
                partial(bus.consume, give_up=partial(give_up, ctx)),
                ctx.js,
                topology.RECONCILER_CONSUMER,
                handler,
            )
            task_status.started()

    # --- the lease table -----------------------------------------------------------------

    def _on_event(self, event: Event | None, job: Job | None, _agent: object) -> None:
        # A grant, a new job (its deadline), or a state reloaded after a lost race.
        if job is not None and (event is None or isinstance(event, LeaseGranted) or job.version == 1):
            self._schedule(job)

    def deadline_of(self, job: Job, lease: Lease) -> datetime:
        seen = self.heartbeats.get((job.id, lease.epoch))
        if seen is None:
            return lease.expires_at
        return max(lease.expires_at, seen.at + timedelta(seconds=lease.ttl_s))

    def _next_check(self, job: Job) -> datetime | None:
        if job.terminal or job.status == "accepted":
            return None  # decided: what remains is Warden's own effect, not the agent's
        times: list[datetime] = []
        if job.contract.stopping.deadline is not None:
            times.append(job.contract.stopping.deadline)
        lease = job.live_lease
        if lease is not None and job.pending_proposal is None:
            times.append(self.deadline_of(job, lease))
            wall = job.contract.stopping.budgets.wall_clock_s
            if wall is not None:
                times.append(lease.granted_at + timedelta(seconds=wall))
        return min(times) if times else None

    def _schedule(self, job: Job) -> None:
        at = self._next_check(job)
        if at is None:
            return
        due = self._due.get(job.id)
        if due is not None and due <= at:
            return  # an earlier check is pending; it re-evaluates and reschedules
        self._due[job.id] = at
        earliest = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (at, job.id))
        if earliest is None or at < earliest:
            self._wake.set()

    async def _timer_loop(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            self._wake = anyio.Event()
            if not self._timers:
                await self._wake.wait()
                continue
            delay = (self._timers[0][0] - now()).total_seconds()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                continue
            at, job_id = heapq.heappop(self._timers)
            if self._due.get(job_id) != at:
                continue
            del self._due[job_id]
            # Due checks run side by side: one slow append must not delay the next expiry.
            tg.start_soon(self._check, job_id)

    async def _sweep(self) -> None:
        while True:
            await anyio.sleep(SWEEP_S)
            for job in list(self.ctx.views.jobs.values()):
                if not job.terminal:
                    self._schedule(job)

    def _lock(self, job_id: UUID) -> anyio.Lock:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = anyio.Lock()
        return lock

    async def _check(self, job_id: UUID) -> None:
        """Enforce whatever stopping condition is due on this job; reschedule the rest."""
        job = self.ctx.views.jobs.get(job_id)
        lease = job.live_lease if job else None
        # A timer acts for the lease it watches: a child of its grant.
        with telemetry.span(
            "reconciler expiry",
            parent=lease.trace if lease else job.trace if job else "",
            job_id=job_id,
            agent=lease.agent if lease else None,
            epoch=lease.epoch if lease else None,
        ):
            await self._check_now(job_id)

    async def _check_now(self, job_id: UUID) -> None:
        async with self._lock(job_id):
            for _ in range(5):
                job = self.ctx.views.jobs.get(job_id)
                if job is None or job.terminal:
                    return
                try:
                    await self._enforce(job, now())
                except IntegrityError:
                    await self.ctx.reload_job(job_id)
                    continue
                except (OperationalError, TimeoutError) as exc:
                    # The store is unreachable for now (a cluster electing a stream leader):
                    # the check stays due and runs again shortly; the service must not die.
                    log.warning("check of job %s failed (%r); retrying in %ss", job_id, exc, RETRY_S)
                    self._retry_soon(job_id)
                    return
                break
            job = self.ctx.views.jobs.get(job_id)
            if job is not None:
                self._schedule(job)

    def _retry_soon(self, job_id: UUID) -> None:
        at = now() + timedelta(seconds=RETRY_S)
        self._due[job_id] = at
        heapq.heappush(self._timers, (at, job_id))
        self._wake.set()

    async def _enforce(self, job: Job, at: datetime) -> Standing | None:
        """Append what the clock says is due; returns how the live lease now stands."""
        lease = job.live_lease
        if job.status == "accepted":
            return "extended"
        deadline = job.contract.stopping.deadline
        if deadline is not None and deadline <= at:
            events: list[Event] = []
            if lease is not None:
                events.append(
                    self._revoke(
                        job, lease, f"job deadline {deadline.isoformat()} passed", "deadline", job.version + 1
                    )
                )
            events.append(
                JobTombstoned(
                    originator_id=job.id,
                    originator_version=job.version + 1 + len(events),
                    reason=f"deadline {deadline.isoformat()} passed",
                    attempts=job.attempts,
                )
            )
            await self.ctx.save(*events)
            telemetry.annotate(standing="deadline")
            return "expired"
        if lease is None:
            return None
        if job.pending_proposal is not None:
            # The agent's part is done once it proposed: a check (CI, an operator's approval)
            # may outlast its TTL, and the attempt's fate is now the decision's.
            return "extended"
        lease_deadline = self.deadline_of(job, lease)
        if lease_deadline <= at:
            await self._expire(job, lease, lease_deadline, at)
            return "expired"
        seen = self.heartbeats.get((job.id, lease.epoch))
        breach = budget_breach(job, seen.usage if seen else Usage(), lease, at)
        if breach:
            revoke = self._revoke(job, lease, f"budget exceeded: {breach}", "budget", job.version + 1)
            await self.ctx.save(revoke, after_attempt(job, job.version + 2, revoke.reason, at))
            telemetry.annotate(standing="budget_exceeded")
            telemetry.instruments().revocations.add(1, {"signal": "budget"})
            return "budget_exceeded"
        return "extended"

    def _revoke(self, job: Job, lease: Lease, reason: str, signal: str, version: int) -> LeaseRevoked:
        return LeaseRevoked(
            originator_id=job.id,
            originator_version=version,
            agent=lease.agent,
            epoch=lease.epoch,
            reason=reason,
            signal=signal,
            by=self.name,
            signal_at=now(),
        )

    async def _expire(self, job: Job, lease: Lease, deadline: datetime, at: datetime) -> None:
        latency_ms = (at - deadline).total_seconds() * 1000
        seen = self.heartbeats.get((job.id, lease.epoch))
        expired = LeaseExpired(
            originator_id=job.id,
            originator_version=job.version + 1,
            agent=lease.agent,
            epoch=lease.epoch,
            deadline=deadline,
            detected_at=at,
            detection_latency_ms=latency_ms,
            last_heartbeat=seen,
            since_progress_ms=since_progress_ms(seen, at),
            timestamp=at,
        )
        reason = f"lease {lease.epoch} of {lease.agent} expired: no heartbeat for {lease.ttl_s}s " + (
            f"(last at {seen.at.isoformat()})" if seen else "(none ever received)"
        )
        await self.ctx.save(expired, after_attempt(job, job.version + 2, reason, at))
        telemetry.annotate(standing="expired")
        metrics = telemetry.instruments()
        metrics.lease_expiries.add(1)
        metrics.detection_latency.record(latency_ms)
        log.info("%s (detected %.1f ms after the deadline)", reason, latency_ms)

    async def _recover_heartbeats(self) -> None:
        """After a restart, the last heartbeat of each live lease is read back from the stream."""
        for job in self.ctx.views.jobs.values():
            lease = job.live_lease
            if lease is None:
                continue
            subject = topology.agent_subject(lease.agent, "heartbeat")
            try:
                raw = await bus.patiently(
                    partial(self.ctx.js.get_last_msg, topology.INPUT_STREAM, subject, direct=True)
                )
            except NotFoundError:
                continue
            except TimeoutError:
                # Unknown: count the restart as its last sign of life rather than expire a lease
                # that may be beating; a silent one still expires one TTL from now.
                self.heartbeats[(job.id, lease.epoch)] = HeartbeatSeen(at=now(), input_seq=0, note="restart")
                continue
            try:
                hb = decode_input(raw.data or b"", Heartbeat)
            except InvalidInput:
                continue
            if hb.job_id == job.id and hb.epoch == lease.epoch and raw.time is not None:
                self.heartbeats[(job.id, lease.epoch)] = HeartbeatSeen(
                    at=raw.time,
                    input_seq=raw.seq or 0,
                    progress=hb.progress,
                    usage=hb.usage,
                    note=hb.note,
                    progress_at=hb.progress_at,
                )

    # --- agent messages --------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        parsed = topology.parse_agent_subject(msg.subject)
        assert parsed is not None, msg.subject
        agent, verb = parsed
        named = telemetry.names_in(msg.data)
        job = self.ctx.views.jobs.get(named.job_id) if named.job_id is not None else None
        with telemetry.span(
            f"reconciler {verb}",
            parent=job.trace_of(named.epoch) if job else None,  # the lease it beats under
            headers=msg.headers,
            job_id=named.job_id,
            agent=agent,
            epoch=named.epoch,
        ):
            kind: type[Heartbeat] | type[Release] = Heartbeat if verb == "heartbeat" else Release
            body = await decode_or_reject(self.ctx, msg, kind, sender=agent)
            if body is None:
                return
            if not await known_job(self.ctx, msg, body.job_id, agent):
                return
            async with self._lock(body.job_id):
                for _ in range(5):
                    try:
                        if isinstance(body, Heartbeat):
                            await self._heartbeat(msg, agent, body)
                        else:
                            await self._release(msg, agent, body)
                        return
                    except IntegrityError:
                        await self.ctx.reload_job(body.job_id)
                raise RuntimeError(f"job {body.job_id} kept changing under the reconciler")

    async def fence(self, msg: Msg, agent: str, verb: str, job: Job, epoch: int) -> Standing | None:
        """None when (agent, job, epoch) names the live lease; else record the rejection."""
        fenced = await fence(self.ctx, msg, agent, verb, job, epoch)
        return fenced.standing if fenced is not None else None

    async def _heartbeat(self, msg: Msg, agent: str, hb: Heartbeat) -> None:
        job = self.ctx.views.jobs[hb.job_id]
        at = now()
        if late_heartbeat(agent, job, hb.epoch):
            await answer(self.ctx, msg, HeartbeatAck(standing="ended", reason=job.reason))
            return
        standing = await self.fence(msg, agent, "heartbeat", job, hb.epoch)
        if standing is not None:
            await answer(self.ctx, msg, HeartbeatAck(standing=standing, reason=job.reason))
            return
        lease = job.live_lease
        assert lease is not None
        sent_at = msg.metadata.timestamp or at
        self.heartbeats[(job.id, lease.epoch)] = HeartbeatSeen(
            at=sent_at,
            input_seq=input_seq(msg),
            progress=hb.progress,
            usage=hb.usage,
            note=hb.note,
            progress_at=hb.progress_at,
        )
        standing_now = await self._enforce(job, at)
        job = self.ctx.views.jobs[hb.job_id]
        if standing_now == "extended":
            expires = self.deadline_of(job, lease)
            await answer(self.ctx, msg, HeartbeatAck(standing="extended", expires_at=expires))
        else:
            await answer(self.ctx, msg, HeartbeatAck(standing=standing_now or "ended", reason=job.reason))

    async def _release(self, msg: Msg, agent: str, rel: Release) -> None:
        job = self.ctx.views.jobs[rel.job_id]
        standing = await self.fence(msg, agent, "release", job, rel.epoch)
        if standing is not None:
            await answer(self.ctx, msg, HeartbeatAck(standing=standing, reason=job.reason))
            return
        lease = job.live_lease
        assert lease is not None
        reason = f"released by {agent}: {rel.reason or 'no reason given'}"
        await self.ctx.save(
            LeaseReleased(
                originator_id=job.id,
                originator_version=job.version + 1,
                agent=agent,
                epoch=lease.epoch,
                reason=rel.reason,
            ),
            after_attempt(job, job.version + 2, reason, now()),
        )
        await answer(self.ctx, msg, Accepted(job_id=job.id, detail="lease released"))
