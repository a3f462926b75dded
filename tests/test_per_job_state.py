"""What the checker and the applier keep per job is gone once the job has ended."""

from __future__ import annotations

from uuid import UUID

import anyio

from services import registry
from services.applier import Applier
from services.checker import Checker
from shared import runtime
from shared.contract import Contract, Scope
from shared.events import JobCompleted, ProposalAccepted
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, job_request, submit, wait_for_event

JOBS = 3


async def test_checker_and_applier_keep_nothing_per_job_once_their_jobs_completed(
    nats_server: EmbeddedServer,
) -> None:
    services = registry.build(["scheduler", "reconciler", "checker", "applier"])
    [checker] = [s for s in services if isinstance(s, Checker)]
    [applier] = [s for s in services if isinstance(s, Applier)]
    completed: set[UUID] = set()
    accepted: set[UUID] = set()
    async with (
        runtime.deployment(nats_server.url, name="per-job-state") as (ctx, _url),
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

        outcomes = await AgentClient(nc, "tidy").run(handler, jobs=JOBS)
        assert [o.status for o in outcomes] == ["proposed"] * JOBS

        def seen(event: object) -> bool:
            if isinstance(event, ProposalAccepted):
                accepted.add(event.proposal_id)
            if isinstance(event, JobCompleted):
                completed.add(event.originator_id)
            return completed >= jobs

        await wait_for_event(nc, seen, timeout=30)
        # Stopping drains what is in hand: every record our services began is finished first.
        tg.cancel_scope.cancel()
    assert completed == jobs and len(accepted) == JOBS
    assert checker._locks == {}
    assert checker._proposal_job == {}
    assert applier._unrecorded == {} and applier._pending == {} and applier._backoff == {}
    assert applier._driving == set() and applier._again == set() and applier._exclusive == {}
    # What remains is bounded: the ended proposals a late approve or deny is answered about.
    assert set(checker._ended) == accepted
