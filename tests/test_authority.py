"""Graduated autonomy and revocation: the policy's pure logic, then the revoker on a real server."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import anyio
import pytest

from shared import bus, topology
from shared.contract import Contract, Stopping
from shared.decide.agents import Action, Authority, due, fold
from shared.events import (
    AgentLevelChanged,
    AgentRegistered,
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    AnyEvent,
    EffectApplied,
    Event,
    InvariantChecked,
    JobCompleted,
    LeaseGranted,
    LeaseRevoked,
    ProposalSubmitted,
    RollbackRequested,
    agent_id_for,
    ref,
)
from shared.messages import Accepted, JobRequest, OperatorCommand, Rejected
from shared.policy import load_policy
from shared.sdk import AgentClient, AgentError, JobContext
from shared.server import EmbeddedServer
from tests.harness import SlowHandler, client, running, submit, wait_for_event

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _registered(name: str) -> AgentRegistered:
    return AgentRegistered(originator_id=agent_id_for(name), originator_version=1, name=name, timestamp=T0)


def _completed(agent: str) -> JobCompleted:
    return JobCompleted(
        originator_id=uuid.uuid4(), originator_version=5, proposal_id=uuid.uuid4(), agent=agent, epoch=1
    )


def _proposal(agent: str, job_id: uuid.UUID | None = None) -> ProposalSubmitted:
    return ProposalSubmitted(
        originator_id=job_id or uuid.uuid4(),
        originator_version=3,
        proposal_id=uuid.uuid4(),
        agent=agent,
        epoch=1,
        content_hash="x",
        size=1,
        input_seq=1,
    )


class _Book:
    """The revoker's record and policy, folded event by event."""

    def __init__(self) -> None:
        self.policy = load_policy()
        self.state = Authority()

    def apply(self, event: Event) -> None:
        fold(self.state, event, self.policy)

    def decide(self, name: str) -> list[Action]:
        return due(self.state.agents.get(name), self.policy)


def _check(p: ProposalSubmitted, invariant: str, verdict: str = "fail") -> InvariantChecked:
    return InvariantChecked(
        originator_id=p.originator_id,
        originator_version=4,
        proposal_id=p.proposal_id,
        invariant=invariant,
        version="1",
        verdict=verdict,  # type: ignore[arg-type]
    )


def test_an_agent_is_promoted_after_n_clean_completions_citing_them() -> None:
    book = _Book()
    book.apply(_registered("ada"))
    done = [_completed("ada") for _ in range(3)]
    for event in done[:2]:
        book.apply(event)
    assert book.decide("ada") == []
    book.apply(done[2])
    [action] = book.decide("ada")
    assert action.kind == "promote"
    assert action.level == 1
    assert action.evidence == [ref(e) for e in done]


def test_a_violation_resets_the_count_toward_promotion() -> None:
    book = _Book()
    book.apply(_registered("bo"))
    book.apply(_completed("bo"))
    book.apply(_completed("bo"))
    p = _proposal("bo")
    book.apply(p)
    book.apply(_check(p, "ci_gate"))
    book.apply(_completed("bo"))
    assert book.decide("bo") == []


def test_a_scope_breach_revokes_and_rolls_back_what_the_agent_applied() -> None:
    book = _Book()
    book.apply(_registered("cy"))
    earlier = _proposal("cy")
    book.apply(earlier)
    book.apply(
        EffectApplied(
            originator_id=earlier.originator_id,
            originator_version=6,
            proposal_id=earlier.proposal_id,
            kind="git.patch",
            receipt={},
        )
    )
    live_job = uuid.uuid4()
    book.apply(
        LeaseGranted(
            originator_id=live_job, originator_version=2, agent="cy", epoch=1, ttl_s=30, expires_at=T0
        )
    )
    bad = _proposal("cy")
    book.apply(bad)
    check = _check(bad, "scope")
    book.apply(check)
    [revoke] = book.decide("cy")
    assert revoke.kind == "revoke"
    assert revoke.evidence == [ref(check)]
    book.apply(
        AgentRevoked(
            originator_id=agent_id_for("cy"), originator_version=2, name="cy", reason="x", by="revoker"
        )
    )
    actions = book.decide("cy")
    assert {(a.kind, a.job_id) for a in actions} == {
        ("revoke_lease", live_job),
        ("rollback", earlier.originator_id),
    }


