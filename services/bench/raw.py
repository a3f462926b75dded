"""Raw JetStream baselines, measured on the same server in the same run as Warden's figures.

The bare work queue does what a minimal job system on JetStream does: publish a job; a worker
pulls it, marks it in progress, publishes a result durably, acks; the submitter reads results.
No leases, heartbeats, fencing, checks or events: the floor Warden's governed path is held to.
"""

from __future__ import annotations

import contextlib
import time

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from services.bench.stats import Figures, percentile

WQ_STREAM = "BENCH_WQ"
RESULTS_STREAM = "BENCH_RESULTS"
PUB_STREAM = "BENCH_PUB"


async def _fresh_stream(nc: Client, name: str, subjects: list[str], **kw: object) -> None:
    """Bench streams are scratch space (never Warden's event streams): recreated per run."""
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(name)
    await js.add_stream(
        js_api.StreamConfig(name=name, subjects=subjects, storage=js_api.StorageType.FILE, **kw)  # type: ignore[arg-type]
    )


async def drop_streams(nc: Client) -> None:
    js = nc.jetstream()
    for name in (WQ_STREAM, RESULTS_STREAM, PUB_STREAM):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)


async def work_queue(nc: Client, workers: list[Client], jobs: int, payload: int) -> Figures:
    """Jobs/s and request→result latency of a bare JetStream work queue with len(workers) workers."""
    await _fresh_stream(nc, WQ_STREAM, ["bench.job"], retention=js_api.RetentionPolicy.WORK_QUEUE)
    await _fresh_stream(nc, RESULTS_STREAM, ["bench.result"])
    js = nc.jetstream()
    await js.add_consumer(
        WQ_STREAM,
        js_api.ConsumerConfig(
            durable_name="workers", ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=10_000
        ),
    )
    body = b"x" * payload
    sent: dict[int, float] = {}
    latencies: list[float] = []
    done = anyio.Event()

    async def on_result(msg: Msg) -> None:
        index = int(msg.data.split(b":", 1)[0])
        latencies.append(time.perf_counter() - sent[index])
        if len(latencies) >= jobs:
            done.set()

    results = await js.subscribe(
        "bench.result",
        stream=RESULTS_STREAM,
        ordered_consumer=True,
        cb=on_result,
        deliver_policy=js_api.DeliverPolicy.NEW,
    )

    async def worker(conn: Client) -> None:
        wjs = conn.jetstream()
        sub = await wjs.pull_subscribe_bind("workers", stream=WQ_STREAM)
        while not done.is_set():
            try:
                batch = await sub.fetch(32, timeout=0.2)
            except TimeoutError:
                continue
            for msg in batch:
                await msg.in_progress()
                index = msg.data.split(b":", 1)[0]
                await wjs.publish("bench.result", index + b":done")
                await msg.ack()

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for conn in workers:
            tg.start_soon(worker, conn)
        for i in range(jobs):
            sent[i] = time.perf_counter()
            await js.publish_async("bench.job", str(i).encode() + b":" + body)
        await js.publish_async_completed()
        with anyio.fail_after(max(60.0, jobs / 50)):
            await done.wait()
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()
    await results.unsubscribe()
    return Figures(
        rate=jobs / elapsed,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        count=jobs,
        seconds=elapsed,
    )


async def publish_rate(nc: Client, count: int, payload: int) -> Figures:
    """Acked, pipelined publishes per second (publish_async), as a service appending events would."""
    await _fresh_stream(nc, PUB_STREAM, ["bench.pub"])
    js = nc.jetstream()
    body = b"x" * payload
    started = time.perf_counter()
    for _ in range(count):
        await js.publish_async("bench.pub", body)
    await js.publish_async_completed()
    elapsed = time.perf_counter() - started
    return Figures(rate=count / elapsed, count=count, seconds=elapsed)


async def replay_rate(nc: Client, stream: str, subject: str) -> Figures:
    """Messages/s through an ordered consumer callback, the fastest read nats-py offers."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    total = info.state.messages
    if total == 0:
        return Figures(rate=0.0, count=0, seconds=0.0)
    seen = 0
    done = anyio.Event()

    async def cb(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        if msg.metadata.num_pending == 0:
            done.set()

    started = time.perf_counter()
    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        cb=cb,
        deliver_policy=js_api.DeliverPolicy.ALL,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1 << 30,
    )
    with anyio.fail_after(600):
        await done.wait()
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return Figures(rate=seen / elapsed, count=seen, seconds=elapsed)
