"""Scheduler: admits job requests, registers agents, and grants leases on claims.

Grants are appended with optimistic concurrency on the job's subject, so two scheduler replicas
racing for one job never both grant it: the loser re-reads and offers the agent the next job.
Runnable jobs are offered oldest first (by request time, requeues keep their place): none starves.
"""

from __future__ import annotations

import bisect
import logging
from datetime import datetime, timedelta
from functools import partial
from uuid import UUID

import anyio
import msgspec
from anyio.abc import TaskStatus
from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg

from shared import bus, telemetry, throttle, topology
from shared.aggregates import Agent, Job
from shared.contract import partial_semantic_errors, semantic_errors
from shared.events import (
    AgentRegistered,
    Event,
    JobCancelled,
    JobRequested,
    JobRequeued,
    LeaseGranted,
    agent_id_for,
    job_id_for,
    now,
)
from shared.handling import answer, decode_or_reject, give_up, input_seq, reject_input
from shared.messages import (
    Accepted,
    Claim,
    JobRequest,
    LeaseGrant,
    NoWork,
    OperatorCommand,
    Register,
    request_digest,
)
from shared.policy import load_policy
from shared.runtime import Context
from shared.task import PreviousAttempt, previous_attempts
from shared.validation import FieldError, missing

log = logging.getLogger("warden.scheduler")
# An agent that claimed within this window counts as present when choosing who retries a job.
RECENT_CLAIM_S = 30.0


def _ordering_key(msg: Msg) -> str:
    """Requests are independent (the idempotency key dedupes); one agent's claims go in order."""
    if msg.subject == topology.REQUEST_SUBJECT:
        return f"request-{msg.metadata.sequence.stream}"
    return str(msg.subject)


def _unknown_to(job: Job, name: str, claim: Claim, seq: int) -> bool:
    lease = job.live_lease
    if job.status != "leased" or lease is None or lease.agent != name:
        return False
    if lease.claim_seq == seq:
        return True
    return claim.holding is not None and job.id not in claim.holding and lease.claim_seq < seq


