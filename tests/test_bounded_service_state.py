"""The scheduler's and reconciler's per-job state ends with its job: after jobs complete, expire
into tombstones or are cancelled, no heartbeat, timer, lock, queue entry or grant in hand is
left behind, and the claims kept for choosing who retries a job last no longer than they count."""

from __future__ import annotations

import uuid
from datetime import timedelta
from functools import partial

import anyio
import pytest

from services import registry
from services.reconciler import Reconciler
from services.scheduler import Scheduler
from shared import bus, runtime, topology
from shared.contract import Contract, Scope, Stopping
from shared.decide.leases import RECENT_CLAIM_S
from shared.events import AnyEvent, JobCancelled, JobCompleted, JobTombstoned, now
from shared.messages import Accepted, Heartbeat, HeartbeatAck, JobRequest, OperatorCommand
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, submit, wait_for_event

JOBS = 24


def completed(job_id: uuid.UUID, event: AnyEvent) -> bool:
    return isinstance(event, JobCompleted) and event.originator_id == job_id


def request(kind: str = "noop", *, ttl: float = 5.0, attempts: int = 3) -> JobRequest:
    # A far deadline: its timer outlives the job unless the reconciler forgets it at the end.
    stopping = Stopping(
        lease_ttl_s=ttl,
        heartbeat_interval_s=ttl / 4,
        max_attempts=attempts,
        deadline=now() + timedelta(hours=1),
    )
    contract = Contract(scope=Scope(effects=["none"]), stopping=stopping)
    return JobRequest(idempotency_key=str(uuid.uuid4()), kind=kind, contract=contract)


@pytest.mark.usefixtures("permissive_policy")
async def test_no_per_job_state_outlives_the_jobs_that_completed_expired_or_were_cancelled(
    nats_server: EmbeddedServer,
) -> None:
    services = registry.build(["scheduler", "reconciler", "checker", "applier"])
    scheduler = next(s for s in services if isinstance(s, Scheduler))
    reconciler = next(s for s in services if isinstance(s, Reconciler))
    async with (
        runtime.deployment(nats_server.url, name="bounded") as (ctx, _url),
        anyio.create_task_group() as tg,
        client(nats_server.url) as nc,
    ):
        await tg.start(runtime.run_services, ctx, services)

        # One job whose only attempt is held by a silent agent: it expires into a tombstone.
        doomed = await submit(nc, request(ttl=0.5, attempts=1))
        silent = AgentClient(nc, "silent")
        await silent.register()
        assert (await silent.claim()) is not None
        await wait_for_event(nc, lambda e: isinstance(e, JobTombstoned) and e.originator_id == doomed)

        # One no agent takes, cancelled by an operator while queued.
        unwanted = await submit(nc, request(kind="nobody-does-this"))
        cancel = OperatorCommand(operator="op", reason="not wanted", job_id=unwanted)
        assert isinstance(await bus.request(nc, f"{topology.INPUT_ROOT}.op.cancel", cancel), Accepted)
        await wait_for_event(nc, lambda e: isinstance(e, JobCancelled) and e.originator_id == unwanted)

        done = [await submit(nc, request()) for _ in range(JOBS)]
        worker = AgentClient(nc, "worker", max_concurrent=4)
        grants: list[JobContext] = []

        async def work(job: JobContext) -> Proposal:
            grants.append(job)
            return Proposal(output={"done": True})

        outcomes = await worker.run(work, jobs=JOBS)
        assert sorted(o.job_id for o in outcomes) == sorted(done)
        for job_id in done:
            await wait_for_event(nc, partial(completed, job_id))

        # The worker's heartbeats go in order on its subject: once this one is answered, every
        # earlier one has been handled (it is late, so it records nothing itself).
        last = grants[-1]
        ack = await bus.request(
            nc,
            topology.agent_subject("worker", "heartbeat"),
            Heartbeat(job_id=last.job_id, epoch=last.epoch),
        )
        assert isinstance(ack, HeartbeatAck) and ack.standing == "ended"
        await ctx.view_current()

        assert reconciler.heartbeats == {}
        assert reconciler._due == {}
        assert reconciler._timers == []
        assert reconciler._locks == {}
        assert len(scheduler._queue) == 0 and scheduler._queue.kinds == set() and scheduler._stale == []
        assert scheduler._granting == set()
        # Claims count as presence for RECENT_CLAIM_S; past it they are gone, not kept.
        assert len(scheduler._last_claim) <= 2
        scheduler._last_claim.prune(ctx.clock() + timedelta(seconds=RECENT_CLAIM_S + 1))
        assert len(scheduler._last_claim) == 0
        tg.cancel_scope.cancel()
