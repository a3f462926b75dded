"""Worker SDK: register, claim, heartbeat while the handler runs, propose or release.

A worker never owns a job, it leases it. The handler runs inside a cancel scope that the
heartbeat task cancels the moment the lease stands anything but `extended` (revoked, expired,
budget exceeded), or when the lease's own expiry passes without an answer: a worker that cannot
reach Warden stops by itself instead of working on a job someone else may now hold.

Requests that time out, fail on a lost connection or are refused by a service whose view lags
are retried with backoff: `serve` keeps serving across broker restarts and ends only when the
agent is revoked, its credentials are refused, or it is told to stop (its job limit, idleness,
`stop()`), with a reason and a summary of the jobs it did.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import anyio
import msgspec
import nats.errors
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


# How long a claim waits at the scheduler for work before it is answered "no work".
CLAIM_WAIT_S = 20.0


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

    @property
    def revoked(self) -> bool:
        """The scheduler refused because the agent itself is revoked (not a lagging view)."""
        return isinstance(self.reply, Rejected) and any(" is revoked" in e.message for e in self.reply.errors)

    @property
    def not_registered(self) -> bool:
        return isinstance(self.reply, Rejected) and any(
            "is not registered" in e.message for e in self.reply.errors
        )


class Stalled(Exception):
    """Raised by a handler whose work shows no sign of progress: the SDK stops heartbeating
    (the lease expires at the reconciler, which records it) instead of proposing or releasing."""


# What a request may fail with and still be worth retrying: no answer in time, no stream
# (leader election), a connection lost or reconnecting. Permission errors are not among them.
TRANSIENT: tuple[type[BaseException], ...] = (TimeoutError, nats.errors.Error)


class Backoff:
    """Exponential delays with jitter, reset after a success."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return float(delay * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempt = 0


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
    # When the work last showed a sign of progress (None: the agent does not say).
    progress_at: datetime | None = None
    # The lease's expiry as last extended: past it, the job may be someone else's.
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.expires_at is None:
            self.expires_at = self.grant.expires_at

    @property
    def lease_gone(self) -> bool:
        return self.expires_at is not None and now() >= self.expires_at

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
        self,
        *,
        progress: float | None = None,
        usage: Usage | None = None,
        note: str | None = None,
        progress_at: datetime | None = None,
    ) -> None:
        if progress_at is not None:
            self.progress_at = progress_at
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
        "proposed",
        "rejected",
        "revoked",
        "expired",
        "budget_exceeded",
        "released",
        "failed",
        "ended",
        "stalled",
    ]
    detail: str = ""
    reply: AnyReply | None = None


