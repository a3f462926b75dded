"""Every id-taking command accepts a unique id prefix (8+ characters), through one resolver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID, uuid4

import anyio
import pytest

from shared.events import InvariantChecked, JobCancelled, JobRequeued, ProposalRejected, agent_id_for
from shared.forensics import ids
from shared.sdk import Proposal
from shared.server import EmbeddedServer
from tests import gitrepo
from tests.harness import client, lease_job, propose_accepted, running, wait_for_event

REPO = Path(__file__).resolve().parent.parent


def test_a_prefix_that_starts_several_ids_lists_them_all() -> None:
    a, b = UUID("1771f15b-0000-4000-8000-000000000001"), UUID("1771f15b-0000-4000-8000-000000000002")
    with pytest.raises(ids.IdNotFound, match="ambiguous: it starts 2 job ids") as caught:
        ids.choose("1771f15b", "job", [a, b, uuid4()])
    assert str(a) in str(caught.value) and str(b) in str(caught.value)
    assert ids.choose("1771F15B-0000-4000-8000-00000000000", "job", [a]) == a


def test_a_prefix_shorter_than_eight_characters_or_not_hex_is_refused() -> None:
    with pytest.raises(ids.IdNotFound, match="too short"):
        ids._prefix("1771f15", "job")
    with pytest.raises(ids.IdNotFound, match="not a job id"):
        ids._prefix("; rm -rf /", "job")


async def test_explain_dossier_ledger_deny_cancel_and_requeue_take_a_unique_prefix(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    env = {**os.environ, "WARDEN_NATS_URL": nats_server.url}

    def warden(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=REPO,
        )

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await anyio.to_thread.run_sync(lambda: warden(*args))

    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    contract = gitrepo.git_contract(repo, approval_required=True)
    async with running(nats_server.url), client(nats_server.url) as nc:
        agent, ctx = await lease_job(nc, "careful", contract)
        pid = await propose_accepted(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        await wait_for_event(
            nc, lambda e: isinstance(e, InvariantChecked) and e.invariant == "ci_gate", timeout=30
        )

        denied = await run("deny", str(pid)[:8], "--reason", "not this week", "--operator", "dora")
        assert denied.returncode == 0, denied.stderr
        rejected = await wait_for_event(
            nc, lambda e: isinstance(e, ProposalRejected) and e.proposal_id == pid
        )
        assert isinstance(rejected, ProposalRejected) and rejected.by == "dora"

        short = str(ctx.job_id)[:8]
        explained = await run("explain", short, "--json")
        assert explained.returncode == 0, explained.stderr
        assert str(ctx.job_id) in explained.stdout and '"cause_class":"operator"' in explained.stdout.replace(
            " ", ""
        )
        for args in (("dossier", short), ("ledger", "show", short), ("ledger", "verify", "--job", short)):
            result = await run(*args)
            assert result.returncode == 0, (args, result.stderr)
            assert str(ctx.job_id) in result.stdout or args[1] == "verify", args

        cancelled = await run("cancel", short, "--reason", "done with it", "--operator", "dora")
        assert cancelled.returncode == 0, cancelled.stderr
        await wait_for_event(nc, lambda e: isinstance(e, JobCancelled) and e.originator_id == ctx.job_id)
        requeued = await run("requeue", short, "--reason", "try again", "--operator", "dora")
        assert requeued.returncode == 0, requeued.stderr
        await wait_for_event(nc, lambda e: isinstance(e, JobRequeued) and e.originator_id == ctx.job_id)

        # A prefix naming nothing (exit 3, not found), or too short (2, usage), is refused with
        # the reason, and nothing is sent.
        nothing = await run("approve", "00000000", "--reason", "x", "--operator", "dora")
        assert nothing.returncode == 3 and "no proposal id starts with '00000000'" in nothing.stderr
        too_short = await run("explain", short[:7])
        assert too_short.returncode == 2 and "too short" in too_short.stderr
        # An agent's aggregate id is not a job id, even though it has events of its own.
        not_a_job = await run("explain", str(agent_id_for("careful"))[:13])
        assert not_a_job.returncode == 3 and "no job id starts with" in not_a_job.stderr
