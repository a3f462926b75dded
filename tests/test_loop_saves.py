"""Services append from the event loop: no worker-thread hop on the hot path, same protocol."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import anyio
import anyio.to_thread
import pytest
from eventsourcing.persistence import IntegrityError

from shared import runtime
from shared.contract import Contract
from shared.events import JobCancelled, JobRequested
from shared.server import EmbeddedServer


def _request(job_id: Any) -> JobRequested:
    return JobRequested(
        originator_id=job_id,
        originator_version=1,
        idempotency_key=f"k-{job_id}",
        kind="k",
        contract=Contract(),
        submitter="test",
        input_seq=1,
    )


async def test_a_save_is_written_from_the_loop_without_a_worker_thread(
    nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with runtime.deployment(nats_server.url, name="loop-saves") as (ctx, _url):
        job_id = uuid4()

        async def no_threads(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError("a save hopped to a worker thread")

        with monkeypatch.context() as patched:
            patched.setattr(anyio.to_thread, "run_sync", no_threads)
            await ctx.save(_request(job_id))
            cancelled = JobCancelled(originator_id=job_id, originator_version=2, reason="r", by="op")
            await ctx.save(cancelled)
            # The same optimistic-concurrency rule as eventsourcing's own save: a lost race.
            with pytest.raises(IntegrityError):
                await ctx.save(JobCancelled(originator_id=job_id, originator_version=2, reason="x", by="op"))
        job = await anyio.to_thread.run_sync(ctx.app.job, job_id)
    assert job.version == 2 and job.status == "cancelled"
