"""Worker SDK: register, claim, heartbeat while the handler runs, propose or release.

A worker never owns a job, it leases it. The handler runs inside a cancel scope that the
heartbeat task cancels the moment the lease stands anything but `extended` (revoked, expired,
budget exceeded), or when the lease's own expiry passes without an answer: a worker that cannot
reach Warden stops by itself instead of working on a job someone else may now hold.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import anyio
import msgspec
from nats.aio.client import Client

from shared import bus, credentials, proposals, topology
from shared.events import Usage, now
from shared.messages import (
    Accepted,
    AnyReply,
    Claim,
    Heartbeat,
    HeartbeatAck,
    LeaseGrant,
    NoWork,
    Propose,
    Register,
    Rejected,
    Release,
)

log = logging.getLogger("warden.sdk")


class AgentError(RuntimeError):
    """Raised when Warden refuses an agent's message (the reply names every reason)."""

    def __init__(self, verb: str, reply: AnyReply) -> None:
        self.reply = reply
        detail = (
            "; ".join(f"{e.path}: {e.message}" for e in reply.errors)
            if isinstance(reply, Rejected)
            else repr(reply)
        )
        super().__init__(f"{verb} refused: {detail}")


@dataclass
class Proposal:
    """What a handler returns: the change it proposes, never the change applied."""

    effect: Literal["git.patch", "file.write", "webhook", "none"] = "none"
    patch: str = ""
    files: dict[str, str] = field(default_factory=dict)
    base: str = ""
    output: Any = None
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    """A handler's view of its lease; `report` sets what the next heartbeat carries."""

    grant: LeaseGrant
    progress: float | None = None
    usage: Usage = field(default_factory=Usage)
    note: str = ""

    @property
    def job_id(self) -> UUID:
        return self.grant.job_id

    @property
    def epoch(self) -> int:
        return self.grant.epoch

    @property
    def inputs(self) -> dict[str, Any]:
        return self.grant.contract.inputs

    def report(
        self, *, progress: float | None = None, usage: Usage | None = None, note: str | None = None
    ) -> None:
        if progress is not None:
            self.progress = progress
        if usage is not None:
            self.usage = usage
        if note is not None:
            self.note = note


@dataclass
class Outcome:
    job_id: UUID
    epoch: int
    status: Literal[
        "proposed", "rejected", "revoked", "expired", "budget_exceeded", "released", "failed", "ended"
    ]
    detail: str = ""
    reply: AnyReply | None = None


Handler = Callable[[JobContext], Awaitable[Proposal | None]]


async def connect_agent(
    url: str, name: str, *, user: str | None = None, password: str | None = None, **kwargs: Any
) -> Client:
    """Connect as agent `name` with its own credentials (or WARDEN_NATS_USER/PASSWORD).

    Every reply (JetStream acks and Warden's verdicts) arrives under the agent's inbox prefix,
    the only place its credentials may subscribe; a refused operation raises
    bus.PermissionDenied instead of timing out.
    """
    return await bus.connect(
        url,
        f"agent-{topology.check_agent_name(name)}",
        inbox_prefix=topology.reply_inbox_prefix(name),
        **credentials.client_credentials(user, password),
        **kwargs,
    )


