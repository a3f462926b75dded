"""Proposals end to end: intake, the invariant map, decisions, approvals and payload limits.

Real nats-server, real git repository in tmp_path, the services running in-process.
"""

from __future__ import annotations

import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from click.testing import CliRunner
from nats.js.errors import NotFoundError

from services.cli.creds import creds
from shared import bus, credentials, gitops, proposals, topology
from shared.contract import Contract, Scope, Target
from shared.events import (
    AgentSuspended,
    AnyEvent,
    InputRejected,
    InvariantChecked,
    JobCompleted,
    JobRequeued,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
)
from shared.forensics import collect, story
from shared.forensics import output as outputs
from shared.messages import Accepted, OperatorCommand, Propose, Rejected
from shared.sdk import AgentClient, JobContext, Proposal, connect_agent
from shared.server import EmbeddedServer
from tests import gitrepo, opsnats
from tests.harness import client, events_of, running, submit, wait_for_event
from tests.harness import job_request as request
from tests.harness import lease_job as claim
from tests.harness import propose_accepted as propose

SERVICES = ["scheduler", "reconciler", "checker", "applier"]
ROOT = Path(__file__).resolve().parent.parent


def decided(pid: uuid.UUID) -> Any:
    return lambda e: isinstance(e, ProposalAccepted | ProposalRejected) and e.proposal_id == pid


async def checks_of(nc: Any, job_id: uuid.UUID) -> dict[str, InvariantChecked]:
    return {
        e.invariant: e
        for e in await events_of(nc, topology.event_subject(job_id))
        if isinstance(e, InvariantChecked)
    }


async def test_a_job_whose_sdk_agent_proposes_no_effect_completes(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        job_id = await submit(nc, request(Contract(scope=Scope(effects=["none"])), kind="noop"))
        agent = AgentClient(nc, "helper")

        async def handler(ctx: JobContext) -> Proposal:
            return Proposal(output={"answer": 42})

        [outcome] = await agent.run(handler, jobs=1)
        assert outcome.status == "proposed"
        done = await wait_for_event(nc, lambda e: isinstance(e, JobCompleted))
        assert isinstance(done, JobCompleted) and done.originator_id == job_id and done.agent == "helper"
        checks = await checks_of(nc, job_id)
        assert set(checks) == {
            "scope",
            "budget",
            "output_shape",
            "base_drift",
            "ci_gate",
            "exit_status",
            "empty_change",
        }
        assert all(c.verdict == "pass" for c in checks.values())
        assert checks["ci_gate"].evidence["applicable"] is False


async def test_a_change_touching_a_file_outside_the_scope_globs_is_rejected_and_recorded(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, {"app/calc.py": "X = 1\n", "check.py": "print('ok')\n"})
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "wanderer", gitrepo.git_contract(repo, ci=False))
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        decision = await wait_for_event(nc, decided(pid))
        assert isinstance(decision, ProposalRejected)
        assert any(v.startswith("scope:") and "check.py" in v for v in decision.violations)
        scope = (await checks_of(nc, ctx.job_id))["scope"]
        assert scope.verdict == "fail"
        assert scope.evidence["outside"] == ["check.py"]
        assert scope.version == "2"
        requeued = await wait_for_event(nc, lambda e: isinstance(e, JobRequeued))
        assert requeued.originator_id == ctx.job_id
    assert gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid)) == []


async def test_a_change_that_breaks_the_tests_is_rejected_with_the_test_output_as_evidence(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, gitrepo.BROKEN)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "breaker", gitrepo.git_contract(repo))
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        decision = await wait_for_event(nc, decided(pid), timeout=30)
        assert isinstance(decision, ProposalRejected)
        ci = (await checks_of(nc, ctx.job_id))["ci_gate"]
        assert ci.verdict == "fail"
        assert ci.evidence["exit_code"] == 1
        assert "report says total=7" in ci.evidence["stdout_tail"]
        assert "AssertionError: total=7" in ci.evidence["stderr_tail"]
        assert ci.evidence["ran_at"] == base
    assert gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid)) == []
    # The CI worktree is gone: nothing of the run is left in the repository.
    assert "warden-wt-" not in gitops.out(repo, "worktree", "list")