def test_a_failed_ci_gate_demotes_a_trusted_agent_one_level() -> None:
    book = _Book()
    book.apply(_registered("di"))
    book.apply(
        AgentLevelChanged(
            originator_id=agent_id_for("di"), originator_version=2, name="di", level=2, previous=0, reason="x"
        )
    )
    p = _proposal("di")
    book.apply(p)
    book.apply(_check(p, "ci_gate"))
    [action] = book.decide("di")
    assert action.kind == "demote"
    assert action.level == 1


def _request(level: int = 0, ttl: float = 5.0) -> JobRequest:
    return JobRequest(
        idempotency_key=str(uuid.uuid4()),
        kind="noop",
        contract=Contract(
            required_level=level, stopping=Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 5)
        ),
    )


async def _operate(nc: object, verb: str, **fields: object) -> object:
    return await bus.request(
        nc,  # type: ignore[arg-type]
        topology.operator_subject(verb),
        OperatorCommand(operator="alice", reason=f"test {verb}", **fields),  # type: ignore[arg-type]
    )


async def test_a_demoted_agent_can_no_longer_claim_a_job_that_needs_its_former_level(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "eve")
        await agent.register()
        job_id = await submit(nc, _request(level=1))
        assert await agent.claim(wait_s=1.0) is None  # level 0 may not take it
        assert isinstance(await _operate(nc, "promote", agent="eve"), Accepted)
        await wait_for_event(nc, lambda e: isinstance(e, AgentLevelChanged) and e.level == 1)
        assert isinstance(await _operate(nc, "demote", agent="eve"), Accepted)
        demoted = await wait_for_event(nc, lambda e: isinstance(e, AgentLevelChanged) and e.level == 0)
        assert isinstance(demoted, AgentLevelChanged)
        assert demoted.by == "alice" and demoted.reason == "test demote"
        assert await agent.claim(wait_s=1.0) is None
        assert isinstance(await _operate(nc, "promote", agent="eve"), Accepted)
        await wait_for_event(
            nc, lambda e: isinstance(e, AgentLevelChanged) and e.level == 1 and e.originator_version == 4
        )
        grant = await agent.claim()
        assert grant is not None and grant.job_id == job_id


async def test_revoking_an_agent_revokes_its_live_leases_and_cancels_its_handler(
    nats_server: EmbeddedServer, permissive_policy: object
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "mallory", max_concurrent=2)
        await agent.register()
        first = await submit(nc, _request(ttl=2.0))
        second = await submit(nc, _request(ttl=2.0))
        g1, g2 = await agent.claim(), await agent.claim()
        assert g1 is not None and g2 is not None
        assert {g1.job_id, g2.job_id} == {first, second}
        handler = SlowHandler()

        async def revoke_when_started() -> None:
            await handler.started.wait()
            assert isinstance(await _operate(nc, "revoke", agent="mallory"), Accepted)

        async with anyio.create_task_group() as tg:
            tg.start_soon(revoke_when_started)
            with anyio.fail_after(15):
                outcome = await agent.work(g1, handler)
        assert handler.cancelled == [True]
        assert outcome.status == "revoked"
        revoked = await wait_for_event(nc, lambda e: isinstance(e, AgentRevoked))
        assert isinstance(revoked, AgentRevoked) and revoked.by == "alice"
        for job_id in (first, second):

            def its_lease_revoked(e: AnyEvent, j: UUID = job_id) -> bool:
                return isinstance(e, LeaseRevoked) and e.originator_id == j

            lease_end = await wait_for_event(nc, its_lease_revoked)
            assert isinstance(lease_end, LeaseRevoked) and lease_end.signal == "agent-revoked"
        # The other lease's next heartbeat is refused, and a new claim too.
        ack = await agent.heartbeat(JobContext(grant=g2))
        assert ack.standing == "revoked"
        with pytest.raises(AgentError, match="revoked"):
            await agent.claim()