class AgentClient:
    """One agent's connection to Warden, speaking only on its own input subjects."""

    def __init__(
        self,
        nc: Client,
        name: str,
        *,
        max_concurrent: int = 1,
        kinds: list[str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.nc = nc
        self.name = topology.check_agent_name(name)
        self.max_concurrent = max_concurrent
        self.kinds = kinds or []
        self.timeout = timeout

    async def _send(self, verb: str, body: msgspec.Struct) -> AnyReply:
        return await bus.request(
            self.nc,
            topology.agent_subject(self.name, verb),
            body,
            timeout=self.timeout,
            inbox_prefix=topology.reply_inbox_prefix(self.name),
        )

    async def register(self) -> None:
        reply = await self._send("register", Register(max_concurrent=self.max_concurrent, kinds=self.kinds))
        if not isinstance(reply, Accepted):
            raise AgentError("register", reply)

    async def claim(self, wait_s: float | None = None) -> LeaseGrant | None:
        """A lease on the oldest runnable job this agent may take, or None when there is none."""
        reply = await self._send(
            "claim", Claim(kinds=self.kinds, wait_s=wait_s or self.timeout, sent_at=now())
        )
        if isinstance(reply, LeaseGrant):
            return reply
        if isinstance(reply, NoWork):
            return None
        raise AgentError("claim", reply)

    async def heartbeat(self, ctx: JobContext) -> HeartbeatAck:
        reply = await self._send(
            "heartbeat",
            Heartbeat(
                job_id=ctx.job_id, epoch=ctx.epoch, progress=ctx.progress, usage=ctx.usage, note=ctx.note
            ),
        )
        if isinstance(reply, HeartbeatAck):
            return reply
        raise AgentError("heartbeat", reply)

    async def propose(self, ctx: JobContext, proposal: Proposal) -> AnyReply:
        """Send the proposal; a payload too large for one message goes to the object store first
        (see shared/proposals.py for the limits). The reply names the proposal's id."""
        body = Propose(
            job_id=ctx.job_id,
            epoch=ctx.epoch,
            effect=proposal.effect,
            patch=proposal.patch,
            files=proposal.files,
            base=proposal.base,
            output=proposal.output,
            usage=ctx.usage,
            evidence=proposal.evidence,
        )
        if len(msgspec.json.encode(body)) > topology.INLINE_PROPOSAL_BYTES:
            envelope, payload = proposals.split(body)
            name = await proposals.put_payload(self.nc.jetstream(), self.name, ctx.job_id, ctx.epoch, payload)
            body = msgspec.structs.replace(envelope, payload_object=name)
        return await self._send("propose", body)

    async def release(self, ctx: JobContext, reason: str = "") -> AnyReply:
        return await self._send("release", Release(job_id=ctx.job_id, epoch=ctx.epoch, reason=reason))

    async def _keep_alive(self, ctx: JobContext, scope: anyio.CancelScope, lost: list[Outcome]) -> None:
        """Heartbeat every interval; cancel the handler when the lease is no longer ours."""
        grant = ctx.grant
        expires: datetime = grant.expires_at
        interval = grant.heartbeat_interval_s
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(min(interval, self.timeout)):
                    ack = await self.heartbeat(ctx)
            except (TimeoutError, bus.ReplyTimeout) as exc:
                if now() >= expires:
                    lost.append(Outcome(ctx.job_id, ctx.epoch, "expired", f"no answer: {exc}"))
                    scope.cancel()
                    return
                continue
            if ack.standing == "extended" and ack.expires_at is not None:
                expires = ack.expires_at
                continue
            status = ack.standing if ack.standing in ("revoked", "expired", "budget_exceeded") else "ended"
            lost.append(Outcome(ctx.job_id, ctx.epoch, status, ack.reason))
            scope.cancel()
            return

    async def work(self, grant: LeaseGrant, handler: Handler) -> Outcome:
        """Run `handler` under this lease: heartbeats meanwhile, then propose (or release)."""
        ctx = JobContext(grant=grant)
        lost: list[Outcome] = []
        result: Proposal | None = None
        failure = ""
        async with anyio.create_task_group() as tg:
            handler_scope = anyio.CancelScope()
            tg.start_soon(self._keep_alive, ctx, handler_scope, lost)
            with handler_scope:
                try:
                    result = await handler(ctx)
                except Exception as exc:  # the agent's own failure: release, say why
                    log.exception("handler failed on job %s", grant.job_id)
                    failure = f"{type(exc).__name__}: {exc}"
            reply: AnyReply | None = None
            if not lost and not failure and result is not None:
                # Still heartbeating: uploading a large payload may take longer than the TTL.
                reply = await self.propose(ctx, result)
            tg.cancel_scope.cancel()
        if lost:
            return lost[0]
        if failure or result is None or reply is None:
            reply = await self.release(ctx, failure or "handler returned no proposal")
            return Outcome(grant.job_id, grant.epoch, "released", failure, reply)
        status: Literal["proposed", "rejected"] = "rejected" if isinstance(reply, Rejected) else "proposed"
        return Outcome(grant.job_id, grant.epoch, status, "", reply)

    async def run(
        self,
        handler: Handler,
        *,
        jobs: int | None = None,
        poll_s: float = 0.2,
        idle_exit_s: float | None = None,
    ) -> list[Outcome]:
        """Register, then claim and work jobs until `jobs` are done or idle for `idle_exit_s`."""
        await self.register()
        outcomes: list[Outcome] = []
        idle_since = anyio.current_time()
        while jobs is None or len(outcomes) < jobs:
            grant = await self.claim()
            if grant is None:
                if idle_exit_s is not None and anyio.current_time() - idle_since > idle_exit_s:
                    break
                await anyio.sleep(poll_s)
                continue
            outcomes.append(await self.work(grant, handler))
            idle_since = anyio.current_time()
        return outcomes
