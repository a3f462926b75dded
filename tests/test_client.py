"""The Python client for services (shared/client.py): submit, get, wait and cancel over the
documented subjects, against real services and a real agent."""

from __future__ import annotations

import uuid

import anyio
import pytest

from shared.client import JobNotFound, Refused, WardenClient
from shared.contract import Contract, Scope, Stopping
from shared.events import JobCancelled
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, propose_accepted, running, wait_for_event


def contract() -> Contract:
    return Contract(
        scope=Scope(effects=["none"]),
        stopping=Stopping(lease_ttl_s=5.0, heartbeat_interval_s=1.0, max_attempts=2),
    )


async def test_a_service_submits_a_job_and_waits_for_an_agent_to_complete_it(
    nats_server: EmbeddedServer,
) -> None:
    async with (
        running(nats_server.url, ["scheduler", "reconciler", "checker", "applier", "revoker"]),
        WardenClient.connect(nats_server.url, name="billing") as warden,
        client(nats_server.url) as nc,
    ):
        key = f"invoice-{uuid.uuid4()}"
        job = await warden.submit(contract(), kind="invoice", idempotency_key=key)
        assert job.duplicate is False
        queued = await job.get()
        assert queued.status == "queued" and queued.submitter == "billing" and queued.kind == "invoice"
        again = await warden.submit(contract(), kind="invoice", idempotency_key=key)
        assert again.job_id == job.job_id and again.duplicate is True

        with pytest.raises(TimeoutError):
            await job.wait(timeout=0.2)  # nobody has claimed it yet

        agent = AgentClient(nc, "clerk", kinds=["invoice"])
        await agent.register()
        grant = await agent.claim()
        assert grant is not None and grant.job_id == job.job_id
        async with anyio.create_task_group() as tg:
            finished: list[object] = []

            async def waiting() -> None:
                finished.append(await job.wait(timeout=30))

            tg.start_soon(waiting)
            await propose_accepted(
                agent, JobContext(grant=grant), Proposal(effect="none", output={"total": 3})
            )
        [final] = finished
        assert final == await job.get()
        done = await warden.job(job.job_id).get()
        assert done.status == "completed" and [lease.agent for lease in done.leases] == ["clerk"]


async def test_a_service_cancels_its_job_and_a_bad_request_is_refused_with_every_reason(
    nats_server: EmbeddedServer,
) -> None:
    async with (
        running(nats_server.url, ["scheduler", "reconciler", "revoker"]),
        WardenClient.connect(nats_server.url, name="billing") as warden,
    ):
        job = await warden.submit(contract(), kind="invoice")
        await job.cancel("customer withdrew")
        cancelled = await job.wait(timeout=15)
        assert cancelled.status == "cancelled"
        event = await wait_for_event(warden.nc, lambda e: isinstance(e, JobCancelled))
        assert (
            isinstance(event, JobCancelled) and event.by == "billing" and event.reason == "customer withdrew"
        )
        with pytest.raises(Refused) as again:
            await job.cancel("twice")
        assert again.value.errors and again.value.rejection_id is not None

        with pytest.raises(Refused) as bad:
            await warden.submit({"stopping": {"max_attempts": -1, "lease_ttl_s": "soon"}}, kind="invoice")
        assert sorted(e.path for e in bad.value.errors) == [
            "$.contract.stopping.lease_ttl_s",
            "$.contract.stopping.max_attempts",
        ]
        with pytest.raises(Refused) as semantic:  # refused by the scheduler, not the client
            await warden.submit(
                Contract(stopping=Stopping(lease_ttl_s=1.0, heartbeat_interval_s=2.0)), kind="x"
            )
        assert semantic.value.rejection_id is not None
        assert [e.path for e in semantic.value.errors] == ["$.contract.stopping.heartbeat_interval_s"]
        with pytest.raises(JobNotFound):
            await warden.job(uuid.uuid4()).get()
