"""Checker: proposals in, invariant verdicts and one decision out. Agents propose; this decides.

For each proposal (stored in the input stream exactly as received) it fences the sender's lease,
records `proposal.submitted` (content hash, input position, payload object), runs every required
invariant and records each verdict, then decides: `proposal.accepted` when every check passed and
the agent's authority at that moment allows the effect; otherwise `proposal.rejected` naming every
violation, atomically with the job's requeue or tombstone (the attempt is spent).

The input message is acked only after the decision, so a crash mid-check redelivers it; the
proposal id is derived from its stream position, and checks already recorded for it are not run
again. A contract with `approval_required` waits after its checks for an operator's
`warden approve|deny PROPOSAL` (handled here too, recorded with who and why).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from uuid import UUID

import anyio
from anyio.abc import TaskStatus
from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg

from shared import bus, invariants, proposals, telemetry, throttle, topology
from shared.aggregates import Agent, Job, Lease, ProposalState
from shared.events import (
    Event,
    InvariantChecked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    now,
    proposal_id_for,
)
from shared.handling import answer, decode_or_reject, give_up, input_seq, known_job, reject_input
from shared.invariants import Invariant, Subject, Verdict
from shared.lifecycle import after_attempt, fence
from shared.messages import Accepted, OperatorCommand, Propose, Rejected
from shared.policy import Policy, load_policy
from shared.runtime import Context
from shared.validation import FieldError, missing

log = logging.getLogger("warden.checker")

_RETRIES = 10


class Checker:
    name = "checker"

    def __init__(self, registry: invariants.Registry | None = None) -> None:
        # Loaded at start so a misconfigured WARDEN_INVARIANTS fails `warden run`, not a proposal.
        self.registry = registry or invariants.load()
        self._locks: dict[UUID, anyio.Lock] = {}
        self._proposal_job: dict[UUID, UUID] = {}
        self.ctx: Context

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        for job in ctx.views.jobs.values():
            for state in job.proposal_log:
                self._proposal_job[state.id] = job.id
        ctx.views.listeners.append(self._on_event)
        async with anyio.create_task_group() as tg:
            # Every message gets its own handler at once (one key each): one waiting for its job's
            # lock is already in hand and kept alive by in_progress(), never queued unseen.
            await tg.start(
                partial(
                    bus.consume,
                    ctx.js,
                    topology.CHECKER_CONSUMER,
                    throttle.guard(ctx, topology.CHECKER_CONSUMER.durable, self.handle),
                    batch=8,
                    concurrency=16,
                    key=lambda m: str(m.metadata.sequence.stream),
                    give_up=partial(give_up, ctx),
                )
            )
            task_status.started()

    def _on_event(self, event: Event | None, job: Job | None, _agent: object) -> None:
        if isinstance(event, ProposalSubmitted) and job is not None:
            self._proposal_job[event.proposal_id] = job.id

    def _lock(self, job_id: UUID) -> anyio.Lock:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = anyio.Lock()
        return lock

    async def handle(self, msg: Msg) -> None:
        named = telemetry.names_in(msg.data)
        if msg.subject.startswith(f"{topology.INPUT_ROOT}.op."):
            verb = msg.subject.rsplit(".", 1)[-1]
            # An approval or denial is the next step of the proposal's own span.
            job_id = self._proposal_job.get(named.proposal_id) if named.proposal_id else None
            job = self.ctx.views.jobs.get(job_id) if job_id else None
            state = job.proposal(named.proposal_id) if job and named.proposal_id else None
            with telemetry.span(
                f"checker {verb}",
                parent=state.trace if state else None,
                headers=msg.headers,
                job_id=job_id,
                proposal_id=named.proposal_id,
            ):
                await self.on_operator(msg, verb)
            return
        parsed = topology.parse_agent_subject(msg.subject)
        assert parsed is not None, msg.subject  # the consumer's filter guarantees it
        job = self.ctx.views.jobs.get(named.job_id) if named.job_id else None
        with telemetry.span(
            "checker proposal",
            parent=job.trace_of(named.epoch) if job else None,  # the lease it was made under
            headers=msg.headers,
            job_id=named.job_id,
            agent=parsed[0],
            epoch=named.epoch,
        ):
            await self.on_propose(msg, parsed[0])

    # --- proposals -----------------------------------------------------------------------

    async def on_propose(self, msg: Msg, agent: str) -> None:
        body = await decode_or_reject(self.ctx, msg, Propose, sender=agent)
        if body is None:
            return
        if not await known_job(self.ctx, msg, body.job_id, agent):
            return
        async with _in_progress(msg), self._lock(body.job_id):
            for _ in range(_RETRIES):
                try:
                    await self._propose(msg, agent, body)
                    return
                except IntegrityError:
                    await self.ctx.reload_job(body.job_id)
            raise RuntimeError(f"job {body.job_id} kept changing under the checker")

    async def _propose(self, msg: Msg, agent: str, body: Propose) -> None:
        seq = input_seq(msg)
        pid = proposal_id_for(topology.INPUT_STREAM, seq)
        telemetry.annotate(proposal_id=pid)
        job = self.ctx.views.jobs[body.job_id]
        state = job.proposal(pid)
        if state is None:  # first delivery (a redelivery finds its proposal already recorded)
            fenced = await fence(self.ctx, msg, agent, "propose", job, body.epoch)
            if fenced is not None:
                await answer(
                    self.ctx, msg, Rejected(errors=[FieldError(path="$.epoch", message=fenced.reason)])
                )
                return
            if job.pending_proposal is not None:
                reason = f"proposal {job.pending_proposal} is already pending under lease {body.epoch}"
                await self.ctx.save(
                    MessageRejected(
                        originator_id=job.id,
                        originator_version=job.version + 1,
                        agent=agent,
                        epoch=body.epoch,
                        verb="propose",
                        reason=reason,
                        input_seq=seq,
                        current_epoch=body.epoch,
                    )
                )
                await answer(self.ctx, msg, Rejected(errors=[FieldError(path="$", message=reason)]))
                return
            resolved, problem = await self._resolve(agent, body)
            # A refused upload is recorded with the size it declared.
            size = resolved.object_size if resolved else body.payload.size if body.payload else 0
            await self.ctx.save(
                ProposalSubmitted(
                    originator_id=job.id,
                    originator_version=job.version + 1,
                    proposal_id=pid,
                    agent=agent,
                    epoch=body.epoch,
                    content_hash=proposals.sha256(msg.data),
                    size=len(msg.data) + size,
                    input_seq=seq,
                    effect=body.effect,
                    payload_object=resolved.object_name if resolved else "",
                    payload_hash=resolved.object_hash if resolved else "",
                    trace=telemetry.current_traceparent(),
                )
            )
            log.info("proposal %s submitted by %s for job %s", pid, agent, job.id)
            job = self.ctx.views.jobs[body.job_id]
            state = job.proposal(pid)
            assert state is not None
        else:
            resolved, problem = await self._resolve(agent, body)
        await answer(
            self.ctx,
            msg,
            Accepted(job_id=job.id, proposal_id=pid, detail=f"proposal {pid} submitted; checking"),
        )
        if state.status != "submitted":
            return  # decided before a crash; the redelivery has nothing left to do
        if job.terminal:
            await self._reject(job, state, [f"job is {job.status}: {job.reason}"], by=self.name)
            return
        if resolved is None:
            await self._reject(job, state, [f"payload: {problem}"], by=self.name)
            return
        received_at = msg.metadata.timestamp or now()
        await self._check_and_decide(job, state, resolved.proposal, received_at)

    async def _resolve(self, agent: str, body: Propose) -> tuple[proposals.Resolved | None, str]:
        try:
            return await proposals.resolve(self.ctx.js, agent, body), ""
        except proposals.PayloadProblem as exc:
            return None, str(exc)

    async def _check_and_decide(
        self, job: Job, state: ProposalState, proposal: Propose, received_at: datetime
    ) -> None:
        policy = load_policy()  # consulted at the moment of deciding: a demotion counts at once
        agent = self.ctx.views.agents.get(state.agent) or await self.ctx.agent_from_store(state.agent)
        level = agent.level if agent else 0
        subject = Subject(
            proposal_id=state.id,
            proposal=proposal,
            job=job,
            agent=agent,
            lease=_lease_of(job, state.epoch),
            received_at=received_at,
            branch=_branch(policy, level, state.agent, job),
            policy=policy,
        )
        violations: list[str] = []
        # Verdicts of cheap checks wait to be appended with the decision, in one atomic write;
        # before a slow check they are appended on their own, so a crash during it re-runs
        # only that check.
        pending: list[Event] = []
        checked = [c.invariant for c in state.checks]
        for name in invariants.required(policy, level, job):
            recorded = state.check(name)
            if recorded is not None:
                if recorded.verdict != "pass":
                    violations.append(f"{name}: {recorded.verdict} (recorded)")
                continue
            inv = self.registry.get(name)
            judge = getattr(inv, "is_expensive", None)
            expensive = bool(judge(subject)) if judge is not None else bool(getattr(inv, "expensive", False))
            if expensive and violations:
                violations.append(f"{name}: not run, an earlier invariant already failed")
                continue
            if expensive and pending:
                await self.ctx.save(*pending)
                pending = []
            with telemetry.span(f"checker invariant {name}", invariant=name, proposal_id=state.id):
                verdict, version = await self._run(inv, name, subject)
                telemetry.annotate(verdict=verdict.verdict)
                check = InvariantChecked(
                    originator_id=job.id,
                    originator_version=self.ctx.views.jobs[job.id].version + 1 + len(pending),
                    proposal_id=state.id,
                    invariant=name,
                    version=version,
                    verdict=verdict.verdict,
                    evidence=verdict.evidence,
                    trace=telemetry.current_traceparent(),
                )
            if expensive:
                await self.ctx.save(check)
            else:
                pending.append(check)
            checked.append(name)
            if not verdict.passed:
                violations.append(f"{name}: {verdict.evidence.get('reason') or verdict.verdict}")
        job = self.ctx.views.jobs[job.id]
        state = job.proposal(state.id) or state
        if violations:
            await self._reject(job, state, violations, by=self.name, prefix=pending)
            return
        if job.contract.approval_required:
            if pending:
                await self.ctx.save(*pending)
            log.info("proposal %s passed its checks; waiting for an operator's approval", state.id)
            return
        await self._authorise(
            job, state, by=self.name, reason="every required invariant passed", prefix=pending, checks=checked
        )

    async def _run(self, inv: Invariant | None, name: str, subject: Subject) -> tuple[Verdict, str]:
        if inv is None:
            return invariants.errored(
                f"no invariant named {name!r} is registered (known: {', '.join(self.registry.names)})"
            ), "?"
        try:
            return await inv.check(subject), inv.version
        except Exception as exc:
            log.exception("invariant %s raised on proposal %s", name, subject.proposal_id)
            return invariants.errored(
                f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:]
            ), inv.version

    # --- decisions -------------------------------------------------------------------------

    async def _authority_refusals(self, job: Job, state: ProposalState, policy: Policy) -> list[str]:
        """What the agent's standing and level, at this moment, say against the effect.

        A refusal is never read off a lagging view: before one, the agent is read from the store."""
        refusals = _refusals(job, state, policy, self.ctx.views.agents.get(state.agent))
        if refusals:
            refusals = _refusals(job, state, policy, await self.ctx.agent_from_store(state.agent))
        return refusals

    async def _authorise(
        self,
        job: Job,
        state: ProposalState,
        *,
        by: str,
        reason: str,
        prefix: Sequence[Event] = (),
        checks: list[str] | None = None,
    ) -> bool:
        """Accept unless the agent's authority forbids it now; True when accepted. `prefix`
        (check verdicts not yet appended) goes in the same atomic write."""
        policy = load_policy()
        refusals = await self._authority_refusals(job, state, policy)
        if refusals:
            await self._reject(job, state, refusals, by=by, reason=reason, prefix=prefix)
            return False
        agent = self.ctx.views.agents[state.agent]
        await self.ctx.save(
            *prefix,
            ProposalAccepted(
                originator_id=job.id,
                originator_version=job.version + 1 + len(prefix),
                proposal_id=state.id,
                checks=checks if checks is not None else [c.invariant for c in state.checks],
                by=by,
                reason=reason,
                effect=state.effect,
                branch=_branch(policy, agent.level, agent.name, job) if state.effect == "git.patch" else "",
                trace=telemetry.current_traceparent(),
            ),
        )
        telemetry.annotate(verdict="accepted")
        telemetry.instruments().decisions.add(1, {"decision": "accepted"})
        log.info("proposal %s accepted (%s)", state.id, by)
        return True

    async def _reject(
        self,
        job: Job,
        state: ProposalState,
        violations: list[str],
        *,
        by: str,
        reason: str = "",
        prefix: Sequence[Event] = (),
    ) -> None:
        """Reject, and spend the attempt: the job is requeued, or tombstoned when none is left."""
        base = job.version + len(prefix)
        events: list[Event] = [
            *prefix,
            ProposalRejected(
                originator_id=job.id,
                originator_version=base + 1,
                proposal_id=state.id,
                violations=violations,
                by=by,
                reason=reason,
                trace=telemetry.current_traceparent(),
            ),
        ]
        if not job.terminal:
            why = f"proposal {state.id} rejected: {'; '.join(violations)}"
            events.append(after_attempt(job, base + 2, why, now(), by=self.name))
        await self.ctx.save(*events)
        telemetry.annotate(verdict="rejected")
        telemetry.instruments().decisions.add(1, {"decision": "rejected"})
        log.info("proposal %s rejected (%s): %s", state.id, by, "; ".join(violations))

    # --- operator approvals ----------------------------------------------------------------

    async def on_operator(self, msg: Msg, verb: str) -> None:
        cmd = await decode_or_reject(self.ctx, msg, OperatorCommand)
        if cmd is None:
            return
        if cmd.proposal_id is None:
            await reject_input(
                self.ctx, msg, [FieldError(path="$.proposal_id", message=f"{verb} needs a proposal_id")]
            )
            return
        job_id = self._proposal_job.get(cmd.proposal_id)
        if job_id is None:
            await reject_input(
                self.ctx,
                msg,
                [missing("$.proposal_id", f"proposal {cmd.proposal_id}")],
                cmd.operator,
            )
            return
        for _ in range(_RETRIES):
            try:
                problem, detail = await self._operate(verb, cmd, job_id)
            except IntegrityError:
                await self.ctx.reload_job(job_id)
                continue
            if problem:
                await reject_input(
                    self.ctx, msg, [FieldError(path="$.proposal_id", message=problem)], cmd.operator
                )
            else:
                await answer(
                    self.ctx, msg, Accepted(job_id=job_id, proposal_id=cmd.proposal_id, detail=detail)
                )
            return
        raise RuntimeError(f"operator {verb} on {cmd.proposal_id} kept conflicting")

    async def _operate(self, verb: str, cmd: OperatorCommand, job_id: UUID) -> tuple[str, str]:
        """("", what happened) when recorded; (why not, "") when refused."""
        assert cmd.proposal_id is not None
        job = self.ctx.views.jobs[job_id]
        state = job.proposal(cmd.proposal_id)
        assert state is not None
        if state.status != "submitted":
            return f"proposal {state.id} is already {state.status}", ""
        who = f"{cmd.operator}: {cmd.reason}"
        if verb == "deny":
            await self._reject(job, state, [f"denied by {who}"], by=cmd.operator, reason=cmd.reason)
            return "", f"proposal {state.id} denied"
        if not job.contract.approval_required:
            return f"job {job.id} does not wait for approval; the checker decides it", ""
        if job.terminal:
            return f"job {job.id} is {job.status}", ""
        policy = load_policy()
        agent = self.ctx.views.agents.get(state.agent)
        pending = [
            n for n in invariants.required(policy, agent.level if agent else 0, job) if state.check(n) is None
        ]
        if pending:
            return f"checks still running ({', '.join(pending)}); approve once they have passed", ""
        if await self._authorise(job, state, by=cmd.operator, reason=cmd.reason):
            return "", f"proposal {state.id} approved by {cmd.operator}"
        return "", f"proposal {state.id} rejected: the agent's authority no longer allows it"


def _lease_of(job: Job, epoch: int) -> Lease | None:
    return next((lease for lease in job.leases if lease.epoch == epoch), None)


def _refusals(job: Job, state: ProposalState, policy: Policy, agent: Agent | None) -> list[str]:
    if agent is None:
        return [f"authority: agent {state.agent} is not registered (the store has no such agent)"]
    refusals: list[str] = []
    if agent.standing != "active":
        refusals.append(f"authority: agent {agent.name} is {agent.standing}: {agent.standing_reason}")
    refusal = policy.effect_refusal(agent.level, state.effect)
    if refusal:
        refusals.append(f"authority: {refusal}")
    if job.contract.required_level > agent.level:
        refusals.append(
            f"authority: the job needs level {job.contract.required_level}, {agent.name} is at {agent.level}"
        )
    return refusals


def _branch(policy: Policy, level: int, agent: str, job: Job) -> str:
    return policy.branch_for(level, agent, job.id, job.contract.target.branch)


@asynccontextmanager
async def _in_progress(msg: Msg) -> AsyncIterator[None]:
    """Keep pushing the message's ack deadline out while it is in hand (a CI run may be long)."""
    every = topology.CHECKER_CONSUMER.ack_wait_s / 3

    async def beat() -> None:
        while True:
            await anyio.sleep(every)
            await msg.in_progress()

    async with anyio.create_task_group() as tg:
        tg.start_soon(beat)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
