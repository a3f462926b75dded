"""The applier: every accepted proposal's effect happens exactly once, and compensates on request.

Real nats-server, real git repositories in tmp_path; crash tests run the applier as its own
process and SIGKILL it between the effect and its record (WARDEN_FAULT).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from shared import gitops, topology
from shared.contract import Contract, Scope, Stopping, Target
from shared.events import (
    EffectApplied,
    EffectFailed,
    EffectRolledBack,
    JobCompleted,
    JobRequeued,
    LeaseExpired,
    MessageRejected,
    ProposalAccepted,
    RollbackRequested,
)
from shared.messages import Rejected
from shared.runtime import Context
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests import gitrepo
from tests.harness import client, events_of, running, wait_for_event
from tests.harness import lease_job as lease
from tests.harness import propose_accepted as propose

SERVICES = ["scheduler", "reconciler", "checker", "applier"]
DECIDERS = ["scheduler", "reconciler", "checker"]
ROOT = Path(__file__).resolve().parent.parent


def applied(pid: uuid.UUID) -> Any:
    return lambda e: isinstance(e, EffectApplied) and e.proposal_id == pid


def accepted(pid: uuid.UUID) -> Any:
    return lambda e: isinstance(e, ProposalAccepted) and e.proposal_id == pid


def settled(pid: uuid.UUID) -> Any:
    return lambda e: isinstance(e, EffectApplied | EffectFailed) and e.proposal_id == pid


def count(events: list[Any], kind: type) -> int:
    return sum(1 for e in events if isinstance(e, kind))


async def applier_process(url: str, log: Path, fault: str) -> anyio.abc.Process:
    env = {**os.environ, "WARDEN_FAULT": fault}
    cmd = [sys.executable, "-m", "services.cli", "run", "applier", "--nats", url]
    with log.open("wb") as sink:
        return await anyio.open_process(cmd, cwd=ROOT, env=env, stdout=sink, stderr=sink)


async def request_rollback(ctx: Context, job_id: uuid.UUID, pid: uuid.UUID, reason: str) -> None:
    job = ctx.views.require_job(job_id)
    await ctx.save(
        RollbackRequested(
            originator_id=job_id,
            originator_version=job.version + 1,
            proposal_id=pid,
            reason=reason,
            by="test-operator",
        )
    )


async def test_a_good_change_is_applied_once_on_the_agents_sandbox_branch_with_a_receipt(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    main_before = gitrepo.head(repo)
    patch, base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "renamer", gitrepo.git_contract(repo))
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        effect = await wait_for_event(nc, applied(pid), timeout=30)
        done = await wait_for_event(nc, lambda e: isinstance(e, JobCompleted))
        assert isinstance(effect, EffectApplied) and isinstance(done, JobCompleted)
        assert done.proposal_id == pid and done.agent == "renamer" and done.epoch == 1
        assert not effect.reused_receipt
        branch = f"warden/renamer/{ctx.job_id}"
        assert effect.receipt["branch"] == branch and effect.receipt["parent"] == base
        events = await events_of(nc, topology.event_subject(ctx.job_id))
        assert count(events, EffectApplied) == 1
        accepted = next(e for e in events if isinstance(e, ProposalAccepted))
        assert accepted.branch == branch and accepted.by == "checker"
    [sha] = gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid))
    assert effect.receipt["commit"] == sha == gitrepo.head(repo, branch)
    message = gitops.out(repo, "log", "-1", "--format=%B", sha)
    assert f"Warden-Job: {ctx.job_id}" in message and "Warden-Agent: renamer" in message
    assert gitrepo.show(repo, sha, "app/calc.py") == gitrepo.RENAMED["app/calc.py"].rstrip("\n")
    assert gitrepo.head(repo) == main_before  # a probation agent never lands on the target branch


@pytest.mark.slow
async def test_an_applier_killed_between_effect_and_record_records_the_receipt_instead_of_applying_again(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    log = tmp_path / "applier.log"
    async with running(nats_server.url, DECIDERS), client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "renamer", gitrepo.git_contract(repo))
        process = await applier_process(nats_server.url, log, "applier:after-effect")
        async with process:
            pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
            with anyio.fail_after(60):
                code = await process.wait()
        assert code == -signal.SIGKILL, log.read_text()
        # The effect happened, the record did not.
        [landed] = gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid))
        assert count(await events_of(nc, topology.event_subject(ctx.job_id)), EffectApplied) == 0

        async with running(nats_server.url, ["applier"], name="applier-restarted"):
            effect = await wait_for_event(nc, applied(pid), timeout=30)
            await wait_for_event(nc, lambda e: isinstance(e, JobCompleted), timeout=10)
        assert isinstance(effect, EffectApplied)
        assert effect.reused_receipt and effect.receipt["commit"] == landed
        events = await events_of(nc, topology.event_subject(ctx.job_id))
        assert count(events, EffectApplied) == 1 and count(events, JobCompleted) == 1
    assert gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid)) == [landed]
    assert len(gitops.out(repo, "rev-list", f"main..warden/renamer/{ctx.job_id}").split()) == 1


async def test_a_rename_retried_after_its_lease_timed_out_lands_exactly_once(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    contract = gitrepo.git_contract(repo, ttl=0.8, attempts=3)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        slow, first = await lease(nc, "slowpoke", contract)
        # Attempt 1 does the rename but stalls (no heartbeats) past its TTL: the run "times out".
        await wait_for_event(nc, lambda e: isinstance(e, LeaseExpired) and e.epoch == 1, timeout=10)
        late = await slow.propose(first, Proposal(effect="git.patch", patch=patch, base=base))
        assert isinstance(late, Rejected) and "already expired" in late.errors[0].message
        fenced = await wait_for_event(nc, lambda e: isinstance(e, MessageRejected) and e.verb == "propose")
        assert isinstance(fenced, MessageRejected) and fenced.agent == "slowpoke" and fenced.epoch == 1

        # The retry (attempt 2) proposes the same change: it is checked, accepted and applied.
        rescuer = AgentClient(nc, "rescuer")
        await rescuer.register()
        grant = await rescuer.claim()
        assert grant is not None and grant.job_id == first.job_id and grant.epoch == 2
        second = JobContext(grant=grant)
        pid = await propose(rescuer, second, Proposal(effect="git.patch", patch=patch, base=base))
        await wait_for_event(nc, applied(pid), timeout=30)
        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted), timeout=10)

        # Attempt 1's agent comes back once more: still fenced, still nothing applied.
        again = await slow.propose(first, Proposal(effect="git.patch", patch=patch, base=base))
        assert isinstance(again, Rejected)
        events = await events_of(nc, topology.event_subject(first.job_id))
        assert count(events, MessageRejected) == 2 and count(events, EffectApplied) == 1
    renames = gitops.out(repo, "log", "--all", "--format=%H", "-S", "def total_of").split()
    assert len(renames) == 1
    assert gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid)) == renames


async def test_two_appliers_racing_on_the_same_proposals_land_each_commit_once(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    # Neither applier shares a process with the checker: both learn of each acceptance from the
    # stream at about the same moment.
    async with (
        running(nats_server.url, DECIDERS, name="deciders"),
        running(nats_server.url, ["applier"], name="replica-a"),
        running(nats_server.url, ["applier"], name="replica-b"),
        client(nats_server.url) as nc,
    ):
        pids = []
        for i in range(4):
            patch, base = gitrepo.patch_for(repo, {f"app/extra_{i}.py": f"VALUE = {i}\n"})
            agent, ctx = await lease(nc, f"racer{i}", gitrepo.git_contract(repo, ci=False))
            pids.append(await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base)))
        for pid in pids:
            await wait_for_event(nc, applied(pid), timeout=30)
        events = await events_of(nc)
    for pid in pids:
        assert len(gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid))) == 1
    assert count(events, EffectApplied) == len(pids)
    assert count(events, JobCompleted) == len(pids)


@pytest.mark.slow
async def test_three_applier_processes_killed_at_random_land_every_proposal_and_every_job_exactly_once(
    nats_server: EmbeddedServer, tmp_path: Path, permissive_policy: Path
) -> None:
    # Every change lands on main (permissive policy), so the appliers race on one branch: a
    # replica that lost finds the patch no longer applies on a head that already holds it.
    repo = gitrepo.make_repo(tmp_path)
    rng = random.Random(13)
    proposals = 40
    appliers: list[anyio.abc.Process] = []
    kills = 0

    async def start_applier() -> None:
        log = tmp_path / f"applier-{len(appliers)}.log"
        appliers.append(await applier_process(nats_server.url, log, ""))

    async def killer() -> None:
        nonlocal kills
        while True:
            await anyio.sleep(rng.uniform(0.3, 1.2))
            live = [p for p in appliers if p.returncode is None]
            victim = rng.choice(live)
            victim.kill()
            await victim.wait()
            kills += 1
            await start_applier()

    async with running(nats_server.url, DECIDERS, name="deciders"), client(nats_server.url) as nc:
        for _ in range(3):
            await start_applier()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                leased = []
                for i in range(proposals):
                    contract = gitrepo.git_contract(repo, ci=False, ttl=120)
                    leased.append(await lease(nc, f"racer{i}", contract))
                pids: list[uuid.UUID] = []

                async def propose_one(i: int) -> None:
                    patch, base = gitrepo.patch_for(repo, {f"app/extra_{i}.py": f"VALUE = {i}\n"})
                    agent, ctx = leased[i]
                    pids.append(
                        await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
                    )

                async with anyio.create_task_group() as proposers:
                    for i in range(proposals):
                        proposers.start_soon(propose_one, i)
                for pid in pids:
                    outcome = await wait_for_event(nc, settled(pid), timeout=90)
                    assert isinstance(outcome, EffectApplied), outcome
                tg.cancel_scope.cancel()
        finally:
            for process in appliers:
                if process.returncode is None:
                    process.kill()
                await process.wait()
        events = await events_of(nc)
    assert kills >= 1
    for pid in pids:
        assert len(gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid))) == 1
    for _, ctx in leased:
        assert len(gitrepo.commits_carrying(repo, "Warden-Job", str(ctx.job_id))) == 1
    assert count(events, EffectFailed) == 0 and count(events, JobRequeued) == 0
    assert count(events, EffectApplied) == proposals and count(events, JobCompleted) == proposals


@pytest.mark.slow
async def test_rollback_reverts_the_commit_exactly_once_even_across_a_crash(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    log = tmp_path / "applier.log"
    async with running(nats_server.url, DECIDERS) as services, client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "renamer", gitrepo.git_contract(repo))
        branch = f"warden/renamer/{ctx.job_id}"
        process = await applier_process(nats_server.url, log, "applier:after-rollback")
        async with process:
            pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
            effect = await wait_for_event(nc, applied(pid), timeout=30)
            await wait_for_event(nc, lambda e: isinstance(e, JobCompleted), timeout=10)
            await request_rollback(services, ctx.job_id, pid, "the rename broke a downstream user")
            with anyio.fail_after(60):
                code = await process.wait()
        assert code == -signal.SIGKILL, log.read_text()
        [revert] = gitrepo.commits_carrying(repo, "Warden-Rollback", str(pid))
        assert count(await events_of(nc, topology.event_subject(ctx.job_id)), EffectRolledBack) == 0

        async with running(nats_server.url, ["applier"], name="applier-restarted"):
            rolled = await wait_for_event(nc, lambda e: isinstance(e, EffectRolledBack), timeout=30)
        assert isinstance(rolled, EffectRolledBack)
        assert rolled.reused_receipt and rolled.receipt["commit"] == revert
        assert rolled.receipt["reverted"] == effect.receipt["commit"]  # type: ignore[union-attr]
        assert rolled.reason == "the rename broke a downstream user"
        job = services.views.require_job(ctx.job_id)
        assert job.status == "completed" and job.proposal(pid).rollback == "done"  # type: ignore[union-attr]
    assert gitrepo.commits_carrying(repo, "Warden-Rollback", str(pid)) == [revert]
    assert gitrepo.head(repo, branch) == revert
    for rel in gitrepo.RENAMED:
        assert gitrepo.show(repo, branch, rel) == gitrepo.FILES[rel].rstrip("\n")
    message = gitops.out(repo, "log", "-1", "--format=%B", revert)
    assert "Reason: the rename broke a downstream user" in message


async def test_a_file_write_lands_atomically_inside_its_directory_and_rolls_back(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>old</h1>\n")
    contract = Contract(
        scope=Scope(paths=["**"], effects=["file.write"]),
        target=Target(directory=str(site)),
        stopping=Stopping(lease_ttl_s=5, heartbeat_interval_s=1),
    )
    files = {"index.html": "<h1>new</h1>\n", "docs/guide.txt": "read me\n"}
    async with running(nats_server.url, SERVICES) as services, client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "writer", contract)
        pid = await propose(agent, ctx, Proposal(effect="file.write", files=files))
        effect = await wait_for_event(nc, applied(pid), timeout=30)
        assert isinstance(effect, EffectApplied)
        assert (site / "index.html").read_text() == files["index.html"]
        assert (site / "docs" / "guide.txt").read_text() == files["docs/guide.txt"]
        assert effect.receipt["previous"] == {"index.html": "<h1>old</h1>\n", "docs/guide.txt": None}
        assert effect.receipt["files"]["docs/guide.txt"]["previous_sha256"] is None
        assert sorted(p.name for p in site.rglob("*")) == ["docs", "guide.txt", "index.html"]  # no temp files

        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted))
        await request_rollback(services, ctx.job_id, pid, "wrong page")
        rolled = await wait_for_event(nc, lambda e: isinstance(e, EffectRolledBack), timeout=30)
        assert isinstance(rolled, EffectRolledBack) and not rolled.reused_receipt
    assert (site / "index.html").read_text() == "<h1>old</h1>\n"
    assert not (site / "docs" / "guide.txt").exists()


async def test_a_file_write_that_would_escape_its_directory_is_rejected_before_any_effect(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    contract = Contract(scope=Scope(paths=["**"], effects=["file.write"]), target=Target(directory=str(site)))
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "climber", contract)
        pid = await propose(agent, ctx, Proposal(effect="file.write", files={"../outside.txt": "boo"}))
        decision = await wait_for_event(
            nc, lambda e: getattr(e, "proposal_id", None) == pid and "rejected" in type(e).__name__.lower()
        )
        assert any("climbs out" in v for v in decision.violations)  # type: ignore[union-attr]
    assert not (tmp_path / "outside.txt").exists()


@contextmanager
def webhook_server(on_post: Callable[[BaseHTTPRequestHandler, bytes], None]) -> Iterator[str]:
    """A real HTTP endpoint on a free port that answers every POST 201 after `on_post`; its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            on_post(self, self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def webhook_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    def record(request: BaseHTTPRequestHandler, body: bytes) -> None:
        received.append({"headers": dict(request.headers), "body": body})

    with webhook_server(record) as url:
        yield url, received


@pytest.mark.usefixtures("permissive_policy")
async def test_a_webhook_is_posted_once_with_the_proposal_id_as_idempotency_key(
    nats_server: EmbeddedServer, webhook_receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook_receiver
    contract = Contract(scope=Scope(effects=["webhook"]), target=Target(url=url))
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "notifier", contract)
        pid = await propose(agent, ctx, Proposal(effect="webhook", output={"deployed": "v2"}))
        effect = await wait_for_event(nc, applied(pid), timeout=30)
        assert isinstance(effect, EffectApplied)
        assert effect.receipt == {"url": url, "status": 201, "idempotency_key": str(pid)}
    [post] = received
    assert post["headers"]["Idempotency-Key"] == str(pid)
    assert post["body"] == b'{"deployed":"v2"}'


@pytest.mark.usefixtures("permissive_policy")
async def test_an_agent_whose_level_lands_on_the_target_branch_moves_it_in_a_bare_repository(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    work = gitrepo.make_repo(tmp_path)
    bare = tmp_path / "origin.git"
    gitops.git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    patch, base = gitrepo.patch_for(work, gitrepo.RENAMED)
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "trusted", gitrepo.git_contract(bare, ci=False))
        pid = await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base))
        effect = await wait_for_event(nc, applied(pid), timeout=30)
    assert isinstance(effect, EffectApplied) and effect.receipt["branch"] == "main"
    assert gitrepo.head(bare) == effect.receipt["commit"]
    assert gitops.out(bare, "rev-parse", f"{effect.receipt['commit']}^") == base


