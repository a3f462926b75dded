"""`warden doctor` against real servers: it passes a deployment as ops/ configures it, and names
each broken guarantee with its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from nats.js import api as js_api

from services.cli.doctor import doctor_command
from shared import credentials, doctor, topology
from shared.server import EmbeddedServer, free_port
from tests import opsnats
from tests.harness import client, running
from tests.processes import ended

SERVICES = ("scheduler", "reconciler")


def failed(findings: list[doctor.Finding]) -> dict[str, doctor.Finding]:
    return {f.check: f for f in findings if f.status == "fail"}


async def test_a_deployment_as_ops_configures_it_is_healthy(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ops_server.server.url
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    async with running(url, list(SERVICES)), opsnats.connected(url, **opsnats.operator_credentials()) as nc:
        findings = await doctor.diagnose(
            nc, [ops_server.server.monitor_url], doctor.Expectations(services=SERVICES)
        )
    assert failed(findings) == {}
    checks = {f.check: f for f in findings}
    assert checks["server warden-1: sync_interval"].status == "ok"
    assert checks["service scheduler"].status == "ok"
    assert checks[f"stream {topology.EVENT_STREAM}: deny_delete"].status == "ok"


def test_a_server_without_sync_interval_always_is_flagged_with_its_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opsnats.set_passwords(monkeypatch)
    node = opsnats.start_single(
        tmp_path / "nats", edit=lambda text: opsnats._sub(r"^\s+sync_interval: always\n", "", text)
    )
    try:
        result = CliRunner().invoke(
            doctor_command,
            [
                "--nats",
                node.server.url,
                "--monitor",
                node.server.monitor_url,
                "--user",
                credentials.OPERATOR_USER,
                "--password",
                opsnats.OPERATOR_PASSWORD,
                "--no-services",
                "--json",
            ],
        )
    finally:
        node.server.stop()
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["healthy"] is False
    problems = {f["check"]: f for f in report["findings"] if f["status"] == "fail"}
    sync = problems["server warden-1: sync_interval"]
    assert "power loss" in sync["detail"]
    assert "sync_interval: always" in sync["fix"]


async def test_a_stream_without_deny_delete_is_flagged_until_warden_reapplies_it(
    nats_server: EmbeddedServer,
) -> None:
    async with client(nats_server.url) as nc:
        js = nc.jetstream()
        for config in topology.stream_configs():
            if config.name == topology.EVENT_STREAM:
                config.deny_delete = False
            await js.add_stream(config)
        for spec in topology.CONSUMERS:
            for stream in topology.consumer_streams(spec):
                await js.add_consumer(stream, topology.consumer_config(spec, stream))
        findings = await doctor.diagnose(nc, [nats_server.monitor_url], doctor.Expectations())
        problems = failed(findings)
        assert set(problems) == {f"stream {topology.EVENT_STREAM}: deny_delete"}
        assert "restart a Warden service" in problems[f"stream {topology.EVENT_STREAM}: deny_delete"].fix

        # The fix it names works: a service's start re-applies the topology.
        await topology.ensure(js, str(nc.connected_server_version))
        assert failed(await doctor.diagnose(nc, [nats_server.monitor_url], doctor.Expectations())) == {}


async def test_a_consumer_with_a_changed_ack_wait_or_backoff_is_flagged(nats_server: EmbeddedServer) -> None:
    async with client(nats_server.url) as nc:
        js = nc.jetstream()
        await topology.ensure(js, str(nc.connected_server_version))
        config = topology.consumer_config(topology.SCHEDULER_CONSUMER, topology.INPUT_STREAM)
        config.ack_wait = 5.0
        config.max_ack_pending = 10
        await js.add_consumer(topology.INPUT_STREAM, config)
        findings = failed(await doctor.diagnose(nc, [], doctor.Expectations()))
    problem = findings[f"consumer {topology.SCHEDULER_CONSUMER.durable}"]
    assert "ack_wait 5s, expected 30s" in problem.detail
    assert "max_ack_pending 10, expected 1024" in problem.detail


async def test_replicas_other_than_expected_and_silent_services_are_flagged(
    nats_server: EmbeddedServer,
) -> None:
    async with client(nats_server.url) as nc:
        await topology.ensure(nc.jetstream(), str(nc.connected_server_version))
        findings = await doctor.diagnose(
            nc,
            [],
            doctor.Expectations(replicas=3, services=("scheduler",), ping_timeout_s=0.5),
        )
    problems = failed(findings)
    assert problems[f"stream {topology.EVENT_STREAM}: replicas"].detail == "1 replica(s), expected 3"
    assert "no replica answered" in problems["service scheduler"].detail
    # Without a monitoring URL the fsync setting cannot be seen: said, not silently passed.
    warned = {f.check: f for f in findings if f.status == "warn"}
    assert "--monitor" in warned["server: sync_interval"].fix


async def test_an_unreachable_monitoring_endpoint_is_a_failure(nats_server: EmbeddedServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    findings = failed(await doctor.diagnose(None, [dead], doctor.Expectations()))
    assert "unreachable" in findings[f"server {dead}"].detail


def test_stream_settings_are_read_from_the_info_the_server_returns() -> None:
    # A pure check of the comparison, for a setting the live tests above do not vary.
    expected = topology.stream_configs()[0]
    info = js_api.StreamInfo.from_response(
        {
            "config": {**expected.as_dict(), "duplicate_window": 10 * 1_000_000_000},
            "state": {"messages": 0, "bytes": 0, "first_seq": 0, "last_seq": 0, "consumer_count": 0},
        }
    )
    problems = {f.check: f for f in doctor.stream_findings(expected, info, 1) if f.status == "fail"}
    assert "10s, expected 120s" in problems[f"stream {expected.name}: duplicate_window"].detail


def test_warden_doctor_finds_warden_ups_server_and_services_through_its_data_dir(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    data_dir = tmp_path / "state"
    warden = [sys.executable, "-m", "services.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    up = subprocess.Popen(
        [*warden, "up", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:  # bounded by the pytest timeout; ends if the process dies
            lines.append(line)
            if "warden ready" in line:
                break
        assert "warden ready" in lines[-1], "".join(lines)
        state = json.loads((data_dir / "server.json").read_text())
        assert state["monitor_url"].startswith("http://127.0.0.1:")
        result = subprocess.run(
            [*warden, "doctor", "--data-dir", str(data_dir), "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        ended(up, signal.SIGINT)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    checks = {f["check"]: f["status"] for f in report["findings"]}
    assert checks["server warden: sync_interval"] == "ok"
    for service in ("scheduler", "reconciler"):
        assert checks[f"service {service}"] == "ok"


def test_a_refused_login_is_reported_at_once_not_waited_out(ops_server: opsnats.OpsServer) -> None:
    result = CliRunner().invoke(
        doctor_command,
        [
            "--nats",
            ops_server.server.url,
            "--monitor",
            ops_server.server.monitor_url,
            "--user",
            credentials.OPERATOR_USER,
            "--password",
            "not-the-password",
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    problem = next(f for f in report["findings"] if f["check"].startswith("connection to"))
    assert "authorization violation" in problem["detail"].lower()
    # The servers were still checked through their monitoring endpoints.
    assert any(
        f["check"] == "server warden-1: sync_interval" and f["status"] == "ok" for f in report["findings"]
    )


def test_a_server_that_does_not_answer_is_exit_4_like_every_client_command() -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(doctor_command, ["--nats", dead, "--no-services"])
    assert result.exit_code == 4, result.output
    assert f"connection to {dead}: cannot connect" in result.output
