"""Revoker: turns failure signals and operator commands into promotions, demotions, revocations,
lease revocations and rollback requests, each an event citing its evidence.

It folds the whole log into an AuthorityBook (shared/authority.py) and, whenever an agent's
record changes, appends what the policy calls for. A revoked agent learns it on its next
heartbeat (its leases end), and anything it sends later under them is fenced and recorded.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg

from shared import bus, telemetry, topology
from shared.aggregates import Job
from shared.authority import Action, AuthorityBook
from shared.events import (
    AgentLevelChanged,
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    AnyEvent,
    Event,
    LeaseRevoked,
    RollbackRequested,
    agent_id_for,
    now,
)
from shared.handling import answer, decode_or_reject, give_up, reject_input
from shared.lifecycle import after_attempt
from shared.messages import Accepted, OperatorCommand
from shared.policy import load_policy
from shared.runtime import Context
from shared.validation import FieldError, missing

log = logging.getLogger("warden.revoker")


class Revoker:
    name = "revoker"

    def __init__(self) -> None:
        self.book = AuthorityBook(load_policy())
        self._versions: dict[Any, int] = {}
        self._dirty: set[str] = set()
        # Per agent, the traceparent of the event that last changed its record, and of its
        # revocation: what an action the policy calls for answers (its span's parent, or the
        # link from the job it acts in). A lease revocation or a rollback answers the revocation,
        # whatever was folded since (the lease's own grant, seen late).
        self._cause: dict[str, str] = {}
        self._revoked_by: dict[str, str] = {}
        self._wake = anyio.Event()
        self.ctx: Context

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        async with anyio.create_task_group() as tg:
            await tg.start(bus.follow, ctx.js, self._on_stream_event)
            self._dirty.update(self.book.agents)  # finish what a crash may have left undone
            self._wake.set()
            tg.start_soon(self._decide_loop)
            await tg.start(
                partial(bus.consume, give_up=partial(give_up, ctx)),
                ctx.js,
                topology.REVOKER_CONSUMER,
                self.on_operator,
            )
            task_status.started()

    def _fold(self, event: Event) -> None:
        last = self._versions.get(event.originator_id, 0)
        if event.originator_version <= last:
            return  # already folded (our own save, seen again on the stream)
        self._versions[event.originator_id] = event.originator_version
        changed = self.book.apply(event)
        if changed is not None:
            if event.trace:
                self._cause[changed] = event.trace
                if isinstance(event, AgentRevoked):
                    self._revoked_by[changed] = event.trace
            self._dirty.add(changed)
            self._wake.set()

    def _on_stream_event(self, _seq: int, event: AnyEvent) -> None:
        self._fold(event)

    async def _save(self, *events: Event) -> None:
        for event in await self.ctx.save(*events):
            self._fold(event)

    async def _decide_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._dirty:
                name = self._dirty.pop()
                for action in self.book.decide(name):
                    try:
                        await self._act(action)
                    except IntegrityError:
                        self._dirty.add(name)  # someone else wrote first: re-read, decide again
                        await anyio.lowlevel.checkpoint()

    async def _act(self, action: Action) -> None:
        cause = self._cause.get(action.agent, "")
        if action.kind in ("revoke_lease", "rollback"):
            cause = self._revoked_by.get(action.agent, cause)
        if action.kind == "rollback":
            await self._request_rollback(action, by=self.name, cause=cause)
            return
        job = self.ctx.views.jobs.get(action.job_id) if action.job_id else None
        # An agent's revocation continues the trace of the signal; a lease's stays in its job's.
        with telemetry.span(
            "revoker revocation" if action.kind in ("revoke", "revoke_lease") else f"revoker {action.kind}",
            parent=job.trace_of(action.epoch) if job else cause,
            link=cause if job else "",
            agent=action.agent,
            job_id=action.job_id,
            epoch=action.epoch or None,
            action=action.kind,
        ):
            await self._act_now(action)

    async def _act_now(self, action: Action) -> None:
        views = self.ctx.views
        at = now()
        match action.kind:
            case "revoke" | "promote" | "demote":
                agent = views.agents.get(action.agent)
                if agent is None:
                    return
                event: Event
                if action.kind == "revoke":
                    event = AgentRevoked(
                        originator_id=agent.id,
                        originator_version=agent.version + 1,
                        name=agent.name,
                        reason=action.reason,
                        by=self.name,
                        evidence=action.evidence,
                        signal_at=action.signal_at,
                        timestamp=at,
                    )
                else:
                    event = AgentLevelChanged(
                        originator_id=agent.id,
                        originator_version=agent.version + 1,
                        name=agent.name,
                        level=action.level,
                        previous=agent.level,
                        reason=action.reason,
                        evidence=action.evidence,
                        signal_at=action.signal_at,
                        timestamp=at,
                    )
                try:
                    await self._save(event)
                except IntegrityError:
                    await self._reload_agent(action.agent)
                    raise
                if action.kind == "revoke" and action.signal_at is not None:
                    latency = (at - action.signal_at).total_seconds() * 1000
                    metrics = telemetry.instruments()
                    metrics.revocations.add(1, {"signal": "policy"})
                    metrics.revocation_latency.record(latency)
                    log.warning(
                        "revoked %s (%.1f ms after the signal): %s", agent.name, latency, action.reason
                    )
            case "revoke_lease":
                assert action.job_id is not None
                job = views.jobs.get(action.job_id)
                lease = job.live_lease if job else None
                if job is None or lease is None or lease.epoch != action.epoch:
                    self._fold_lease_gone(action)
                    return
                revoke = LeaseRevoked(
                    originator_id=job.id,
                    originator_version=job.version + 1,
                    agent=lease.agent,
                    epoch=lease.epoch,
                    reason=action.reason,
                    signal="agent-revoked",
                    by=self.name,
                    signal_at=action.signal_at,
                )
                try:
                    await self._save(
                        revoke, after_attempt(job, job.version + 2, action.reason, at, by=self.name)
                    )
                except IntegrityError:
                    await self.ctx.reload_job(job.id)
                    raise

    def _fold_lease_gone(self, action: Action) -> None:
        """The lease already ended (expired, released): nothing to revoke, stop asking."""
        rec = self.book.agents.get(action.agent)
        if rec is not None and action.job_id is not None:
            rec.live_leases.pop(action.job_id, None)

    async def _request_rollback(self, action: Action, by: str, cause: str) -> None:
        """`cause`: the traceparent of what asked for it (a revocation, an operator's command)."""
        assert action.proposal_id is not None
        job_id = action.job_id or self.book.proposal_job.get(action.proposal_id)
        job = self.ctx.views.jobs.get(job_id) if job_id else None
        if job is None:
            log.error("rollback of %s: its job is unknown", action.proposal_id)
            self.book.rollback_requested.add(action.proposal_id)
            return
        state = job.proposal(action.proposal_id)
        # In the proposal's job's trace, after the span that last moved it (its application);
        # the cause is linked.
        with telemetry.span(
            "revoker rollback",
            parent=state.trace if state else job.trace,
            link=cause,
            job_id=job.id,
            agent=action.agent,
            proposal_id=action.proposal_id,
        ):
            await self._save_rollback(job, action, by)

    async def _save_rollback(self, job: Job, action: Action, by: str) -> None:
        assert action.proposal_id is not None
        try:
            await self._save(
                RollbackRequested(
                    originator_id=job.id,
                    originator_version=job.version + 1,
                    proposal_id=action.proposal_id,
                    reason=action.reason,
                    by=by,
                    signal_at=action.signal_at,
                )
            )
        except IntegrityError:
            await self.ctx.reload_job(job.id)
            raise

    async def _reload_agent(self, name: str) -> None:
        agent = await anyio.to_thread.run_sync(self.ctx.app.agent, agent_id_for(name))
        self.ctx.views.replace_agent(agent)

    # --- operator commands -----------------------------------------------------------------

    async def on_operator(self, msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        with telemetry.span(f"revoker {verb}", headers=msg.headers):
            await self._on_operator(msg, verb)

    async def _on_operator(self, msg: Msg, verb: str) -> None:
        cmd = await decode_or_reject(self.ctx, msg, OperatorCommand)
        if cmd is None:
            return
        for _ in range(5):
            try:
                problem = await self._operate(verb, cmd)
            except IntegrityError:
                if cmd.agent:
                    await self._reload_agent(cmd.agent)
                continue
            if problem:
                await reject_input(self.ctx, msg, [problem], sender=cmd.operator)
            else:
                await answer(self.ctx, msg, Accepted(detail=f"{verb} recorded"))
            return
        raise RuntimeError(f"operator {verb} kept conflicting")

    async def _operate(self, verb: str, cmd: OperatorCommand) -> FieldError | None:
        if verb == "rollback":
            if cmd.proposal_id is None:
                return FieldError(path="$.proposal_id", message="rollback needs a proposal_id")
            if cmd.proposal_id not in self.book.proposal_job:
                return missing("$.proposal_id", f"proposal {cmd.proposal_id}")
            await self._request_rollback(
                Action(
                    kind="rollback",
                    agent=self.book.proposal_agent.get(cmd.proposal_id, ""),
                    reason=cmd.reason,
                    evidence=[],
                    proposal_id=cmd.proposal_id,
                    signal_at=now(),
                ),
                by=cmd.operator,
                cause=telemetry.current_traceparent(),
            )
            return None
        if not cmd.agent:
            return FieldError(path="$.agent", message=f"{verb} needs an agent")
        agent = self.ctx.views.agents.get(cmd.agent)
        if agent is None:
            return missing("$.agent", f"agent {cmd.agent}")
        version = agent.version + 1
        event: Event
        if verb == "revoke":
            if agent.standing == "revoked":
                return FieldError(path="$.agent", message=f"agent {cmd.agent} is already revoked")
            event = AgentRevoked(
                originator_id=agent.id,
                originator_version=version,
                name=agent.name,
                reason=cmd.reason,
                by=cmd.operator,
                signal_at=now(),
            )
        elif verb == "suspend":
            if agent.standing != "active":
                return FieldError(path="$.agent", message=f"agent {cmd.agent} is {agent.standing}")
            event = AgentSuspended(
                originator_id=agent.id,
                originator_version=version,
                name=agent.name,
                reason=cmd.reason,
                by=cmd.operator,
            )
        elif verb == "reinstate":
            if agent.standing == "active":
                return FieldError(path="$.agent", message=f"agent {cmd.agent} is already active")
            event = AgentReinstated(
                originator_id=agent.id,
                originator_version=version,
                name=agent.name,
                reason=cmd.reason,
                by=cmd.operator,
            )
        elif verb in ("promote", "demote"):
            level = cmd.level if cmd.level is not None else agent.level + (1 if verb == "promote" else -1)
            refusal = self.book.policy.level_refusal(level)
            if refusal is None and (
                (verb == "promote" and level <= agent.level) or (verb == "demote" and level >= agent.level)
            ):
                refusal = f"a {verb} must go {'up' if verb == 'promote' else 'down'}"
            if refusal is not None:
                return FieldError(
                    path="$.level",
                    message=f"cannot {verb} {cmd.agent} from level {agent.level} to {level}: {refusal}",
                )
            event = AgentLevelChanged(
                originator_id=agent.id,
                originator_version=version,
                name=agent.name,
                level=level,
                previous=agent.level,
                reason=cmd.reason,
                by=cmd.operator,
            )
        else:
            return FieldError(path="$", message=f"the revoker does not handle {verb}")
        await self._save(event)
        return None
