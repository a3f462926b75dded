"""`warden agent exec` against a real server: a real command, a real kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import msgspec

from shared import topology
from shared.contract import Contract, Scope, Stopping, Target
from shared.events import LeaseExpired, LeaseGranted, ProposalSubmitted
from shared.messages import JobRequest
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import client, running, submit, wait_for_event

ROOT = Path(__file__).resolve().parent.parent
EDIT = (
    "import pathlib, os; pathlib.Path('notes.txt').write_text('hello from ' + os.environ['WARDEN_INPUT_WHO'])"
)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _repo(path: Path) -> Path:
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("a repo\n")
    _git(path, "add", "-A")
    _git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    return path


def _exec(url: str, name: str, *command: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "agent",
            "exec",
            "--name",
            name,
            "--nats",
            url,
            "--jobs",
            "1",
            "--",
            *command,
        ],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "WARDEN_NATS_URL": ""},
    )


async def test_agent_exec_runs_a_real_command_and_its_diff_arrives_as_a_proposal(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = _repo(tmp_path / "repo")
    contract = Contract(
        scope=Scope(paths=["**"], effects=["git.patch"]),
        inputs={"who": "exec"},
        target=Target(repo=str(repo), branch="main"),
        stopping=Stopping(lease_ttl_s=5, heartbeat_interval_s=1),
    )
    async with (
        running(nats_server.url, ["scheduler", "reconciler", "checker"]),
        client(nats_server.url) as nc,
    ):
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="edit", contract=contract)
        )
        proc = _exec(nats_server.url, "scribe", sys.executable, "-c", EDIT, log=tmp_path / "agent.log")
        submitted = await wait_for_event(nc, lambda e: isinstance(e, ProposalSubmitted), timeout=60)
        assert isinstance(submitted, ProposalSubmitted)
        assert submitted.originator_id == job_id and submitted.agent == "scribe"
        assert await anyio.to_thread.run_sync(proc.wait) == 0, (tmp_path / "agent.log").read_text()
        raw = await nc.jetstream().get_msg("WARDEN_INPUT", submitted.input_seq)
        proposal = msgspec.json.decode(raw.data)
        assert "+hello from exec" in proposal["patch"]
        assert "notes.txt" in proposal["patch"]
        assert proposal["base"] == _git(repo, "rev-parse", "main").strip()
        assert proposal["evidence"]["exit_code"] == 0
    # The worktree it ran in is gone; the repository itself was not touched by the agent.
    assert not (repo / "notes.txt").exists()
    assert "notes" not in _git(repo, "worktree", "list")


async def test_an_agent_killed_while_holding_a_lease_loses_the_job_to_another_agent(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    contract = Contract(stopping=Stopping(lease_ttl_s=1.0, heartbeat_interval_s=0.25))
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="long", contract=contract)
        )
        beats = await nc.subscribe(topology.agent_subject("doomed", "heartbeat"))
        proc = _exec(nats_server.url, "doomed", "sleep", "600", log=tmp_path / "doomed.log")
        try:
            granted = await wait_for_event(
                nc, lambda e: isinstance(e, LeaseGranted) and e.agent == "doomed", timeout=60
            )
            assert granted.originator_id == job_id
            await beats.next_msg(timeout=30)  # alive and heartbeating under its lease...
            os.kill(proc.pid, signal.SIGKILL)  # ...when the agent process dies holding it
        finally:
            proc.wait()
        expired = await wait_for_event(nc, lambda e: isinstance(e, LeaseExpired), timeout=15)
        assert isinstance(expired, LeaseExpired)
        assert expired.agent == "doomed" and expired.epoch == 1
        assert expired.last_heartbeat is not None  # it was alive and beating until the kill
        assert expired.detection_latency_ms >= 0
        rescuer = AgentClient(nc, "rescuer")
        await rescuer.register()
        grant = await rescuer.claim()
        assert grant is not None and grant.job_id == job_id and grant.epoch == 2