async def test_a_proposal_on_a_stale_base_is_rejected_by_the_drift_invariant(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, stale = gitrepo.patch_for(repo, gitrepo.RENAMED)
    (repo / "app" / "calc.py").write_text("def compute_total(items):\n    return sum(list(items))\n")
    moved = gitrepo.commit(repo, "someone else changed calc")
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "late", gitrepo.git_contract(repo))
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=stale))
        decision = await wait_for_event(nc, decided(pid), timeout=30)
        assert isinstance(decision, ProposalRejected)
        drift = (await checks_of(nc, ctx.job_id))["base_drift"]
        assert drift.verdict == "fail"
        assert drift.evidence["base"] == stale and drift.evidence["head"] == moved
        assert drift.evidence["commits_since_base"] == [f"{moved[:7]} someone else changed calc"]
        assert drift.evidence["files_changed_since_base"] == ["app/calc.py"]
        assert "stale base" in drift.evidence["reason"]
        # The expensive gate is not run once a cheaper invariant failed, and says so.
        assert any(v.startswith("ci_gate: not run") for v in decision.violations)


async def test_output_that_does_not_match_the_contract_schema_is_rejected_naming_the_field(
    nats_server: EmbeddedServer,
) -> None:
    schema = {"type": "object", "required": ["summary"], "properties": {"summary": {"type": "string"}}}
    contract = Contract(scope=Scope(effects=["none"]), output_schema=schema)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "shapeless", contract)
        pid = await propose(agent, ctx, Proposal(output={"summary": 3}))
        decision = await wait_for_event(nc, decided(pid))
        assert isinstance(decision, ProposalRejected)
        shape = (await checks_of(nc, ctx.job_id))["output_shape"]
        assert shape.verdict == "fail"
        assert shape.evidence["errors"] == [{"path": "$['summary']", "message": "3 is not of type 'string'"}]


async def test_a_stale_epoch_proposal_is_fenced_and_recorded(nats_server: EmbeddedServer) -> None:
    contract = Contract(scope=Scope(effects=["none"]))
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "ghost", contract)
        stale = JobContext(grant=msgspec.structs.replace(ctx.grant, epoch=7))
        reply = await agent.propose(stale, Proposal())
        assert isinstance(reply, Rejected)
        assert "stale lease" in reply.errors[0].message
        fenced = await wait_for_event(nc, lambda e: isinstance(e, MessageRejected) and e.verb == "propose")
        assert isinstance(fenced, MessageRejected) and fenced.epoch == 7 and fenced.current_epoch == 1
        submitted = [e for e in await events_of(nc) if isinstance(e, ProposalSubmitted)]
        assert submitted == []


async def test_a_second_proposal_under_one_lease_is_refused_while_the_first_is_pending(
    nats_server: EmbeddedServer,
) -> None:
    contract = Contract(scope=Scope(effects=["none"]), approval_required=True)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "eager", contract)
        first = await propose(agent, ctx, Proposal(output=1))
        reply = await agent.propose(ctx, Proposal(output=2))
        assert isinstance(reply, Rejected)
        assert f"proposal {first} is already pending" in reply.errors[0].message
        assert await wait_for_event(nc, lambda e: isinstance(e, MessageRejected) and e.verb == "propose")


async def operator(nc: Any, verb: str, pid: uuid.UUID, who: str, why: str) -> Any:
    return await bus.request(
        nc, topology.operator_subject(verb), OperatorCommand(operator=who, reason=why, proposal_id=pid)
    )


async def test_approval_required_waits_for_an_operator_and_records_who_approved(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    contract = gitrepo.git_contract(repo, approval_required=True)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "careful", contract)
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        await wait_for_event(
            nc, lambda e: isinstance(e, InvariantChecked) and e.invariant == "ci_gate", timeout=30
        )
        # Checks passed, yet nothing is decided or applied until an operator says so.
        events = await events_of(nc, topology.event_subject(ctx.job_id))
        assert not [e for e in events if isinstance(e, ProposalAccepted | ProposalRejected)]
        assert gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid)) == []

        reply = await operator(nc, "approve", pid, "alice", "reviewed the rename")
        assert isinstance(reply, Accepted) and "approved by alice" in reply.detail
        accepted = await wait_for_event(nc, decided(pid))
        assert isinstance(accepted, ProposalAccepted)
        assert accepted.by == "alice" and accepted.reason == "reviewed the rename"
        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted), timeout=20)
        # A second approval of a decided proposal is refused and recorded.
        again = await operator(nc, "approve", pid, "bob", "me too")
        assert isinstance(again, Rejected) and "already" in again.errors[0].message
    assert len(gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid))) == 1


