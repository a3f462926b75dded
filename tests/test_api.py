"""The HTTP query API over the read model: listing, filtering, paging, a job's timeline, live
updates, OpenAPI and the Prometheus scrape endpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.readmodel.tables import JOB_STATES
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import client, submit
from tests.processes import ended
from tests.readside import (
    ReadSide,
    agent_history,
    append_histories,
    job_history,
    job_request,
    quick_contract,
    read_side,
)


@asynccontextmanager
async def api_over(
    nats_server: EmbeddedServer, tmp_path: Path, **kw: object
) -> AsyncIterator[tuple[ReadSide, httpx.AsyncClient]]:
    store = f"sqlite:///{tmp_path / 'api.sqlite'}"
    async with read_side(nats_server.url, store, api=True, **kw) as side:  # type: ignore[arg-type]
        assert side.api is not None
        async with httpx.AsyncClient(base_url=side.api.url, timeout=10) as http:
            yield side, http


async def test_jobs_are_listed_filtered_and_paged(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    async with api_over(nats_server, tmp_path) as (side, http):
        for name in ("a1", "a2"):
            await side.ctx.save(*agent_history(name))
        await append_histories(side.ctx, 12, start=1)
        position = await side.caught_up()
        status = (await http.get("/api/status", params={"at_least": position, "timeout": 5})).json()
        assert status["position"] == position and status["behind"] == 0

        everything = (await http.get("/api/jobs", params={"limit": 500})).json()
        assert everything["total"] == 12 and len(everything["items"]) == 12
        tombstoned = (await http.get("/api/jobs", params={"state": "tombstoned"})).json()
        assert tombstoned["total"] == 4
        assert {j["state"] for j in tombstoned["items"]} == {"tombstoned"}
        by_agent = (await http.get("/api/jobs", params={"agent": "a2"})).json()
        assert by_agent["total"] == 6 and {j["agent"] for j in by_agent["items"]} == {"a2"}
        assert (await http.get("/api/jobs", params={"kind": "nope"})).json()["total"] == 0

        first = (await http.get("/api/jobs", params={"limit": 5, "offset": 0})).json()
        second = (await http.get("/api/jobs", params={"limit": 5, "offset": 5})).json()
        third = (await http.get("/api/jobs", params={"limit": 5, "offset": 10})).json()
        ids = [j["job_id"] for page in (first, second, third) for j in page["items"]]
        assert len(ids) == 12 and len(set(ids)) == 12
        assert ids == [j["job_id"] for j in everything["items"]]

        agents = (await http.get("/api/agents")).json()
        assert [a["name"] for a in agents["items"]] == ["a1", "a2"]
        assert all(a["standing"] == "revoked" and a["level"] == 0 for a in agents["items"])
        a1 = (await http.get("/api/agents/a1")).json()
        assert [(c["previous"], c["level"]) for c in a1["level_changes"]] == [(0, 1), (1, 0)]

        failures = (await http.get("/api/failures", params={"kind": "lease.expired"})).json()
        assert failures["total"] == 8 and all(f["latency_ms"] is not None for f in failures["items"])
        revocations = (await http.get("/api/revocations", params={"agent": "a1"})).json()
        assert {r["kind"] for r in revocations["items"]} == {
            "lease.revoked",
            "agent.revoked",
            "agent.level_changed",
        }

        summary = (await http.get("/api/metrics/summary")).json()
        assert summary["jobs"]["total"] == 12
        assert summary["detection_latency_ms"]["count"] == 8
        assert summary["detection_latency_ms"]["p50"] <= summary["detection_latency_ms"]["p99"]
        assert summary["decisions"] == {"rejected": 4}
        points = (await http.get("/api/metrics/detection-latency", params={"limit": 3})).json()
        assert len(points) == 3 and [p["seq"] for p in points] == sorted(p["seq"] for p in points)


@pytest.mark.parametrize(
    ("path", "params", "parameter", "needle"),
    [
        ("/api/jobs", {"state": "sleeping"}, "state", "must be one of queued"),
        ("/api/jobs", {"limit": "0"}, "limit", "at least 1"),
        ("/api/jobs", {"limit": "many"}, "limit", "must be an integer"),
        ("/api/jobs", {"colour": "red"}, "colour", "unknown query parameter"),
        ("/api/failures", {"job": "not-a-uuid"}, "job", "must be a UUID"),
        ("/api/jobs/not-a-uuid", {}, "job_id", "must be a UUID"),
        ("/api/status", {"at_least": "-1"}, "at_least", "at least 0"),
    ],
)
async def test_bad_parameters_get_a_400_naming_the_parameter(
    nats_server: EmbeddedServer,
    tmp_path: Path,
    path: str,
    params: dict[str, str],
    parameter: str,
    needle: str,
) -> None:
    async with api_over(nats_server, tmp_path) as (_side, http):
        response = await http.get(path, params=params)
        assert response.status_code == 400
        body = response.json()
        assert body["error"]
        [detail] = [d for d in body["details"] if d["parameter"] == parameter]
        assert needle in detail["message"]


async def test_an_unknown_job_is_a_404(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    async with api_over(nats_server, tmp_path) as (_side, http):
        response = await http.get("/api/jobs/0b1e6f6e-3e44-4b8e-9b1c-2d7d4c0f9a11")
        assert response.status_code == 404 and "no job" in response.json()["error"]
        assert (await http.get("/api/agents/ghost")).status_code == 404
        assert (await http.get("/api/nothing-here")).status_code == 404


async def test_a_job_shows_its_timeline_with_the_evidence_as_stored(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_over(nats_server, tmp_path, services=["scheduler", "reconciler"]) as (side, http):
        async with client(nats_server.url) as nc:
            agent = AgentClient(nc, "sleepy")
            await agent.register()
            job_id = await submit(nc, job_request(contract=quick_contract(ttl=0.4, attempts=1)))
            assert await agent.claim() is not None
            # Silent: the lease expires and, with one attempt allowed, the job is tombstoned.
            with anyio.fail_after(15):
                while True:
                    await side.caught_up()
                    job = (await http.get(f"/api/jobs/{job_id}")).json()
                    if job["state"] == "tombstoned":
                        break
                    await side.projector.wait_for(side.projector.position + 1, timeout=15)
        types = [e["type"] for e in job["timeline"]]
        assert types[:3] == ["job.requested", "lease.granted", "lease.expired"]
        assert types[-1] == "job.tombstoned"
        expired = next(e for e in job["timeline"] if e["type"] == "lease.expired")
        assert expired["event"]["agent"] == "sleepy"
        assert expired["event"]["detection_latency_ms"] >= 0
        assert [lease["ended"] for lease in job["leases"]] == ["expired"]
        assert {f["kind"] for f in job["failures"]} == {"lease.expired", "job.tombstoned"}


async def test_live_updates_arrive_as_server_sent_events_and_resume_after_a_position(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_over(nats_server, tmp_path) as (side, http):
        await side.ctx.save(*agent_history("a1")[:1])
        start = await side.caught_up()
        history = job_history("a1", "expire", 3)
        received: list[tuple[int | None, dict[str, object]]] = []
        got_all = anyio.Event()

        async def listen(after: int, count: int, into: list[tuple[int | None, dict[str, object]]]) -> None:
            """`count` updates, each with the id its server-sent event carried (None: none)."""
            async with http.stream(
                "GET", "/api/events/stream", headers={"Last-Event-ID": str(after)}
            ) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                event_id: int | None = None
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        event_id = int(line[4:])
                    elif line.startswith("data: "):
                        into.append((event_id, json.loads(line[6:])))
                        event_id = None
                        if len(into) >= count:
                            return

        async def listen_all() -> None:
            await listen(start, len(history), received)
            got_all.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen_all)
            # The request alone, then the rest of the history in one save: one packed record.
            await side.ctx.save(history[0])
            await side.ctx.save(*history[1:])
            with anyio.fail_after(10):
                await got_all.wait()
        entries = [update["entry"] for _, update in received]
        assert [e["type"] for e in entries] == [type(e).__struct_config__.tag for e in history]  # type: ignore[index]
        assert all(e["seq"] > start for e in entries)  # type: ignore[index]
        job = received[-1][1]["job"]
        assert isinstance(job, dict) and job["state"] in JOB_STATES
        # Only a record's last event carries its id, so a Last-Event-ID names a whole record.
        first, record = entries[0]["seq"], entries[-1]["seq"]  # type: ignore[index]
        assert [i for i, _ in received] == [first] + [None] * (len(history) - 2) + [record]

        # Replay: a client that reconnects after the first record gets the rest, in order.
        replayed: list[tuple[int | None, dict[str, object]]] = []
        with anyio.fail_after(10):
            await listen(first, len(history) - 1, replayed)
        assert replayed == received[1:]


async def test_the_openapi_document_describes_every_endpoint(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_over(nats_server, tmp_path) as (_side, http):
        doc = (await http.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        for path in (
            "/api/jobs",
            "/api/jobs/{job_id}",
            "/api/agents",
            "/api/metrics/summary",
            "/api/events/stream",
            "/api/approvals",
        ):
            assert path in doc["paths"], path
        params = {p["name"]: p for p in doc["paths"]["/api/jobs"]["get"]["parameters"]}
        assert params["state"]["schema"]["enum"] == list(JOB_STATES)
        assert params["limit"]["schema"]["maximum"] == 500
        assert params["since"]["schema"] == {"type": "string", "format": "date-time"}
        assert "q" in params
        # A job as listed: its row and what its folded state says (approval, rollback).
        listed = doc["components"]["schemas"]["JobView"]["properties"]
        assert {"job_id", "state", "awaiting_approval", "rollback"} <= set(listed)
        ref = doc["paths"]["/api/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"][
            "schema"
        ]
        assert ref == {"$ref": "#/components/schemas/JobDetail"}


async def test_the_metrics_endpoint_exposes_job_states_and_detection_latency(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    async with api_over(nats_server, tmp_path, services=["scheduler", "reconciler"]) as (side, http):
        async with client(nats_server.url) as nc:
            agent = AgentClient(nc, "quiet")
            await agent.register()
            await submit(nc, job_request(contract=quick_contract(ttl=0.3, attempts=1)))
            assert await agent.claim() is not None
            with anyio.fail_after(15):
                while True:
                    position = await side.caught_up()
                    status = (await http.get("/api/status", params={"at_least": position})).json()
                    summary = (await http.get("/api/metrics/summary")).json()
                    if summary["jobs"]["by_state"].get("tombstoned") == 1 and status["behind"] == 0:
                        break
                    await side.projector.wait_for(position + 1, timeout=15)
        text = (await http.get("/metrics")).text
    samples = {
        (
            sample.name,
            tuple(sorted((k, v) for k, v in sample.labels.items() if not k.startswith("otel_"))),
        ): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("warden_readmodel_jobs", (("state", "tombstoned"),))] == 1
    assert samples[("warden_readmodel_jobs", (("state", "queued"),))] == 0
    assert samples[("warden_readmodel_failures", (("kind", "lease.expired"),))] == 1
    assert ("warden_readmodel_detection_latency_p99_milliseconds", ()) in samples
    # The reconciler ran in this process: its own instruments are scraped too.
    assert samples[("warden_lease_expiries_total", ())] >= 1
    assert samples[("warden_detection_latency_milliseconds_count", ())] >= 1
    assert samples[("warden_detection_latency_milliseconds_bucket", (("le", "+Inf"),))] >= 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_warden_up_serves_the_dashboard_and_api_with_projections_in_its_data_dir(tmp_path: Path) -> None:
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
        for line in proc.stdout:  # bounded by the pytest timeout; ends if the process dies
            if "warden ready" in line:
                assert "projector" in line and "api" in line
                break
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            page = http.get("/")
            assert page.status_code == 200 and "<title>Warden</title>" in page.text
            assert http.get("/static/app.js").status_code == 200
            status = http.get("/api/status").json()
            assert status["store"] == f"sqlite:///{data_dir / 'projections.sqlite'}"
        assert (data_dir / "projections.sqlite").exists()
    finally:
        assert ended(proc, signal.SIGINT) == 0
