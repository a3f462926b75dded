"""What the revoker keeps per job is gone once the job has ended; per agent, only the evidence
its policy counts."""

from __future__ import annotations

from uuid import UUID

import anyio

from services import registry
from services.revoker import Revoker
from shared import runtime
from shared.contract import Contract, Scope
from shared.events import AgentLevelChanged, JobCompleted
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, job_request, submit, wait_for_event

# One more than the policy's clean completions: the agent is promoted on the way.
JOBS = 4


async def test_the_revoker_keeps_nothing_per_job_once_its_jobs_completed(nats_server: EmbeddedServer) -> None:
    services = registry.build(["scheduler", "reconciler", "checker", "applier", "revoker"])
    [revoker] = [s for s in services if isinstance(s, Revoker)]
    completed: set[UUID] = set()
    promoted: list[AgentLevelChanged] = []
    async with (
        runtime.deployment(nats_server.url, name="revoker-state") as (ctx, _url),
        anyio.create_task_group() as tg,
        client(nats_server.url) as nc,
    ):
        await tg.start(runtime.run_services, ctx, services)
        jobs = {
            await submit(nc, job_request(Contract(scope=Scope(effects=["none"])), kind="noop"))
            for _ in range(JOBS)
        }

        async def handler(job: JobContext) -> Proposal:
            return Proposal(output={"answer": 42})

        await AgentClient(nc, "tidy").run(handler, jobs=JOBS)

        def seen(event: object) -> bool:
            if isinstance(event, JobCompleted):
                completed.add(event.originator_id)
            if isinstance(event, AgentLevelChanged):
                promoted.append(event)
            return completed >= jobs and bool(promoted)

        await wait_for_event(nc, seen, timeout=30)
        tg.cancel_scope.cancel()
    state = revoker.authority
    assert state.jobs == {}
    record = state.agents["tidy"]
    assert record.live_leases == {}
    assert record.level == promoted[0].level == 1
    # The evidence since the promotion, bounded by what the policy counts.
    assert len(record.clean) <= revoker.policy.promotion.clean_completions
    # What outlives a job: only an applied proposal a revocation's rollback could still reach.
    assert set(state.proposals) == set(record.applied)
    assert len(record.applied) <= JOBS - revoker.policy.promotion.clean_completions