async def test_an_agent_whose_only_lease_awaits_approval_is_granted_its_next_job_meanwhile(
    nats_server: EmbeddedServer,
) -> None:
    contract = Contract(scope=Scope(effects=["none"]), approval_required=True)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent = AgentClient(nc, "diligent", max_concurrent=1)
        await agent.register()
        first_id = await submit(nc, request(contract))
        second_id = await submit(nc, request(contract))
        first = await agent.claim()
        assert first is not None and first.job_id == first_id
        ctx = JobContext(grant=first)
        pid = await propose(agent, ctx, Proposal(output="first"))

        # Its part of the first job is done: the operator's approval is not its to wait for.
        second = await agent.claim()
        assert second is not None and second.job_id == second_id
        # The first lease still lives: its heartbeats are answered, and it ends with its job.
        ack = await agent.heartbeat(ctx)
        assert ack.standing == "extended"
        assert isinstance(await operator(nc, "approve", pid, "alice", "fine"), Accepted)
        done = await wait_for_event(nc, lambda e: isinstance(e, JobCompleted) and e.originator_id == first_id)
        assert isinstance(done, JobCompleted) and done.agent == "diligent" and done.epoch == 1


async def test_a_denied_proposal_is_rejected_naming_the_operator_and_the_attempt_is_spent(
    nats_server: EmbeddedServer,
) -> None:
    contract = Contract(scope=Scope(effects=["none"]), approval_required=True)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "hopeful", contract)
        pid = await propose(agent, ctx, Proposal(output="please"))
        await wait_for_event(nc, lambda e: isinstance(e, InvariantChecked) and e.invariant == "ci_gate")
        reply = await operator(nc, "deny", pid, "carol", "not this week")
        assert isinstance(reply, Accepted)
        rejected = await wait_for_event(nc, decided(pid))
        assert isinstance(rejected, ProposalRejected)
        assert rejected.by == "carol" and rejected.reason == "not this week"
        assert rejected.violations == ["denied by carol: not this week"]
        requeued = await wait_for_event(nc, lambda e: isinstance(e, JobRequeued))
        assert isinstance(requeued, JobRequeued)
        assert str(pid) in requeued.reason


async def test_an_approval_for_an_unknown_proposal_is_refused_and_recorded(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        reply = await operator(nc, "approve", uuid.uuid4(), "dave", "looks fine")
        assert isinstance(reply, Rejected) and "no proposal" in reply.errors[0].message
        recorded = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(recorded, InputRejected) and recorded.sender == "dave"


async def test_a_several_megabyte_proposal_goes_through_the_object_store_and_is_applied(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    big = "".join(f"row {i:08d} {'x' * 60}\n" for i in range(50_000))  # ~3.5 MB
    patch, base = gitrepo.patch_for(repo, {"app/data.txt": big})
    assert len(patch) > 3 * 1024 * 1024
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "bulky", gitrepo.git_contract(repo, ci=False))
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        submitted = await wait_for_event(nc, lambda e: isinstance(e, ProposalSubmitted))
        assert isinstance(submitted, ProposalSubmitted)
        assert submitted.payload_object.startswith(f"bulky/{ctx.job_id}/1/")
        assert submitted.size > len(patch) and len(submitted.payload_hash) == 64
        assert isinstance(await wait_for_event(nc, decided(pid), timeout=30), ProposalAccepted)
        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted), timeout=30)
    [sha] = gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid))
    assert gitrepo.show(repo, sha, "app/data.txt") == big.rstrip("\n")


