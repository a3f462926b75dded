"""`warden replay` rebuilds the read model from the streams and finds every difference."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
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


def checkpoint_position(path: Path) -> int:
    """The position a replay's checkpoint store has committed (0 before its first commit)."""
    if not path.exists():
        return 0
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        try:
            row = db.execute(
                "SELECT notification_id FROM tracking WHERE application_name = 'warden'"
            ).fetchone()
        except sqlite3.OperationalError:  # its tables are still being made
            return 0
    return int(row[0]) if row else 0


async def test_a_replay_killed_mid_rebuild_resumes_from_its_checkpoint_and_ends_as_a_full_rebuild(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    from services.bench.history import write_history
    from shared import bus, topology
    from shared.app import PERSISTENCE_MODULE, WardenApp
    from shared.persistence.bridge import URL_ENV
    from shared.persistence.jetstream import JetStreamApplicationRecorder
    from shared.readmodel import replay as replays

    nc = await bus.connect(nats_server.url, "test-replay-checkpoint")
    try:
        await topology.ensure(nc.jetstream(), str(nc.connected_server_version))
        written = (await write_history(nc, 5 * replays.FOLD_BATCH)).count
    finally:
        await nc.close()
    live = f"sqlite:///{tmp_path / 'live.sqlite'}"

    def caught_up_projection() -> int:
        """The live read model as a projector that has folded the whole stream holds it."""
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: nats_server.url})
        store = open_read_model(live)
        try:
            recorder = app.recorder
            assert isinstance(recorder, JetStreamApplicationRecorder)
            replays.rebuild(recorder, store, f"{topology.EVENT_ROOT}.*", recorder.max_notification_id() or 0)
            return store.position()
        finally:
            store.close()
            app.close()

    position = await anyio.to_thread.run_sync(caught_up_projection)
    checkpoint = replays.checkpoint_path(tmp_path / "replay-checkpoints", "all")
    command = [sys.executable, "-m", "services.cli", "replay", "--nats", nats_server.url]
    async with await anyio.open_process([*command, "--projections", live, "--json"]) as first:
        with anyio.fail_after(60):
            while checkpoint_position(checkpoint) == 0:
                assert first.returncode is None, "the replay ended before its first commit was seen"
                await anyio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
    killed_at = checkpoint_position(checkpoint)
    assert 0 < killed_at < position  # killed mid-rebuild, after a commit

    code, resumed = await replay(nats_server.url, live)
    assert code == 0, resumed["differences"]
    assert resumed["resumed_from"] == killed_at
    assert 0 < resumed["events"] < written  # only the events after the checkpoint were folded
    assert resumed["rebuilt_into"] == str(checkpoint)

    # The resumed store holds exactly the rows of a rebuild from the start.
    full_store = tmp_path / "full.sqlite"
    code, full = await replay(nats_server.url, live, "--into", str(full_store))
    assert code == 0 and full["resumed_from"] == 0 and full["events"] == written
    resumed_rows, full_rows = (
        open_read_model(f"sqlite:///{checkpoint}"),
        open_read_model(f"sqlite:///{full_store}"),
    )
    try:
        for table in TABLES:
            assert queries.dump(resumed_rows, table) == queries.dump(full_rows, table), table.name
    finally:
        resumed_rows.close()
        full_rows.close()

    # Nothing new in the stream: the next replay folds nothing; --fresh folds it all again.
    code, again = await replay(nats_server.url, live)
    assert code == 0 and again["resumed_from"] == position and again["events"] == 0
    code, fresh = await replay(nats_server.url, live, "--fresh")
    assert code == 0 and fresh["resumed_from"] == 0 and fresh["events"] == written