class Overlap:
    """A webhook receiver that holds each POST until `expected` are in flight at once (or one
    gave up waiting), so the answer it records says whether the applier's POSTs overlapped."""

    def __init__(self, expected: int, patience_s: float = 10.0) -> None:
        self.expected = expected
        self.patience_s = patience_s
        self.keys: list[str] = []
        self.peak = 0
        self._in_flight = 0
        self._gave_up = False
        self._changed = threading.Condition()

    def arrive(self, key: str) -> None:
        with self._changed:
            self.keys.append(key)
            self._in_flight += 1
            self.peak = max(self.peak, self._in_flight)
            self._changed.notify_all()
            met = self._changed.wait_for(
                lambda: self.peak >= self.expected or self._gave_up, timeout=self.patience_s
            )
            self._gave_up = self._gave_up or not met
            self._in_flight -= 1
            self._changed.notify_all()


@pytest.fixture
def overlapping_receiver() -> Iterator[tuple[str, Overlap]]:
    overlap = Overlap(expected=6)
    with webhook_server(lambda request, _body: overlap.arrive(request.headers["Idempotency-Key"])) as url:
        yield url, overlap


async def accepted_webhooks(nc: Any, url: str, jobs: int) -> list[uuid.UUID]:
    """`jobs` webhook proposals, each of its own agent, all accepted (no applier runs yet)."""
    contract = Contract(scope=Scope(effects=["webhook"]), target=Target(url=url))
    pids = []
    for i in range(jobs):
        agent, ctx = await lease(nc, f"notifier{i}", contract)
        pids.append(await propose(agent, ctx, Proposal(effect="webhook", output={"n": i})))
    for pid in pids:
        await wait_for_event(nc, accepted(pid))
    return pids