async def test_a_payload_past_the_object_limit_is_rejected_with_its_size_recorded(
    nats_server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_MAX_PROPOSAL_BYTES", str(2 * 1024 * 1024))
    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, {"app/data.txt": "y" * (3 * 1024 * 1024)})
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "hoarder", gitrepo.git_contract(repo, ci=False))
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        decision = await wait_for_event(nc, decided(pid), timeout=30)
        assert isinstance(decision, ProposalRejected)
        [violation] = decision.violations
        assert violation.startswith("payload: payload is ")
        assert f"the limit is {2 * 1024 * 1024} bytes" in violation
        submitted = await wait_for_event(nc, lambda e: isinstance(e, ProposalSubmitted))
        assert isinstance(submitted, ProposalSubmitted) and submitted.size > 3 * 1024 * 1024
        assert submitted.payload_object == "", "a payload past the limit is never stored"
        assert await wait_for_event(nc, lambda e: isinstance(e, JobRequeued))


async def test_an_inline_proposal_over_the_input_limit_is_rejected_as_input(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        _agent, ctx = await claim(nc, "raw", Contract(scope=Scope(effects=["none"])))
        subject = topology.agent_subject("raw", "propose")
        body = Propose(
            job_id=ctx.job_id, epoch=1, effect="none", output="z" * (topology.MAX_INPUT_BYTES + 1000)
        )
        reply = await bus.request(nc, subject, body)
        assert isinstance(reply, Rejected)
        assert f"the limit is {topology.MAX_INPUT_BYTES}" in reply.errors[0].message
        recorded = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(recorded, InputRejected) and recorded.sender == "raw"
        # Past what the input stream takes, the server refuses it and nothing is stored.
        huge = Propose(job_id=ctx.job_id, epoch=1, effect="none", output="z" * (2 * 1024 * 1024))
        with pytest.raises(bus.InputRefused, match="nothing stored"):
            await bus.request(nc, subject, huge)


async def test_a_user_invariant_registered_through_configuration_is_enforced(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_INVARIANTS", "tests.sample_invariants:no_secrets")
    contract = Contract(scope=Scope(effects=["none"]), invariants=["no_secrets"])
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "leaky", contract)
        pid = await propose(agent, ctx, Proposal(output={"note": "the password is hunter2"}))
        decision = await wait_for_event(nc, decided(pid))
        assert isinstance(decision, ProposalRejected)
        check = (await checks_of(nc, ctx.job_id))["no_secrets"]
        assert check.verdict == "fail" and check.version == "2"
        assert check.evidence["found"] == ["password"]


async def test_an_invariant_the_contract_names_but_nobody_registered_fails_closed(
    nats_server: EmbeddedServer,
) -> None:
    contract = Contract(scope=Scope(effects=["none"]), invariants=["imaginary"])
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "hopeful2", contract)
        pid = await propose(agent, ctx, Proposal())
        decision = await wait_for_event(nc, decided(pid))
        assert isinstance(decision, ProposalRejected)
        check = (await checks_of(nc, ctx.job_id))["imaginary"]
        assert check.verdict == "error" and "no invariant named 'imaginary'" in check.evidence["reason"]


@pytest.mark.slow
async def test_a_checker_killed_mid_check_resumes_without_recording_anything_twice(
    nats_server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv("WARDEN_INVARIANTS", "tests.sample_invariants:crash_once")
    monkeypatch.setenv("WARDEN_TEST_CRASH_MARKER", str(marker))
    contract = Contract(scope=Scope(effects=["none"]), invariants=["crash_once"])
    cmd = [sys.executable, "-m", "services.cli", "run", "checker", "--nats", nats_server.url]
    log = tmp_path / "checker.log"
    async with (
        running(nats_server.url, ["scheduler", "reconciler", "applier"]),
        client(nats_server.url) as nc,
    ):
        agent, ctx = await claim(nc, "patient", contract)
        with log.open("wb") as sink:
            process = await anyio.open_process(cmd, cwd=ROOT, stdout=sink, stderr=sink)
            async with process:
                pid = await propose(agent, ctx, Proposal())
                with anyio.fail_after(30):
                    code = await process.wait()
        assert code == -signal.SIGKILL, log.read_text()
        assert marker.exists()
        before = await events_of(nc, topology.event_subject(ctx.job_id))
        assert _count(before, InvariantChecked) == 7  # the policy's seven, recorded before the crash
        assert _count(before, ProposalAccepted) + _count(before, ProposalRejected) == 0

        # A new checker gets the unacked proposal again and finishes it.
        async with running(nats_server.url, ["checker"], name="checker-2"):
            decision = await wait_for_event(nc, decided(pid), timeout=40)
            assert isinstance(decision, ProposalAccepted)
            await wait_for_event(nc, lambda e: isinstance(e, JobCompleted), timeout=20)
        after = await events_of(nc, topology.event_subject(ctx.job_id))
    assert _count(after, ProposalSubmitted) == 1
    names = [e.invariant for e in after if isinstance(e, InvariantChecked)]
    policy = ["scope", "budget", "output_shape", "base_drift", "ci_gate", "exit_status", "empty_change"]
    assert sorted(names) == sorted([*policy, "crash_once"])
    assert _count(after, ProposalAccepted) == 1 and _count(after, JobCompleted) == 1


def _count(events: list[AnyEvent], kind: type) -> int:
    return sum(1 for e in events if isinstance(e, kind))


async def test_an_effect_beyond_the_agents_level_is_rejected_when_deciding(
    nats_server: EmbeddedServer,
) -> None:
    contract = Contract(scope=Scope(effects=["webhook"]), target=Target(url="http://127.0.0.1:9/hook"))
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "junior", contract)
        pid = await propose(agent, ctx, Proposal(effect="webhook", output={"ping": True}))
        decision = await wait_for_event(nc, decided(pid))
        assert isinstance(decision, ProposalRejected)
        assert decision.violations == [
            "authority: level 0 (probation) may not perform webhook; allowed: none, file.write, git.patch"
        ]
        # Every invariant passed: the refusal is the authority's, not a check's.
        assert all(c.verdict == "pass" for c in (await checks_of(nc, ctx.job_id)).values())


