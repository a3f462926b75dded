"""Revoker: turns failure signals and operator commands into promotions, demotions, revocations,
lease revocations and rollback requests, each an event citing its evidence.

It folds each agent's authority record (shared/decide/agents.py) beside the process's one view,
from the view's own listener, and whenever a record changes appends what the policy calls for.
A revoked agent learns it on its next heartbeat (its leases end in the revocation's own save),
and anything it sends later under them is fenced and recorded.

Every decision is a pure rule (shared/decide): a handler loads the states a rule reads, asks
it, saves what it returns, and on a lost race reloads and asks again (`retry`).

Decisions about different agents run side by side: signals come in bursts (many leases expire
together), and one agent's save must not hold back another's revocation. Decisions about one
agent, automatic or an operator's, take that agent's turn, one at a time in the order they came.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from functools import partial
from uuid import UUID

import anyio
import msgspec
from anyio.abc import TaskStatus
from eventsourcing.persistence import OperationalError
from msgspec.structs import replace
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from shared import bus, telemetry, topology
from shared.aggregates import Agent, Job
from shared.decide import Contended, Refusal, retry
from shared.decide.agents import (
    Action,
    Authority,
    behind,
    change_level,
    due,
    fold,
    revoke,
    revoke_lease,
    rollback,
)
from shared.decide.operators import VERBS, Given, Verb
from shared.events import AgentRevoked, Event
from shared.handling import answer, decode_or_reject, give_up, reject_input
from shared.messages import Accepted, OperatorCommand
from shared.policy import load_policy
from shared.runtime import Context

log = logging.getLogger("warden.revoker")

# After a decision lost every race, the agent is decided again this much later.
CONTENDED_BACKOFF_S = 1.0
# What a read or save of the store raises when the store is slow or away, not when input is bad.
STORE_FAULTS = (OperationalError, NatsError, TimeoutError)
# Agents decided at once, at most: each mostly waits on a durable write, and the broker
# commits concurrent writes together (as the input consumers do).
MAX_DECIDING = 32


class _Named(msgspec.Struct):
    """Whom an operator command is about, read before it is validated: only to order it."""

    agent: str | None = None
    proposal_id: str | None = None


def _operator_key(msg: Msg) -> str:
    """One agent's commands in stream order, whatever their verbs; different agents' side by side.

    Hostile bytes name nothing and raise nothing: they keep the subject's order, and the handler
    records why they are refused."""
    named = _Named()
    if len(msg.data) <= topology.MAX_INPUT_BYTES:
        with suppress(msgspec.MsgspecError, RecursionError, ValueError):
            named = msgspec.json.decode(msg.data, type=_Named)
    if named.agent:
        return f"agent {named.agent}"
    if named.proposal_id:
        return f"proposal {named.proposal_id}"
    return str(msg.subject)


class Revoker:
    name = "revoker"

    def __init__(self) -> None:
        self.policy = load_policy()
        self.authority = Authority()
        self._dirty: set[str] = set()  # agents whose record changed since they were last decided
        self._deciding: set[str] = set()  # agents with a task deciding them
        self._turns: dict[str, anyio.Lock] = {}  # only while someone holds or awaits the turn
        self._tg: anyio.abc.TaskGroup | None = None
        self._slots: anyio.Semaphore  # made in `run`, in the loop it bounds
        # Aggregates a reload moved past versions the record never folded: (folded, reached].
        self._gaps: dict[UUID, tuple[int, int]] = {}
        self._wake = anyio.Event()
        self.ctx: Context

    def attach(self, ctx: Context) -> None:
        """Listen before the process's one fold starts, so the record sees the log from its start."""
        ctx.views.listeners.append(self._on_view)
        # Kept in the view's snapshot, so a restart folds only the tail into the record too.
        ctx.views.register("authority", self)

    def dump(self) -> bytes:
        return msgspec.msgpack.encode(self.authority)

    def load(self, data: bytes) -> Callable[[], None]:
        authority = msgspec.msgpack.decode(data, type=Authority)

        def adopt() -> None:
            self.authority = authority

        return adopt

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        if self._on_view not in ctx.views.listeners:
            raise RuntimeError("the revoker folds beside the view: attach it before the view is followed")
        self._slots = anyio.Semaphore(MAX_DECIDING)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._dirty.update(self.authority.agents)  # finish what a crash may have left undone
                for name in list(self._dirty):
                    self._start(name)
                tg.start_soon(self._gap_loop)
                await tg.start(
                    partial(bus.consume, key=_operator_key, give_up=partial(give_up, ctx)),
                    ctx.js,
                    topology.REVOKER_CONSUMER,
                    self.on_operator,
                )
                task_status.started()
        finally:
            self._tg = None

    # --- the record, folded beside the view -------------------------------------------------

    def _on_view(self, event: Event | None, job: Job | None, agent: Agent | None) -> None:
        if event is not None:
            self._fold(event)
            return
        # A state reloaded from the store may have moved past versions the view never folded
        # (another replica wrote them): the record reads those from the store.
        for reloaded in (job, agent):
            missed = behind(self.authority, reloaded) if reloaded is not None else None
            if reloaded is not None and missed is not None:
                self._gap(reloaded.id, *missed)

    def _gap(self, aggregate_id: UUID, folded: int, reached: int) -> None:
        known = self._gaps.get(aggregate_id)
        if known is not None:
            folded, reached = min(folded, known[0]), max(reached, known[1])
        self._gaps[aggregate_id] = (folded, reached)
        self._wake.set()

    def _fold(self, event: Event) -> None:
        changed = fold(self.authority, event, self.policy)
        if changed is not None:
            self._dirty.add(changed)
            self._start(changed)

    async def _fill_gaps(self) -> None:
        while self._gaps:
            aggregate_id, (folded, reached) = self._gaps.popitem()
            stored = await anyio.to_thread.run_sync(self.ctx.app.events_of, aggregate_id)
            for event in stored:
                if folded < event.originator_version <= reached:
                    self._fold(event)

    # --- what the policy calls for ----------------------------------------------------------

    def _start(self, name: str) -> None:
        """Decide the agent in a task of its own, unless one is deciding it already (that task
        sees the change: it decides again while the agent is dirty)."""
        if self._tg is not None and name not in self._deciding:
            self._deciding.add(name)
            self._tg.start_soon(self._decide_agent, name)

    async def _decide_agent(self, name: str) -> None:
        try:
            async with self._slots:
                while name in self._dirty:
                    self._dirty.discard(name)
                    try:
                        await self._fill_gaps()
                        async with self._turn(name):
                            decided = await self._decide(name)
                    except STORE_FAULTS as exc:
                        # The store did not answer (a busy loop, a broker restart): a fault
                        # to wait out, never a reason to end the service or drop the decision.
                        log.warning(
                            "deciding %s failed (%r); deciding again in %.0f s",
                            name,
                            exc,
                            CONTENDED_BACKOFF_S,
                        )
                        decided = False
                    if not decided:
                        self._later(name)
                        return
        finally:
            # No await between the loop's last look at `_dirty` and here: a change folded
            # after it starts a new task.
            self._deciding.discard(name)

    async def _decide(self, name: str) -> bool:
        """Carry out what the policy calls for now; False when a decision lost every race."""
        for action in due(self.authority.agents.get(name), self.policy):
            try:
                await retry(
                    partial(self._act, action),
                    partial(self._reload_for, action),
                    what=f"{action.kind} of {name}",
                )
            except Contended as exc:
                log.warning("%s; deciding again in %.0f s", exc, CONTENDED_BACKOFF_S)
                return False
        return True

    def _later(self, name: str) -> None:
        if self._tg is not None:
            self._tg.start_soon(self._decide_later, name)

    async def _decide_later(self, name: str) -> None:
        await anyio.sleep(CONTENDED_BACKOFF_S)
        self._dirty.add(name)
        self._start(name)

    async def _gap_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self._fill_gaps()
            except STORE_FAULTS as exc:
                log.warning(
                    "reading reloaded versions failed (%r); trying again in %.0f s", exc, CONTENDED_BACKOFF_S
                )
                await anyio.sleep(CONTENDED_BACKOFF_S)
                self._wake.set()

    @asynccontextmanager
    async def _turn(self, name: str) -> AsyncIterator[None]:
        """One decision about an agent at a time, in the order they asked (anyio's lock is
        first come, first served); the lock goes once nobody holds or awaits it."""
        lock = self._turns.get(name)
        if lock is None:
            lock = self._turns[name] = anyio.Lock()
        try:
            async with lock:
                yield
        finally:
            # A waiter is handed the lock on release, so an unlocked lock has none.
            if not lock.locked() and self._turns.get(name) is lock:
                del self._turns[name]

    async def _reload_for(self, action: Action) -> None:
        await self.ctx.agent_from_store(action.agent)
        for job_id in self._jobs_of(action):
            await self.ctx.job_from_store(job_id)

    def _jobs_of(self, action: Action) -> list[UUID]:
        if action.kind == "revoke":
            rec = self.authority.agents.get(action.agent)
            return list(rec.live_leases) if rec is not None else []
        job_id = action.job_id or self._job_of_proposal(action.proposal_id)
        return [job_id] if job_id is not None else []

    async def _act(self, action: Action) -> None:
        """Load what the action's rule reads, decide, save (a lost race raises IntegrityError)."""
        rec = self.authority.agents.get(action.agent)
        cause = rec.cause if rec is not None else ""
        revoked_by = (rec.revoked_by if rec is not None else "") or cause
        at = self.ctx.clock()
        match action.kind:
            case "revoke":
                agent = await self._agent(action.agent)
                if agent is None:
                    return
                leases = await self._jobs(self._jobs_of(action))
                decided = revoke(
                    agent,
                    leases,
                    reason=action.reason,
                    by=self.name,
                    at=at,
                    evidence=action.evidence,
                    signal_at=action.signal_at,
                )
                with telemetry.span("revoker revocation", parent=cause, agent=action.agent, action="revoke"):
                    if await self._save_decided(decided, action):
                        self._revoked(agent, action, at)
            case "promote" | "demote":
                agent = await self._agent(action.agent)
                if agent is None:
                    return
                decided = change_level(
                    agent,
                    action.level,
                    self.policy,
                    verb=action.kind,
                    reason=action.reason,
                    by="policy",
                    at=at,
                    evidence=action.evidence,
                    signal_at=action.signal_at,
                )
                with telemetry.span(f"revoker {action.kind}", parent=cause, agent=action.agent):
                    await self._save_decided(decided, action)
            case "revoke_lease":
                assert action.job_id is not None
                job = await self._job(action.job_id)
                decided = revoke_lease(
                    job, action.epoch, reason=action.reason, by=self.name, at=at, signal_at=action.signal_at
                )
                if isinstance(decided, Refusal):
                    # The lease already ended (expired, released): nothing to revoke, stop asking.
                    if rec is not None:
                        rec.live_leases.pop(action.job_id, None)
                    return
                assert job is not None
                # A lease's revocation stays in its job's trace, linked to the agent's.
                with telemetry.span(
                    "revoker revocation",
                    parent=job.trace_of(action.epoch),
                    link=revoked_by,
                    agent=action.agent,
                    job_id=action.job_id,
                    epoch=action.epoch,
                    action="revoke_lease",
                ):
                    await self._save_decided(decided, action)
            case "rollback":
                assert action.proposal_id is not None
                job_id = self._job_of_proposal(action.proposal_id)
                job = await self._job(job_id) if job_id else None
                if job is None:
                    log.error("rollback of %s: its job is unknown", action.proposal_id)
                    if rec is not None:
                        rec.applied.pop(action.proposal_id, None)  # stop asking
                    return
                decided = rollback(
                    job,
                    action.proposal_id,
                    reason=action.reason,
                    by=self.name,
                    at=at,
                    signal_at=action.signal_at,
                    once=True,
                )
                if isinstance(decided, Refusal):
                    if rec is not None:
                        rec.applied.pop(action.proposal_id, None)  # asked for already: stop asking
                    return
                await self._save_rollback(job, action.proposal_id, decided, link=revoked_by)

    def _revoked(self, agent: Agent, action: Action, at: datetime) -> None:
        if action.signal_at is None:
            return
        latency = (at - action.signal_at).total_seconds() * 1000
        metrics = telemetry.instruments()
        metrics.revocations.add(1, {"signal": "policy"})
        metrics.revocation_latency.record(latency)
        log.warning("revoked %s (%.1f ms after the signal): %s", agent.name, latency, action.reason)

    async def _save_decided(self, decided: list[Event] | Refusal, action: Action | None = None) -> bool:
        """Save what a rule decided (False when it refused: the change is made already, or moot)."""
        if isinstance(decided, Refusal):
            if action is not None:
                log.debug("%s of %s not needed: %s", action.kind, action.agent, decided.reason)
            return False
        await self.ctx.save(*self._in_job_traces(decided))
        return True

    async def _save_rollback(
        self, job: Job, proposal_id: UUID, decided: list[Event] | Refusal, *, link: str
    ) -> bool:
        state = job.proposal(proposal_id)
        # In the proposal's job's trace, after the span that last moved it (its application);
        # what asked for it (a revocation, an operator's command) is linked.
        with telemetry.span(
            "revoker rollback",
            parent=state.trace if state else job.trace,
            link=link,
            job_id=job.id,
            agent=state.agent if state else "",
            proposal_id=proposal_id,
        ):
            return await self._save_decided(decided)

    def _in_job_traces(self, events: Sequence[Event]) -> list[Event]:
        """An agent's revocation saves its leases' revocations too: each of those stays in its
        job's trace (under the lease's grant), linked to the span revoking the agent."""
        revoked = next((e for e in events if isinstance(e, AgentRevoked)), None)
        if revoked is None:
            return list(events)
        link = telemetry.current_traceparent()
        out: list[Event] = []
        traces: dict[UUID, str] = {}
        for event in events:
            if event.originator_id != revoked.originator_id and not event.trace:
                trace = traces.get(event.originator_id)
                job = self.ctx.views.jobs.get(event.originator_id)
                if trace is None and job is not None and job.live_lease is not None:
                    lease = job.live_lease
                    with telemetry.span(
                        "revoker revocation",
                        parent=job.trace_of(lease.epoch),
                        link=link,
                        agent=revoked.name,
                        job_id=job.id,
                        epoch=lease.epoch,
                        action="revoke_lease",
                    ):
                        trace = traces[event.originator_id] = telemetry.current_traceparent()
                if trace:
                    event = replace(event, trace=trace)
            out.append(event)
        return out

    # --- loading ----------------------------------------------------------------------------

    async def _agent(self, name: str) -> Agent | None:
        return self.ctx.views.agents.get(name) or await self.ctx.agent_from_store(name)

    async def _job(self, job_id: UUID) -> Job | None:
        return await self.ctx.job(job_id)

    async def _jobs(self, job_ids: Sequence[UUID]) -> list[Job]:
        jobs = [await self._job(job_id) for job_id in job_ids]
        return [job for job in jobs if job is not None]

    def _job_of_proposal(self, proposal_id: UUID | None) -> UUID | None:
        if proposal_id is None:
            return None
        known = self.authority.proposals.get(proposal_id)
        if known is not None:
            return known.job_id
        # A proposal the record let go of (its job ended, nothing a policy rollback reaches):
        # the view knows live and recently ended jobs; an older one's command names its job
        # (`_given` loads that one from the store).
        views = self.ctx.views
        return next(
            (j.id for j in (*views.jobs.values(), *views.ended.values()) if j.proposal(proposal_id)), None
        )

    async def _given(self, verb: Verb, cmd: OperatorCommand) -> Given:
        if verb.loads == "proposal":
            if cmd.job_id is not None:
                # The job the command names, from the store (the view forgets ended jobs); the
                # rule refuses it unless it holds the proposal.
                return Given(job=await self.ctx.job_from_store(cmd.job_id))
            job_id = self._job_of_proposal(cmd.proposal_id)
            return Given(job=await self._job(job_id) if job_id else None)
        if not cmd.agent:
            return Given()
        agent = await self._agent(cmd.agent)
        rec = self.authority.agents.get(cmd.agent)
        leases = await self._jobs(list(rec.live_leases)) if rec is not None else []
        return Given(agent=agent, leases=leases)

    async def _reload(self, loaded: list[Given]) -> None:
        [given] = loaded
        if given.agent is not None:
            await self.ctx.agent_from_store(given.agent.name)
        for job in (*given.leases, *([given.job] if given.job else [])):
            await self.ctx.job_from_store(job.id)

    # --- operator commands: decode -> load -> decide -> save -> reply -------------------------

    async def on_operator(self, msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        with telemetry.span(f"revoker {verb}", headers=msg.headers):
            await self._on_operator(msg, verb)

    async def _on_operator(self, msg: Msg, verb: str) -> None:
        cmd = await decode_or_reject(self.ctx, msg, OperatorCommand)
        if cmd is None:
            return
        handler = VERBS.get(verb)
        refusal: Refusal | None
        if handler is None:
            refusal = Refusal.of("$", f"the revoker does not handle {verb}")
        else:
            loaded = [Given()]  # what the last try loaded: a lost race reloads it from the store
            async with self._turn_of(cmd):
                refusal = await retry(
                    partial(self._operate, handler, cmd, loaded),
                    partial(self._reload, loaded),
                    what=f"operator {verb}",
                )
        if refusal is not None:
            await reject_input(self.ctx, msg, refusal.errors, sender=cmd.operator)
        else:
            await answer(self.ctx, msg, Accepted(detail=f"{verb} recorded"))

    @asynccontextmanager
    async def _turn_of(self, cmd: OperatorCommand) -> AsyncIterator[None]:
        """A command about an agent takes that agent's turn, like the policy's own decisions."""
        if not cmd.agent:
            yield
            return
        async with self._turn(cmd.agent):
            yield

    async def _operate(self, verb: Verb, cmd: OperatorCommand, loaded: list[Given]) -> Refusal | None:
        given = loaded[0] = await self._given(verb, cmd)
        decided = verb.rule(cmd, given, self.policy, self.ctx.clock())
        if isinstance(decided, Refusal):
            return decided
        if verb.loads == "proposal":
            assert given.job is not None and cmd.proposal_id is not None
            await self._save_rollback(
                given.job, cmd.proposal_id, decided, link=telemetry.current_traceparent()
            )
        else:
            await self._save_decided(decided)
        return None
