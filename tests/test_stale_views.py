"""No service refuses a valid input because its view lags the store.

Two replicas of every deciding service, each its own connection and view, against a real
nats-server: registrations, claims, heartbeats and proposals land on whichever replica fetches
them, right after a kill -9 of the broker (restarted on the same port and store) and with no
fault at all. Nothing valid may be refused or rejected, and no attempt may be spent.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TypeVar
from uuid import UUID

import anyio

from shared.contract import Contract, Stopping
from shared.events import (
    InputRejected,
    JobCompleted,
    JobRequeued,
    LeaseExpired,
    LeaseGranted,
    MessageRejected,
    ProposalRejected,
)
from shared.messages import Accepted, HeartbeatAck
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, events_of, job_request, running, submit, wait_for_event

SERVICES = ["scheduler", "reconciler", "checker", "applier"]
T = TypeVar("T")


async def across_outage(call: Callable[[], Awaitable[T]]) -> T:
    """Retry while the broker is away: a publish no stream took stored nothing, and a stored
    register or claim left unanswered is answered again (or told it arrived too late)."""
    with anyio.fail_after(60):
        while True:
            try:
                return await call()
            except TimeoutError:  # NotStored, ReplyTimeout, or the connection still reconnecting
                await anyio.sleep(0.1)


async def work_one(nc: object, name: str, expected: set[UUID], refusals: list[str]) -> None:
    """Register, claim, heartbeat and propose as agent `name`; every refusal is noted."""
    agent = AgentClient(nc, name, timeout=3.0)  # type: ignore[arg-type]
    await across_outage(agent.register)
    grant = await across_outage(agent.claim)
    if grant is None:
        refusals.append(f"{name}: claim answered no.work with jobs queued")
        return
    assert grant.job_id in expected
    ctx = JobContext(grant=grant)
    ack = await across_outage(lambda: agent.heartbeat(ctx))
    if not (isinstance(ack, HeartbeatAck) and ack.standing == "extended"):
        refusals.append(f"{name}: heartbeat answered {ack}")
    reply = await across_outage(lambda: agent.propose(ctx, Proposal(output={"by": name})))
    if not isinstance(reply, Accepted):
        refusals.append(f"{name}: proposal answered {reply}")


async def replicas(stack: AsyncExitStack, url: str) -> None:
    for replica in ("replica-a", "replica-b"):
        await stack.enter_async_context(running(url, SERVICES, name=replica))


def contract() -> Contract:
    # A lease long enough that the outage itself never spends an attempt.
    return Contract(stopping=Stopping(lease_ttl_s=60, heartbeat_interval_s=15, max_attempts=1))


async def assert_nothing_refused(nc: object, jobs: set[UUID], refusals: list[str]) -> None:
    assert refusals == []
    for job_id in jobs:
        await wait_for_event(
            nc,  # type: ignore[arg-type]
            lambda e, j=job_id: isinstance(e, JobCompleted) and e.originator_id == j,  # type: ignore[misc]
            timeout=30,
        )
    events = await events_of(nc)  # type: ignore[arg-type]
    refused = [
        e
        for e in events
        if isinstance(e, InputRejected | MessageRejected | ProposalRejected | LeaseExpired | JobRequeued)
    ]
    assert refused == []
    assert sum(isinstance(e, JobCompleted) for e in events) == len(jobs)


async def test_valid_inputs_right_after_a_broker_restart_are_neither_refused_nor_rejected(
    nats_server: EmbeddedServer,
) -> None:
    async with AsyncExitStack() as stack:
        await replicas(stack, nats_server.url)
        nc = await stack.enter_async_context(client(nats_server.url))
        refusals: list[str] = []
        jobs = {await submit(nc, job_request(contract(), kind="warm")) for _ in range(4)}
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(work_one, nc, f"before{i}", jobs, refusals)

        # A clean stop (SIGTERM flushes consumer state): a kill -9 also redelivers a few acked
        # inputs, and a redelivered heartbeat of a finished lease is fenced, which is right but
        # is not what this test is about.
        await anyio.to_thread.run_sync(nats_server.restart)
        ready = time.monotonic()
        # Jobs and agents both new since the restart: only one replica wrote each of them, so
        # the other knows them only through its (re-established) stream or the store.
        after = {await across_outage(lambda: submit(nc, job_request(contract()))) for _ in range(8)}
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(work_one, nc, f"after{i}", after, refusals)
        first = await wait_for_event(nc, lambda e: isinstance(e, LeaseGranted) and e.originator_id in after)
        assert isinstance(first, LeaseGranted)
        print(f"first lease after the broker was ready: {time.monotonic() - ready:.2f}s ({first.agent})")
        await assert_nothing_refused(nc, jobs | after, refusals)


async def test_two_scheduler_replicas_taking_registrations_and_claims_at_once_refuse_none(
    nats_server: EmbeddedServer,
) -> None:
    async with AsyncExitStack() as stack:
        await replicas(stack, nats_server.url)
        nc = await stack.enter_async_context(client(nats_server.url))
        refusals: list[str] = []
        jobs = {await submit(nc, job_request(contract())) for _ in range(16)}
        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(work_one, nc, f"agent{i}", jobs, refusals)
        await assert_nothing_refused(nc, jobs, refusals)
