"""Projector: folds the event stream into the read model (SQLite by default, or PostgreSQL).

The projection runs in a worker thread (eventsourcing is synchronous; its JetStream recorder
calls back onto this loop through the bridge). It resumes from the read model's tracked
position, so a restart neither loses nor double-counts anything; a failure (say the database is
briefly gone) restarts it after a growing pause instead of taking the process down.

Far behind the stream (a new or replaced projector, one down for long, a store rebuilt after a
schema change), it first catches up as `warden replay` rebuilds: one ordered consumer, 10,000-
event transactions, each committing its position, so a projector killed while catching up
resumes from its last commit, not from the start.
"""

from __future__ import annotations

import logging
import threading

import anyio
from anyio.abc import TaskStatus

from shared import topology
from shared.persistence.jetstream import JetStreamApplicationRecorder
from shared.readmodel import ReadModel, configured_url, open_read_model
from shared.readmodel import replay as replays
from shared.readmodel.runner import BatchingProjectionRunner, ReadModelProjection
from shared.readmodel.store import redacted
from shared.runtime import Context

log = logging.getLogger("warden.projector")

MAX_BACKOFF_S = 30.0
# Events behind the stream past which the projector catches up as a rebuild does, in large
# transactions, before following it batch by batch.
CATCH_UP_FROM = replays.FOLD_BATCH


class Projector:
    name = "projector"

    def __init__(self, url: str | None = None, *, max_batch: int = 1000) -> None:
        self.url = configured_url(url)
        self.max_batch = max_batch
        self.position = 0
        self.restarts = 0
        self._advanced = anyio.Event()

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        store = await anyio.to_thread.run_sync(open_read_model, self.url)
        try:
            self.position = await anyio.to_thread.run_sync(store.position)
            log.info("projecting into %s from position %d", redacted(self.url), self.position)
            task_status.started()
            backoff = 0.5
            while True:
                try:
                    await self._project(ctx, store)
                    # Only cancellation stops the runner; a subscription that ended by itself
                    # (its connection closed) is a failure like any other.
                    log.warning("projection subscription ended; restarting in %.1fs", backoff)
                except Exception:
                    log.exception("projection failed; restarting in %.1fs from its tracked position", backoff)
                self.restarts += 1
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.close)

    async def _project(self, ctx: Context, store: ReadModel) -> None:
        recorder = ctx.app.recorder
        if isinstance(recorder, JetStreamApplicationRecorder):
            stopping = threading.Event()

            async def stop_catching_up_when_cancelled() -> None:
                try:
                    await anyio.sleep_forever()
                finally:
                    stopping.set()  # the thread stops after its transaction

            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_catching_up_when_cancelled)
                await anyio.to_thread.run_sync(self._catch_up, recorder, store, stopping)
                tg.cancel_scope.cancel()
            await anyio.lowlevel.checkpoint()
        runner = BatchingProjectionRunner(
            ctx.app, ReadModelProjection(store), max_batch=self.max_batch, on_commit=self._committed
        )

        async def stop_when_cancelled() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                runner.stop()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_when_cancelled)
            # Not abandoned on cancellation: the thread finishes its batch and returns once
            # stop_when_cancelled has stopped the runner.
            await anyio.to_thread.run_sync(runner.run)
            tg.cancel_scope.cancel()
        # If the service is being cancelled (which is what stopped the runner), stop here.
        await anyio.lowlevel.checkpoint()

    def _catch_up(
        self, recorder: JetStreamApplicationRecorder, store: ReadModel, stopping: threading.Event
    ) -> None:
        last = recorder.max_notification_id() or 0
        position = store.position()
        if last - position < CATCH_UP_FROM:
            return
        log.info("catching up from position %d to %d", position, last)
        replays.rebuild(
            recorder, store, f"{topology.EVENT_ROOT}.*", last, self._committed, stopping=stopping.is_set
        )

    def _committed(self, position: int) -> None:
        """Called in the projection thread after each commit."""
        anyio.from_thread.run_sync(self._advance, position)

    def _advance(self, position: int) -> None:
        self.position = max(self.position, position)
        self._advanced.set()
        self._advanced = anyio.Event()

    async def wait_for(self, position: int, timeout: float = 10.0) -> None:
        """Until the read model has folded the stream up to `position`; TimeoutError after `timeout`."""
        with anyio.fail_after(timeout):
            while self.position < position:
                await self._advanced.wait()
