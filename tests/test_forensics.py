"""Forensics against real servers: the ledger, explain, state at a time, backtest and dossier.

Every answer here comes from the streams alone: the tests drive real failures through the real
services, then ask the forensic functions (and the `warden` commands) what happened.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import msgspec
import pytest
from click.testing import CliRunner
from nats.aio.client import Client

from services.cli.main import cli
from shared import bus, credentials, invariants, topology
from shared.contract import Budgets, CiGate, Contract, Scope, Stopping, Target
from shared.events import (
    AgentRevoked,
    AnyEvent,
    EffectApplied,
    InvariantChecked,
    JobCancelled,
    JobCompleted,
    JobRequeued,
    JobTombstoned,
    LeaseExpired,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    Usage,
    encode,
    proposal_id_for,
)
from shared.forensics import backtest, dossier, explain, ledger, log, timetravel
from shared.messages import JobRequest, LeaseGrant, OperatorCommand, Propose, Rejected
from shared.persistence.jetstream import ORIGINATOR_HEADER, TOPIC_HEADER, VERSION_HEADER
from shared.runtime import Context
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests import opsnats
from tests.harness import client, events_of, running, submit, wait_for_event

REPO = Path(__file__).resolve().parent.parent


def quick(ttl: float = 0.5, attempts: int = 1, budgets: Budgets | None = None, **kw: Any) -> Contract:
    stopping = Stopping(
        lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=attempts, budgets=budgets or Budgets()
    )
    return Contract(stopping=stopping, **kw)


def request(kind: str, contract: Contract | None = None) -> JobRequest:
    return JobRequest(
        idempotency_key=str(uuid.uuid4()), kind=kind, contract=contract or quick(), submitter="tests"
    )


async def claim_one(agent: AgentClient) -> LeaseGrant:
    grant = await agent.claim()
    assert grant is not None, f"{agent.name} found no job"
    return grant


def finished(job_id: UUID) -> Callable[[AnyEvent], bool]:
    return lambda e: isinstance(e, JobCompleted | JobTombstoned) and e.originator_id == job_id


def is_tomb(job_id: UUID) -> Callable[[AnyEvent], bool]:
    return lambda e: isinstance(e, JobTombstoned) and e.originator_id == job_id


# --- explain: one run, many injected failures ---------------------------------------------------

CRASHING_AGENT = """
import sys, anyio
from shared import bus
from shared.sdk import AgentClient

async def main(url):
    nc = await bus.connect(url, "crasher")
    agent = AgentClient(nc, "crasher", kinds=["crash"])
    await agent.register()
    grant = None
    while grant is None:
        grant = await agent.claim()
        await anyio.sleep(0.05)
    async def handler(ctx):
        ctx.report(note="editing src/app.py", progress=0.4)
        await anyio.sleep(3600)
    await agent.work(grant, handler)

