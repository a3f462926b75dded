"""Checker: proposals in, invariant verdicts and one decision out. Agents propose; this decides.

For each proposal (stored in the input stream exactly as received) it fences the sender's lease,
records `proposal.submitted` (content hash, input position, payload object), runs every required
invariant and records each verdict, then decides: `proposal.accepted` when every check passed and
the agent's authority at that moment allows the effect; otherwise `proposal.rejected` naming every
violation, atomically with the job's requeue or tombstone (the attempt is spent).

A proposal decided at once (no slow check, no approval) is one save, so one stored message:
its `proposal.submitted`, its verdicts and its decision. Before a slow check, what is drafted so
far (the submission first) is saved on its own, so the lease stops ticking and a crash during
the check re-runs only that check. The sender is answered once its submission is stored.

The input message is acked only after the decision, so a crash mid-check redelivers it; the
proposal id is derived from its stream position, and checks already recorded for it are not run
again (a crash before the submission was stored admits the proposal afresh). A contract with
`approval_required` waits after its checks for an operator's `warden approve|deny PROPOSAL`
(handled here too, recorded with who and why).

Every rule (admit or fence, record, decide, approve, deny) is a pure function in
shared.decide.proposals; the handlers here decode, load, run the invariants, decide, save and
reply, and every lost race goes through shared.decide.retry.
"""

from __future__ import annotations

import logging
import traceback
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from uuid import UUID

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from shared import bus, invariants, proposals, telemetry, throttle, topology
from shared.aggregates import Agent, Job, Lease, ProposalState, project_job
from shared.decide import Refusal, after, retry
from shared.decide import proposals as decide
from shared.events import Event, InvariantChecked, ProposalSubmitted, proposal_id_for
from shared.handling import answer, decode_or_reject, give_up, input_seq, reject_input
from shared.invariants import Invariant, Subject, Verdict
from shared.messages import Accepted, OperatorCommand, Propose, Rejected
from shared.policy import Policy, load_policy
from shared.runtime import Context
from shared.validation import FieldError, missing

log = logging.getLogger("warden.checker")

# How many proposals of ended jobs stay known, so a late approve or deny of one is answered
# with what became of it rather than "no such proposal".
ENDED_PROPOSALS_KEPT = 10_000

# The proposal with its payload, or why the payload cannot be used.
Resolution = tuple[proposals.Resolved | None, str]

OperatorRule = Callable[[Job, ProposalState, OperatorCommand], Awaitable[decide.Decision | Refusal]]