class Scheduler:
    name = "scheduler"

    def __init__(self) -> None:
        self._queue: list[tuple[datetime, UUID]] = []
        self._queued: set[UUID] = set()
        self.policy = load_policy()
        self._last_claim: dict[str, datetime] = {}
        # Jobs a claim handled concurrently is granting right now: another claim passes them by
        # rather than race its own process to the same version (a lost race is still a publish
        # every core subscriber of the job's subject sees).
        self._granting: set[UUID] = set()
        self.ctx: Context

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        for job in ctx.views.jobs.values():
            self._track(job)
        ctx.views.listeners.append(lambda _e, job, _a: self._track(job) if job else None)
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(bus.consume, key=_ordering_key, give_up=partial(give_up, ctx)),
                ctx.js,
                topology.SCHEDULER_CONSUMER,
                throttle.guard(ctx, topology.SCHEDULER_CONSUMER.durable, self.handle),
            )
            task_status.started()

    def _track(self, job: Job) -> None:
        if job.status == "queued" and job.id not in self._queued:
            self._queued.add(job.id)
            bisect.insort(self._queue, (job.created_on, job.id))
        elif job.status != "queued" and job.id in self._queued:
            self._queued.discard(job.id)
            self._queue.remove((job.created_on, job.id))

    async def handle(self, msg: Msg) -> None:
        if msg.subject == topology.REQUEST_SUBJECT:
            # The request opens the job's trace (under the submitter's, when it sent one).
            with telemetry.span("scheduler request", headers=msg.headers):
                await self.on_request(msg)
        elif msg.subject.startswith(f"{topology.INPUT_ROOT}.op."):
            verb = msg.subject.rsplit(".", 1)[-1]
            named = telemetry.names_in(msg.data).job_id
            job = self.ctx.views.jobs.get(named) if named is not None else None
            with telemetry.span(
                f"scheduler {verb}", parent=job.trace if job else None, headers=msg.headers, job_id=named
            ):
                await self.on_operator(msg, verb)
        else:
            parsed = topology.parse_agent_subject(msg.subject)
            with telemetry.span(
                f"scheduler {parsed[1] if parsed else 'input'}",
                headers=msg.headers,
                agent=parsed[0] if parsed else None,
            ):
                if parsed is None:  # the malformed agent subjects are ours to refuse
                    await self.on_malformed(msg)
                    return
                agent, verb = parsed
                if verb == "register":
                    await self.on_register(msg, agent)
                else:
                    await self.on_claim(msg, agent)

    async def on_malformed(self, msg: Msg) -> None:
        sender = topology.input_agent(msg.subject) or ""
        error = FieldError(
            path="subject",
            message=f"{msg.subject} does not parse: agent inputs go on "
            f"{topology.INPUT_ROOT}.agent.<name>.<verb>, and agent names have no dots",
        )
        await reject_input(self.ctx, msg, [error], sender)

    async def on_request(self, msg: Msg) -> None:
        request = await decode_or_reject(self.ctx, msg, JobRequest, also=self._contract_rules)
        if request is None:
            return
        errors = [
            FieldError(path=p, message=m)
            for p, m in semantic_errors(request.contract, now(), max_level=self.policy.top_level)
        ]
        if errors:
            await reject_input(self.ctx, msg, errors, sender=request.submitter)
            return
        job_id = job_id_for(request.idempotency_key)
        telemetry.annotate(job_id=job_id)
        digest = request_digest(request)
        if job_id not in self.ctx.views.jobs:
            event = JobRequested(
                originator_id=job_id,
                originator_version=1,
                idempotency_key=request.idempotency_key,
                kind=request.kind,
                contract=request.contract,
                submitter=request.submitter,
                input_seq=input_seq(msg),
                request_digest=digest,
                trace=telemetry.current_traceparent(),
            )
            try:
                await self.ctx.save(event)
            except IntegrityError:  # the same key raced in through another replica or a redelivery
                await self.ctx.reload_job(job_id)
            else:
                telemetry.instruments().jobs.add(1, {"state": "requested"})
                await answer(self.ctx, msg, Accepted(job_id=job_id))
                return
        await self._repeated_key(msg, request, digest, self.ctx.views.jobs[job_id])

    def _contract_rules(self, data: bytes, type_errors: list[FieldError]) -> list[FieldError]:
        """The contract's rules on a request that has type errors, for the parts that have types."""
        if any(e.path == "$" for e in type_errors):
            return []  # not JSON, too large, or wrong as a whole: there are no parts to check
        raw = msgspec.json.decode(data)  # decoded once already by the typed decode's fallback
        contract = raw.get("contract") if isinstance(raw, dict) else None
        return [
            FieldError(path=p, message=m)
            for p, m in partial_semantic_errors(contract, now(), max_level=self.policy.top_level)
        ]

    async def _repeated_key(self, msg: Msg, request: JobRequest, digest: str, first: Job) -> None:
        """The same key and body is the same job (a retry); the same key with another body is refused."""
        # Recomputed from the job as recorded, so events from before digests were kept compare too.
        recorded = request_digest(
            JobRequest(
                idempotency_key=first.idempotency_key,
                kind=first.kind,
                contract=first.contract,
                submitter=first.submitter,
            )
        )
        if recorded == digest:
            await answer(self.ctx, msg, Accepted(job_id=first.id, duplicate=True))
            return
        error = FieldError(
            path="$.idempotency_key",
            message=(
                f"idempotency key {request.idempotency_key!r} already names job {first.id}, "
                f"requested with a different body (sha256 {recorded[:16]}, this one {digest[:16]})"
            ),
        )
        await reject_input(self.ctx, msg, [error], sender=request.submitter, job_id=first.id)

    async def on_register(self, msg: Msg, name: str) -> None:
        reg = await decode_or_reject(self.ctx, msg, Register, sender=name)
        if reg is None:
            return
        for _ in range(5):
            agent = self.ctx.views.agents.get(name)
            event = AgentRegistered(
                originator_id=agent_id_for(name),
                originator_version=agent.version + 1 if agent else 1,
                name=name,
                max_concurrent=reg.max_concurrent,
                kinds=reg.kinds,
                level=agent.level if agent else 0,
            )
            try:
                await self.ctx.save(event)
                break
            except IntegrityError:
                await self.ctx.agent_from_store(name)
        await answer(self.ctx, msg, Accepted(detail=f"agent {name} registered"))

    async def on_claim(self, msg: Msg, name: str) -> None:
        claim = await decode_or_reject(self.ctx, msg, Claim, sender=name)
        if claim is None:
            return
        at = now()
        if claim.sent_at is not None and claim.sent_at + timedelta(seconds=claim.wait_s) < at:
            # Its sender stopped waiting: a grant now would be a lease nobody holds.
            await answer(self.ctx, msg, NoWork(detail="claim arrived after its wait"))
            return
        self._last_claim[name] = at
        agent = self.ctx.views.agents.get(name) or await self.ctx.agent_from_store(name)
        if agent is None:
            error = FieldError(
                path="$", message=f"agent {name} is not registered (the store has no such agent)"
            )
            await reject_input(self.ctx, msg, [error], name)
            return
        if agent.standing != "active":
            agent = await self.ctx.agent_from_store(name) or agent  # never refuse on a lagging view
        if agent.standing != "active":
            await reject_input(
                self.ctx,
                msg,
                [FieldError(path="$", message=f"agent {name} is {agent.standing}: {agent.standing_reason}")],
                name,
            )
            return
        verdict = await self._lease_for(agent, claim, at, input_seq(msg))
        if isinstance(verdict, NoWork) and await self.ctx.view_current():
            # "No work" rests on what the view lacks: decide again once it holds what the store
            # held when the claim arrived (after an outage the view catches up first).
            agent = self.ctx.views.agents.get(name) or agent
            verdict = await self._lease_for(agent, claim, at, input_seq(msg))
        await answer(self.ctx, msg, verdict)

    async def _lease_for(self, agent: Agent, claim: Claim, at: datetime, seq: int) -> LeaseGrant | NoWork:
        name = agent.name
        unknown = await self._unknown_lease(name, claim, seq)
        if unknown is not None:
            return await self._grant_again(unknown)
        held = self.ctx.views.live_leases_of(name)
        # The agent's own limit, capped by what its autonomy level allows.
        limit = min(agent.max_concurrent, self.policy.at(agent.level).max_leases)
        if held >= limit:
            return NoWork(detail=f"agent {name} holds {held} of {limit} leases (level {agent.level})")
        kinds = set(claim.kinds or agent.kinds)
        for _created, job_id in list(self._queue):
            job = self.ctx.views.jobs[job_id]
            if job.status != "queued":  # reloaded after a lost race: no longer runnable
                self._track(job)
                continue
            if job_id in self._granting:
                continue
            if kinds and job.kind not in kinds:
                continue
            if job.contract.required_level > agent.level:
                continue
            if self._failed_by(job, name) and self._someone_else_for(job, name, at):
                continue
            deadline = job.contract.stopping.deadline
            if deadline is not None and deadline <= at:
                continue  # the reconciler tombstones it
            grant = await self._grant(job, name, at, seq)
            if grant is not None:
                return grant
        return NoWork(detail="no runnable job for this agent")

    async def _unknown_lease(self, name: str, claim: Claim, seq: int) -> Job | None:
        """A job whose live lease `name` holds without knowing it: granted on this very claim
        (delivered again after a broker restart lost its ack), or on an earlier claim whose
        answer never reached the agent (its claim says it does not hold it). Handed back, it is
        worked; left alone, it would expire and spend an attempt. Only a lease with nothing
        proposed under it yet, as the store has it (the view may not hold the proposal)."""
        for job in list(self.ctx.views.jobs.values()):
            if not _unknown_to(job, name, claim, seq):
                continue
            stored = await self.ctx.job_from_store(job.id)
            if stored is not None and _unknown_to(stored, name, claim, seq):
                return stored
        return None

    async def _grant_again(self, job: Job) -> LeaseGrant:
        lease = job.live_lease
        assert lease is not None
        log.info(
            "handing lease %d of job %s back to %s (its grant was not received)",
            lease.epoch,
            job.id,
            lease.agent,
        )
        return LeaseGrant(
            job_id=job.id,
            kind=job.kind,
            epoch=lease.epoch,
            expires_at=lease.expires_at,
            ttl_s=lease.ttl_s,
            heartbeat_interval_s=job.contract.stopping.heartbeat_interval_s,
            contract=job.contract,
            previous_attempts=await self._previous_attempts(job.id, lease.epoch),
        )

    @staticmethod
    def _failed_by(job: Job, name: str) -> bool:
        """Did `name` lose an attempt at this job since its last fresh start?"""
        return any(
            lease.agent == name and lease.ended not in ("", "completed") and lease.epoch > job.attempt_base
            for lease in job.leases
        )

    def _someone_else_for(self, job: Job, name: str, at: datetime) -> bool:
        """Is another agent, asking for work lately, able to take this job? A retry prefers it:
        the agent that failed a job tends to fail it the same way (the liar keeps lying). With
        no one else around, the same agent gets it again, so no job starves."""
        recent = at - timedelta(seconds=RECENT_CLAIM_S)
        for other, seen in self._last_claim.items():
            if other == name or seen < recent:
                continue
            agent = self.ctx.views.agents.get(other)
            if (
                agent is not None
                and agent.standing == "active"
                and agent.level >= job.contract.required_level
                and (not agent.kinds or job.kind in agent.kinds)
                and not self._failed_by(job, other)
            ):
                return True
        return False

    async def _grant(self, job: Job, agent: str, at: datetime, claim_seq: int) -> LeaseGrant | None:
        # A child of what made the job runnable, not of the claim (an agent's, about no job yet):
        # the claim's span is linked.
        with telemetry.span(
            "scheduler grant",
            parent=job.trace,
            link=telemetry.current_traceparent(),
            job_id=job.id,
            agent=agent,
            epoch=job.attempts + 1,
        ):
            stopping = job.contract.stopping
            expires = at + timedelta(seconds=stopping.lease_ttl_s)
            event = LeaseGranted(
                originator_id=job.id,
                originator_version=job.version + 1,
                agent=agent,
                epoch=job.attempts + 1,
                ttl_s=stopping.lease_ttl_s,
                expires_at=expires,
                claim_seq=claim_seq,
                timestamp=at,
                trace=telemetry.current_traceparent(),
            )
            self._granting.add(job.id)
            try:
                await self.ctx.save(event)
            except IntegrityError:
                await self.ctx.reload_job(job.id)  # another replica moved it first
                self._track(self.ctx.views.jobs[job.id])
                return None
            finally:
                self._granting.discard(job.id)
        return LeaseGrant(
            job_id=job.id,
            kind=job.kind,
            epoch=event.epoch,
            expires_at=expires,
            ttl_s=stopping.lease_ttl_s,
            heartbeat_interval_s=stopping.heartbeat_interval_s,
            contract=job.contract,
            previous_attempts=await self._previous_attempts(job.id, event.epoch),
        )

    async def _previous_attempts(self, job_id: UUID, epoch: int) -> list[PreviousAttempt]:
        """A retry's grant tells how the earlier attempts ended (one read of the job, retries only)."""
        if epoch <= 1:
            return []
        events = await anyio.to_thread.run_sync(self.ctx.app.events_of, job_id)
        return previous_attempts(events, epoch)

    async def on_operator(self, msg: Msg, verb: str) -> None:
        cmd = await decode_or_reject(self.ctx, msg, OperatorCommand)
        if cmd is None:
            return
        if cmd.job_id is None:
            await reject_input(self.ctx, msg, [FieldError(path="$.job_id", message=f"{verb} needs a job_id")])
            return
        for _ in range(5):
            job = self.ctx.views.jobs.get(cmd.job_id) or await self.ctx.job_from_store(cmd.job_id)
            if job is None:
                await reject_input(self.ctx, msg, [missing("$.job_id", f"job {cmd.job_id}")])
                return
            event: Event
            if verb == "requeue":
                if job.status not in ("tombstoned", "cancelled"):
                    await reject_input(
                        self.ctx,
                        msg,
                        [
                            FieldError(
                                path="$.job_id", message=f"job is {job.status}; only a dead job is requeued"
                            )
                        ],
                    )
                    return
                event = JobRequeued(
                    originator_id=job.id,
                    originator_version=job.version + 1,
                    reason=cmd.reason,
                    by=cmd.operator,
                    fresh_attempts=True,
                )
            else:
                if job.terminal:
                    await reject_input(
                        self.ctx, msg, [FieldError(path="$.job_id", message=f"job is already {job.status}")]
                    )
                    return
                event = JobCancelled(
                    originator_id=job.id,
                    originator_version=job.version + 1,
                    reason=cmd.reason,
                    by=cmd.operator,
                )
            try:
                await self.ctx.save(event)
            except IntegrityError:
                await self.ctx.reload_job(job.id)
                continue
            await answer(self.ctx, msg, Accepted(job_id=job.id, detail=f"{verb} recorded"))
            return