anyio.run(main, sys.argv[1])
"""


async def crash_an_agent_mid_job(nc: Client, url: str) -> None:
    """Start a real agent process, let it heartbeat, then kill -9 it while it holds its lease."""
    beats = await nc.subscribe(topology.agent_subject("crasher", "heartbeat"))
    process = await anyio.open_process([sys.executable, "-c", CRASHING_AGENT, url], cwd=REPO)
    try:
        with anyio.fail_after(20):
            for _ in range(2):
                await beats.next_msg(timeout=20)
    finally:
        await beats.unsubscribe()
        process.kill()
        await process.wait()


LIFECYCLE = ["scheduler", "reconciler", "revoker"]
EVERYTHING = [*LIFECYCLE, "checker", "applier"]


async def test_explain_names_the_cause_of_each_injected_failure(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    (target / "src").mkdir(parents=True)
    files_only = Scope(paths=["src/**"], effects=["file.write"])
    async with running(nats_server.url, EVERYTHING), client(nats_server.url) as nc:
        agents = {
            name: AgentClient(nc, name, kinds=[kind])
            for name, kind in [
                ("sleeper", "hang"),
                ("flaky", "flaky"),
                ("spender", "budget"),
                ("worker", "cancel"),
                ("late", "stale"),
                ("rescuer", "stale"),
                ("wanderer", "scope"),
                ("breaker", "ci"),
            ]
        }
        for agent in agents.values():
            await agent.register()
        hang = await submit(nc, request("hang"))
        crash = await submit(nc, request("crash", quick(ttl=1.0)))
        flaky = await submit(nc, request("flaky", quick(attempts=2)))
        budget = await submit(nc, request("budget", quick(ttl=5.0, budgets=Budgets(tokens=100))))
        cancel = await submit(nc, request("cancel", quick(ttl=5.0)))
        stale = await submit(nc, request("stale", quick(attempts=3)))
        scope = await submit(nc, request("scope", quick(ttl=10.0, scope=files_only)))
        ci = await submit(
            nc,
            request(
                "ci",
                quick(
                    ttl=10.0,
                    scope=files_only,
                    target=Target(directory=str(target)),
                    ci=CiGate(command=["sh", "-c", "echo '2 tests failed'; exit 1"], timeout_s=30),
                ),
            ),
        )

        # Hang: alive but silent; it speaks again only after its lease is gone.
        hung_grant = await claim_one(agents["sleeper"])
        # Crash: a real agent process heartbeats, then dies holding the lease.
        await crash_an_agent_mid_job(nc, nats_server.url)
        # Max attempts: two leases, both lost.
        await claim_one(agents["flaky"])
        await wait_for_event(nc, lambda e: isinstance(e, LeaseExpired) and e.originator_id == flaky)
        await claim_one(agents["flaky"])
        # Budget: the agent reports more tokens than the contract allows.
        spent = JobContext(grant=await claim_one(agents["spender"]))
        spent.report(usage=Usage(tokens=500))
        assert (await agents["spender"].heartbeat(spent)).standing == "budget_exceeded"
        # Operator cancel while a lease is live.
        await claim_one(agents["worker"])
        await bus.request(
            nc,
            topology.operator_subject("cancel"),
            OperatorCommand(operator="bob", reason="wrong repository", job_id=cancel),
        )
        # Repeated side effect: the first holder goes quiet, loses the lease, and proposes late,
        # after the second holder's proposal has been applied.
        old = JobContext(grant=await claim_one(agents["late"]))
        await wait_for_event(nc, lambda e: isinstance(e, LeaseExpired) and e.originator_id == stale)
        rescue = JobContext(grant=await claim_one(agents["rescuer"]))
        assert rescue.epoch == 2
        await agents["rescuer"].propose(rescue, Proposal(effect="none", output={"done": True}))
        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted) and e.originator_id == stale)
        assert isinstance(await agents["late"].propose(old, Proposal(effect="none")), Rejected)
        # Scope breach: a file outside the contract's globs.
        wander = JobContext(grant=await claim_one(agents["wanderer"]))
        await agents["wanderer"].propose(
            wander, Proposal(effect="file.write", files={"src/ok.py": "x = 1\n", "secrets/key.pem": "k"})
        )
        # Failing tests: the contract's CI command fails with the change applied.
        broken = JobContext(grant=await claim_one(agents["breaker"]))
        await agents["breaker"].propose(broken, Proposal(effect="file.write", files={"src/app.py": "oops"}))

        await wait_for_event(nc, is_tomb(hang), timeout=15)
        assert (await agents["sleeper"].heartbeat(JobContext(grant=hung_grant))).standing != "extended"
        for job in (crash, flaky, budget, scope, ci):
            await wait_for_event(nc, is_tomb(job), timeout=30)
        await wait_for_event(nc, lambda e: isinstance(e, JobCancelled) and e.originator_id == cancel)
        await wait_for_event(
            nc, lambda e: isinstance(e, MessageRejected) and e.originator_id == stale and e.verb == "propose"
        )

        js = nc.jetstream()
        jobs = (hang, crash, flaky, budget, cancel, stale, scope, ci)
        explained = {job: await explain.explain_job(js, job) for job in jobs}
        whole = await ledger.verify_log(js)

    # Every service that appended (scheduler, reconciler, revoker, checker, applier) chained it.
    assert whole.ok, ledger.render(whole)
    causes = {job: e.cause for job, e in explained.items()}
    classes = {job: e.cause_class for job, e in explained.items()}

    assert classes[hang] == "hung"
    assert causes[hang].startswith("agent sleeper hung (it spoke again"), causes[hang]
    assert "lease 1 expired with no heartbeat for 0.5s (none ever received)" in causes[hang]
    assert "ms after deadline" in causes[hang]
    # Killed, never restarted: the log cannot tell a dead agent from a stopped one, and says so.
    assert classes[crash] == "crashed_or_hung"
    assert causes[crash].startswith("agent crasher crashed or hung: lease 1 expired with no heartbeat for 1s")
    assert "note 'editing src/app.py'" in causes[crash]
    assert "undecidable from the log" in causes[crash]
    assert classes[flaky] == "crashed_or_hung"
    assert causes[flaky].startswith("max attempts (2) reached, every lease lost (expired); last: agent flaky")
    assert "lease 2 expired" in causes[flaky]
    # The first of flaky's two lost leases is named too, beside the one that ended it.
    assert [c.epoch for c in explained[flaky].contained] == [1]
    assert classes[budget] == "budget"
    assert causes[budget] == (
        "budget breach: tokens 500 > budget 100 (over by 400) (lease 1 of spender revoked by reconciler)"
    )
    assert classes[cancel] == "operator"
    assert (
        causes[cancel] == "cancelled by operator bob: wrong repository (lease 1 of worker revoked in flight)"
    )
    # The stale job completed: it contained a hang (the late agent spoke again) and its late proposal.
    assert explained[stale].status == "completed" and explained[stale].ended_by is None
    assert [c.cls for c in explained[stale].contained] == ["hung", "fenced_late_message"]
    late = explained[stale].contained[1]
    assert late.epoch == 1 and late.agent == "late" and late.proposal_id is not None
    assert str(late.proposal_id) in causes[stale] and "under lease 1 (expired at" in causes[stale]
    assert classes[scope] == "scope_breach"
    assert causes[scope] == "scope breach: secrets/key.pem outside contract globs ['src/**']"
    assert classes[ci] == "ci_failure"
    assert causes[ci] == "tests failed: ci_gate exit 1"


# --- the ledger ---------------------------------------------------------------------------------


async def run_a_few_jobs(url: str) -> tuple[UUID, UUID]:
    """A job cancelled under a live lease, and one tombstoned after a lost lease."""
    async with running(url, LIFECYCLE), client(url) as nc:
        agent = AgentClient(nc, "a1")
        await agent.register()
        lost = await submit(nc, request("noop"))
        await claim_one(agent)
        await wait_for_event(nc, is_tomb(lost))
        cancelled = await submit(nc, request("noop", quick(ttl=30)))
        grant = await claim_one(agent)
        ctx = JobContext(grant=grant)
        ctx.report(note="halfway", progress=0.5)
        assert (await agent.heartbeat(ctx)).standing == "extended"
        await bus.request(
            nc,
            topology.operator_subject("cancel"),
            OperatorCommand(operator="bob", reason="wrong repository", job_id=cancelled),
        )
        await wait_for_event(nc, lambda e: isinstance(e, JobCancelled))
    return lost, cancelled


async def test_ledger_verify_passes_on_an_untouched_log(nats_server: EmbeddedServer) -> None:
    _lost, cancelled = await run_a_few_jobs(nats_server.url)
    async with client(nats_server.url) as nc:
        js = nc.jetstream()
        whole = await ledger.verify_log(js)
        one = await ledger.verify_log(js, cancelled)
        stored = await events_of(nc, f"{topology.EVENT_ROOT}.*")
    assert whole.ok, ledger.render(whole)
    # Two jobs and one agent, and every event of theirs linked to its predecessor.
    assert whole.aggregates == 3
    assert whole.events == len(stored)
    assert one.ok and one.aggregates == 1 and one.events == 3


async def test_a_forged_event_in_the_stream_is_reported_as_the_first_break(
    nats_server: EmbeddedServer,
) -> None:
    _lost, cancelled = await run_a_few_jobs(nats_server.url)
    async with client(nats_server.url) as nc:
        js = nc.jetstream()
        stored = await log.job_events(js, cancelled)
        last = stored[-1]
        assert last.event is not None
        # Someone with the service credential appends, with Warden's writer headers, an event
        # the services never decided (without them it would be stepped over as foreign).
        forged = JobRequeued(
            originator_id=cancelled,
            originator_version=last.event.originator_version + 1,
            reason="forged: looks legitimate",
            by="scheduler",
            prev_hash="0" * 64,
        )
        headers = {
            ORIGINATOR_HEADER: str(cancelled),
            VERSION_HEADER: str(forged.originator_version),
            TOPIC_HEADER: "job.requeued",
        }
        ack = await js.publish(topology.event_subject(cancelled), encode(forged), headers=headers)
        report = await ledger.verify_log(js)
    assert not report.ok
    assert [b.aggregate for b in report.breaks] == [str(cancelled)]
    first = report.first_break
    assert first is not None
    assert first.kind == "hash"
    assert first.seq == ack.seq
    assert first.version == last.event.originator_version + 1
    assert first.expected == last.hash
    assert first.found == "0" * 64
    assert f"v{first.version - 1} was altered or v{first.version} forged" in first.detail


def cli_run(*args: str) -> Any:

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_a_tampered_dossier_copy_fails_ledger_verify_where_it_was_edited(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = nats_server.url
    _lost, job = anyio.run(run_a_few_jobs, url)
    copy = tmp_path / "dossier.json"
    made = cli_run("dossier", str(job), "--nats", url, "--out", str(copy))
    assert made.exit_code == 0, made.output
    bundle = json.loads(copy.read_text())

    # The bundle carries the events as stored, the inputs they cite, the states and the story.
    assert [e["event"]["type"] for e in bundle["events"]] == [
        "job.requested",
        "lease.granted",
        "job.cancelled",
    ]
    assert bundle["ledger"]["ok"] is True
    assert bundle["state"]["status"] == "cancelled"
    assert bundle["agents"]["a1"]["state"]["name"] == "a1"
    assert [r["subject"] for r in bundle["inputs"]["request"]] == [topology.REQUEST_SUBJECT]
    assert len(bundle["inputs"]["claims"]) == 1
    assert "halfway" in bundle["inputs"]["heartbeats"][0]["raw"]
    assert bundle["explain"]["cause"].startswith("cancelled by operator bob")

    intact = cli_run("ledger", "verify", "--file", str(copy))
    assert intact.exit_code == 0, intact.output
    assert "ledger intact" in intact.output

    # Rewrite who held the lease, consistently in the raw bytes, the readable event and the hash.
    granted = bundle["events"][1]
    raw = granted["raw"].replace('"agent":"a1"', '"agent":"someone-else"')
    assert raw != granted["raw"]
    granted["raw"] = raw
    granted["event"] = json.loads(raw)
    granted["hash"] = hashlib.sha256(raw.encode()).hexdigest()
    copy.write_text(json.dumps(bundle))
    broken = cli_run("ledger", "verify", "--file", str(copy), "--json")
    assert broken.exit_code == 1
    report = json.loads(broken.output)
    first = report["first_break"]
    assert first["aggregate"] == str(job)
    assert first["kind"] == "hash"
    assert first["version"] == 3
    assert first["seq"] == bundle["events"][2]["seq"]
    assert first["found"] == bundle["events"][2]["event"]["prev_hash"]
    assert "v2 was altered or v3 forged" in first["detail"]


def test_a_copy_edited_only_where_people_read_it_is_caught_too(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = nats_server.url
    _lost, job = anyio.run(run_a_few_jobs, url)
    copy = tmp_path / "dossier.json"
    assert cli_run("dossier", str(job), "--nats", url, "--out", str(copy)).exit_code == 0
    bundle = json.loads(copy.read_text())
    bundle["events"][-1]["event"]["by"] = "nobody"
    copy.write_text(json.dumps(bundle))
    result = cli_run("ledger", "verify", "--file", str(copy))
    assert result.exit_code == 1
    assert "[copy]" in result.output and "readable event differs from its stored bytes" in result.output


def test_an_edited_last_event_is_caught_only_against_the_log(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = nats_server.url
    _lost, job = anyio.run(run_a_few_jobs, url)
    copy = tmp_path / "dossier.json"
    assert cli_run("dossier", str(job), "--nats", url, "--out", str(copy)).exit_code == 0
    bundle = json.loads(copy.read_text())
    last = bundle["events"][-1]
    raw = last["raw"].replace("wrong repository", "agent misbehaved")
    last["raw"], last["event"] = raw, json.loads(raw)
    last["hash"] = hashlib.sha256(raw.encode()).hexdigest()
    copy.write_text(json.dumps(bundle))
    # Nothing in the copy vouches for its last event: the chain alone cannot see this edit...
    assert cli_run("ledger", "verify", "--file", str(copy)).exit_code == 0
    # ...the stream can.
    against = cli_run("ledger", "verify", "--file", str(copy), "--against-log", "--nats", url)
    assert against.exit_code == 1
    assert "differs from the event the stream holds" in against.output


# --- state at a time ----------------------------------------------------------------------------


async def test_the_world_before_and_after_a_revocation_differs_by_its_consequences_only(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, LIFECYCLE), client(nats_server.url) as nc:
        rogue, steady = AgentClient(nc, "rogue"), AgentClient(nc, "steady")
        for agent in (rogue, steady):
            await agent.register()
        held = await submit(nc, request("noop", quick(ttl=30, attempts=3)))
        assert (await claim_one(rogue)).job_id == held
        other = await submit(nc, request("noop", quick(ttl=30)))
        assert (await claim_one(steady)).job_id == other
        waiting = await submit(nc, request("noop", quick(ttl=30)))
        await bus.request(
            nc,
            topology.operator_subject("revoke"),
            OperatorCommand(operator="alice", reason="leaked a token", agent="rogue"),
        )
        await wait_for_event(nc, lambda e: isinstance(e, JobRequeued) and e.originator_id == held)
        js = nc.jetstream()
        events = await log.read_events(js)
        revoked = next(e for e in events if isinstance(e.event, AgentRevoked))
        settled = next(
            e for e in events if isinstance(e.event, JobRequeued) and e.event.originator_id == held
        )
        lease_end = next(e for e in events if isinstance(e.event, LeaseRevoked))
        before = await timetravel.state_at(js, seq=revoked.seq - 1)
        after = await timetravel.state_at(js, seq=settled.seq)
        now = await timetravel.state_at(js)

    assert before.seq == revoked.seq - 1 and after.seq == settled.seq
    # The lease's end and the requeue are one save of the job: one packed record, in that order.
    assert revoked.seq < lease_end.seq == settled.seq and lease_end.ordinal < settled.ordinal
    changes = {(c.what, c.id): c for c in timetravel.diff(before, after)}
    assert set(changes) == {("agent", "rogue"), ("job", str(held))}
    agent_change = changes[("agent", "rogue")]
    assert set(agent_change.fields) == {"standing", "standing_reason", "version", "live_leases"}
    was, became = agent_change.before, agent_change.after
    assert isinstance(was, timetravel.AgentAt) and isinstance(became, timetravel.AgentAt)
    assert (was.standing, became.standing) == ("active", "revoked")
    job_change = changes[("job", str(held))]
    assert set(job_change.fields) == {"status", "lease_ended", "reason", "version", "modified_on"}
    then, later = job_change.before, job_change.after
    assert isinstance(then, timetravel.JobAt) and isinstance(later, timetravel.JobAt)
    assert (then.status, later.status) == ("leased", "queued")
    assert (then.lease_ended, later.lease_ended) == ("", "revoked")
    # The bystanders stand as they did; folding up to now (nothing happened since) agrees.
    assert before.job(other) == after.job(other) and after.job(other).status == "leased"  # type: ignore[union-attr]
    assert before.job(waiting) == after.job(waiting)
    assert now.jobs == after.jobs and now.agents == after.agents


def test_warden_at_a_time_shows_a_budget_revocation_and_nothing_else(nats_server: EmbeddedServer) -> None:
    url = nats_server.url

    async def breach() -> tuple[str, str]:
        async with running(url, LIFECYCLE), client(url) as nc:
            spender = AgentClient(nc, "spender")
            await spender.register()
            job = await submit(nc, request("noop", quick(ttl=30, attempts=2, budgets=Budgets(steps=10))))
            ctx = JobContext(grant=await claim_one(spender))
            ctx.report(usage=Usage(steps=11))
            assert (await spender.heartbeat(ctx)).standing == "budget_exceeded"
            await wait_for_event(nc, lambda e: isinstance(e, JobRequeued) and e.originator_id == job)
            events = await log.read_events(nc.jetstream())
        revoke = next(i for i, e in enumerate(events) if isinstance(e.event, LeaseRevoked))
        return events[revoke - 1].time.isoformat(), events[revoke + 1].time.isoformat()

    before_time, after_time = anyio.run(breach)
    before = cli_run("at", before_time, "--nats", url, "--json")
    after = cli_run("at", after_time, "--nats", url, "--json")
    assert before.exit_code == 0 and after.exit_code == 0, before.output + after.output
    then, later = json.loads(before.output), json.loads(after.output)
    assert then["agents"] == [{**later["agents"][0], "live_leases": 1}]
    assert later["agents"][0]["live_leases"] == 0
    (job_then,), (job_later,) = then["jobs"], later["jobs"]
    assert (job_then["status"], job_later["status"]) == ("leased", "queued")
    assert (job_then["lease_ended"], job_later["lease_ended"]) == ("", "revoked")
    assert job_later["reason"] == "budget exceeded: steps 11 > budget 10"
    changed = {k for k in job_then if job_then[k] != job_later[k]}
    assert changed == {"status", "lease_ended", "reason", "version", "modified_on"}
    text = cli_run("at", "--seq", str(later["seq"]), "--nats", url)
    assert "queued" in text.output and "lease 1 spender revoked" in text.output


# --- explain at scale ---------------------------------------------------------------------------


async def test_explain_answers_fast_for_a_job_with_thousands_of_events(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url, ["scheduler", "reconciler"]) as ctx, client(nats_server.url) as nc:
        agent = AgentClient(nc, "chatty")
        await agent.register()
        job_id = await submit(nc, request("noop", quick(ttl=60)))
        grant = await claim_one(agent)
        # 3000 fenced messages, recorded as the reconciler records each one.
        for _start in range(0, 3000, 500):
            job = ctx.views.jobs[job_id]
            await ctx.save(
                *(
                    MessageRejected(
                        originator_id=job_id,
                        originator_version=job.version + 1 + i,
                        agent="ghost",
                        epoch=grant.epoch,
                        verb="heartbeat",
                        reason="stale lease: ghost holds no lease",
                        input_seq=0,
                    )
                    for i in range(500)
                )
            )
        js = nc.jetstream()
        started = time.perf_counter()
        expl = await explain.explain_job(js, job_id)
        elapsed = time.perf_counter() - started
    print(f"\nexplain of a job with {expl.events} events took {elapsed * 1000:.0f} ms")
    assert expl.events == 3002
    assert expl.ledger.ok and expl.ledger.events == 3002
    assert [(f.agent, f.count) for f in expl.fenced] == [("ghost", 3000)]
    assert [line.text for line in expl.timeline][-1].startswith("3000 messages (heartbeat) from ghost")
    assert elapsed < 10  # a generous bound that cannot flake; the figure above is what matters


# --- backtest -----------------------------------------------------------------------------------


@invariants.invariant("no_secrets", version="2")
def no_secrets(subject: invariants.Subject) -> invariants.Verdict:
    """A new version of an invariant under test: nothing whose file name starts with "secret"."""
    touched = sorted(p for p in subject.proposal.files if p.rsplit("/", 1)[-1].startswith("secret_"))
    if touched:
        return invariants.failed("secret material in the change", paths=touched)
    assert subject.job.contract.scope.paths == ["src/**"]  # the contract as the log holds it
    return invariants.passed()


async def record_proposal(
    nc: Client,
    ctx: Context,
    agent: AgentClient,
    files: dict[str, str],
    checks: list[tuple[str, str]],
) -> UUID:
    """A proposal stored as the agent sent it, and checked and decided as the checker records it."""
    job_id = await submit(
        nc, request("noop", quick(ttl=60, scope=Scope(paths=["src/**"], effects=["file.write"])))
    )
    grant = await claim_one(agent)
    assert grant.job_id == job_id
    body = Propose(job_id=job_id, epoch=grant.epoch, effect="file.write", files=files)
    data = msgspec.json.encode(body)
    ack = await nc.jetstream().publish(topology.agent_subject(agent.name, "propose"), data)
    pid = proposal_id_for(topology.AGENT_INPUT_STREAM, ack.seq)
    version = ctx.views.jobs[job_id].version
    events: list[Any] = [
        ProposalSubmitted(
            originator_id=job_id,
            originator_version=version + 1,
            proposal_id=pid,
            agent=agent.name,
            epoch=grant.epoch,
            content_hash=hashlib.sha256(data).hexdigest(),
            size=len(data),
            input_seq=ack.seq,
            effect="file.write",
        )
    ]
    for name, verdict in checks:
        events.append(
            InvariantChecked(
                originator_id=job_id,
                originator_version=version + 1 + len(events),
                proposal_id=pid,
                invariant=name,
                version="1",
                verdict=verdict,  # type: ignore[arg-type]
            )
        )
    failed = [name for name, verdict in checks if verdict != "pass"]
    decision = (
        ProposalRejected(
            originator_id=job_id,
            originator_version=version + 1 + len(events),
            proposal_id=pid,
            violations=failed,
        )
        if failed
        else ProposalAccepted(
            originator_id=job_id, originator_version=version + 1 + len(events), proposal_id=pid
        )
    )
    await ctx.save(*events, decision)
    return pid


async def test_a_backtest_reports_what_a_new_invariant_would_have_caught_and_let_through(
    nats_server: EmbeddedServer, permissive_policy: Path
) -> None:
    async with running(nats_server.url, ["scheduler", "reconciler"]) as ctx, client(nats_server.url) as nc:
        agent = AgentClient(nc, "proposer", max_concurrent=10)
        await agent.register()
        clean = await record_proposal(nc, ctx, agent, {"src/app.py": "x"}, [("scope", "pass")])
        leaked = await record_proposal(nc, ctx, agent, {"src/secret_token.py": "x"}, [("scope", "pass")])
        outside = await record_proposal(nc, ctx, agent, {"docs/x.md": "x"}, [("scope", "fail")])
        # An older, stricter version of the same invariant stopped this one.
        stopped = await record_proposal(
            nc, ctx, agent, {"src/secret_key.py": "x"}, [("scope", "pass"), ("no_secrets", "fail")]
        )
        # ...and this one, which the new version lets through.
        relaxed = await record_proposal(
            nc, ctx, agent, {"src/secretary.py": "x"}, [("scope", "pass"), ("no_secrets", "fail")]
        )
        named = backtest.load("tests.test_forensics:no_secrets")
        report = await backtest.run(named, await backtest.past_cases(nc.jetstream()))
        scope_report = await backtest.run(backtest.load("scope"), await backtest.past_cases(nc.jetstream()))

    outcomes = {r.proposal_id: r.outcome for r in report.results}
    assert outcomes == {
        clean: "agrees",
        leaked: "caught",
        outside: "agrees",
        stopped: "agrees",
        relaxed: "let_through",
    }
    assert (report.proposals, report.caught, report.let_through, report.errors) == (5, 1, 1, 0)
    caught = next(r for r in report.results if r.proposal_id == leaked)
    assert caught.evidence["paths"] == ["src/secret_token.py"] and caught.decision == "accepted"
    assert "would have caught           1" in backtest.render(report)
    # The built-in scope invariant, re-run from the log, agrees with every verdict recorded then.
    assert (scope_report.invariant, scope_report.proposals) == ("scope", 5)
    assert {r.outcome for r in scope_report.results} == {"agrees"}


def test_warden_explain_prints_the_story_and_the_same_as_json(nats_server: EmbeddedServer) -> None:
    url = nats_server.url
    lost, _cancelled = anyio.run(run_a_few_jobs, url)
    text = cli_run("explain", str(lost), "--nats", url)
    data = cli_run("explain", str(lost), "--nats", url, "--json")
    assert text.exit_code == 0 and data.exit_code == 0, text.output + data.output
    story = json.loads(data.output)
    assert story["status"] == "tombstoned"
    assert story["cause"].startswith("agent a1 crashed or hung: lease 1 expired")
    assert story["cause_class"] == story["ended_by"]["cls"] == "crashed_or_hung"
    assert f"cause [crashed_or_hung]: {story['cause']}" in text.output
    assert "a1 claimed it: lease 1 granted for 0.5s" in text.output
    shown = cli_run("ledger", "show", str(lost), "--nats", url, "--json")
    assert shown.exit_code == 0, shown.output
    phases = json.loads(shown.output)
    assert [p["type"] for p in phases] == [
        "job.requested",
        "lease.granted",
        "lease.expired",
        "job.tombstoned",
    ]
    assert all(p["linked"] for p in phases)
    assert [p["prev_hash"] for p in phases[1:]] == [p["hash"] for p in phases[:-1]]
    assert phases[2]["evidence"]["detection_latency_ms"] >= 0
    # Each in its own stream: the request in WARDEN_INPUT, the claim in WARDEN_AGENT_INPUT.
    assert phases[1]["evidence"]["claim_input_seq"] > 0 and phases[0]["evidence"]["request_input_seq"] > 0


def test_forensic_commands_refuse_a_server_without_a_warden_log(nats_server: EmbeddedServer) -> None:
    result = cli_run("explain", str(uuid.uuid4()), "--nats", nats_server.url)
    assert result.exit_code == 1
    assert "has no stream WARDEN_EVENTS" in result.output


def test_explaining_an_unknown_job_says_so(nats_server: EmbeddedServer) -> None:
    url = nats_server.url
    anyio.run(run_a_few_jobs, url)
    missing = uuid.uuid4()
    result = cli_run("explain", str(missing), "--nats", url)
    assert result.exit_code == 3  # not found (README, "Exit codes")
    assert f"no events for job {missing}" in result.output


def test_warden_backtest_judges_proposals_the_checker_decided_from_the_log_alone(
    nats_server: EmbeddedServer, tmp_path: Path, permissive_policy: Path
) -> None:
    url = nats_server.url
    target = tmp_path / "target"
    target.mkdir()
    contract = quick(
        ttl=10,
        scope=Scope(paths=["src/**"], effects=["file.write"]),
        target=Target(directory=str(target)),
        invariants=["scope"],
    )

    async def propose_three() -> None:
        async with running(url, EVERYTHING), client(url) as nc:
            agent = AgentClient(nc, "author", max_concurrent=10)
            await agent.register()
            big = "x" * (topology.INLINE_PROPOSAL_BYTES + 1)  # goes through the object store
            for files in ({"src/a.py": "a"}, {"src/secret_b.py": big}, {"etc/c.conf": "c"}):
                job_id = await submit(nc, request("edit", contract))
                ctx = JobContext(grant=await claim_one(agent))
                await agent.propose(ctx, Proposal(effect="file.write", files=files))
                await wait_for_event(nc, finished(job_id))

    anyio.run(propose_three)
    assert (target / "src" / "secret_b.py").is_file()  # it was let through, and applied
    new = cli_run("backtest", "--invariant", "tests.test_forensics:no_secrets", "--nats", url, "--json")
    assert new.exit_code == 0, new.output
    report = json.loads(new.output)
    assert (report["proposals"], report["caught"], report["also_rejected"], report["agreed"]) == (3, 1, 0, 2)
    (caught,) = [r for r in report["results"] if r["outcome"] == "caught"]
    assert caught["decision"] == "accepted" and caught["evidence"]["paths"] == ["src/secret_b.py"]
    again = cli_run("backtest", "--invariant", "scope", "--nats", url)
    assert again.exit_code == 0, again.output
    assert "over 3 past proposals" in again.output and "agrees                      3" in again.output


def test_a_copy_with_an_event_left_out_reports_the_gap(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    url = nats_server.url
    lost, _cancelled = anyio.run(run_a_few_jobs, url)
    copy = tmp_path / "dossier.json"
    assert cli_run("dossier", str(lost), "--nats", url, "--out", str(copy)).exit_code == 0
    bundle = json.loads(copy.read_text())
    assert [e["event"]["type"] for e in bundle["events"]] == [
        "job.requested",
        "lease.granted",
        "lease.expired",
        "job.tombstoned",
    ]
    del bundle["events"][2]  # the evidence of the lost lease, quietly dropped
    copy.write_text(json.dumps(bundle))
    result = cli_run("ledger", "verify", "--file", str(copy), "--json")
    assert result.exit_code == 1
    first = json.loads(result.output)["first_break"]
    assert (first["kind"], first["expected"], first["found"]) == ("version", "v3", "v4")
    assert "events are missing" in first["detail"]
    # The live chain of the same job is intact, and the command says so with exit 0.
    live = cli_run("ledger", "verify", "--job", str(lost), "--nats", url)
    assert live.exit_code == 0 and "ledger intact: 4 events in 1 aggregate chains" in live.output
    agent = cli_run("ledger", "verify", "--agent", "a1", "--nats", url, "--json")
    assert agent.exit_code == 0 and json.loads(agent.output)["aggregates"] == 1


async def test_an_effect_found_already_applied_is_explained_as_a_repeat_prevented(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, ["scheduler", "reconciler"]) as ctx, client(nats_server.url) as nc:
        agent = AgentClient(nc, "writer")
        await agent.register()
        job_id = await submit(nc, request("noop", quick(ttl=30)))
        grant = await claim_one(agent)
        pid = uuid.uuid4()
        version = ctx.views.jobs[job_id].version
        receipt = {"kind": "git.patch", "commit": "abc123", "branch": "warden/writer/x"}
        # As the applier records a re-drive after dying between the effect and its record.
        await ctx.save(
            ProposalSubmitted(
                originator_id=job_id,
                originator_version=version + 1,
                proposal_id=pid,
                agent="writer",
                epoch=grant.epoch,
                content_hash="0" * 64,
                size=10,
                input_seq=0,
                effect="git.patch",
            ),
            ProposalAccepted(originator_id=job_id, originator_version=version + 2, proposal_id=pid),
            EffectApplied(
                originator_id=job_id,
                originator_version=version + 3,
                proposal_id=pid,
                kind="git.patch",
                receipt=receipt,
                reused_receipt=True,
            ),
            JobCompleted(
                originator_id=job_id, originator_version=version + 4, proposal_id=pid, agent="writer", epoch=1
            ),
        )
        expl = await explain.explain_job(nc.jetstream(), job_id)
    assert expl.status == "completed"
    assert expl.cause_class == "receipt_reused" and expl.ended_by is None
    assert expl.cause == (
        f"contained: repeated side effect prevented: git.patch of proposal {pid} was already applied "
        "(its receipt was found), so the retry recorded it instead of doing it again"
    )
    (story,) = expl.proposals
    assert [(e.what, e.receipt, e.reused_receipt) for e in story.effects] == [("applied", receipt, True)]
    assert "not applied again" in explain.render(expl)


async def test_forensics_need_nothing_beyond_the_operators_read_access(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ops_server.server.url
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    async with (
        running(url, LIFECYCLE),
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        job_id = await submit(operator, request("noop", quick(ttl=30)))
        await bus.request(
            operator,
            topology.operator_subject("cancel"),
            OperatorCommand(operator="carol", reason="not needed", job_id=job_id),
        )
        await wait_for_event(operator, lambda e: isinstance(e, JobCancelled))
        js = operator.jetstream()
        await log.check_streams(js)
        expl = await explain.explain_job(js, job_id)
        report = await ledger.verify_log(js)
        world = await timetravel.state_at(js)
        bundle = await dossier.dossier(js, job_id)
    assert expl.cause == "cancelled by operator carol: not needed"
    assert report.ok and report.events == 2
    assert [j.status for j in world.jobs] == ["cancelled"]
    assert bundle.ledger.ok and [r.subject for r in bundle.inputs["request"]] == [topology.REQUEST_SUBJECT]
