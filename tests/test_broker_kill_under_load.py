"""The broker killed (-9) while agents work: no valid input is refused, no attempt is spent.

Two replicas of every deciding service (each its own connection, application and view), agents
serving jobs through the SDK's loop with heartbeats every second, and jobs submitted all along.
The nats-server is killed with SIGKILL twice while inputs flow, and restarted on the same port
and store. A kill -9 loses no acknowledged write (`sync_interval: always`) but may lose consumer
acks, so inputs already handled are delivered again: they must be recognised, not judged anew.

The lease TTL (30 s) is far longer than an outage, so the contract allows no expiry; the log
must hold no rejection, no fenced message, no expiry and no requeue, and every job completes
once. Services must resume within a third of the TTL of the server being ready.
"""

from __future__ import annotations

import functools
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from uuid import UUID

import anyio
import pytest
from nats.aio.client import Client

from shared import bus, topology
from shared.contract import Contract, Stopping
from shared.events import (
    AnyEvent,
    InputRejected,
    JobCompleted,
    JobRequeued,
    LeaseExpired,
    LeaseGranted,
    MessageRejected,
    ProposalRejected,
    ProposalSubmitted,
)
from shared.messages import Accepted, JobRequest
from shared.sdk import AgentClient, JobContext, Outcome, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, events_of, job_request, running, wait_for_event

SERVICES = ["scheduler", "reconciler", "checker", "applier"]
JOBS, AGENTS, KILLS = 24, 4, 2
TTL_S = 30
OUTAGE_S = 1.0  # how long the broker stays dead: the fault itself, not a wait for a condition
WORK_S = 2.5  # each job's work: several heartbeats, so some are in flight at a kill


def contract() -> Contract:
    return Contract(stopping=Stopping(lease_ttl_s=TTL_S, heartbeat_interval_s=1, max_attempts=1))


async def submit_across_outage(nc: Client, request: JobRequest) -> UUID:
    """Submit, retrying the same request (same idempotency key) until answered."""
    with anyio.fail_after(90):
        while True:
            try:
                reply = await bus.request(nc, topology.REQUEST_SUBJECT, request, timeout=3.0)
            except TimeoutError:  # not stored, not answered, or still reconnecting
                await anyio.sleep(0.2)
                continue
            assert isinstance(reply, Accepted), reply
            assert reply.job_id is not None
            return reply.job_id


async def handler(ctx: JobContext) -> Proposal:
    for step in range(5):
        ctx.report(progress=step / 5, note=f"step {step}")
        await anyio.sleep(WORK_S / 5)  # the agent's work
    return Proposal(output={"job": str(ctx.job_id)})


def first_after(events: list[AnyEvent], at: datetime) -> AnyEvent | None:
    """The first event a service wrote in answer to an agent after `at`."""
    answers = [
        e
        for e in events
        if isinstance(e, LeaseGranted | ProposalSubmitted | JobCompleted) and e.timestamp > at
    ]
    return min(answers, key=lambda e: e.timestamp, default=None)


@pytest.mark.timeout(300)  # bounded below; two outages and 24 jobs of 2.5 s on a loaded machine
async def test_valid_inputs_across_broker_kills_under_load_are_neither_refused_nor_fenced(
    nats_server: EmbeddedServer,
) -> None:
    async with AsyncExitStack() as stack:
        for replica in ("replica-a", "replica-b"):
            await stack.enter_async_context(running(nats_server.url, SERVICES, name=replica))
        submitter = await stack.enter_async_context(client(nats_server.url, "submitter"))
        agents_nc = await stack.enter_async_context(client(nats_server.url, "agents"))
        agents = [AgentClient(agents_nc, f"worker{i}", timeout=3.0) for i in range(AGENTS)]
        outcomes: list[Outcome] = []
        jobs: set[UUID] = set()
        completed = anyio.Event()
        ready_at: list[datetime] = []

        # Kill k comes once (k + 1) / (KILLS + 1) of the jobs have ended at their agents.
        milestones = [anyio.Event() for _ in range(KILLS)]

        def on_outcome(outcome: Outcome) -> None:
            outcomes.append(outcome)
            for k, milestone in enumerate(milestones):
                if len(outcomes) >= (k + 1) * JOBS // (KILLS + 1):
                    milestone.set()
            if len([o for o in outcomes if o.status == "proposed"]) >= JOBS:
                completed.set()

        async def submit_all() -> None:
            for _ in range(JOBS):
                jobs.add(await submit_across_outage(submitter, job_request(contract())))
                await anyio.sleep(0.3)  # inputs keep arriving through the run

        async def kill_broker() -> None:
            for kill in range(KILLS):
                with anyio.fail_after(120):
                    await milestones[kill].wait()
                print(f"kill {kill} after {len(outcomes)} outcomes", flush=True)
                nats_server.kill()
                await anyio.sleep(OUTAGE_S)
                await anyio.to_thread.run_sync(nats_server.start)
                ready_at.append(datetime.now(UTC))

        async with anyio.create_task_group() as tg:
            for agent in agents:
                tg.start_soon(functools.partial(agent.serve, handler, on_outcome=on_outcome))
            tg.start_soon(submit_all)
            await kill_broker()
            with anyio.fail_after(120):
                await completed.wait()
            for job_id in jobs:  # an accepted proposal is applied after the verdict
                await wait_for_event(
                    submitter,
                    lambda e, j=job_id: isinstance(e, JobCompleted) and e.originator_id == j,  # type: ignore[misc]
                    timeout=60,
                )
            for agent in agents:
                agent.stop("the test is done")

        assert [o for o in outcomes if o.status != "proposed"] == []
        assert len(jobs) == JOBS
        events = await events_of(submitter)
        refused = [
            e
            for e in events
            if isinstance(e, InputRejected | MessageRejected | ProposalRejected | LeaseExpired | JobRequeued)
        ]
        assert refused == []
        done = [e.originator_id for e in events if isinstance(e, JobCompleted)]
        assert sorted(done) == sorted(jobs)  # each job completed exactly once
        for n, ready in enumerate(ready_at):
            first = first_after(events, ready)
            assert first is not None
            resumed = (first.timestamp - ready).total_seconds()
            print(f"restart {n}: first answer {resumed:.2f}s after the server was ready ({first})")
            assert resumed < TTL_S / 3
