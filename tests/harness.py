"""Helpers for tests: run services in-process against a real server, wait for events by deadline."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import anyio
from nats.aio.client import Client
from nats.js import api as js_api

from services import registry
from shared import bus, runtime, topology
from shared.events import AnyEvent
from shared.messages import Accepted, JobRequest
from shared.persistence import written
from shared.runtime import Context


@asynccontextmanager
async def running(
    url: str, names: list[str] | None = None, name: str = "test", *, replicas: int = 1
) -> AsyncIterator[Context]:
    """Run the named services (all by default) in this task until the block exits.

    `url` may list a cluster's servers separated by commas; `replicas` is the streams' (3 there).
    """
    async with (
        runtime.deployment(url, name=name, replicas=replicas) as (ctx, _url),
        anyio.create_task_group() as tg,
    ):
        await tg.start(runtime.run_services, ctx, registry.build(names))
        yield ctx
        tg.cancel_scope.cancel()


@asynccontextmanager
async def client(url: str, name: str = "test-client") -> AsyncIterator[Client]:
    nc = await bus.connect(url, name)
    try:
        yield nc
    finally:
        await nc.close()


async def events_of(nc: Client, subject: str = f"{topology.EVENT_ROOT}.>") -> list[AnyEvent]:
    """Every event stored on `subject` right now, in stream order."""
    js = nc.jetstream()
    info = await js.stream_info(topology.EVENT_STREAM)
    out: list[AnyEvent] = []
    if info.state.messages == 0:
        return out
    done = anyio.Event()
    last = info.state.last_seq

    async def cb(msg: Any) -> None:
        found = written.events_of(msg.subject, msg.headers, msg.data)
        if not isinstance(found, str):  # tracking records share the stream
            out.extend(found)
        if msg.metadata.sequence.stream >= last or msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(subject, ordered_consumer=True, cb=cb, deliver_policy=js_api.DeliverPolicy.ALL)
    try:
        with anyio.fail_after(10):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return out


async def wait_for_event(
    nc: Client,
    predicate: Callable[[AnyEvent], bool],
    *,
    timeout: float = 10.0,
    subject: str = f"{topology.EVENT_ROOT}.>",
) -> AnyEvent:
    """The first event (past or future) matching `predicate`; TimeoutError after `timeout`."""
    js = nc.jetstream()
    found: list[AnyEvent] = []
    hit = anyio.Event()

    async def cb(msg: Any) -> None:
        events = written.events_of(msg.subject, msg.headers, msg.data)
        for event in () if isinstance(events, str) else events:
            if not hit.is_set() and predicate(event):
                found.append(event)
                hit.set()

    sub = await js.subscribe(subject, ordered_consumer=True, cb=cb, deliver_policy=js_api.DeliverPolicy.ALL)
    try:
        with anyio.fail_after(timeout):
            await hit.wait()
    finally:
        await sub.unsubscribe()
    return found[0]


async def submit(nc: Client, request: JobRequest) -> UUID:
    reply = await bus.request(nc, topology.REQUEST_SUBJECT, request)
    assert isinstance(reply, Accepted), reply
    assert reply.job_id is not None
    return reply.job_id


class SlowHandler:
    """A handler that works until cancelled, recording that it was: for revocation tests."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled: list[bool] = []

    async def __call__(self, ctx: Any) -> Any:
        from shared.sdk import Proposal

        self.started.set()
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(True)
            raise
        return Proposal()


def job_request(contract: Any, kind: str = "refactor") -> JobRequest:
    return JobRequest(idempotency_key=str(uuid.uuid4()), kind=kind, contract=contract)


async def lease_job(nc: Client, name: str, contract: Any) -> tuple[Any, Any]:
    """Register agent `name`, submit a job under `contract`, and lease it: (agent, its JobContext)."""
    from shared.sdk import AgentClient, JobContext

    agent = AgentClient(nc, name)
    await agent.register()
    job_id = await submit(nc, job_request(contract))
    grant = await agent.claim()
    assert grant is not None and grant.job_id == job_id
    return agent, JobContext(grant=grant)


async def propose_accepted(agent: Any, ctx: Any, proposal: Any) -> UUID:
    """Propose and expect the checker to take it; its proposal id."""
    reply = await agent.propose(ctx, proposal)
    assert isinstance(reply, Accepted), reply
    assert reply.proposal_id is not None
    return reply.proposal_id
