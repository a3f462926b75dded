"""An operator's command on a proposal whose job ended long ago (evicted from every service's
bounded memory) reaches it through the log: the CLI reads the proposal's job from its
`proposal.submitted` and names it, the service loads that job from the store and checks that it
holds the proposal. A command naming the wrong job is refused and recorded, and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import anyio
from nats.aio.client import Client

from services import registry
from services.api import Api
from services.checker import Checker
from services.projector import Projector
from services.revoker import Revoker
from shared import bus, runtime, topology
from shared.contract import Contract, Scope
from shared.events import (
    AgentLevelChanged,
    AnyEvent,
    InputRejected,
    JobCompleted,
    ProposalSubmitted,
    RollbackRequested,
)
from shared.messages import OperatorCommand, Rejected
from shared.runtime import Context
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from shared.views import Views
from tests.harness import client, events_of, job_request, submit, wait_for_event

REPO = Path(__file__).resolve().parent.parent
# One more than the policy's clean completions: the agent's promotion on the way lets the
# revoker forget the applied proposals before it, so only the log still knows the first jobs.
JOBS = 4


@dataclass
class Ended:
    ctx: Context
    nc: Client
    checker: Checker
    revoker: Revoker
    jobs: list[UUID]  # in the order they completed
    proposal_of: dict[UUID, UUID]
    api: Api


@asynccontextmanager
async def ended_jobs(url: str, tmp_path: Path) -> AsyncIterator[Ended]:
    """JOBS completed jobs, with views and the checker's index keeping one ended job each (and
    a projector and an open API over the read model)."""
    checker = Checker(ended_kept=1)
    store = f"sqlite:///{tmp_path}/old-proposals.sqlite"
    projector = Projector(store, max_batch=200)
    api = Api("127.0.0.1:0", store, auth="off")
    services = [
        *registry.build(["scheduler", "reconciler", "applier", "revoker"]),
        checker,
        projector,
        api,
    ]
    [revoker] = [s for s in services if isinstance(s, Revoker)]
    async with (
        runtime.deployment(url, name="old-proposals") as (ctx, _url),
        anyio.create_task_group() as tg,
        client(url) as nc,
    ):
        ctx.views = Views(forget_ended=True, ended_cache=1)
        await tg.start(runtime.run_services, ctx, services)
        for _ in range(JOBS):
            await submit(nc, job_request(Contract(scope=Scope(effects=["none"])), kind="noop"))

        async def handler(job: JobContext) -> Proposal:
            return Proposal(output={"answer": 42})

        await AgentClient(nc, "tidy").run(handler, jobs=JOBS)
        completed: list[UUID] = []
        promoted: list[AgentLevelChanged] = []

        def seen(event: AnyEvent) -> bool:
            if isinstance(event, JobCompleted) and event.originator_id not in completed:
                completed.append(event.originator_id)
            if isinstance(event, AgentLevelChanged):
                promoted.append(event)
            return len(completed) == JOBS and bool(promoted)

        await wait_for_event(nc, seen, timeout=30)
        info = await ctx.js.stream_info(topology.EVENT_STREAM)
        with anyio.fail_after(10):
            await ctx.views.reached(info.state.last_seq)
        proposal_of = {
            e.originator_id: e.proposal_id for e in await events_of(nc) if isinstance(e, ProposalSubmitted)
        }
        await projector.wait_for(info.state.last_seq, timeout=15)
        yield Ended(ctx, nc, checker, revoker, completed, proposal_of, api)
        tg.cancel_scope.cancel()


def warden(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--operator", "carol", "--reason", f"why {args[0]}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WARDEN_NATS_URL": url},
        cwd=REPO,
    )


async def test_a_proposal_of_a_job_evicted_from_every_cache_is_approved_or_rolled_back_from_the_cli(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with ended_jobs(nats_server.url, tmp_path) as ended:
        first = ended.jobs[0]
        pid = ended.proposal_of[first]
        # Nothing in memory knows the first job's proposal any more: only the log does.
        assert ended.ctx.views.job(first) is None
        assert pid not in ended.revoker.authority.proposals
        assert ended.checker._job_of(pid) is None

        approved = await anyio.to_thread.run_sync(warden, nats_server.url, "approve", str(pid))
        # Answered with what became of it (decided by the checker), not "not in the record".
        assert approved.returncode == 1, (approved.stdout, approved.stderr)
        assert f"proposal {pid} is already applied" in approved.stderr

        rolled = await anyio.to_thread.run_sync(warden, nats_server.url, "rollback", str(pid)[:8])
        assert rolled.returncode == 0, (rolled.stdout, rolled.stderr)
        asked = await wait_for_event(
            ended.nc, lambda e: isinstance(e, RollbackRequested) and e.proposal_id == pid
        )
        assert isinstance(asked, RollbackRequested)
        assert asked.originator_id == first and asked.by == "carol" and asked.reason == "why rollback"

        # A full id is checked against the log as a prefix is: one it does not hold exits 3.
        stray = uuid4()
        unknown = await anyio.to_thread.run_sync(warden, nats_server.url, "rollback", str(stray))
        assert unknown.returncode == 3 and f"no proposal {stray} in the record" in unknown.stderr


async def test_a_command_naming_a_job_that_does_not_hold_the_proposal_is_refused_and_changes_nothing(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with ended_jobs(nats_server.url, tmp_path) as ended:
        # The last job's proposal is still known to the services; the command names another job.
        last, other = ended.jobs[-1], ended.jobs[0]
        pid = ended.proposal_of[last]
        before = {j: await events_of(ended.nc, topology.event_subject(j)) for j in (last, other)}
        for verb in ("rollback", "approve", "deny"):
            command = OperatorCommand(operator="mallory", reason="wrong job", proposal_id=pid, job_id=other)
            reply = await bus.request(ended.nc, topology.operator_subject(verb), command)
            assert isinstance(reply, Rejected), (verb, reply)
            [error] = reply.errors
            assert error.path == "$.job_id" and f"proposal {pid} is not one of job {other}" in error.message

            def refused(e: AnyEvent, subject: str = topology.operator_subject(verb)) -> bool:
                return isinstance(e, InputRejected) and e.subject == subject and e.sender == "mallory"

            recorded = await wait_for_event(ended.nc, refused)
            assert isinstance(recorded, InputRejected) and recorded.errors == [error]
        after = {j: await events_of(ended.nc, topology.event_subject(j)) for j in (last, other)}
        assert after == before


async def test_a_proposal_of_a_job_evicted_from_every_cache_is_approved_or_rolled_back_over_http(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    import httpx

    async with ended_jobs(nats_server.url, tmp_path) as ended:
        first = ended.jobs[0]
        pid = str(ended.proposal_of[first])
        assert ended.ctx.views.job(first) is None  # only the log (and the read model) know it
        async with httpx.AsyncClient(base_url=ended.api.url, timeout=15) as http:
            approved = await http.post("/api/operator/approve", json={"reason": "ok", "proposal_id": pid})
            # Decided by the checker on the job the read model names, not "not found".
            assert approved.status_code == 422, approved.text
            assert f"proposal {pid} is already applied" in approved.json()["errors"][0]["message"]
            rolled = await http.post("/api/operator/rollback", json={"reason": "undo", "proposal_id": pid})
            assert rolled.status_code == 200, rolled.text
        asked = await wait_for_event(
            ended.nc, lambda e: isinstance(e, RollbackRequested) and str(e.proposal_id) == pid
        )
        assert isinstance(asked, RollbackRequested) and asked.originator_id == first
