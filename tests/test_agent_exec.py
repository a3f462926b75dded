"""`warden agent exec` against a real server: a real command, a real kill."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec

from services.cli.agent import WORKSPACES
from shared import bus, topology
from shared.contract import Budgets, CiGate, Contract, Scope, Stopping, Target, scope_errors
from shared.events import (
    AgentRevoked,
    EffectApplied,
    InvariantChecked,
    JobCompleted,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRevoked,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    agent_id_for,
)
from shared.messages import Accepted, Heartbeat, JobRequest, LeaseGrant, OperatorCommand
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import SlowHandler, client, events_of, running, submit, wait_for_event

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


def _exec(
    url: str,
    name: str,
    *command: str,
    log: Path,
    options: tuple[str, ...] = ("--max-jobs", "1"),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "services.cli", "agent", "exec", "--name", name, "--nats", url, *options]
    with log.open("wb") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(
            [*argv, "--", *command],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WARDEN_NATS_URL": "", **(env or {})},
        )


def _ended(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> tuple[int, str]:
    """The exec process's exit code and everything it printed."""
    code = proc.wait(timeout=timeout)
    return code, log.read_text()


async def _checks(nc: Any, job_id: uuid.UUID) -> dict[str, InvariantChecked]:
    return {
        e.invariant: e
        for e in await events_of(nc, topology.event_subject(job_id))
        if isinstance(e, InvariantChecked)
    }


async def _proposal(nc: Any, submitted: ProposalSubmitted) -> dict[str, Any]:
    raw = await nc.jetstream().get_msg(topology.AGENT_INPUT_STREAM, submitted.input_seq)
    decoded: dict[str, Any] = msgspec.json.decode(raw.data)
    return decoded


async def _heartbeat(nc: Any, agent: str, predicate: Any, timeout: float = 60) -> Heartbeat:
    """The first heartbeat of `agent` (as the reconciler receives it) matching `predicate`."""
    sub = await nc.subscribe(topology.agent_subject(agent, "heartbeat"))
    try:
        with anyio.fail_after(timeout):
            while True:
                msg = await sub.next_msg(timeout=timeout)
                beat = msgspec.json.decode(msg.data, type=Heartbeat)
                if predicate(beat):
                    return beat
    finally:
        await sub.unsubscribe()


def _alive_after(pids: list[int], timeout: float) -> list[int]:
    """The pids among `pids` still running after waiting up to `timeout` for each to end."""
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)  # readable once the process has ended
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


async def _gone(pids: list[int], timeout: float = 20) -> list[int]:
    return await anyio.to_thread.run_sync(_alive_after, pids, timeout)


def _quick(**stopping: Any) -> Stopping:
    return Stopping(**{"lease_ttl_s": 3.0, "heartbeat_interval_s": 0.5, **stopping})


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
        raw = await nc.jetstream().get_msg(topology.AGENT_INPUT_STREAM, submitted.input_seq)
        assert raw.data is not None
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


SERVICES = ["scheduler", "reconciler", "checker", "applier"]


async def test_a_command_that_exits_non_zero_never_has_its_change_applied(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = _repo(tmp_path / "repo")
    contract = Contract(target=Target(repo=str(repo)), stopping=_quick(max_attempts=1))
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="edit", contract=contract)
        )
        log = tmp_path / "failer.log"
        proc = _exec(
            nats_server.url, "failer", "sh", "-c", "echo x=1 > x.py; echo broke >&2; exit 1", log=log
        )
        await wait_for_event(
            nc, lambda e: isinstance(e, JobTombstoned) and e.originator_id == job_id, timeout=60
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
        checks = await _checks(nc, job_id)
        events = await events_of(nc, topology.event_subject(job_id))
    assert code == 0, out
    assert checks["exit_status"].verdict == "fail"
    assert checks["exit_status"].evidence["exit_code"] == 1
    assert "broke" in checks["exit_status"].evidence["stderr_tail"]
    assert checks["scope"].verdict == "pass"  # a failed attempt, not a breach
    assert not any(isinstance(e, EffectApplied) for e in events)
    assert _git(repo, "branch", "--list", "warden/*") == ""


async def test_a_command_that_changes_nothing_is_a_no_change_result_not_a_breach(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = _repo(tmp_path / "repo")
    accept = Contract(target=Target(repo=str(repo)), stopping=_quick())
    refuse = Contract(target=Target(repo=str(repo)), stopping=_quick(max_attempts=1), on_empty="fail")
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        first = await submit(nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="edit", contract=accept))
        second = await submit(nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="edit", contract=refuse))
        log = tmp_path / "idle.log"
        proc = _exec(
            nats_server.url, "idle", "sh", "-c", "echo nothing", log=log, options=("--max-jobs", "2")
        )
        done = await wait_for_event(nc, lambda e: isinstance(e, JobCompleted) and e.originator_id == first)
        dead = await wait_for_event(nc, lambda e: isinstance(e, JobTombstoned) and e.originator_id == second)
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
        accepted, refused = await _checks(nc, first), await _checks(nc, second)
        submitted = await wait_for_event(
            nc, lambda e: isinstance(e, ProposalSubmitted) and e.originator_id == first
        )
        agent_events = await events_of(nc, topology.event_subject(agent_id_for("idle")))
    assert isinstance(done, JobCompleted) and isinstance(dead, JobTombstoned)
    assert code == 0, out
    assert isinstance(submitted, ProposalSubmitted) and submitted.effect == "none"
    assert accepted["empty_change"].verdict == "pass" and accepted["scope"].verdict == "pass"
    assert refused["empty_change"].verdict == "fail" and refused["scope"].verdict == "pass"
    assert "on_empty: fail" in refused["empty_change"].evidence["reason"]
    assert not any(isinstance(e, AgentRevoked) for e in agent_events)