async def test_a_proposal_from_an_agent_suspended_meanwhile_is_rejected(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url, SERVICES) as services, client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "benched", Contract(scope=Scope(effects=["none"])))
        record = services.views.agents["benched"]
        await services.save(
            AgentSuspended(
                originator_id=record.id,
                originator_version=record.version + 1,
                name="benched",
                reason="under review",
                by="erin",
            )
        )
        pid = await propose(agent, ctx, Proposal())
        decision = await wait_for_event(nc, decided(pid))
        assert isinstance(decision, ProposalRejected)
        assert decision.violations == ["authority: agent benched is suspended: under review"]


async def test_an_agent_with_its_own_write_only_credentials_uploads_a_large_proposal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents may write payload objects but never read the bucket: the SDK's upload needs no read."""
    opsnats.set_passwords(monkeypatch)
    node = opsnats.start_single(tmp_path / "nats")
    try:
        assert node.server.process is not None
        before = node.server.log_path.read_text().count(opsnats.RELOADED)
        added = CliRunner().invoke(
            creds,
            [
                "add-agent",
                "uploader",
                "--users-file",
                str(node.users_file),
                "--reload-pid",
                str(node.server.process.pid),
                "--json",
            ],
        )
        assert added.exit_code == 0, added.output
        opsnats.wait_for_log(node.server, opsnats.RELOADED, 10, after=before)
        password = json.loads(added.output)["password"]
        monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
        monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
        url = node.server.url
        async with (
            running(url, SERVICES),
            opsnats.connected(url, **opsnats.operator_credentials()) as operator_nc,
        ):
            job_id = await submit(operator_nc, request(Contract(scope=Scope(effects=["none"]))))
            nc = await connect_agent(
                url, "uploader", user=credentials.agent_user("uploader"), password=password
            )
            try:
                agent = AgentClient(nc, "uploader")
                await agent.register()
                grant = await agent.claim()
                assert grant is not None and grant.job_id == job_id
                pid = await propose(agent, JobContext(grant=grant), Proposal(output="w" * (2 * 1024 * 1024)))
            finally:
                await nc.close()
            decision = await wait_for_event(operator_nc, decided(pid), timeout=30)
            assert isinstance(decision, ProposalAccepted)
            submitted = await wait_for_event(operator_nc, lambda e: isinstance(e, ProposalSubmitted))
            assert isinstance(submitted, ProposalSubmitted) and submitted.payload_object.startswith(
                "uploader/"
            )
    finally:
        node.server.stop()