async def test_a_checkpoint_folded_from_another_stream_is_not_resumed(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    from services.bench.history import write_history
    from shared import bus, topology
    from shared.app import PERSISTENCE_MODULE, WardenApp
    from shared.persistence.bridge import URL_ENV
    from shared.persistence.jetstream import JetStreamApplicationRecorder
    from shared.readmodel import replay as replays

    live = f"sqlite:///{tmp_path / 'live.sqlite'}"

    async def new_stream() -> int:
        """The event stream deleted and made again with another history; the live read model
        rebuilt from it. Returns the number of events."""
        nc = await bus.connect(nats_server.url, "test-replay-other-stream")
        try:
            js = nc.jetstream()
            await topology.ensure(js, str(nc.connected_server_version))
            await js.delete_stream(topology.EVENT_STREAM)
            await topology.ensure(js, str(nc.connected_server_version))
            written = (await write_history(nc, 2000)).count
        finally:
            await nc.close()

        def projected() -> None:
            (tmp_path / "live.sqlite").unlink(missing_ok=True)
            app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: nats_server.url})
            store = open_read_model(live)
            try:
                recorder = app.recorder
                assert isinstance(recorder, JetStreamApplicationRecorder)
                position = recorder.max_notification_id() or 0
                replays.rebuild(recorder, store, f"{topology.EVENT_ROOT}.*", position)
            finally:
                store.close()
                app.close()

        await anyio.to_thread.run_sync(projected)
        return written

    written = await new_stream()
    code, first = await replay(nats_server.url, live)
    assert code == 0 and first["events"] == written
    # Same sequences, other events: the checkpoint's last record is not at its position.
    written = await new_stream()
    code, second = await replay(nats_server.url, live)
    assert code == 0, second["differences"]
    assert second["resumed_from"] == 0 and second["events"] == written


