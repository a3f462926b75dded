"""Reconciler: the live lease table. Answers heartbeats, fences stale messages, expires leases.

It enforces every stopping condition itself, on a timer per job (not JetStream's AckWait): a
lease whose TTL passes without a heartbeat gets `lease.expired` with the last heartbeat seen and
the detection latency, appended atomically with the job's requeue or tombstone. A hung agent
(connected, silent) and a dead one look the same here: silence past the deadline.

What is due is decided by `shared.decide.leases` (pure); this module keeps the table (the last
heartbeat of each live lease, one timer per job, one lock per job in hand), saves and replies.
Every entry of the table goes when its lease or job ends.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from eventsourcing.persistence import OperationalError
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from shared import bus, telemetry, throttle, topology
from shared.aggregates import Job
from shared.decide import Contended, retry
from shared.decide import leases as rules
from shared.events import Event, HeartbeatSeen, LeaseExpired, LeaseGranted, MessageRejected
from shared.handling import answer, decode_or_reject, give_up, input_seq, known_job
from shared.messages import Heartbeat, Release, Reply, decode_input
from shared.runtime import Context
from shared.validation import InvalidInput

log = logging.getLogger("warden.reconciler")
# How soon a check that could not reach the store runs again.
RETRY_S = 1.0
# Timers follow the events the view folds; a lease the view adopted another way (reloaded after
# a lost race whose winning write had an unknown outcome, e.g. during a cluster failover) would
# have none and never expire. This often, every live job's next check is derived again.
SWEEP_S = 5.0
# Heap entries of checks no longer due (their job ended, or was rescheduled earlier) are
# skipped when they surface; past this many per live check the heap is rebuilt without them.
STALE_TIMERS_PER_DUE = 2
# A sweep hands the event loop back after this many jobs: a synchronous pass over 10,000 live
# jobs would hold every due expiry (and every heartbeat) behind it for tens of milliseconds.
SWEEP_SLICE = 200
# Heartbeats are answered from memory (no save unless something is due), so many can be in hand
# at once; the consumer's defaults are sized for handlers that wait on a durable write. A fetch
# this large and this many in flight keep a fleet's bursts (10,000 leases) from queueing in the
# stream behind a 64-message fetch round trip.
FETCH_BATCH = 256
IN_FLIGHT = 256
# How each enforcement shows on its span.
STANDING_OF: dict[rules.Cause, str] = {
    "deadline": "deadline",
    "expired": "expired",
    "budget": "budget_exceeded",
}


class Reconciler:
    name = "reconciler"

    def __init__(self) -> None:
        # The last heartbeat of each job's live lease: (its epoch, what was seen).
        self.heartbeats: dict[UUID, tuple[int, HeartbeatSeen]] = {}
        self._timers: list[tuple[datetime, UUID]] = []
        # The one live check time per job; heap entries that disagree with it are stale.
        self._due: dict[UUID, datetime] = {}
        self._wake = anyio.Event()
        # One lock per job while a check or an agent message about it is in hand.
        self._locks: dict[UUID, anyio.Lock] = {}
        self._routes: dict[str, tuple[type[Heartbeat] | type[Release], Callable[..., Awaitable[Reply]]]] = {
            "heartbeat": (Heartbeat, self._heartbeat),
            "release": (Release, self._release),
        }
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
                partial(bus.consume, give_up=partial(give_up, ctx), batch=FETCH_BATCH, concurrency=IN_FLIGHT),
                ctx.js,
                topology.RECONCILER_CONSUMER,
                handler,
            )
            task_status.started()

    # --- the lease table -----------------------------------------------------------------

    def _on_event(self, event: Event | None, job: Job | None, _agent: object) -> None:
        if job is None:
            return
        self._forget_ended(job)
        # A grant, a new job (its deadline), or a state reloaded after a lost race.
        if event is None or isinstance(event, LeaseGranted) or job.version == 1:
            self._schedule(job)

    def _forget_ended(self, job: Job) -> None:
        """Drop what the table holds for a lease or a job that has ended."""
        lease = job.live_lease
        beat = self.heartbeats.get(job.id)
        if beat is not None and (lease is None or lease.epoch != beat[0]):
            del self.heartbeats[job.id]
        if job.terminal and self._due.pop(job.id, None) is not None:
            self._compact_timers()

    def _compact_timers(self) -> None:
        if len(self._timers) > STALE_TIMERS_PER_DUE * len(self._due):
            self._timers = [(at, job_id) for job_id, at in self._due.items()]
            heapq.heapify(self._timers)

    def seen(self, job: Job) -> HeartbeatSeen | None:
        """The last heartbeat seen under the job's live lease."""
        lease = job.live_lease
        beat = self.heartbeats.get(job.id)
        return beat[1] if beat is not None and lease is not None and beat[0] == lease.epoch else None

    def _schedule(self, job: Job) -> None:
        at = rules.next_check(job, self.seen(job))
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
            delay = (self._timers[0][0] - self.ctx.clock()).total_seconds()
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
            for i, job in enumerate(list(self.ctx.views.jobs.values())):
                if i % SWEEP_SLICE == SWEEP_SLICE - 1:
                    await anyio.lowlevel.checkpoint()
                if not job.terminal:
                    self._schedule(job)

    @asynccontextmanager
    async def _locked(self, job_id: UUID) -> AsyncIterator[None]:
        """One check or message per job at a time; the lock goes once nobody holds or awaits it."""
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = anyio.Lock()
        try:
            async with lock:
                yield
        finally:
            # A waiter is handed the lock on release, so an unlocked lock has none.
            if not lock.locked() and self._locks.get(job_id) is lock:
                del self._locks[job_id]

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
        async with self._locked(job_id):

            async def step() -> None:
                job = self.ctx.views.jobs.get(job_id)
                if job is not None and not job.terminal:
                    enforced = rules.enforce(job, self.seen(job), self.ctx.clock())
                    await self._record(enforced.events, enforced.cause)

            try:
                await retry(step, partial(self.ctx.reload_job, job_id), what=f"check of job {job_id}")
            except (OperationalError, TimeoutError, Contended) as exc:
                # The store is unreachable for now (a cluster electing a stream leader), or the
                # job keeps moving: the check stays due and runs again shortly; the service
                # must not die.
                log.warning("check of job %s failed (%r); retrying in %ss", job_id, exc, RETRY_S)
                self._retry_soon(job_id)
                return
            job = self.ctx.views.jobs.get(job_id)
            if job is not None:
                self._schedule(job)

    def _retry_soon(self, job_id: UUID) -> None:
        at = self.ctx.clock() + timedelta(seconds=RETRY_S)
        self._due[job_id] = at
        heapq.heappush(self._timers, (at, job_id))
        self._wake.set()

    async def _record(self, events: list[Event], cause: rules.Cause = "", verb: str = "") -> None:
        """Save what a rule decided, and count it: an enforcement by its `cause`, a fenced
        message by its `verb`."""
        if not events:
            return
        await self.ctx.save(*events)
        metrics = telemetry.instruments()
        if cause:
            telemetry.annotate(standing=STANDING_OF[cause])
        if cause == "budget":
            metrics.revocations.add(1, {"signal": "budget"})
        for event in events:
            if isinstance(event, LeaseExpired):
                metrics.lease_expiries.add(1)
                metrics.detection_latency.record(event.detection_latency_ms)
                log.info(
                    "lease %d of %s expired (detected %.1f ms after the deadline)",
                    event.epoch,
                    event.agent,
                    event.detection_latency_ms,
                )
            elif isinstance(event, MessageRejected):
                metrics.rejected_inputs.add(1, {"subject": verb, "fenced": "yes"})

    async def _recover_heartbeats(self) -> None:
        """After a restart, the last heartbeat of each live lease is read back from the stream."""
        # A copy: the view folds on while this awaits, and a job that settles leaves it.
        for job in list(self.ctx.views.jobs.values()):
            lease = job.live_lease
            if lease is None:
                continue
            subject = topology.agent_subject(lease.agent, "heartbeat")
            try:
                raw = await bus.patiently(
                    partial(self.ctx.js.get_last_msg, topology.AGENT_INPUT_STREAM, subject, direct=True)
                )
            except NotFoundError:
                continue
            except TimeoutError:
                # Unknown: count the restart as its last sign of life rather than expire a lease
                # that may be beating; a silent one still expires one TTL from now.
                restart = HeartbeatSeen(at=self.ctx.clock(), input_seq=0, note="restart")
                self.heartbeats[job.id] = (lease.epoch, restart)
                continue
            try:
                hb = decode_input(raw.data or b"", Heartbeat)
            except InvalidInput:
                continue
            if hb.job_id == job.id and hb.epoch == lease.epoch and raw.time is not None:
                self.heartbeats[job.id] = (
                    lease.epoch,
                    HeartbeatSeen(
                        at=raw.time,
                        input_seq=raw.seq or 0,
                        progress=hb.progress,
                        usage=hb.usage,
                        note=hb.note,
                        progress_at=hb.progress_at,
                    ),
                )

    # --- agent messages --------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        parsed = topology.parse_agent_subject(msg.subject)
        assert parsed is not None, msg.subject
        agent, verb = parsed
        named = telemetry.names_in(msg.data)
        job = self.ctx.views.job(named.job_id) if named.job_id is not None else None
        with telemetry.span(
            f"reconciler {verb}",
            parent=job.trace_of(named.epoch) if job else None,  # the lease it beats under
            headers=msg.headers,
            job_id=named.job_id,
            agent=agent,
            epoch=named.epoch,
        ):
            kind, decide = self._routes[verb]
            body: Any = await decode_or_reject(self.ctx, msg, kind, sender=agent)
            if body is None:
                return
            if not await known_job(self.ctx, msg, body.job_id, agent):
                return
            async with self._locked(body.job_id):
                reply = await retry(
                    partial(decide, msg, agent, body),
                    partial(self.ctx.job_from_store, body.job_id),
                    what=f"{verb} of job {body.job_id}",
                )
            await answer(self.ctx, msg, reply)

    async def _job(self, job_id: UUID) -> Job:
        job = await self.ctx.job(job_id)
        if job is None:  # known_job found it: a store that loses a job is a fault, not input
            raise LookupError(f"job {job_id} is no longer in the store")
        return job

    async def _heartbeat(self, msg: Msg, agent: str, hb: Heartbeat) -> Reply:
        job = await self._job(hb.job_id)
        at = self.ctx.clock()
        seen = HeartbeatSeen(
            at=msg.metadata.timestamp or at,
            input_seq=input_seq(msg),
            progress=hb.progress,
            usage=hb.usage,
            note=hb.note,
            progress_at=hb.progress_at,
        )
        beat = rules.heartbeat(job, agent, hb.epoch, seen, at)
        if beat.seen is not None:
            self.heartbeats[job.id] = (hb.epoch, beat.seen)
        await self._record(beat.events, beat.cause, "heartbeat")
        return beat.reply

    async def _release(self, msg: Msg, agent: str, rel: Release) -> Reply:
        job = await self._job(rel.job_id)
        outcome = rules.release(job, agent, rel, input_seq(msg), self.ctx.clock())
        await self._record(outcome.events, verb="release")
        return outcome.reply