async def test_a_completed_jobs_proposal_is_still_read_back_after_its_agent_sent_k_more(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent stream keeps each subject's latest K messages: the proposal messages and payload
    chunks of finished jobs are evicted by newer ones, yet what the applier, approvals, rollback
    and forensics read back is the record the checker kept (shared/proposals.py): in the event
    itself for a small proposal, as an object for an upload."""
    ring = 4
    monkeypatch.setenv("WARDEN_AGENT_INPUT_PER_SUBJECT", str(ring))
    blob = "y" * (2 * topology.PAYLOAD_CHUNK_BYTES)  # uploaded: past the inline threshold, 3 chunks
    contract = Contract(scope=Scope(effects=["none"]))
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        js = nc.jetstream()
        done: dict[uuid.UUID, Proposal] = {}
        for proposal in (Proposal(output={"answer": 42}), Proposal(output={"blob": blob})):
            agent, ctx = await claim(nc, "keeper", contract)
            await propose(agent, ctx, proposal)

            def completed(e: AnyEvent, j: uuid.UUID = ctx.job_id) -> bool:
                return isinstance(e, JobCompleted) and e.originator_id == j

            await wait_for_event(nc, completed)
            done[ctx.job_id] = proposal
        submitted = [e for e in await events_of(nc) if isinstance(e, ProposalSubmitted)]
        # The small one keeps its record in the event itself; the upload's is an object.
        assert [(bool(s.record), bool(s.payload_object)) for s in submitted] == [(True, False), (False, True)]
        # K more of each: the proposals' messages and the upload's chunks are evicted.
        for _ in range(ring):
            await js.publish(topology.agent_subject("keeper", "propose"), b"{}")
            await js.publish(topology.payload_subject("keeper"), b"chunk")
        for s in submitted:
            with pytest.raises(NotFoundError):
                await js.get_msg(topology.AGENT_INPUT_STREAM, s.input_seq, direct=True)
        for s in submitted:
            read = await proposals.read_recorded(
                js,
                agent=s.agent,
                input_seq=s.input_seq,
                content_hash=s.content_hash,
                payload_object=s.payload_object,
                payload_hash=s.payload_hash,
                record=s.record,
            )
            assert read.output == done[s.originator_id].output
            output = await outputs.job_output(js, s.originator_id)
            assert [o.problem for a in output.attempts for o in a.outputs] == [""]
            # Explain still shows what the proposal said, from the record.
            evidence = story.proposal_evidence(await collect.collect(js, s.originator_id), s)
            assert "unavailable" not in evidence and "undecodable" not in evidence, evidence


async def test_an_upload_of_more_chunks_than_the_ring_keeps_is_refused_naming_the_sizes(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_AGENT_INPUT_PER_SUBJECT", "2")
    contract = Contract(scope=Scope(effects=["none"]))
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "hoarder", contract)
        blob = "z" * (3 * topology.PAYLOAD_CHUNK_BYTES)  # 4 chunks; the ring keeps 2
        pid = await propose(agent, ctx, Proposal(output={"blob": blob}))
        decision = await wait_for_event(nc, decided(pid), timeout=30)
        assert isinstance(decision, ProposalRejected)
        [violation] = decision.violations
        assert f"the limit is {2 * topology.PAYLOAD_CHUNK_BYTES} bytes" in violation
        assert "keeps only its latest 2 chunks" in violation and "(4 chunks of" in violation


async def test_a_proposal_kept_inline_is_read_back_only_while_its_record_matches_its_hash(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await claim(nc, "inline", Contract(scope=Scope(effects=["none"])))
        pid = await propose(agent, ctx, Proposal(output={"answer": 42}))
        await wait_for_event(nc, decided(pid))
        [s] = [e for e in await events_of(nc) if isinstance(e, ProposalSubmitted)]
        # Nothing in the bucket: the record is the event's.
        assert s.record and not s.payload_object and s.payload_hash == proposals.sha256(s.record.encode())
        assert (await nc.jetstream().stream_info(topology.PAYLOAD_STREAM)).state.messages == 0

        async def read(record: str) -> Propose:
            return await proposals.read_recorded(
                nc.jetstream(),
                agent=s.agent,
                input_seq=s.input_seq,
                content_hash=s.content_hash,
                payload_object=s.payload_object,
                payload_hash=s.payload_hash,
                record=record,
            )

        assert (await read(s.record)).output == {"answer": 42}
        with pytest.raises(proposals.PayloadProblem, match="inline record no longer matches"):
            await read(s.record.replace("42", "43"))