async def test_exec_keeps_serving_through_unanswered_claims_and_a_broker_restart(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    log = tmp_path / "patient.log"
    # No service runs yet: nothing it sends is answered. Then the broker itself restarts.
    proc = _exec(nats_server.url, "patient", sys.executable, "-c", EDIT, log=log)
    async with client(nats_server.url) as nc:
        tries = await nc.subscribe(topology.agent_subject("patient", "register"))
        await tries.next_msg(timeout=60)  # it asked at least once (and nobody answered)
    await anyio.to_thread.run_sync(nats_server.stop)
    await anyio.to_thread.run_sync(nats_server.start)
    assert proc.poll() is None, log.read_text()
    repo = _repo(tmp_path / "repo")
    contract = Contract(inputs={"who": "exec"}, target=Target(repo=str(repo)), stopping=_quick())
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="edit", contract=contract)
        )
        await wait_for_event(
            nc, lambda e: isinstance(e, JobCompleted) and e.originator_id == job_id, timeout=90
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
    assert code == 0, out
    assert "Traceback" not in out
    assert f"{job_id} epoch 1: proposed" in out
    assert "stopped: did the 1 job(s) asked for; 1 job(s): 1 proposed" in out


async def test_a_revoked_agent_exits_1_with_the_reason(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    log = tmp_path / "rogue.log"
    async with (
        running(nats_server.url, ["scheduler", "reconciler", "revoker"]),
        client(nats_server.url) as nc,
    ):
        proc = _exec(nats_server.url, "rogue", "true", log=log, options=())
        await wait_for_event(nc, lambda e: getattr(e, "name", None) == "rogue", timeout=60)  # registered
        reply = await bus.request(
            nc,
            topology.operator_subject("revoke"),
            OperatorCommand(operator="alice", reason="caught exfiltrating", agent="rogue"),
        )
        assert isinstance(reply, Accepted), reply
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
    assert code == 1, out
    assert "agent rogue stopped: revoked:" in out and "caught exfiltrating" in out
    assert "Traceback" not in out


SPAWNER = (
    "import os, subprocess, sys, time\n"
    "kids = [subprocess.Popen(['sleep', '600']) for _ in range(2)]\n"
    "print('pids', os.getpid(), *[k.pid for k in kids], flush=True)\n"
    "time.sleep(600)\n"
)


async def test_the_command_dies_with_a_killed_exec_and_a_restarted_exec_removes_its_workspace(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    contract = Contract(stopping=_quick(lease_ttl_s=30.0, heartbeat_interval_s=0.3))
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="long", contract=contract)
        )
        proc = _exec(nats_server.url, "mortal", sys.executable, "-c", SPAWNER, log=tmp_path / "mortal.log")
        beat = await _heartbeat(nc, "mortal", lambda b: b.note.startswith("pids"))
        pids = [int(p) for p in beat.note.split()[1:]]
        assert len(pids) == 3 and await _gone(pids, timeout=0) == pids  # all running
        workspaces = await anyio.to_thread.run_sync(lambda: list((WORKSPACES / "mortal").glob(f"{job_id}-*")))
        assert len(workspaces) == 1
        os.kill(proc.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait)
        # The command and the children it started, all in its group, die with exec.
        assert await _gone(pids) == []
        assert workspaces[0].exists()  # exec had no chance to clean up...
        log = tmp_path / "mortal-2.log"
        again = _exec(nats_server.url, "mortal", "true", log=log, options=("--once",))
        code, out = await anyio.to_thread.run_sync(_ended, again, log)
    assert code == 0, out
    assert f"removed workspace {workspaces[0]}" in out  # ...so its next start does
    assert not workspaces[0].exists()


REPORTER = (
    "import json, os\n"
    "files = sorted(os.path.relpath(os.path.join(d, f)) for d, ds, fs in os.walk('.') "
    "if '.git' not in d.split(os.sep) for f in fs)\n"
    "task = json.load(open(os.environ['WARDEN_TASK_FILE']))\n"
    "json.dump({'env': dict(os.environ), 'files': files, 'task': task}, open('report.json', 'w'))\n"
)


async def test_the_command_sees_only_its_allowed_environment_and_readable_files(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = _repo(tmp_path / "repo")
    (repo / "secrets").mkdir()
    (repo / "secrets" / "deploy.env").write_text("TOKEN=do-not-read\n")
    (repo / "src").mkdir()
    (repo / "src" / "app.py").write_text("print('app')\n")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "more")
    contract = Contract(
        scope=Scope(paths=["report.json"], read=["*", "src/**"]),
        inputs={"topic": "env"},
        ci=CiGate(command=["true"]),
        target=Target(repo=str(repo)),
        stopping=_quick(budgets=Budgets(tokens=10_000)),
    )
    env = {
        "WARDEN_NATS_USER": "agent-user",
        "WARDEN_NATS_PASSWORD": "hunter2",
        "SOME_SECRET": "s3cret",
        "PASSED_ON": "yes",
    }
    async with (
        running(nats_server.url, ["scheduler", "reconciler", "checker"]),
        client(nats_server.url) as nc,
    ):
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="edit", contract=contract)
        )
        log = tmp_path / "nosy.log"
        proc = _exec(
            nats_server.url,
            "nosy",
            sys.executable,
            "-c",
            REPORTER,
            log=log,
            options=("--max-jobs", "1", "--env", "PASSED_ON"),
            env=env,
        )
        submitted = await wait_for_event(nc, lambda e: isinstance(e, ProposalSubmitted), timeout=60)
        assert isinstance(submitted, ProposalSubmitted)
        proposal = await _proposal(nc, submitted)
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
    assert code == 0, out
    assert "secrets" not in proposal["patch"]  # the hidden files are not "deleted" by the diff
    added = [line[1:] for line in proposal["patch"].splitlines() if line.startswith("+{")]
    report = json.loads(added[0])
    assert "WARDEN_NATS_PASSWORD" not in report["env"] and "WARDEN_NATS_USER" not in report["env"]
    assert "SOME_SECRET" not in report["env"]
    assert report["env"]["PASSED_ON"] == "yes"
    assert report["env"]["WARDEN_JOB_ID"] == str(job_id)
    assert json.loads(report["env"]["WARDEN_SCOPE_PATHS"]) == ["report.json"]
    assert json.loads(report["env"]["WARDEN_CI_COMMAND"]) == ["true"]
    assert report["files"] == [".warden/task.json", "README.md", "src/app.py"]
    assert report["task"]["inputs"] == {"topic": "env"}
    assert report["task"]["budgets"]["tokens"] == 10_000
    assert report["task"]["ci"]["command"] == ["true"]
    assert report["task"]["previous_attempts"] == []
    assert proposal["evidence"]["files_not_readable"] == 1


