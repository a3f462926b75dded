"""The HTTP API authenticates: bearer tokens from `warden creds add-operator|add-client`, the
`--auth` setting for reads, the operator recorded as the token's name, and POST /api/jobs."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from services.api import Api
from services.api.auth import BadAuthSetting
from services.cli.creds import creds
from services.cli.main import cli
from shared import bus, tokens, topology
from shared.events import AgentReinstated, AgentSuspended, InputRejected, JobCompleted, JobRequested
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, propose_accepted, wait_for_event
from tests.processes import ended
from tests.readside import ReadSide, read_side
from tests.test_api import free_port


def issue(data_dir: Path, role: str, name: str) -> str:
    """`warden creds add-operator|add-client NAME --data-dir D`, as an operator runs it: the token."""
    result = CliRunner().invoke(creds, [f"add-{role}", name, "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["name"] == name and out["role"] == role
    return str(out["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def api_with_tokens(
    nats_server: EmbeddedServer, tmp_path: Path, *, auth: str = "operators", services: list[str] | None = None
) -> AsyncIterator[tuple[ReadSide, httpx.AsyncClient, Path]]:
    data_dir = tmp_path / "data"
    store = f"sqlite:///{tmp_path / 'auth.sqlite'}"
    async with read_side(
        nats_server.url,
        store,
        api=True,
        auth=auth,
        tokens=tokens.tokens_path(data_dir),
        services=services if services is not None else ["scheduler", "revoker"],
    ) as side:
        assert side.api is not None
        async with httpx.AsyncClient(base_url=side.api.url, timeout=15) as http:
            yield side, http, data_dir


async def stored_inputs(side: ReadSide, subject: str) -> list[bus.StoredMessage]:
    return await bus.read_subject(side.ctx.js, topology.INPUT_STREAM, subject)


async def test_a_write_without_a_valid_token_is_a_401_with_a_challenge_and_stores_nothing(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_with_tokens(nats_server, tmp_path) as (side, http, data_dir):
        issue(data_dir, "operator", "dana")
        command = {"operator": "anyone", "reason": "x", "agent": "remote"}
        missing = await http.post("/api/operator/suspend", json=command)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="warden"'
        assert "add-operator" in missing.json()["error"]
        wrong = await http.post("/api/operator/suspend", json=command, headers=bearer("wdn_guessed"))
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = await http.post(
            "/api/operator/suspend", json=command, headers={"Authorization": "Basic ZGFuYQ=="}
        )
        assert basic.status_code == 401
        assert 'error="invalid_request"' in basic.headers["www-authenticate"]
        job = await http.post("/api/jobs", json={"idempotency_key": "k", "kind": "noop"})
        assert job.status_code == 401
        assert await stored_inputs(side, f"{topology.INPUT_ROOT}.op.>") == []
        assert await stored_inputs(side, topology.REQUEST_SUBJECT) == []
        # Reads stay open under the default `--auth operators`, and ignore a bad token.
        assert (await http.get("/api/jobs")).status_code == 200
        assert (await http.get("/api/jobs", headers=bearer("wdn_guessed"))).status_code == 200


async def test_the_recorded_operator_is_the_token_holder_even_when_the_body_claims_another(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with (
        api_with_tokens(nats_server, tmp_path) as (side, http, data_dir),
        client(nats_server.url) as nc,
    ):
        token = issue(data_dir, "operator", "dana")
        await AgentClient(nc, "remote").register()
        ok = await http.post(
            "/api/operator/suspend",
            json={"operator": "mallory", "reason": "paging", "agent": "remote"},
            headers=bearer(token),
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["type"] == "accepted"
        suspended = await wait_for_event(nc, lambda e: isinstance(e, AgentSuspended))
        assert (
            isinstance(suspended, AgentSuspended) and suspended.by == "dana" and suspended.reason == "paging"
        )
        # The body need not name anyone at all.
        back = await http.post(
            "/api/operator/reinstate", json={"reason": "fixed", "agent": "remote"}, headers=bearer(token)
        )
        assert back.status_code == 200, back.text
        reinstated = await wait_for_event(nc, lambda e: isinstance(e, AgentReinstated))
        assert isinstance(reinstated, AgentReinstated) and reinstated.by == "dana"
        [first, _second] = await stored_inputs(side, f"{topology.INPUT_ROOT}.op.>")
        assert json.loads(first.data)["operator"] == "dana"  # what was stored, too
        # The service still refuses what it refuses, and a malformed command is a 400.
        again = await http.post(
            "/api/operator/reinstate", json={"reason": "again", "agent": "remote"}, headers=bearer(token)
        )
        assert again.status_code == 422
        bad = await http.post("/api/operator/suspend", json={"agent": "remote"}, headers=bearer(token))
        assert bad.status_code == 400
        assert [d["parameter"] for d in bad.json()["details"]] == ["$.reason"]
        listed = await http.post("/api/operator/suspend", json=["x"], headers=bearer(token))
        assert listed.status_code == 400 and "JSON object" in listed.json()["details"][0]["message"]


async def test_a_client_token_submits_and_reads_but_may_not_command_and_a_removed_token_stops_working(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_with_tokens(nats_server, tmp_path, auth="all") as (side, http, data_dir):
        token = issue(data_dir, "client", "billing")
        command = await http.post(
            "/api/operator/suspend", json={"reason": "x", "agent": "remote"}, headers=bearer(token)
        )
        assert command.status_code == 403
        assert "billing holds a client token" in command.json()["error"]
        assert await stored_inputs(side, f"{topology.INPUT_ROOT}.op.>") == []
        assert (await http.get("/api/agents", headers=bearer(token))).status_code == 200
        submitted = await http.post(
            "/api/jobs", json={"idempotency_key": "b-1", "kind": "noop"}, headers=bearer(token)
        )
        assert submitted.status_code == 201, submitted.text

        listing = CliRunner().invoke(creds, ["list", "--data-dir", str(data_dir)])
        assert listing.exit_code == 0, listing.output
        assert "billing  client" in listing.output and token not in listing.output
        removed = CliRunner().invoke(creds, ["remove-client", "billing", "--data-dir", str(data_dir)])
        assert removed.exit_code == 0, removed.output
        # The running API notices the change on its next request: no restart.
        after = await http.get("/api/agents", headers=bearer(token))
        assert after.status_code == 401
        assert 'error="invalid_token"' in after.headers["www-authenticate"]
        again = CliRunner().invoke(creds, ["remove-client", "billing", "--data-dir", str(data_dir)])
        assert again.exit_code == 3 and "no client token named billing" in again.output


async def test_with_auth_all_every_read_needs_a_token_and_the_document_says_so(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_with_tokens(nats_server, tmp_path, auth="all", services=[]) as (_side, http, data_dir):
        token = issue(data_dir, "operator", "dana")
        for path in (
            "/api/jobs",
            "/api/agents/x",
            "/api/status",
            "/api/events/stream",
            "/api/metrics/summary",
        ):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
        assert (await http.get("/api/status", headers=bearer(token))).status_code == 200
        # The page, its script, the document and the Prometheus scrape stay open.
        for path in ("/", "/static/app.js", "/openapi.json", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        doc = (await http.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    jobs = doc["paths"]["/api/jobs"]
    assert jobs["get"]["security"] == [{"bearer": []}] and "401" in jobs["get"]["responses"]
    assert jobs["post"]["security"] == [{"bearer": []}]
    assert {"201", "200", "401", "422"} <= set(jobs["post"]["responses"])
    assert "WWW-Authenticate" in jobs["post"]["responses"]["401"]["headers"]
    operator = doc["paths"]["/api/operator/{verb}"]["post"]
    assert {"401", "403"} <= set(operator["responses"])
    assert doc["paths"]["/metrics"]["get"]["security"] == []


async def test_under_the_default_setting_the_document_marks_reads_open_and_writes_protected(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_with_tokens(nats_server, tmp_path, services=[]) as (_side, http, _data_dir):
        doc = (await http.get("/openapi.json")).json()
    assert doc["paths"]["/api/jobs"]["get"]["security"] == []
    assert "401" not in doc["paths"]["/api/jobs"]["get"]["responses"]
    assert doc["paths"]["/api/operator/{verb}"]["post"]["security"] == [{"bearer": []}]


def test_auth_off_is_refused_on_an_address_other_machines_can_reach(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "[::]", "example.com"):
        with pytest.raises(BadAuthSetting, match="only on a loopback address"):
            Api(f"{host}:0", "sqlite:///x.sqlite", auth="off")
    assert Api("127.0.0.1:0", "sqlite:///x.sqlite", auth="off").auth.mode == "off"
    assert Api("[::1]:0", "sqlite:///x.sqlite", auth="off").auth.mode == "off"
    result = CliRunner().invoke(
        cli, ["run", "api", "--auth", "off", "--http", "0.0.0.0:8765", "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2
    assert "--auth off" in result.output and "not on 0.0.0.0" in result.output
    assert not (tmp_path / "d").exists()  # refused before anything started


async def test_auth_off_on_loopback_lets_requests_in_as_anonymous(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with (
        api_with_tokens(nats_server, tmp_path, auth="off") as (_side, http, data_dir),
        client(nats_server.url) as nc,
    ):
        await AgentClient(nc, "remote").register()
        ok = await http.post(
            "/api/operator/suspend", json={"operator": "dana", "reason": "r", "agent": "remote"}
        )
        assert ok.status_code == 200, ok.text
        event = await wait_for_event(nc, lambda e: isinstance(e, AgentSuspended))
        assert isinstance(event, AgentSuspended) and event.by == tokens.ANONYMOUS
        # A token, when sent, must still be a real one.
        assert (await http.get("/api/jobs", headers=bearer("wdn_guessed"))).status_code == 401
        assert not tokens.tokens_path(data_dir).exists()


async def test_post_jobs_validates_like_the_request_subject_is_idempotent_and_the_job_completes(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with (
        api_with_tokens(
            nats_server, tmp_path, services=["scheduler", "reconciler", "checker", "applier", "revoker"]
        ) as (side, http, data_dir),
        client(nats_server.url) as nc,
    ):
        token = issue(data_dir, "client", "billing")
        # Every problem at once, recorded as the NATS path records it.
        bad = await http.post(
            "/api/jobs",
            json={
                "idempotency_key": "bad-1",
                "kind": "noop",
                "colour": "red",
                "contract": {"stopping": {"max_attempts": "three", "lease_ttl_s": -1}},
            },
            headers=bearer(token),
        )
        assert bad.status_code == 422, bad.text
        reply = bad.json()
        paths = sorted(e["path"] for e in reply["errors"])
        assert paths == ["$.colour", "$.contract.stopping.lease_ttl_s", "$.contract.stopping.max_attempts"]
        rejected = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(rejected, InputRejected) and str(rejected.originator_id) == reply["rejection_id"]
        assert sorted(e.path for e in rejected.errors) == paths
        not_json = await http.post("/api/jobs", content=b"{nope", headers=bearer(token))
        assert not_json.status_code == 422 and "not valid JSON" in not_json.json()["errors"][0]["message"]

        key = f"http-{uuid.uuid4()}"
        body: dict[str, Any] = {
            "idempotency_key": key,
            "kind": "noop",
            "submitter": "someone-else",
            "contract": {
                "scope": {"effects": ["none"]},
                "stopping": {"lease_ttl_s": 5, "heartbeat_interval_s": 1, "max_attempts": 2},
            },
        }
        first = await http.post("/api/jobs", json=body, headers=bearer(token))
        assert first.status_code == 201, first.text
        job_id = first.json()["job_id"]
        assert first.headers["location"] == f"/api/jobs/{job_id}" and first.json()["duplicate"] is False
        second = await http.post("/api/jobs", json=body, headers=bearer(token))
        assert second.status_code == 200 and second.json() == {**first.json(), "duplicate": True}
        requested = await wait_for_event(
            nc, lambda e: isinstance(e, JobRequested) and e.idempotency_key == key
        )
        assert isinstance(requested, JobRequested) and requested.submitter == "billing"

        agent = AgentClient(nc, "worker", kinds=["noop"])
        await agent.register()
        grant = await agent.claim()
        assert grant is not None and str(grant.job_id) == job_id
        await propose_accepted(agent, JobContext(grant=grant), Proposal(effect="none", output={"ok": True}))
        done = await wait_for_event(
            nc, lambda e: isinstance(e, JobCompleted) and str(e.originator_id) == job_id, timeout=30
        )
        assert isinstance(done, JobCompleted) and done.agent == "worker"
        jobs = await stored_inputs(side, topology.REQUEST_SUBJECT)
        assert len(jobs) == 4  # the bad one, the non-JSON one, and the same request twice


async def test_an_oversized_body_is_refused_before_it_is_read_to_the_end(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_with_tokens(nats_server, tmp_path) as (side, http, data_dir):
        token = issue(data_dir, "operator", "dana")
        huge = b'{"idempotency_key": "k", "kind": "' + b"x" * (topology.MAX_INPUT_BYTES + 1) + b'"}'
        response = await http.post("/api/jobs", content=huge, headers=bearer(token))
        assert response.status_code == 413
        assert await stored_inputs(side, topology.REQUEST_SUBJECT) == []


def test_a_token_is_stored_only_as_a_hash_in_a_private_file(tmp_path: Path) -> None:
    token = issue(tmp_path, "operator", "dana")
    path = tokens.tokens_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text() and tokens.digest(token) in path.read_text()
    store = tokens.TokenStore(path)
    assert store.verify(token) == tokens.Identity(name="dana", role="operator")
    assert store.verify(token + "x") is None
    replaced = issue(tmp_path, "operator", "dana")
    assert store.verify(token) is None and store.verify(replaced) is not None
    clash = CliRunner().invoke(creds, ["add-client", "dana", "--data-dir", str(tmp_path)])
    assert clash.exit_code == 2 and "already a operator token" in clash.output
    for name in ("anonymous", "a.b", ""):
        refused = CliRunner().invoke(creds, ["add-operator", name, "--data-dir", str(tmp_path)])
        assert refused.exit_code == 2, name


def test_the_local_operator_token_is_kept_while_valid_and_reissued_once_removed(tmp_path: Path) -> None:
    token, path = tokens.local_operator_token(tmp_path)
    assert path == tmp_path.resolve() / tokens.LOCAL_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == token
    assert tokens.local_operator_token(tmp_path)[0] == token
    assert tokens.TokenStore(tokens.tokens_path(tmp_path)).remove(tokens.LOCAL_OPERATOR, "operator")
    fresh, _ = tokens.local_operator_token(tmp_path)
    assert fresh != token
    assert tokens.TokenStore(tokens.tokens_path(tmp_path)).verify(fresh) == tokens.Identity(
        name=tokens.LOCAL_OPERATOR, role="operator"
    )


def test_warden_up_on_loopback_writes_a_local_operator_token_that_the_api_accepts(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WARDEN_PROJECTIONS_URL", "WARDEN_NATS_URL")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--http",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # bounded by the pytest timeout; ends if the process dies
            lines.append(line)
            if "API token" in line:
                break
        assert any("warden ready" in line for line in lines), lines
        token_file = data_dir.resolve() / tokens.LOCAL_TOKEN_FILE
        assert str(token_file) in lines[-1]
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            body = {"idempotency_key": "quick-start", "kind": "noop"}
            assert http.post("/api/jobs", json=body).status_code == 401
            created = http.post("/api/jobs", json=body, headers=bearer(token))
            assert created.status_code == 201, created.text
    finally:
        assert ended(proc, signal.SIGINT) == 0


async def test_a_token_store_that_cannot_be_read_refuses_with_a_503_not_a_guess(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_with_tokens(nats_server, tmp_path, auth="all", services=[]) as (_side, http, data_dir):
        issue(data_dir, "operator", "dana")
        tokens.tokens_path(data_dir).write_text("{not json")
        response = await http.get("/api/jobs", headers=bearer("wdn_anything"))
        assert response.status_code == 503 and "damaged" in response.json()["error"]


def test_compose_serves_the_api_with_auth_all_and_its_tokens_in_a_volume_the_cli_shares() -> None:
    import yaml

    from tests.opsnats import ROOT

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    api, cli_tool = compose["api"], compose["cli"]
    assert api["environment"]["WARDEN_HTTP"].startswith("0.0.0.0:")
    command = api["command"]
    assert command[command.index("--auth") + 1] == "all"
    data_dir = "/var/lib/warden"  # the image's WARDEN_DATA_DIR (Dockerfile)
    assert f"ENV WARDEN_DATA_DIR={data_dir}" in (ROOT / "Dockerfile").read_text()
    [shared] = [v for v in api["volumes"] if v.endswith(f":{data_dir}")]
    assert shared in cli_tool["volumes"]
