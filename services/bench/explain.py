"""`warden explain` latency on a large log: in-process, and the whole command with its start-up.

The log is the history generator's (complete job lifecycles written straight to the event
stream); explain must read only the job's own subjects, so its latency should not grow with the
size of the stream. The command is timed end to end (a fresh process, an 8-character prefix to
resolve), because that is what an operator waits for.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import anyio
from nats.aio.client import Client

from services.bench.history import write_history
from services.bench.report import Options, Progress, Report, Services
from services.bench.stats import Figures, percentile
from shared import topology
from shared.forensics import explain, ids

SAMPLE = 20  # jobs explained in-process per size
COMMANDS = 5  # `warden explain` processes per size


def sizes(options: Options) -> list[int]:
    first = min(100_000, options.replay_events // 10 if options.quick else options.replay_events)
    return sorted({first, options.replay_events})


async def _events(nc: Client) -> int:
    info = await nc.jetstream().stream_info(topology.EVENT_STREAM)
    return int(info.state.messages)


def _command(url: str, prefix: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "explain", prefix, "--nats", url],
        capture_output=True,
        timeout=120,
        check=False,
    )
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"warden explain {prefix} failed: {done.stderr.decode()[-500:]}")
    return elapsed


async def run(
    report: Report, nc: Client, url: str, options: Options, services: Services, progress: Progress
) -> None:
    # Alone on the machine: the services would be folding the synthetic history meanwhile.
    await anyio.to_thread.run_sync(services.stop)
    js = nc.jetstream()
    for size in sizes(options):
        have = await _events(nc)
        if have < size:
            progress(f"writing history up to {size:,} events for explain")
            await write_history(nc, size - have)
            have = await _events(nc)
        started = time.perf_counter()
        everything = await ids.aggregate_ids(nc)
        listing_ms = (time.perf_counter() - started) * 1000
        jobs = random.Random(size).sample(everything, min(SAMPLE, len(everything)))
        progress(f"explaining {len(jobs)} jobs in a log of {have:,} events")
        latencies: list[float] = []
        for job in jobs:
            try:
                started = time.perf_counter()
                await explain.explain_job(js, job)
                latencies.append((time.perf_counter() - started) * 1000)
            except explain.JobNotFound:
                continue  # an agent's aggregate, not a job
        commands = []
        for job in jobs[:COMMANDS]:
            commands.append(await anyio.to_thread.run_sync(_command, url, str(job)[:8]))
        report.figures[f"explain_{size}"] = Figures(
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            count=len(latencies),
            extra={
                "events": have,
                "aggregates": len(everything),
                "command_p50_ms": percentile(commands, 50),
                "command_max_ms": max(commands, default=float("nan")),
                "prefix_listing_ms": listing_ms,
            },
        )