class Checker:
    name = "checker"

    def __init__(
        self, registry: invariants.Registry | None = None, *, ended_kept: int = ENDED_PROPOSALS_KEPT
    ) -> None:
        # Loaded at start so a misconfigured WARDEN_INVARIANTS fails `warden run`, not a proposal.
        self.registry = registry or invariants.load()
        # One lock per job with a proposal in hand; it goes when no handler holds or awaits it.
        self._locks: dict[UUID, anyio.Lock] = {}
        # The job of each proposal of a live job (an operator names only the proposal); a job's
        # entries move to the bounded `_ended` when it ends.
        self._proposal_job: dict[UUID, UUID] = {}
        self._ended: OrderedDict[UUID, UUID] = OrderedDict()
        self._ended_kept = ended_kept
        self._operator_rules: dict[str, OperatorRule] = {"approve": self._approve, "deny": self._deny}
        self.ctx: Context

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        for job in ctx.views.jobs.values():
            self._index(job)
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

    # --- what it keeps per job -------------------------------------------------------------

    def _on_event(self, event: Event | None, job: Job | None, _agent: object) -> None:
        if job is not None and (event is None or isinstance(event, ProposalSubmitted) or job.terminal):
            self._index(job)

    def _index(self, job: Job) -> None:
        if not job.terminal:
            for state in job.proposal_log:
                self._proposal_job[state.id] = job.id
            return
        for state in job.proposal_log:
            self._proposal_job.pop(state.id, None)
            self._ended[state.id] = job.id
            self._ended.move_to_end(state.id)
        while len(self._ended) > self._ended_kept:
            self._ended.popitem(last=False)

    def _job_of(self, proposal_id: UUID) -> UUID | None:
        return self._proposal_job.get(proposal_id) or self._ended.get(proposal_id)

    @asynccontextmanager
    async def _exclusive(self, job_id: UUID) -> AsyncIterator[None]:
        """One handler at a time per job; the lock is dropped once nobody holds or awaits it."""
        lock = self._locks.setdefault(job_id, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            # Released to a waiter, it is still locked; otherwise nobody needs it any more.
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(job_id, None)

    async def _job(self, job_id: UUID) -> Job | None:
        # A job that ended may have left the view (a late approval, a redelivered proposal).
        return await self.ctx.job(job_id)

    # --- routing ---------------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        named = telemetry.names_in(msg.data)
        if msg.subject.startswith(f"{topology.INPUT_ROOT}.op."):
            verb = msg.subject.rsplit(".", 1)[-1]
            # An approval or denial is the next step of the proposal's own span (a job the
            # command names is only a span's parent here: the handler checks it holds the proposal).
            job_id = (self._job_of(named.proposal_id) if named.proposal_id else None) or named.job_id
            job = self.ctx.views.job(job_id) if job_id else None
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
        job = self.ctx.views.job(named.job_id) if named.job_id else None
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
        async with _in_progress(msg), self._exclusive(body.job_id):
            await retry(
                partial(self._propose, msg, agent, body),
                partial(self.ctx.reload_job, body.job_id),
                what=f"the checker's record on job {body.job_id}",
            )

    async def _propose(self, msg: Msg, agent: str, body: Propose) -> None:
        pid = proposal_id_for(msg.metadata.stream, input_seq(msg))
        telemetry.annotate(proposal_id=pid)
        at = self.ctx.clock()
        job = await self._job(body.job_id)
        state = job.proposal(pid) if job is not None else None
        if state is None:  # first delivery (a redelivery finds its proposal already recorded)
            arrived = await self._arrive(msg, agent, body, job, pid, at)
            if arrived is None:
                return  # refused or fenced: recorded and answered
            record, state, (resolved, problem) = arrived
        else:
            record = _Record(self.ctx, msg, body.job_id, pid, [])
            resolved, problem = await self._resolve(agent, body)
            await record.answer("checking" if state.status == "submitted" else state.status)
        job = record.ahead(job)
        if state.status != "submitted":
            return  # decided before a crash; the redelivery has nothing left to do
        early = decide.before_checks(job, state, None if resolved else problem, at)
        if early is not None:
            await self._save_decision(record, state, early, self.name)
            return
        assert resolved is not None
        await self._check_and_decide(record, job, state, resolved.proposal, msg.metadata.timestamp or at)

    async def _arrive(
        self, msg: Msg, agent: str, body: Propose, job: Job | None, pid: UUID, at: datetime
    ) -> tuple[_Record, ProposalState, Resolution] | None:
        """Admit a proposal and draft its record as received (saved with its first verdicts);
        None once it is refused or fenced."""
        seq = input_seq(msg)
        refused = decide.admit(job, body.job_id, agent, body.epoch, input_seq=seq, at=at)
        if isinstance(refused, Refusal):
            await reject_input(self.ctx, msg, refused.errors, agent)
            return None
        if refused is not None:
            await self.ctx.save(*refused.events)
            if refused.why == "lease":
                telemetry.instruments().rejected_inputs.add(1, {"subject": "propose", "fenced": "yes"})
            await answer(self.ctx, msg, Rejected(errors=refused.refusal.errors))
            return None
        assert job is not None
        resolved, problem = await self._resolve(agent, body)
        # A refused upload is recorded with the size it declared.
        size = resolved.object_size if resolved else body.payload.size if body.payload else 0
        received = decide.Received(
            proposal_id=pid,
            agent=agent,
            epoch=body.epoch,
            input_seq=seq,
            content_hash=proposals.sha256(msg.data),
            size=len(msg.data) + size,
            effect=body.effect,
            payload_object=resolved.object_name if resolved else "",
            payload_hash=resolved.object_hash if resolved else "",
            record=resolved.record if resolved else "",
        )
        record = _Record(self.ctx, msg, job.id, pid, decide.submit(job, received, at))
        state = record.ahead(job).proposal(pid)
        assert state is not None
        return record, state, (resolved, problem)

    async def _resolve(self, agent: str, body: Propose) -> Resolution:
        try:
            return await proposals.resolve(self.ctx.js, agent, body), ""
        except proposals.PayloadProblem as exc:
            return None, str(exc)

    async def _check_and_decide(
        self, record: _Record, job: Job, state: ProposalState, proposal: Propose, received_at: datetime
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
            branch=decide.branch(policy, level, state.agent, job),
            policy=policy,
        )
        judged: list[decide.Judgement] = []
        # Verdicts of cheap checks wait to be appended with the decision, in one atomic write;
        # before a slow check they are appended on their own, so a crash during it re-runs
        # only that check.
        unsaved: list[InvariantChecked] = []
        for name in invariants.required(policy, level, job):
            recorded = state.check(name)
            if recorded is not None:
                judged.append(decide.Judgement(invariant=name, verdict=recorded.verdict, recorded=True))
                continue
            inv = self.registry.get(name)
            expensive = _expensive(inv, subject)
            skipped = decide.not_run(name, expensive, judged)
            if skipped is not None:
                judged.append(skipped)
                continue
            if expensive and (unsaved or record.unsaved):
                await self._save_verdicts(record, job.id, unsaved)
                unsaved = []
            with telemetry.span(f"checker invariant {name}", invariant=name, proposal_id=state.id):
                verdict, version = await self._run(inv, name, subject)
                telemetry.annotate(verdict=verdict.verdict)
                check = decide.verdict(
                    job,
                    state.id,
                    name,
                    version,
                    verdict.verdict,
                    verdict.evidence,
                    trace=telemetry.current_traceparent(),
                    at=self.ctx.clock(),
                )
            if expensive:
                await self._save_verdicts(record, job.id, [check])
            else:
                unsaved.append(check)
            reason = verdict.evidence.get("reason") or ""
            judged.append(decide.Judgement(invariant=name, verdict=verdict.verdict, reason=str(reason)))
        current = record.ahead(await self._job(job.id))
        assert current is not None
        state = current.proposal(state.id) or state
        standing = await self._standing(current, state, policy)
        decided = decide.check_and_decide(
            current, state, judged, agent=standing, policy=policy, at=self.ctx.clock(), unsaved=unsaved
        )
        await self._save_decision(record, state, decided, self.name)

    async def _save_verdicts(self, record: _Record, job_id: UUID, drafts: list[InvariantChecked]) -> None:
        job = record.ahead(await self._job(job_id))
        await record.save(after(job, *drafts), "checking")

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

    async def _standing(self, job: Job, state: ProposalState, policy: Policy) -> Agent | None:
        """The agent as its authority stands now. A refusal is never read off a lagging view:
        when the view's copy would refuse, the agent is read from the store."""
        agent = self.ctx.views.agents.get(state.agent)
        if decide.authority_refusals(job, state, policy, agent):
            agent = await self.ctx.agent_from_store(state.agent)
        return agent

    async def _save_decision(
        self, record: _Record | None, state: ProposalState, decided: decide.Decision, by: str
    ) -> None:
        if record is not None:
            await record.save(decided.events, decided.outcome)
        elif decided.events:
            await self.ctx.save(*decided.events)
        if decided.outcome == "awaiting approval":
            log.info("proposal %s passed its checks; waiting for an operator's approval", state.id)
            return
        telemetry.annotate(verdict=decided.outcome)
        telemetry.instruments().decisions.add(1, {"decision": decided.outcome})
        log.info("proposal %s %s (%s): %s", state.id, decided.outcome, by, decided.detail)

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
        # The job the command names (the CLI reads it from the log) is loaded from the store, so a
        # proposal of a job ended long ago is found; without one, only the bounded index knows.
        job_id = cmd.job_id or self._job_of(cmd.proposal_id)
        if job_id is None:
            await reject_input(
                self.ctx, msg, [missing("$.proposal_id", f"proposal {cmd.proposal_id}")], cmd.operator
            )
            return
        outcome = await retry(
            partial(self._operate, self._operator_rules[verb], cmd, job_id),
            partial(self.ctx.reload_job, job_id),
            what=f"operator {verb} of proposal {cmd.proposal_id}",
        )
        if isinstance(outcome, Refusal):
            await reject_input(self.ctx, msg, outcome.errors, cmd.operator)
        else:
            await answer(
                self.ctx, msg, Accepted(job_id=job_id, proposal_id=cmd.proposal_id, detail=outcome.detail)
            )

    async def _operate(
        self, rule: OperatorRule, cmd: OperatorCommand, job_id: UUID
    ) -> decide.Decision | Refusal:
        assert cmd.proposal_id is not None
        job = await (self.ctx.job_from_store(job_id) if cmd.job_id else self._job(job_id))
        state = decide.named(job, cmd.proposal_id, cmd.job_id)
        if isinstance(state, Refusal):
            return state
        assert job is not None  # named() found the proposal in it
        decided = await rule(job, state, cmd)
        if isinstance(decided, decide.Decision):
            await self._save_decision(None, state, decided, cmd.operator)
        return decided

    async def _deny(self, job: Job, state: ProposalState, cmd: OperatorCommand) -> decide.Decision | Refusal:
        return decide.deny(job, state, operator=cmd.operator, reason=cmd.reason, at=self.ctx.clock())

    async def _approve(
        self, job: Job, state: ProposalState, cmd: OperatorCommand
    ) -> decide.Decision | Refusal:
        policy = load_policy()
        agent = self.ctx.views.agents.get(state.agent)
        required = invariants.required(policy, agent.level if agent else 0, job)
        return decide.approve(
            job,
            state,
            operator=cmd.operator,
            reason=cmd.reason,
            required=required,
            agent=await self._standing(job, state, policy),
            policy=policy,
            at=self.ctx.clock(),
        )


class _Record:
    """What this delivery of a proposal has drafted and not yet saved: its `proposal.submitted`
    (none on a redelivery, which finds it stored). It goes with the next save of the job, the
    decision's when no check is slow, so a proposal decided at once is one stored message; the
    sender is answered once it is stored, never before."""

    def __init__(self, ctx: Context, msg: Msg, job_id: UUID, proposal_id: UUID, events: list[Event]) -> None:
        self.ctx, self.msg, self.job_id, self.proposal_id = ctx, msg, job_id, proposal_id
        self.unsaved = events

    def ahead(self, job: Job | None) -> Job:
        """The job as it stands once the unsaved drafts are stored: what the checks and the
        decision are numbered after. Drafted on an older version, they fail their save's
        expected sequence, and the retry admits the proposal afresh."""
        ahead = project_job(job, self.unsaved) if self.unsaved else job
        assert ahead is not None
        return ahead

    async def save(self, events: list[Event], status: str) -> None:
        if not events and not self.unsaved:
            return
        await self.ctx.save(*self.unsaved, *events)
        first, self.unsaved = self.unsaved, []
        if first:
            log.info("proposal %s submitted for job %s", self.proposal_id, self.job_id)
            await self.answer(status)

    async def answer(self, status: str) -> None:
        detail = f"proposal {self.proposal_id} submitted; {status}"
        await answer(
            self.ctx, self.msg, Accepted(job_id=self.job_id, proposal_id=self.proposal_id, detail=detail)
        )


def _lease_of(job: Job, epoch: int) -> Lease | None:
    return next((lease for lease in job.leases if lease.epoch == epoch), None)


def _expensive(inv: Invariant | None, subject: Subject) -> bool:
    judge = getattr(inv, "is_expensive", None)
    return bool(judge(subject)) if judge is not None else bool(getattr(inv, "expensive", False))


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