async def test_a_projector_killed_while_catching_up_resumes_from_its_last_commit_and_ends_as_a_full_rebuild(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    from services.bench.history import write_history
    from shared import bus, topology
    from shared.readmodel import replay as replays
    from tests import service_processes

    nc = await bus.connect(nats_server.url, "test-projector-checkpoint")
    try:
        js = nc.jetstream()
        await topology.ensure(js, str(nc.connected_server_version))
        written = (await write_history(nc, 5 * replays.FOLD_BATCH)).count
        last = (await js.stream_info(topology.EVENT_STREAM)).state.last_seq
    finally:
        await nc.close()
    path = tmp_path / "projections.sqlite"
    store = f"sqlite:///{path}"
    env = {"WARDEN_PROJECTIONS_URL": store}
    first = service_processes.start(nats_server.url, "projector", tmp_path / "first", env=env)
    try:
        with anyio.fail_after(90):
            while checkpoint_position(path) == 0:
                assert first.proc.poll() is None, first.output()[-3000:]
                await anyio.sleep(0.01)
    finally:
        first.kill()  # SIGKILL, mid catch-up
    killed_at = checkpoint_position(path)
    assert 0 < killed_at < last, first.output()[-3000:]

    second = service_processes.start(nats_server.url, "projector", tmp_path / "second", env=env, verbose=True)
    try:
        with anyio.fail_after(90):
            while checkpoint_position(path) < last:
                assert second.proc.poll() is None, second.output()[-3000:]
                await anyio.sleep(0.05)
    finally:
        second.stop()
    assert f"catching up from position {killed_at} to {last}" in second.output()

    code, report = await replay(nats_server.url, store, "--fresh")
    assert code == 0, report["differences"]
    assert report["events"] == written == report["compared"]["warden_timeline"]


async def test_a_reader_slower_than_the_stream_stops_the_consumer_and_loses_nothing(
    nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A rebuild reads slower than the stream pushes. Holding the consumer's callback does not
    hold the server past a heartbeat's interval (the client answers a stalled flow control), so
    a long rebuild buffered the stream until the subscription's limit, lost messages as a slow
    consumer and stalled; the reader here stalls past that interval with a 1 MiB limit."""
    import logging

    from shared import bus, topology
    from shared.app import PERSISTENCE_MODULE, WardenApp
    from shared.persistence.bridge import URL_ENV
    from shared.persistence.jetstream import JetStreamApplicationRecorder
    from shared.readmodel.replay import PAGE, PAGES_AHEAD, OrderedPages

    subject = f"{topology.EVENT_ROOT}.slow-reader"
    count = (PAGES_AHEAD + 3) * PAGE
    body = b"x" * 4096  # 44 MB in all against a 1 MiB buffer
    nc = await bus.connect(nats_server.url, "test-slow-reader")
    try:
        js = nc.jetstream()
        await topology.ensure(js, str(nc.connected_server_version))
        limiter = anyio.Semaphore(64)

        async def put(i: int) -> None:
            async with limiter:
                await js.publish(subject, body, headers={"n": str(i)})

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(put, i)
        last = (await js.stream_info(topology.EVENT_STREAM)).state.last_seq
    finally:
        await nc.close()

    def read() -> tuple[list[int], int]:
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: nats_server.url})
        try:
            recorder = app.recorder
            assert isinstance(recorder, JetStreamApplicationRecorder)
            pages = OrderedPages(recorder, subject, 1, last, pending_bytes_limit=1 << 20)
            seqs: list[int] = []
            for n, page in enumerate(pages):
                seqs.extend(r.seq for r in page)
                if n == 0:
                    time.sleep(11)  # the fault: a reader stalled past two idle heartbeats (5 s)
            return seqs, pages.pauses
        finally:
            app.close()

    with caplog.at_level(logging.WARNING):
        seqs, pauses = await anyio.to_thread.run_sync(read)
    assert len(seqs) == count and seqs == sorted(set(seqs)) and seqs[-1] == last
    assert pauses >= 1  # it stopped the consumer rather than buffer the stream
    assert not [r for r in caplog.records if "SlowConsumer" in r.getMessage()]


async def test_a_live_subscription_read_slower_than_the_stream_stops_its_consumer_and_loses_nothing(
    nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorder's subscription (what the projector follows) under the same fault: its
    reader stalls past two idle heartbeats while the stream holds far more than its buffer."""
    import logging

    from services.bench.history import write_history
    from shared import bus, topology
    from shared.app import PERSISTENCE_MODULE, WardenApp
    from shared.persistence import jetstream
    from shared.persistence.bridge import URL_ENV
    from shared.persistence.jetstream import JetStreamApplicationRecorder, JetStreamIO

    monkeypatch.setattr(jetstream, "HIGH_WATER", 2_000)
    monkeypatch.setattr(jetstream, "LOW_WATER", 200)
    ordered = JetStreamIO.ordered

    async def small_buffer(self: JetStreamIO, *args: Any, **kwargs: Any) -> Any:
        return await ordered(self, *args, pending_bytes_limit=1 << 20)

    monkeypatch.setattr(JetStreamIO, "ordered", small_buffer)
    nc = await bus.connect(nats_server.url, "test-slow-subscriber")
    try:
        js = nc.jetstream()
        await topology.ensure(js, str(nc.connected_server_version))
        written = (await write_history(nc, 12_000)).count
    finally:
        await nc.close()

    def read() -> list[int]:
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: nats_server.url})
        try:
            recorder = app.recorder
            assert isinstance(recorder, JetStreamApplicationRecorder)
            ids: list[int] = []
            with recorder.subscribe(gt=0) as subscription:
                for notification in subscription:
                    ids.append(notification.id)
                    if len(ids) == 1:
                        time.sleep(11)  # the fault: a reader stalled past two idle heartbeats (5 s)
                    if len(ids) == written:
                        break
            return ids
        finally:
            app.close()

    with caplog.at_level(logging.WARNING):
        ids = await anyio.to_thread.run_sync(read)
    assert len(ids) == written and ids == sorted(ids)  # every event once (a packed record's share its id)
    assert not [r for r in caplog.records if "SlowConsumer" in r.getMessage()]
