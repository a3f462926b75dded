"""Two scheduler processes taking registrations and claims at once refuse none.

Each service runs as its own `warden run` process, the scheduler twice. Agents register and
claim at the same instant, in rounds of new names, so a claim often reaches the replica that did
not record its agent's registration (and whose view has not folded it yet). Nothing valid may be
refused: no "not registered", no rejected input, and every job completes.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import anyio
import pytest

from shared.contract import Contract, Stopping
from shared.events import InputRejected, JobCompleted, MessageRejected, ProposalRejected
from shared.messages import Accepted
from shared.sdk import AgentClient, AgentError, JobContext, Proposal
from shared.server import EmbeddedServer
from tests import service_processes
from tests.harness import client, events_of, job_request, submit, wait_for_event

PROCESSES = ["scheduler", "scheduler", "reconciler", "checker", "applier"]
ROUNDS, AGENTS = 3, 8


def contract() -> Contract:
    return Contract(stopping=Stopping(lease_ttl_s=60, heartbeat_interval_s=15, max_attempts=1))


@pytest.mark.timeout(300)  # five service processes start on a loaded machine; each step is bounded
async def test_two_scheduler_processes_refuse_no_registration_or_claim_made_at_once(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    procs = [
        service_processes.start(nats_server.url, s, tmp_path, label=f"{s}-{i}")
        for i, s in enumerate(PROCESSES)
    ]
    try:
        for proc in procs:
            await anyio.to_thread.run_sync(proc.wait_ready)
        async with client(nats_server.url) as nc:
            refusals: list[str] = []
            jobs: set[UUID] = set()
            for round_ in range(ROUNDS):
                jobs |= {await submit(nc, job_request(contract())) for _ in range(AGENTS)}
                go = anyio.Event()

                async def agent(name: str, go: anyio.Event) -> None:
                    client_ = AgentClient(nc, name, timeout=10.0)
                    await go.wait()  # every agent of the round registers, then claims, at once
                    try:
                        await client_.register()
                        grant = await client_.claim()
                    except AgentError as exc:
                        refusals.append(f"{name}: {exc}")
                        return
                    if grant is None:
                        refusals.append(f"{name}: no.work with jobs queued")
                        return
                    reply = await client_.propose(JobContext(grant=grant), Proposal(output={"by": name}))
                    if not isinstance(reply, Accepted):
                        refusals.append(f"{name}: proposal answered {reply}")

                async with anyio.create_task_group() as tg:
                    for i in range(AGENTS):
                        tg.start_soon(agent, f"r{round_}-agent{i}", go)
                    go.set()
            assert refusals == []
            for job_id in jobs:
                await wait_for_event(
                    nc,
                    lambda e, j=job_id: isinstance(e, JobCompleted) and e.originator_id == j,  # type: ignore[misc]
                    timeout=30,
                )
            events = await events_of(nc)
            assert [
                e for e in events if isinstance(e, InputRejected | MessageRejected | ProposalRejected)
            ] == []
            assert sum(isinstance(e, JobCompleted) for e in events) == ROUNDS * AGENTS
    finally:
        for proc in procs:
            proc.stop()
    assert [p.service for p in procs if "Traceback" in p.output()] == []