TICKER = (
    "import os, time, pathlib\n"
    "print('pid', os.getpid(), flush=True)\n"
    "for i in range(100000):\n"
    "    pathlib.Path('progress.txt').write_text(str(i))\n"
    "    time.sleep(0.2)\n"
)


async def test_a_stopped_command_is_a_stall_exec_stops_heartbeating_and_the_lease_expires(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    contract = Contract(stopping=_quick(stall_s=30.0))  # the stop, not the stall_s, catches it
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="long", contract=contract)
        )
        log = tmp_path / "frozen.log"
        proc = _exec(nats_server.url, "frozen", sys.executable, "-c", TICKER, log=log)
        beat = await _heartbeat(nc, "frozen", lambda b: b.note.startswith("pid"))
        os.kill(int(beat.note.split()[1]), signal.SIGSTOP)
        stopped_at = datetime.now(UTC)
        expired = await wait_for_event(
            nc, lambda e: isinstance(e, LeaseExpired) and e.originator_id == job_id, timeout=60
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
    assert isinstance(expired, LeaseExpired) and expired.agent == "frozen"
    latency = (expired.detected_at - stopped_at).total_seconds()
    print(f"SIGSTOP to lease.expired: {latency:.2f}s (ttl {contract.stopping.lease_ttl_s}s)")
    assert latency < 30.0  # well before stall_s would have: the state T was what caught it
    assert code == 0, out
    assert "stalled" in out and "stopped (state T)" in out


async def test_a_command_without_any_sign_of_progress_for_stall_s_is_a_stall(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    contract = Contract(stopping=_quick(stall_s=2.0))
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="long", contract=contract)
        )
        log = tmp_path / "hung.log"
        started = time.monotonic()
        proc = _exec(nats_server.url, "hung", "sleep", "600", log=log)
        granted = await wait_for_event(
            nc, lambda e: isinstance(e, LeaseGranted) and e.originator_id == job_id
        )
        expired = await wait_for_event(
            nc, lambda e: isinstance(e, LeaseExpired) and e.originator_id == job_id, timeout=60
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
    assert isinstance(granted, LeaseGranted) and isinstance(expired, LeaseExpired)
    # The command's last sign of progress is its start, just after the grant.
    latency = (expired.detected_at - granted.timestamp).total_seconds()
    print(f"last progress to lease.expired: {latency:.2f}s (stall_s 2, ttl 3)")
    assert latency >= 2.0
    assert time.monotonic() - started < 60
    assert code == 0, out
    assert "no output, no change in its workspace and no usage report" in out
    # The expiry's evidence says the command had been idle at its last heartbeat, and measures
    # the stall from its last sign of progress (its start): at least stall_s, within stall_s + 2 TTLs.
    assert expired.last_heartbeat is not None
    assert "[no sign of progress for" in expired.last_heartbeat.note
    assert expired.last_heartbeat.progress_at is not None
    assert expired.since_progress_ms is not None
    assert 2_000 <= expired.since_progress_ms <= (2.0 + 2 * contract.stopping.lease_ttl_s) * 1000
    assert expired.last_heartbeat.progress_at <= granted.timestamp + timedelta(seconds=5)


SPENDER = (
    "import json, os, time\n"
    "open(os.environ['WARDEN_USAGE_FILE'], 'a').write(json.dumps({'tokens': 5000, 'note': 'thinking'}) + '\\n')\n"
    "time.sleep(600)\n"
)


async def test_usage_the_command_reports_reaches_the_budget_and_stops_it(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    contract = Contract(stopping=_quick(budgets=Budgets(tokens=1000)))
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="long", contract=contract)
        )
        log = tmp_path / "spender.log"
        proc = _exec(nats_server.url, "spender", sys.executable, "-c", SPENDER, log=log)
        revoked = await wait_for_event(
            nc, lambda e: isinstance(e, LeaseRevoked) and e.originator_id == job_id, timeout=60
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
    assert isinstance(revoked, LeaseRevoked) and revoked.signal == "budget"
    assert "tokens" in revoked.reason
    assert code == 0, out
    assert f"{job_id} epoch 1: budget_exceeded" in out


async def test_sigterm_releases_the_lease_in_hand_and_exits_0_with_a_summary(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    contract = Contract(stopping=_quick())
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="long", contract=contract)
        )
        log = tmp_path / "polite.log"
        proc = _exec(nats_server.url, "polite", sys.executable, "-c", SPAWNER, log=log, options=())
        beat = await _heartbeat(nc, "polite", lambda b: b.note.startswith("pids"))
        proc.send_signal(signal.SIGTERM)
        released = await wait_for_event(
            nc, lambda e: isinstance(e, LeaseReleased) and e.originator_id == job_id, timeout=60
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
    assert isinstance(released, LeaseReleased) and "SIGTERM received" in released.reason
    assert code == 0, out
    assert "agent polite stopped: SIGTERM received; 1 job(s): 1 released" in out
    assert await _gone([int(p) for p in beat.note.split()[1:]]) == []


FEATURE_TEST = (
    "import unittest\n\nfrom src.greet import greet\n\n\n"
    "class GreetTest(unittest.TestCase):\n    def test_value(self):\n        self.assertEqual(greet(), 5)\n"
)


async def test_a_stand_in_agent_reads_its_task_reports_usage_and_fixes_what_its_first_attempt_got_wrong(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    repo = _repo(tmp_path / "repo")
    for rel, text in {
        "src/__init__.py": "",
        "tests/__init__.py": "",
        "tests/test_greet.py": FEATURE_TEST,
    }.items():
        (repo / rel).parent.mkdir(exist_ok=True)
        (repo / rel).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tests")
    contract = Contract(
        scope=Scope(paths=["src/**"]),
        inputs={"feature": "greet"},
        target=Target(repo=str(repo)),
        ci=CiGate(
            command=[sys.executable, "-m", "unittest", "discover", "-s", "tests", "-t", "."], timeout_s=60
        ),
        stopping=_quick(max_attempts=2, budgets=Budgets(tokens=1000)),
    )
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        job_id = await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="feature", contract=contract)
        )
        log = tmp_path / "learner.log"
        proc = _exec(
            nats_server.url,
            "learner",
            sys.executable,
            str(ROOT / "tests" / "standin_agent.py"),
            log=log,
            options=("--max-jobs", "2"),
        )
        await wait_for_event(
            nc, lambda e: isinstance(e, JobCompleted) and e.originator_id == job_id, timeout=120
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log)
        events = await events_of(nc, topology.event_subject(job_id))
        submitted = [e for e in events if isinstance(e, ProposalSubmitted)]
        retry = await _proposal(nc, submitted[1])
    assert code == 0, out
    assert [type(e).__name__ for e in events if isinstance(e, ProposalRejected | ProposalAccepted)] == [
        "ProposalRejected",
        "ProposalAccepted",
    ]
    assert "fixing: ci_gate" in retry["evidence"]["stdout"]  # it read why the first attempt failed
    assert retry["usage"] == {"steps": 2, "tokens": 300, "cost": 0.03}
    assert _git(repo, "show", f"warden/learner/{job_id}:src/greet.py") == "def greet():\n    return 5\n"


