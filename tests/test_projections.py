"""The read model: projections of the event stream that never count an event twice."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.events import JobRequested
from shared.readmodel import open_read_model, queries
from shared.readmodel.store import ReadModel
from shared.readmodel.tables import CHECKS, TABLES, TIMELINE
from shared.server import EmbeddedServer
from tests.readside import agent_history, append_histories, job_history, quick_contract, read_side


def snapshot(store: ReadModel) -> dict[str, dict[tuple[object, ...], dict[str, object]]]:
    return {t.name: queries.dump(store, t) for t in TABLES}


def counts(store: ReadModel) -> dict[str, int]:
    return {name: len(rows) for name, rows in snapshot(store).items()}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'live.sqlite'}"


def test_a_redelivered_batch_changes_nothing(sqlite_url: str) -> None:
    store = open_read_model(sqlite_url)
    try:
        history = list(enumerate(agent_history("a1") + job_history("a1", "expire", 7), start=1))
        assert store.project(history[:5]) == 5
        assert store.project(history) == len(history)
        before = snapshot(store)
        # The whole history again, and an overlapping tail: both already folded.
        assert store.project(history) == len(history)
        assert store.project(history[3:]) == len(history)
        assert snapshot(store) == before
        summary = queries.summary(store)
        assert summary["failures"] == {"job.tombstoned": 1, "lease.expired": 2, "message.rejected": 1}
        assert summary["jobs"]["by_state"] == {"tombstoned": 1}
    finally:
        store.close()


def test_the_events_of_a_packed_record_share_its_seq_and_each_keeps_its_own_rows(sqlite_url: str) -> None:
    store = open_read_model(sqlite_url)
    try:
        history = job_history("a1", "reject", 1)  # two invariant checks, saved together
        # As a packed save stores them: the checks and the rejection in one record, seq 3.
        batch = [(1, history[0]), (2, history[1]), (2, history[2]), *((3, e) for e in history[3:])]
        assert store.project(batch) == 3
        checks = queries.dump(store, CHECKS)
        assert sorted(checks) == [(3, 0), (3, 1)]
        timeline = queries.dump(store, TIMELINE)
        assert sorted(timeline) == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (3, 3)]
    finally:
        store.close()


def test_a_read_model_keyed_by_seq_alone_is_rebuilt_from_the_stream(sqlite_url: str) -> None:
    store = open_read_model(sqlite_url)
    try:
        store.project(list(enumerate(job_history("a1", "expire", 1), start=1)))
        assert store.position() > 0
    finally:
        store.close()
    # As a read model made before packed records: its timeline keyed by seq, no ordinal.
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute(f"DROP TABLE {TIMELINE.name}")
        db.execute(f"CREATE TABLE {TIMELINE.name} (seq INTEGER PRIMARY KEY, job_id TEXT)")
    store = open_read_model(sqlite_url)
    try:
        assert store.position() == 0
        assert counts(store) == dict.fromkeys(counts(store), 0)
        assert store.project(list(enumerate(job_history("a1", "hold", 2), start=1))) == 2
        assert len(queries.dump(store, TIMELINE)) == 2
    finally:
        store.close()


def test_a_batch_that_fails_halfway_leaves_no_trace(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.readmodel import fold

    store = open_read_model(sqlite_url)
    try:
        history = list(enumerate(job_history("a1", "reject", 1), start=1))
        store.project(history[:2])
        before = snapshot(store)

        def explode(self: fold.BatchFold) -> None:
            raise RuntimeError("disk full")

        monkeypatch.setattr(fold.BatchFold, "flush", explode)
        with pytest.raises(RuntimeError):
            store.project(history)
        assert store.position() == 2
        assert snapshot(store) == before
        monkeypatch.undo()
        assert store.project(history) == len(history)
        proposal = queries.page(store, TABLES[4], {}, 10, 0).items[0]
        assert proposal["verdict"] == "rejected"
        assert (proposal["checks_passed"], proposal["checks_failed"]) == (1, 1)
    finally:
        store.close()


def test_an_event_type_the_read_model_does_not_know_still_advances_the_position(sqlite_url: str) -> None:
    store = open_read_model(sqlite_url)
    try:
        job_id = uuid.uuid4()
        requested = JobRequested(
            originator_id=job_id,
            originator_version=1,
            idempotency_key="k",
            kind="noop",
            contract=quick_contract(attempts=2),  # as job_history's
        )
        assert store.project([(1, requested), (2, None), (3, None)]) == 3
        assert store.position() == 3
        assert queries.job_detail(store, str(job_id)) is not None
    finally:
        store.close()


async def test_a_projector_stopped_and_restarted_mid_stream_ends_with_the_same_rows(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    steady_url = f"sqlite:///{tmp_path / 'steady.sqlite'}"
    restarted_url = f"sqlite:///{tmp_path / 'restarted.sqlite'}"
    async with read_side(nats_server.url, steady_url, name="steady") as steady:
        for name in ("a1", "a2"):
            await steady.ctx.save(*agent_history(name))
        async with read_side(nats_server.url, restarted_url, name="first-run") as first:
            await append_histories(steady.ctx, 60, agents=("a1", "a2"), start=1)
            stopped_at = await first.caught_up()
        # Appended while the second projector is down.
        await append_histories(steady.ctx, 60, agents=("a1", "a2"), start=61)
        async with read_side(nats_server.url, restarted_url, name="second-run") as second:
            assert second.projector.position == stopped_at  # resumed from its tracked position
            await append_histories(steady.ctx, 30, agents=("a1", "a2"), start=121)
            last = await second.caught_up()
            await steady.projector.wait_for(last)
            assert second.projector.position == last

    steady_store, restarted_store = open_read_model(steady_url), open_read_model(restarted_url)
    try:
        assert counts(restarted_store) == counts(steady_store)
        assert snapshot(restarted_store) == snapshot(steady_store)
        summary = queries.summary(restarted_store)
        # 150 jobs: 50 of each outcome, and two expiries per expired job.
        assert summary["jobs"]["total"] == 150
        assert summary["jobs"]["by_state"]["tombstoned"] == 50
        assert summary["failures"]["lease.expired"] == 100
        assert summary["decisions"] == {"rejected": 50}
        assert summary["revocations"]["by_kind"] == {
            "agent.level_changed": 2,
            "agent.revoked": 2,
            "lease.revoked": 50,
        }
        agent = queries.agent_detail(restarted_store, "a1")
        assert agent is not None and agent["standing"] == "revoked"
        assert [c["level"] for c in agent["level_changes"]] == [1, 0]
    finally:
        steady_store.close()
        restarted_store.close()


async def test_two_projectors_on_one_store_never_count_an_event_twice(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    shared_url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    solo_url = f"sqlite:///{tmp_path / 'solo.sqlite'}"
    async with (
        read_side(nats_server.url, shared_url, name="replica-a") as a,
        read_side(nats_server.url, shared_url, name="replica-b") as b,
        read_side(nats_server.url, solo_url, name="solo") as solo,
    ):
        await append_histories(a.ctx, 45)
        last = await solo.caught_up()
        # Whichever replica commits a batch first, the other finds it folded and moves on.
        assert await a.caught_up() == last
        assert await b.caught_up() == last
        assert a.projector.restarts == b.projector.restarts == 0
    shared_store, solo_store = open_read_model(shared_url), open_read_model(solo_url)
    try:
        assert snapshot(shared_store) == snapshot(solo_store)
        assert queries.summary(shared_store)["jobs"]["total"] == 45
    finally:
        shared_store.close()
        solo_store.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    base = os.environ.get("WARDEN_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("WARDEN_TEST_POSTGRES_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    import psycopg

    schema = f"warden_test_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{base}?schema={schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.postgres
async def test_the_postgres_read_model_matches_the_sqlite_one(
    nats_server: EmbeddedServer, postgres_url: str, sqlite_url: str
) -> None:
    async with (
        read_side(nats_server.url, postgres_url, name="pg") as pg,
        read_side(nats_server.url, sqlite_url, name="sqlite") as lite,
    ):
        for name in ("a1", "a2"):
            await pg.ctx.save(*agent_history(name))
        await append_histories(pg.ctx, 30, start=1)
        await pg.caught_up()
        await lite.caught_up()
    pg_store, lite_store = open_read_model(postgres_url), open_read_model(sqlite_url)
    try:
        assert pg_store.position() == lite_store.position() > 0
        assert snapshot(pg_store) == snapshot(lite_store)
        summary = queries.summary(pg_store)
        assert summary["jobs"]["total"] == 30
        assert summary["detection_latency_ms"]["count"] == 20
        assert summary["detection_latency_ms"]["p99"] is not None
        # A redelivered batch counts nothing in PostgreSQL either.
        job = queries.page(pg_store, TABLES[0], {"state": "tombstoned"}, 1, 0).items[0]
        before = snapshot(pg_store)
        assert (
            pg_store.project(
                [
                    (
                        1,
                        JobRequested(
                            originator_id=uuid.UUID(job["job_id"]),
                            originator_version=1,
                            idempotency_key="x",
                            kind="x",
                            contract=quick_contract(attempts=2),  # as job_history's
                        ),
                    )
                ]
            )
            == pg_store.position()
        )
        assert snapshot(pg_store) == before
    finally:
        pg_store.close()
        lite_store.close()


@pytest.mark.postgres
def test_a_postgres_read_model_keyed_by_seq_alone_is_rebuilt_from_the_stream(postgres_url: str) -> None:
    import psycopg

    store = open_read_model(postgres_url)
    try:
        store.project(list(enumerate(job_history("a1", "expire", 1), start=1)))
        assert store.position() > 0
    finally:
        store.close()
    base, _, schema = postgres_url.partition("?schema=")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{schema}".{TIMELINE.name}')
        conn.execute(f'CREATE TABLE "{schema}".{TIMELINE.name} (seq BIGINT PRIMARY KEY, job_id TEXT)')
    store = open_read_model(postgres_url)
    try:
        assert store.position() == 0
        assert counts(store) == dict.fromkeys(counts(store), 0)
        assert store.project(list(enumerate(job_history("a1", "hold", 2), start=1))) == 2
        assert len(queries.dump(store, TIMELINE)) == 2
    finally:
        store.close()
