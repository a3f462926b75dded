"""The service runtime against real faults: server restarts under running services, `warden up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import msgspec

from shared import topology
from shared.events import JobRequested, LeaseGranted
from shared.messages import JobRequest
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import client, events_of, running, wait_for_event
from tests.processes import ended

WARDEN = [sys.executable, "-m", "services.cli"]


async def test_a_server_restart_under_running_services_loses_no_event_and_doubles_none(
    nats_server: EmbeddedServer,
) -> None:
    total = 500
    async with running(nats_server.url), client(nats_server.url) as nc:
        js = nc.jetstream()
        for i in range(total):
            body = msgspec.json.encode(JobRequest(idempotency_key=f"restart-{i}", kind="noop"))
            await js.publish_async(topology.REQUEST_SUBJECT, body)
        await js.publish_async_completed()
        # Stop the broker while the scheduler is still working through the backlog.
        await anyio.to_thread.run_sync(nats_server.restart)
        with anyio.fail_after(30):
            while True:
                requested = [e for e in await events_of(nc) if isinstance(e, JobRequested)]
                if len(requested) >= total:
                    break
                await anyio.sleep(0.1)
        keys = [e.idempotency_key for e in requested]
        assert len(keys) == total
        assert len(set(keys)) == total

        # The services are still serving after the outage, without a restart of their own.
        agent = AgentClient(nc, "after-outage")
        await agent.register()
        grant = await agent.claim()
        assert grant is not None
        granted = await wait_for_event(nc, lambda e: isinstance(e, LeaseGranted))
        assert granted.originator_id == grant.job_id


def _start_up(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*WARDEN, "up", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "WARDEN_NATS_URL": ""},
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # bounded by the pytest timeout; ends if the process dies
        lines.append(line)
        if "warden ready" in line:
            return proc, line
    raise AssertionError(f"warden up exited {ended(proc)} before ready: {''.join(lines)}")


def test_warden_up_starts_stops_on_ctrl_c_and_finds_its_state_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    proc, ready = _start_up(data_dir)
    try:
        seconds = float(ready.split("ready in ")[1].split("s")[0])
        assert seconds < 10
        state = json.loads((data_dir / "server.json").read_text())
        first = subprocess.run(
            [*WARDEN, "submit", "--kind", "noop", "--key", "kept", "--json", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "WARDEN_NATS_URL": ""},
        )
        assert first.returncode == 0, first.stderr
        job_id = json.loads(first.stdout)["job_id"]
    finally:
        assert ended(proc, signal.SIGINT) == 0
    assert not (data_dir / "server.json").exists()

    proc, _ready = _start_up(data_dir)
    try:
        again = subprocess.run(
            [*WARDEN, "submit", "--kind", "noop", "--key", "kept", "--json", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "WARDEN_NATS_URL": ""},
        )
        assert again.returncode == 0, again.stderr
        reply = json.loads(again.stdout)
        assert reply["job_id"] == job_id
        assert reply["duplicate"] is True
        assert json.loads((data_dir / "server.json").read_text())["url"] != "" and state["url"]
    finally:
        assert ended(proc, signal.SIGTERM) == 0


def test_client_commands_refuse_to_guess_a_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [*WARDEN, "submit", "--kind", "noop", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WARDEN_NATS_URL": ""},
    )
    assert result.returncode == 4  # no server to reach (README, "Exit codes")
    assert "no NATS server named" in result.stderr
    assert str(uuid.UUID(int=0)) not in result.stdout