@dataclass
class ServeResult:
    """How `serve` ended: why (one line), whether the agent was revoked, and every job it did."""

    reason: str
    outcomes: list[Outcome] = field(default_factory=list)
    revoked: bool = False

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        done = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
        return f"{len(self.outcomes)} job(s): {done}"


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


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


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
        claim_wait_s: float = CLAIM_WAIT_S,
    ) -> None:
        self.nc = nc
        self.name = topology.check_agent_name(name)
        self.max_concurrent = max_concurrent
        self.kinds = kinds or []
        self.timeout = timeout
        self.claim_wait_s = claim_wait_s
        self._stop = anyio.Event()
        self.stop_reason = ""
        # The jobs whose leases this client was granted: every claim names them, so the scheduler
        # hands back a lease whose grant never reached us (see Claim.holding). A job being worked
        # maps to None; one let go without an answer that ended its lease (stalled, a proposal
        # stored but not judged yet) is named until its lease has surely ended, so it is never
        # handed back. One claim at a time, so a claim never leaves out a grant another is receiving.
        self._holding: dict[UUID, datetime | None] = {}
        self._claiming = anyio.Lock()
        # `serve`'s claims in flight: a claim waits up to its wait at the scheduler, and an agent
        # told to stop stops waiting at once (a grant that arrives meanwhile goes unheard, and
        # is handed back on the agent's next claim or expires).
        self._claims_waiting: set[anyio.CancelScope] = set()

    def stop(self, reason: str = "told to stop") -> None:
        """Claim nothing more; a job in hand has its handler cancelled and its lease released."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()
        for scope in self._claims_waiting:
            scope.cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when told to stop."""
        with anyio.move_on_after(seconds):
            await self._stop.wait()

    async def _send(self, verb: str, body: msgspec.Struct, timeout: float | None = None) -> AnyReply:
        return await bus.request(
            self.nc,
            topology.agent_subject(self.name, verb),
            body,
            timeout=timeout or self.timeout,
            inbox_prefix=topology.reply_inbox_prefix(self.name),
        )

    async def register(self) -> None:
        reply = await self._send("register", Register(max_concurrent=self.max_concurrent, kinds=self.kinds))
        if not isinstance(reply, Accepted):
            raise AgentError("register", reply)

    async def register_retrying(self) -> None:
        """Register, retrying what may pass (no answer, no connection) until told to stop."""
        backoff = Backoff()
        while True:
            try:
                await self.register()
                return
            except TRANSIENT as exc:
                if self.stopping:
                    return
                log.warning("register not answered (%s); retrying", exc)
                await self._pause(backoff.next())

    async def claim(self, wait_s: float | None = None) -> LeaseGrant | None:
        """A lease on the oldest runnable job this agent may take, or None when none turned up
        within `wait_s` (default `claim_wait_s`): the scheduler holds the claim until work
        arrives or the wait ends, so an idle agent sends one claim per wait, not a stream.

        The lease may be one granted earlier whose answer never arrived (see Claim.holding)."""
        wait = wait_s or self.claim_wait_s
        async with self._claiming:
            at = now()
            for job_id, until in list(self._holding.items()):
                if until is not None and until < at:
                    del self._holding[job_id]
            body = Claim(kinds=self.kinds, wait_s=wait, sent_at=at, holding=sorted(self._holding))
            # The scheduler answers a little before the wait ends; the request outlasts the wait
            # by the usual time for an answer, so a late "no work" is still heard.
            reply = await self._send("claim", body, timeout=wait + self.timeout)
            if isinstance(reply, LeaseGrant):
                self._holding[reply.job_id] = None
        if isinstance(reply, LeaseGrant):
            return reply
        if isinstance(reply, NoWork):
            return None
        raise AgentError("claim", reply)

    async def heartbeat(self, ctx: JobContext) -> HeartbeatAck:
        reply = await self._send(
            "heartbeat",
            Heartbeat(
                job_id=ctx.job_id,
                epoch=ctx.epoch,
                progress=ctx.progress,
                usage=ctx.usage,
                note=ctx.note,
                progress_at=ctx.progress_at,
            ),
        )
        if isinstance(reply, HeartbeatAck):
            return reply
        raise AgentError("heartbeat", reply)

    async def propose(self, ctx: JobContext, proposal: Proposal) -> AnyReply:
        """Send the proposal; a payload too large for one message is uploaded in chunks on the
        agent's payload subject first (see shared/proposals.py). The reply names the proposal's id."""
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
            upload = await proposals.upload(self.nc.jetstream(), self.name, payload)
            body = msgspec.structs.replace(envelope, payload=upload)
        return await self._send("propose", body)

    async def release(self, ctx: JobContext, reason: str = "") -> AnyReply:
        return await self._send("release", Release(job_id=ctx.job_id, epoch=ctx.epoch, reason=reason))

    async def _propose_retrying(self, ctx: JobContext, proposal: Proposal) -> AnyReply | str:
        """The checker's reply, or why there is none. A proposal stored but not yet answered is not
        sent again: the checker judges it from the stream, and a second copy would be fenced."""
        backoff = Backoff()
        while True:
            try:
                return await self.propose(ctx, proposal)
            except bus.ReplyTimeout as exc:
                return f"stored, no verdict yet: {exc}"
            except TRANSIENT as exc:
                if ctx.lease_gone:
                    return f"not stored before the lease expired: {exc}"
                log.warning("proposal for job %s not stored (%s); retrying", ctx.job_id, exc)
                await anyio.sleep(backoff.next())

    async def _release_retrying(self, ctx: JobContext, reason: str) -> AnyReply | str:
        backoff = Backoff()
        while True:
            try:
                return await self.release(ctx, reason)
            except TRANSIENT as exc:
                if ctx.lease_gone:
                    return f"release not answered before the lease expired (it expires instead): {exc}"
                await anyio.sleep(backoff.next())

    async def _keep_alive(self, ctx: JobContext, scope: anyio.CancelScope, lost: list[Outcome]) -> None:
        """Heartbeat every interval; cancel the handler when the lease is no longer ours."""
        interval = ctx.grant.heartbeat_interval_s
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(min(interval, self.timeout)):
                    ack = await self.heartbeat(ctx)
            except (TimeoutError, nats.errors.Error, AgentError) as exc:
                # No answer, or a refusal from a service whose view may lag ("no job"): the lease
                # stands until its own expiry; past that, the job may be someone else's.
                if ctx.lease_gone:
                    lost.append(Outcome(ctx.job_id, ctx.epoch, "expired", f"no heartbeat answered: {exc}"))
                    scope.cancel()
                    return
                log.warning("heartbeat for job %s not answered (%s)", ctx.job_id, exc)
                continue
            if ack.standing == "extended" and ack.expires_at is not None:
                ctx.expires_at = ack.expires_at
                continue
            status = ack.standing if ack.standing in ("revoked", "expired", "budget_exceeded") else "ended"
            lost.append(Outcome(ctx.job_id, ctx.epoch, status, ack.reason))
            scope.cancel()
            return

    async def work(self, grant: LeaseGrant, handler: Handler) -> Outcome:
        """Run `handler` under this lease: heartbeats meanwhile, then propose (or release).

        A handler that raises Stalled gets neither: heartbeats stop and the lease expires."""
        outcome: Outcome | None = None
        try:
            outcome = await self._work(grant, handler)
            return outcome
        finally:
            self._let_go(grant, outcome)

    def _let_go(self, grant: LeaseGrant, outcome: Outcome | None) -> None:
        if outcome is not None and isinstance(outcome.reply, Accepted):
            self._holding.pop(grant.job_id, None)  # judged or released: the lease is over
        else:  # a lease nobody beats for ends within a TTL; twice that covers a late expiry
            self._holding[grant.job_id] = now() + timedelta(seconds=2 * grant.ttl_s)

    async def _work(self, grant: LeaseGrant, handler: Handler) -> Outcome:
        ctx = JobContext(grant=grant)
        lost: list[Outcome] = []
        result: Proposal | None = None
        failure = ""
        stalled = ""
        reply: AnyReply | str | None = None
        async with anyio.create_task_group() as tg:
            handler_scope = anyio.CancelScope()

            async def stop_handler_on_stop() -> None:
                await self._stop.wait()
                handler_scope.cancel()

            tg.start_soon(self._keep_alive, ctx, handler_scope, lost)
            tg.start_soon(stop_handler_on_stop)
            with handler_scope:
                try:
                    result = await handler(ctx)
                except Stalled as exc:
                    stalled = str(exc)
                except Exception as exc:  # the agent's own failure: release, say why
                    log.exception("handler failed on job %s", grant.job_id)
                    failure = f"{type(exc).__name__}: {exc}"
            if not stalled and not lost and not failure and result is not None:
                # Still heartbeating: uploading a large payload may take longer than the TTL.
                reply = await self._propose_retrying(ctx, result)
            tg.cancel_scope.cancel()
        if stalled:
            log.warning("job %s stalled: %s; heartbeats stopped", grant.job_id, stalled)
            return Outcome(grant.job_id, grant.epoch, "stalled", stalled)
        if lost:
            return lost[0]
        if reply is None:
            if not failure and result is None and self.stopping:
                failure = f"agent stopping: {self.stop_reason}"
            released = await self._release_retrying(ctx, failure or "handler returned no proposal")
            detail = failure if not isinstance(released, str) else f"{failure}; {released}".strip("; ")
            return Outcome(
                grant.job_id, grant.epoch, "released", detail, None if isinstance(released, str) else released
            )
        if isinstance(reply, str):
            return Outcome(grant.job_id, grant.epoch, "proposed", reply)
        status: Literal["proposed", "rejected"] = "rejected" if isinstance(reply, Rejected) else "proposed"
        return Outcome(grant.job_id, grant.epoch, status, "", reply)

    async def serve(
        self,
        handler: Handler,
        *,
        max_jobs: int | None = None,
        concurrency: int = 1,
        once: bool = False,
        poll_s: float = 0.2,
        idle_exit_s: float | None = None,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> ServeResult:
        """Register, then claim and work jobs (`concurrency` at a time) until told to stop.

        Ends when `max_jobs` were taken, when idle for `idle_exit_s`, after one claim round per
        worker with `once`, on `stop()`, or when the agent is revoked; `on_outcome` hears of
        each job as it ends. A refused or unanswered
        request is retried with backoff; refused credentials raise bus.PermissionDenied."""
        result = ServeResult(reason="")
        fatal: list[BaseException] = []
        taken = 0
        idle_since = anyio.current_time()

        async def worker() -> None:
            nonlocal taken, idle_since
            backoff = Backoff()
            while not self.stopping:
                if max_jobs is not None and taken >= max_jobs:
                    return
                wait = self.claim_wait_s
                if idle_exit_s is not None:  # wait no longer than the idle time left
                    wait = min(wait, max(0.1, idle_exit_s - (anyio.current_time() - idle_since)))
                taken += 1  # reserved before the claim, so workers together never exceed max_jobs
                asked = anyio.current_time()
                grant: LeaseGrant | None = None
                try:
                    with anyio.CancelScope() as waiting:
                        self._claims_waiting.add(waiting)
                        try:
                            grant = await self.claim(wait)
                        finally:
                            self._claims_waiting.discard(waiting)
                except AgentError as exc:
                    taken -= 1
                    if exc.revoked:
                        result.revoked = True
                        self.stop(str(exc))
                        return
                    if exc.not_registered:  # the scheduler's view lags, or it lost us: say who we are
                        await self.register_retrying()
                    log.warning("%s; retrying", exc)
                    await self._pause(backoff.next())
                    continue
                except TRANSIENT as exc:
                    taken -= 1
                    log.warning("claim not answered (%s); retrying", exc)
                    await self._pause(backoff.next())
                    continue
                backoff.reset()
                if grant is None:
                    taken -= 1
                    if once:
                        return
                    if idle_exit_s is not None and anyio.current_time() - idle_since >= idle_exit_s:
                        self.stop(f"idle for {idle_exit_s}s")
                        return
                    if anyio.current_time() - asked < poll_s:
                        # Answered at once (a scheduler that lets no claim wait, or too many
                        # waiting): claim again no sooner than `poll_s`. A claim that waited
                        # is followed by the next at once.
                        await self._pause(poll_s)
                    continue
                if self.stopping:  # granted as we were told to stop: hand it back at once
                    why = f"agent stopping: {self.stop_reason}"
                    released = await self._release_retrying(JobContext(grant=grant), why)
                    detail = f"{why}; {released}" if isinstance(released, str) else why
                    outcome = Outcome(
                        grant.job_id,
                        grant.epoch,
                        "released",
                        detail,
                        None if isinstance(released, str) else released,
                    )
                    self._let_go(grant, outcome)
                else:
                    outcome = await self.work(grant, handler)
                result.outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
                idle_since = anyio.current_time()
                if once:
                    return

        async def guarded() -> None:
            try:
                await worker()
            except* bus.PermissionDenied as group:
                fatal.append(_leaf(group))
                self.stop(str(fatal[-1]))

        await self.register_retrying()
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, concurrency)):
                tg.start_soon(guarded)
        if fatal:
            raise fatal[0]
        if self.stop_reason:
            result.reason = ("revoked: " if result.revoked else "") + self.stop_reason
        elif max_jobs is not None and taken >= max_jobs:
            result.reason = f"did the {max_jobs} job(s) asked for"
        else:
            result.reason = "one claim round done (--once)" if once else "done"
        return result

    async def run(
        self,
        handler: Handler,
        *,
        jobs: int | None = None,
        poll_s: float = 0.2,
        idle_exit_s: float | None = None,
    ) -> list[Outcome]:
        """`serve` for callers that only want the outcomes."""
        served = await self.serve(handler, max_jobs=jobs, poll_s=poll_s, idle_exit_s=idle_exit_s)
        return served.outcomes
