"""Projection rebuild rate: every read model folded from the event stream into a scratch store,
from the start, or resumed from the checkpoint an earlier rebuild left in it."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from services.bench.stats import Figures
from shared import topology
from shared.app import PERSISTENCE_MODULE, WardenApp
from shared.persistence.bridge import URL_ENV
from shared.persistence.jetstream import JetStreamApplicationRecorder
from shared.readmodel import open_read_model
from shared.readmodel.replay import rebuild


async def rebuild_rate(url: str, store: Path) -> Figures:
    """Events/s of `warden replay`'s rebuild (read through the recorder, folded into SQLite at
    `store`, resuming from its position when it holds one: `extra["resumed_from"]`)."""

    def work() -> Figures:
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: url})
        fresh = open_read_model(f"sqlite:///{store}", durable=False)
        try:
            recorder = app.recorder
            assert isinstance(recorder, JetStreamApplicationRecorder)
            position = recorder.max_notification_id() or 0
            resumed_from = fresh.position()
            started = time.perf_counter()
            count = rebuild(recorder, fresh, f"{topology.EVENT_ROOT}.*", position)
            elapsed = time.perf_counter() - started
        finally:
            fresh.close()
            app.close()
        return Figures(
            rate=count / elapsed if elapsed else None,
            count=count,
            seconds=elapsed,
            extra={"resumed_from": resumed_from},
        )

    return await anyio.to_thread.run_sync(work)
