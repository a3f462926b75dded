"""Projection rebuild rate: every read model folded from the event stream into a fresh store."""

from __future__ import annotations

import tempfile
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


async def rebuild_rate(url: str) -> Figures:
    """Events/s of `warden replay`'s rebuild (read through the recorder, folded into SQLite)."""

    def work() -> Figures:
        scratch = tempfile.TemporaryDirectory(prefix="warden-bench-replay-")
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: url})
        fresh = open_read_model(f"sqlite:///{Path(scratch.name) / 'rebuild.sqlite'}", durable=False)
        try:
            recorder = app.recorder
            assert isinstance(recorder, JetStreamApplicationRecorder)
            position = recorder.max_notification_id() or 0
            started = time.perf_counter()
            count = rebuild(recorder, fresh, f"{topology.EVENT_ROOT}.*", position)
            elapsed = time.perf_counter() - started
        finally:
            fresh.close()
            app.close()
            scratch.cleanup()
        return Figures(rate=count / elapsed if elapsed else None, count=count, seconds=elapsed)

    return await anyio.to_thread.run_sync(work)
