"""Applier: performs the effect of every accepted proposal exactly once, and compensates on request.

It follows the event stream. For each `proposal.accepted` it reads the proposal back from the
input stream (and the object store), verifies it against the recorded hashes, and performs the
effect; `effect.applied` with the receipt is appended atomically with `job.completed`. For each
`rollback.requested` on an applied proposal it performs the compensating effect and appends
`effect.rolled_back`.

Exactly once: before acting it looks for its own receipt (for git a commit on the branch whose
`Warden-Proposal:` / `Warden-Rollback:` trailer names the proposal; for files the content hashes
already in place), so a crash between the effect and its record is re-driven into a record
(`reused_receipt=True`), never into a second effect. Git branches move by compare-and-swap
(`git update-ref NEW OLD`), so two appliers can never both land a commit.

What to record is decided by shared.decide.proposals (apply, applied, failed, rolled_back);
how each kind is carried out lives in `effects` (git.patch, file.write, webhook, none), chosen
from one table by the proposal's effect kind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from functools import partial
from uuid import UUID

import anyio
from anyio.abc import TaskGroup, TaskStatus

from services.applier.effects import EffectError, Performed, effect_for
from shared import faults, proposals, telemetry
from shared.aggregates import Job, ProposalState
from shared.decide import Refusal, retry
from shared.decide import proposals as decide
from shared.events import (
    EffectApplied,
    Event,
    JobCancelled,
    JobTombstoned,
    ProposalAccepted,
    RollbackRequested,
)
from shared.messages import Propose
from shared.runtime import Context

log = logging.getLogger("warden.applier")


DRIVERS_ENV = "WARDEN_APPLIER_DRIVERS"
DEFAULT_DRIVERS = 32
# How long a record may take once begun, even while the applier is being stopped.
RECORD_S = 30.0


def drivers_setting(value: str | None) -> int:
    """How many jobs one applier drives at once (WARDEN_APPLIER_DRIVERS, default 32)."""
    if not value:
        return DEFAULT_DRIVERS
    count = int(value)
    if count < 1:
        raise ValueError(f"{DRIVERS_ENV} must be at least 1, not {count}")
    return count


class Applier:
    name = "applier"

    def __init__(self, *, drivers: int | None = None) -> None:
        self.drivers = drivers or drivers_setting(os.environ.get(DRIVERS_ENV))
        self._pending: dict[UUID, None] = {}  # insertion-ordered set of jobs waiting for a driver
        # One driver per job, never two: a job with work already being driven is only marked
        # to be looked at again by its driver, which may have read it before the news arrived.
        self._driving: set[UUID] = set()
        self._again: set[UUID] = set()
        self._wake = anyio.Event()
        # Per job, effects this process performed but has not recorded yet: a lost append race
        # is retried with the receipt in hand, not by looking the effect up as someone else's.
        # A job's entry goes once nothing more is owed to it.
        self._unrecorded: dict[UUID, dict[tuple[UUID, decide.Work], Performed]] = {}
        self._backoff: dict[UUID, float] = {}
        # What an effect must have to itself (Effect.exclusive): held while it looks and acts.
        self._exclusive: dict[Hashable, anyio.Lock] = {}
        self.ctx: Context
        self._tg: TaskGroup

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        for job in list(ctx.views.jobs.values()):
            self._consider(job)  # finish what a crash left: accepted but unrecorded, rollbacks asked
        ctx.views.listeners.append(self._on_event)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._dispatch)
            task_status.started()

    def _on_event(self, event: Event | None, job: Job | None, _agent: object) -> None:
        if job is not None and (
            event is None  # reloaded from the store: its work may be new to us
            or isinstance(event, ProposalAccepted | RollbackRequested | JobCancelled | JobTombstoned)
        ):
            self._consider(job)

    def _consider(self, job: Job) -> None:
        if decide.owed(job) is not None:
            self._enqueue(job.id)

    def _enqueue(self, job_id: UUID) -> None:
        if job_id in self._driving:
            self._again.add(job_id)
            return
        self._pending[job_id] = None
        self._wake.set()

    async def _dispatch(self) -> None:
        """Start a driver for each job with work, oldest first, up to `drivers` at once."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._pending and len(self._driving) < self.drivers:
                job_id = next(iter(self._pending))
                del self._pending[job_id]
                self._driving.add(job_id)
                self._tg.start_soon(self._driver, job_id)

    async def _driver(self, job_id: UUID) -> None:
        try:
            while True:
                self._again.discard(job_id)
                await self._drive(job_id)
                self._backoff.pop(job_id, None)
                if job_id not in self._again:
                    return
        except Exception:  # Contended included: the job is driven again later
            delay = min(self._backoff.get(job_id, 0.5) * 2, 30.0)
            self._backoff[job_id] = delay
            log.exception("applier failed on job %s; retrying in %.1fs", job_id, delay)
            self._tg.start_soon(self._retry_later, job_id, delay)
        finally:
            self._driving.discard(job_id)
            self._again.discard(job_id)
            self._wake.set()  # a slot is free

    async def _retry_later(self, job_id: UUID, delay: float) -> None:
        await anyio.sleep(delay)
        self._enqueue(job_id)

    @asynccontextmanager
    async def _alone_on(self, key: Hashable | None) -> AsyncIterator[None]:
        """Hold what an effect needs to itself; the lock goes once nobody holds or awaits it."""
        if key is None:
            yield
            return
        lock = self._exclusive.setdefault(key, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            # Released to a waiter, it is still locked; otherwise nobody needs it any more.
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._exclusive.pop(key, None)

    async def _drive(self, job_id: UUID) -> None:
        """Record what the job is owed, one step at a time, until nothing is."""
        step = partial(self._step, job_id)
        reload = partial(self.ctx.reload_job, job_id)
        while await retry(step, reload, what=f"the applier's record on job {job_id}"):
            pass

    async def _step(self, job_id: UUID) -> bool:
        """Load, act, record one piece of owed work; False when nothing is owed."""
        # A job that ended may have left the view (a rollback is asked of a completed job).
        job = await self.ctx.job(job_id)
        work = decide.owed(job) if job is not None else None
        if job is None or work is None:
            self._unrecorded.pop(job_id, None)  # recorded (by us or a replica): forget it
            return False
        kind, state = work
        # A child of the span that accepted the proposal, or that asked for its rollback.
        with telemetry.span(
            "applier effect" if kind == "apply" else "applier rollback",
            parent=state.trace,
            job_id=job.id,
            agent=state.agent,
            epoch=state.epoch,
            proposal_id=state.id,
            effect=state.effect,
        ):
            if kind == "apply":
                return await self._apply(job, state)
            return await self._rollback(job, state)

    # --- applying ------------------------------------------------------------------------

    async def _apply(self, job: Job, state: ProposalState) -> bool:
        effect = effect_for(state.effect)
        js = self.ctx.js
        done = self._in_hand(job.id, state.id, "apply")
        if done is None:
            proposal: Propose | None = None
            async with self._alone_on(effect.exclusive(job, state)):
                try:
                    proposal = await proposals.read_stored(js, state)
                    found = await effect.find_receipt(js, job, state, proposal)
                    step = decide.apply(job, state, found, self.ctx.clock())
                    if not isinstance(step, decide.Perform):
                        what = "receipt found" if found else "not applied"
                        return await self._record(job, state, step, what)
                    done = await effect.perform(js, job, state, proposal)
                except (EffectError, proposals.PayloadProblem) as exc:
                    # A replica may have landed this very effect while ours failed (its patch no
                    # longer applies on a head that already holds it): look for the receipt
                    # exactly as before acting, so a landed effect is never recorded as a failure.
                    found = await effect.find_receipt(js, job, state, proposal)
                    if found is None:
                        return await self._fail(job, state, "apply", exc)
                    done = Performed(found, True)
            if not done.reused:
                faults.crash_if_armed("applier", "after-effect")
            self._unrecorded.setdefault(job.id, {})[(state.id, "apply")] = done
        decided = decide.applied(job, state, done.receipt, reused=done.reused, at=self.ctx.clock())
        return await self._record(job, state, decided, "receipt found" if done.reused else "applied")

    async def _fail(self, job: Job, state: ProposalState, phase: decide.Work, exc: Exception) -> bool:
        reason = exc.reason if isinstance(exc, EffectError) else str(exc)
        evidence = exc.evidence if isinstance(exc, EffectError) else {}
        decided = decide.failed(job, state, phase, reason, evidence, at=self.ctx.clock())
        return await self._record(job, state, decided, f"{phase} failed: {reason}", logging.WARNING)

    # --- rollback ----------------------------------------------------------------------------

    async def _rollback(self, job: Job, state: ProposalState) -> bool:
        done = self._in_hand(job.id, state.id, "rollback")
        if done is None:
            effect = effect_for(state.effect)
            try:
                async with self._alone_on(effect.exclusive(job, state)):
                    done = await effect.compensate(self.ctx.js, job, state)
            except EffectError as exc:
                return await self._fail(job, state, "rollback", exc)
            if not done.reused:
                faults.crash_if_armed("applier", "after-rollback")
            self._unrecorded.setdefault(job.id, {})[(state.id, "rollback")] = done
        decided = decide.rolled_back(job, state, done.receipt, reused=done.reused, at=self.ctx.clock())
        return await self._record(job, state, decided, "rolled back")

    # --- recording -----------------------------------------------------------------------------

    def _in_hand(self, job_id: UUID, proposal_id: UUID, work: decide.Work) -> Performed | None:
        return self._unrecorded.get(job_id, {}).get((proposal_id, work))

    async def _record(
        self,
        job: Job,
        state: ProposalState,
        decided: list[Event] | Refusal,
        what: str,
        level: int = logging.INFO,
    ) -> bool:
        """Save what was decided (raises IntegrityError on a lost race: `retry` decides again)."""
        if isinstance(decided, Refusal):  # the record moved on meanwhile; nothing of ours to add
            log.info("proposal %s of job %s: nothing to record: %s", state.id, job.id, decided.reason)
            return False
        # Stopping lets a record in flight finish: the effect it records has happened, and a
        # save cut off after its message was stored would leave the process unsure whether.
        with anyio.fail_after(RECORD_S, shield=True):
            await self.ctx.save(*decided)
        self._unrecorded.pop(job.id, None)
        if any(isinstance(e, EffectApplied) for e in decided):
            telemetry.instruments().jobs.add(1, {"state": "completed"})
        log.log(level, "proposal %s (%s) of job %s: %s", state.id, state.effect, job.id, what)
        return True
