"""`warden replay` rebuilds the read model from the streams and finds every difference."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from shared.readmodel import open_read_model, queries
from shared.readmodel.tables import JOBS, TABLES
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import client, submit
from tests.readside import agent_history, append_histories, job_request, quick_contract, read_side


async def replay(nats_url: str, live_url: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "services.cli",
            "replay",
            "--nats",
            nats_url,
            "--projections",
            live_url,
            "--json",
            *args,
        ],
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr.decode()
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
async def live(nats_server: EmbeddedServer, tmp_path: Path) -> str:
    """A live read model of a stream with every kind of row, some of it from real services."""
    url = f"sqlite:///{tmp_path / 'live.sqlite'}"
    async with read_side(nats_server.url, url, services=["scheduler", "reconciler"]) as side:
        for name in ("a1", "a2"):
            await side.ctx.save(*agent_history(name))
        await append_histories(side.ctx, 9, start=1)
        async with client(nats_server.url) as nc:
            agent = AgentClient(nc, "real")
            await agent.register()
            await submit(nc, job_request(contract=quick_contract(ttl=0.3, attempts=1)))
            assert await agent.claim() is not None
            with anyio.fail_after(15):
                while True:
                    await side.caught_up()
                    store = open_read_model(url)
                    try:
                        states = queries.summary(store)["jobs"]["by_state"]
                    finally:
                        store.close()
                    if states.get("tombstoned", 0) == 4:  # three built, one expired for real
                        break
                    await side.projector.wait_for(side.projector.position + 1, timeout=15)
    return url


async def test_replay_reproduces_the_live_read_model_exactly(nats_server: EmbeddedServer, live: str) -> None:
    code, report = await replay(nats_server.url, live)
    assert code == 0, report["differences"]
    assert report["identical"] is True
    assert report["events"] > 60
    assert report["compared"]["warden_jobs"] == 10
    assert report["compared"]["warden_timeline"] == report["events"]
    assert set(report["compared"]) == {t.name for t in TABLES}


async def test_replay_of_one_job_compares_only_that_jobs_rows(nats_server: EmbeddedServer, live: str) -> None:
    store = open_read_model(live)
    try:
        job = queries.page(store, JOBS, {"state": "tombstoned"}, 1, 0).items[0]
    finally:
        store.close()
    code, report = await replay(nats_server.url, live, "--job", job["job_id"])
    assert code == 0, report["differences"]
    assert report["compared"]["warden_jobs"] == 1
    assert report["compared"]["warden_timeline"] == report["events"] == job["events"]
    assert "warden_agents" not in report["compared"]


async def test_replay_of_a_time_window_compares_only_rows_changed_in_it(
    nats_server: EmbeddedServer, live: str
) -> None:
    code, everything = await replay(nats_server.url, live)
    assert code == 0
    code, nothing = await replay(nats_server.url, live, "--until", "2000-01-01T00:00:00Z")
    assert code == 0 and sum(nothing["compared"].values()) == 0
    code, window = await replay(
        nats_server.url, live, "--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01T00:00:00Z"
    )
    assert code == 0 and window["compared"] == everything["compared"]


async def test_replay_reports_every_difference_and_exits_non_zero(
    nats_server: EmbeddedServer, live: str
) -> None:
    path = live.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        job_id, state = db.execute("SELECT job_id, state FROM warden_jobs ORDER BY job_id LIMIT 1").fetchone()
        db.execute("UPDATE warden_jobs SET state = 'completed', attempts = 99 WHERE job_id = ?", (job_id,))
        (seq,) = db.execute("SELECT MIN(seq) FROM warden_failures").fetchone()
        db.execute("DELETE FROM warden_failures WHERE seq = ?", (seq,))
        db.execute("UPDATE warden_agents SET level = 7 WHERE name = 'a1'")
    code, report = await replay(nats_server.url, live)
    assert code == 1
    problems = {(d["table"], d["problem"]) for d in report["differences"]}
    assert problems == {
        ("warden_jobs", "differs"),
        ("warden_failures", "missing from the live read model"),
        ("warden_agents", "differs"),
    }
    job_diff = next(d for d in report["differences"] if d["table"] == "warden_jobs")
    assert job_diff["key"] == [job_id]
    assert job_diff["columns"]["state"] == {"live": "completed", "replay": state}
    assert job_diff["columns"]["attempts"]["live"] == 99
    # The human report names them too.
    result = await anyio.run_process(
        [sys.executable, "-m", "services.cli", "replay", "--nats", nats_server.url, "--projections", live],
        check=False,
    )
    assert result.returncode == 1
    text = result.stdout.decode()
    assert "3 difference(s)" in text and job_id in text


async def test_replay_skips_rows_the_live_projector_changed_after_its_position(
    nats_server: EmbeddedServer, live: str
) -> None:
    path = live.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        (position,) = db.execute(
            "SELECT notification_id FROM tracking WHERE application_name = 'warden'"
        ).fetchone()
        # As if the projector had folded a newer event into this row while replay ran.
        db.execute("UPDATE warden_agents SET seq = ?, level = 5 WHERE name = 'a2'", (position + 1000,))
    code, report = await replay(nats_server.url, live)
    assert code == 0, report["differences"]
    assert report["skipped_moved_on"] == {"warden_agents": 1}


async def test_a_rebuild_reads_many_pages_and_stops_at_its_position_though_the_stream_goes_on(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    from services.bench.history import write_history
    from shared import bus, topology
    from shared.app import PERSISTENCE_MODULE, WardenApp
    from shared.persistence.bridge import URL_ENV
    from shared.persistence.jetstream import JetStreamApplicationRecorder
    from shared.readmodel.replay import PAGE, rebuild

    nc = await bus.connect(nats_server.url, "test-replay-pages")
    try:
        js = nc.jetstream()
        await topology.ensure(js, str(nc.connected_server_version))
        written = (await write_history(nc, 3 * PAGE, packed=False)).count
        middle = (await js.stream_info(topology.EVENT_STREAM)).state.last_seq - PAGE // 2
        # Not an event of Warden's: the stream's last message is one no rebuild folds.
        await js.publish(f"{topology.EVENT_ROOT}.not-a-record", b"{}")
        last = (await js.stream_info(topology.EVENT_STREAM)).state.last_seq
    finally:
        await nc.close()

    def rebuilt(position: int, name: str) -> tuple[int, list[int]]:
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: nats_server.url})
        fresh = open_read_model(f"sqlite:///{tmp_path / name}", durable=False)
        reached: list[int] = []
        try:
            recorder = app.recorder
            assert isinstance(recorder, JetStreamApplicationRecorder)
            count = rebuild(recorder, fresh, f"{topology.EVENT_ROOT}.*", position, reached.append)
            assert fresh.position() <= position
            return count, reached
        finally:
            fresh.close()
            app.close()

    whole, reached = await anyio.to_thread.run_sync(rebuilt, last, "whole.sqlite")
    assert whole == written  # every event, though the last message was none of them
    assert reached[-1] == last
    part, _ = await anyio.to_thread.run_sync(rebuilt, middle, "part.sqlite")
    # One event per message in this history: the events up to `middle`, none after.
    first = last - 1 - written  # the sequence before the first event
    assert part == middle - first