@pytest.mark.usefixtures("permissive_policy")
async def test_jobs_accepted_at_once_are_applied_concurrently_each_exactly_once(
    nats_server: EmbeddedServer, overlapping_receiver: tuple[str, Overlap]
) -> None:
    url, overlap = overlapping_receiver
    async with running(nats_server.url, DECIDERS, name="deciders"), client(nats_server.url) as nc:
        pids = await accepted_webhooks(nc, url, overlap.expected)
        async with running(nats_server.url, ["applier"], name="applier"):
            for pid in pids:
                await wait_for_event(nc, applied(pid), timeout=30)
        events = await events_of(nc)
    # Every POST was in flight at one moment: one driver per job, not one job at a time.
    assert overlap.peak == overlap.expected
    assert sorted(overlap.keys) == sorted(str(pid) for pid in pids)
    assert count(events, EffectApplied) == len(pids) and count(events, JobCompleted) == len(pids)


@pytest.mark.usefixtures("permissive_policy")
async def test_an_applier_drives_no_more_jobs_at_once_than_its_setting_allows(
    nats_server: EmbeddedServer, overlapping_receiver: tuple[str, Overlap], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, overlap = overlapping_receiver
    # Each POST is held until a third is in flight beside it, which two drivers never allow:
    # the first to lose patience lets them all pass.
    overlap.expected, overlap.patience_s = 3, 1.0
    monkeypatch.setenv("WARDEN_APPLIER_DRIVERS", "2")
    async with running(nats_server.url, DECIDERS, name="deciders"), client(nats_server.url) as nc:
        pids = await accepted_webhooks(nc, url, 6)
        async with running(nats_server.url, ["applier"], name="applier"):
            for pid in pids:
                await wait_for_event(nc, applied(pid), timeout=30)
    assert overlap.peak == 2
    assert sorted(overlap.keys) == sorted(str(pid) for pid in pids)


@pytest.mark.usefixtures("permissive_policy")
async def test_changes_accepted_at_once_onto_one_branch_land_one_after_another_each_once(
    nats_server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every change lands on main: the applier's drivers take the branch in turn instead of
    # racing its compare-and-swap, so none runs out of tries and none is recorded as failed.
    repo = gitrepo.make_repo(tmp_path)
    before = gitrepo.head(repo)
    changes = 12
    async with running(nats_server.url, DECIDERS, name="deciders"), client(nats_server.url) as nc:
        pids = []
        for i in range(changes):
            patch, base = gitrepo.patch_for(repo, {f"app/extra_{i}.py": f"VALUE = {i}\n"})
            agent, ctx = await lease(nc, f"lander{i}", gitrepo.git_contract(repo, ci=False))
            pids.append(await propose(agent, ctx, Proposal(effect="git.patch", patch=patch, base=base)))
        for pid in pids:
            await wait_for_event(nc, accepted(pid))
        async with running(nats_server.url, ["applier"], name="applier"):
            for pid in pids:
                outcome = await wait_for_event(nc, settled(pid), timeout=60)
                assert isinstance(outcome, EffectApplied), outcome
        events = await events_of(nc)
    for pid in pids:
        assert len(gitrepo.commits_carrying(repo, "Warden-Proposal", str(pid))) == 1
    assert len(gitops.out(repo, "rev-list", f"{before}..main").split()) == changes
    assert count(events, EffectFailed) == 0 and count(events, EffectApplied) == changes
    # Nor did any driver lose the branch so often that it had to give up and try again later.
    assert not [r for r in caplog.records if r.name == "warden.applier" and r.levelno >= logging.ERROR]