async def test_every_operator_command_works_from_the_cli_and_names_who_and_why(
    nats_server: EmbeddedServer,
) -> None:
    env = {**os.environ, "WARDEN_NATS_URL": nats_server.url}

    def warden(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                *args,
                "--operator",
                "carol",
                "--reason",
                f"why {args[0]}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "zed")
        await agent.register()
        job_id = await submit(nc, _request())
        expectations = [
            (("suspend", "zed"), AgentSuspended),
            (("reinstate", "zed"), AgentReinstated),
            (("promote", "zed"), AgentLevelChanged),
            (("demote", "zed"), AgentLevelChanged),
            (("revoke", "zed"), AgentRevoked),
            (("reinstate", "zed"), AgentReinstated),
            (("cancel", str(job_id)), None),
            (("requeue", str(job_id)), None),
        ]
        for args, kind in expectations:
            result = await anyio.to_thread.run_sync(functools.partial(warden, *args))
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            if kind is not None:

                def recorded(e: AnyEvent, k: type[object] = kind, v: str = args[0]) -> bool:
                    return isinstance(e, k) and getattr(e, "reason", "") == f"why {v}"

                event = await wait_for_event(nc, recorded)
                assert getattr(event, "by", None) == "carol"
        # A refused command says why and exits non-zero.
        result = await anyio.to_thread.run_sync(lambda: warden("reinstate", "zed"))
        assert result.returncode == 1
        assert "already active" in result.stderr
        unknown = await anyio.to_thread.run_sync(lambda: warden("revoke", "nobody"))
        assert unknown.returncode == 3 and "no agent nobody in the record" in unknown.stderr


async def test_a_rollback_request_names_the_operator(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url) as ctx, client(nats_server.url) as nc:
        job_id = await submit(nc, _request())
        job = ctx.views.jobs[job_id]
        proposal = ProposalSubmitted(
            originator_id=job_id,
            originator_version=job.version + 1,
            proposal_id=uuid.uuid4(),
            agent="someone",
            epoch=1,
            content_hash="h",
            size=1,
            input_seq=1,
        )
        await ctx.save(proposal)
        await wait_for_event(nc, lambda e: isinstance(e, ProposalSubmitted))
        reply = await _operate(nc, "rollback", proposal_id=proposal.proposal_id)
        assert isinstance(reply, Accepted), reply
        event = await wait_for_event(nc, lambda e: isinstance(e, RollbackRequested))
        assert isinstance(event, RollbackRequested) and event.by == "alice"
        missing = await _operate(nc, "rollback", proposal_id=uuid.uuid4())
        assert isinstance(missing, Rejected)


async def test_revocation_latency_is_measured_from_the_signal_to_the_event_and_the_last_accepted_message(
    nats_server: EmbeddedServer,
) -> None:
    from shared.authority import revocation_figures

    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "late")
        await agent.register()
        await submit(nc, _request(ttl=5.0))
        grant = await agent.claim()
        assert grant is not None
        ctx = JobContext(grant=grant)
        assert (await agent.heartbeat(ctx)).standing == "extended"
        assert isinstance(await _operate(nc, "revoke", agent="late"), Accepted)
        await wait_for_event(nc, lambda e: isinstance(e, LeaseRevoked))
        assert (await agent.heartbeat(ctx)).standing == "revoked"
        [figures] = await revocation_figures(nc.jetstream())
        assert figures.agent == "late" and figures.by == "alice"
        assert figures.latency_ms is not None and figures.latency_ms >= 0
        # The heartbeat before the revocation was the last one accepted; the one after was fenced.
        assert figures.last_accepted_subject == topology.agent_subject("late", "heartbeat")
        assert figures.exposure_ms == 0.0


async def test_operator_commands_work_over_http_and_name_who_and_why(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    import httpx

    from shared.tokens import TokenStore, tokens_path
    from tests.readside import read_side

    store = f"sqlite:///{tmp_path}/ops.sqlite"
    token_file = tokens_path(tmp_path)
    token = TokenStore(token_file).add("dana", "operator")
    async with (
        read_side(
            nats_server.url, store, api=True, tokens=token_file, services=["scheduler", "revoker"]
        ) as side,
        client(nats_server.url) as nc,
    ):
        assert side.api is not None
        agent = AgentClient(nc, "remote")
        await agent.register()
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=side.api.url, timeout=15, headers=headers) as http:
            ok = await http.post("/api/operator/suspend", json={"reason": "paging", "agent": "remote"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["type"] == "accepted"
            event = await wait_for_event(nc, lambda e: isinstance(e, AgentSuspended))
            assert isinstance(event, AgentSuspended) and event.by == "dana" and event.reason == "paging"
            refused = await http.post("/api/operator/suspend", json={"reason": "again", "agent": "remote"})
            assert refused.status_code == 422
            assert "suspended" in refused.json()["errors"][0]["message"]
            bad = await http.post("/api/operator/suspend", json={"agent": "remote"})
            assert bad.status_code == 400
            assert any(d["parameter"] == "$.reason" for d in bad.json()["details"])
            unknown = await http.post("/api/operator/teleport", json={})
            assert unknown.status_code == 400 and "unknown operator command" in unknown.json()["error"]
            document = (await http.get("/openapi.json")).json()
            assert "post" in document["paths"]["/api/operator/{verb}"]