def test_a_read_glob_warden_cannot_match_or_that_names_unsafe_paths_is_refused_at_submission() -> None:
    errors = dict(scope_errors(Scope(read=["src/**", "/etc/**", "src/[z-a].py"])))
    assert set(errors) == {"$.contract.scope.read[1]", "$.contract.scope.read[2]"}
    assert "absolute" in errors["$.contract.scope.read[1]"]


RENDEZVOUS = (
    "import os, pathlib, sys, time\n"
    "here = pathlib.Path(os.environ['RENDEZVOUS'])\n"
    "(here / os.environ['WARDEN_JOB_ID']).touch()\n"
    "deadline = time.monotonic() + 30\n"
    "while len(list(here.iterdir())) < 2:\n"
    "    if time.monotonic() > deadline:\n"
    "        sys.exit('alone: the other job never ran beside this one')\n"
    "    time.sleep(0.05)\n"
    "pathlib.Path('met.txt').write_text('met\\n')\n"
)


async def test_concurrency_2_runs_two_jobs_at_once_each_in_its_own_workspace(
    nats_server: EmbeddedServer, tmp_path: Path, permissive_policy: Path
) -> None:
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    repo = _repo(tmp_path / "repo")
    contract = Contract(target=Target(repo=str(repo)), stopping=_quick(lease_ttl_s=10.0))
    async with (
        running(nats_server.url, ["scheduler", "reconciler", "checker"]),
        client(nats_server.url) as nc,
    ):
        jobs = {
            await submit(nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="edit", contract=contract))
            for _ in range(2)
        }
        log = tmp_path / "pair.log"
        proc = _exec(
            nats_server.url,
            "pair",
            sys.executable,
            "-c",
            RENDEZVOUS,
            log=log,
            options=("--concurrency", "2", "--max-jobs", "2", "--env", "RENDEZVOUS"),
            env={"RENDEZVOUS": str(rendezvous)},
        )
        code, out = await anyio.to_thread.run_sync(_ended, proc, log, 90)
        submitted = [e for e in await events_of(nc) if isinstance(e, ProposalSubmitted)]
        proposals = [await _proposal(nc, e) for e in submitted]
    assert code == 0, out
    assert {e.originator_id for e in submitted} == jobs
    assert [p["evidence"]["exit_code"] for p in proposals] == [0, 0], [
        p["evidence"]["stderr"] for p in proposals
    ]
    assert all("+met" in p["patch"] for p in proposals)


async def test_a_refused_heartbeat_keeps_the_work_going_until_the_lease_itself_would_expire(
    nats_server: EmbeddedServer,
) -> None:
    # A reconciler whose view lags answers "no job": the SDK neither crashes nor drops the work
    # at once; it stops when the lease's own expiry has passed, as with no answer at all.
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        agent = AgentClient(nc, "lagged")
        await agent.register()
        grant = LeaseGrant(
            job_id=uuid.uuid4(),
            kind="x",
            epoch=1,
            expires_at=datetime.now(UTC) + timedelta(seconds=2),
            ttl_s=2.0,
            heartbeat_interval_s=0.3,
            contract=Contract(),
        )
        handler = SlowHandler()
        outcome = await agent.work(grant, handler)
    assert outcome.status == "expired"
    assert "no job" in outcome.detail
    assert handler.cancelled == [True]
