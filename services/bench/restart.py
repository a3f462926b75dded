"""Time to serving: how long a service process takes from its start to answering, with a large log.

Each service is started as `warden run NAME` against the history the memory part wrote, after
its kind of view has a snapshot that reflects the whole log (written by the services already
running, or by a first start of its own): the restart loads it and folds only the tail. The
clock runs from spawning the process (interpreter and imports included) to its "warden ready"
line, printed once every service in it is serving and answers liveness pings. The scheduler is
also started once with snapshots off, folding the whole log: what the snapshot saves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.bench.report import Progress, Report
from services.bench.stats import Figures
from shared import snapshot, topology
from shared.runtime import SNAPSHOT_EVERY_ENV, Context
from shared.views import Views

SNAPSHOT_WAIT_S = 600.0


def snapshot_name(service: str) -> str:
    """The snapshot object a process running only `service` starts from."""
    from services.registry import SERVICES

    built = SERVICES[service]()
    views = Views(forget_ended=True)
    attach = getattr(built, "attach", None)
    if attach is not None:
        attach(cast(Context, SimpleNamespace(views=views)))
    return snapshot.object_name(list(views.folded))


async def snapshot_position(nc: Client, name: str) -> int:
    data = await snapshot.read(nc.jetstream(), name)
    snap = snapshot.decode(data) if data is not None else None
    return snap.position if snap is not None else 0


async def wait_for_snapshot(nc: Client, name: str, position: int) -> bool:
    """Until the stored snapshot `name` reflects the log up to `position` (bounded): looked at
    again whenever an object's metadata is written in the bucket."""
    written = anyio.Event()

    async def on_write(_msg: Msg) -> None:
        written.set()

    sub = await nc.subscribe(f"$O.{topology.SNAPSHOT_BUCKET}.M.>", cb=on_write)
    try:
        with anyio.move_on_after(SNAPSHOT_WAIT_S):
            while await snapshot_position(nc, name) < position:
                await written.wait()
                written = anyio.Event()
            return True
        return False
    finally:
        await sub.unsubscribe()


class Started:
    """One `warden run NAME` process, timed from its spawn to its "warden ready" line."""

    def __init__(self, url: str, service: str, data_dir: Path, *, snapshot_every: int | None = None) -> None:
        env = {**os.environ, "WARDEN_HTTP": "127.0.0.1:0"}
        if snapshot_every is not None:  # 0: no snapshots, every start folds the whole log
            env[SNAPSHOT_EVERY_ENV] = str(snapshot_every)
        self.service = service
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "run",
                service,
                "--nats",
                url,
                "--data-dir",
                str(data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.append(line)
            if "warden ready in" in line:
                # Wall clock from spawn (interpreter and imports included), and the process's own
                # figure (from its first line of Warden's code).
                self.serving_s = time.monotonic() - started
                self.ready_s = float(line.split("warden ready in", 1)[1].split("s", 1)[0])
                return
        self.stop()
        raise RuntimeError(f"warden run {service} did not become ready: {''.join(lines)[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def record(report: Report, key: str, events: int, started: Started, load: float) -> None:
    figures = report.figures.setdefault(key, Figures(extra={}))
    figures.extra[f"serving_s_{events}"] = round(started.serving_s, 3)
    figures.extra[f"ready_s_{events}"] = round(started.ready_s, 3)
    figures.extra[f"load_{events}"] = round(load, 2)


async def measure(
    report: Report,
    nc: Client,
    url: str,
    names: list[str],
    events: int,
    data_dir: Path,
    progress: Progress,
    *,
    running: dict[str, subprocess.Popen[bytes]] | None,
) -> None:
    """Time to serving of each service with `events` in the log. `running`: the memory part's
    processes, which write the snapshots; a service with none alive gets a first start of its
    own, kept up until its snapshot reflects the log."""
    last = (await nc.jetstream().stream_info(topology.EVENT_STREAM)).state.last_seq
    for name in names:
        object_name = snapshot_name(name)
        alive = running is not None and name in running and running[name].poll() is None
        first: Started | None = None
        if not alive and await snapshot_position(nc, object_name) < last:
            progress(f"first start of {name}: it folds the log and writes its snapshot")
            # Checkpointing at once, whatever the log's size: the restart is what is timed.
            first = await anyio.to_thread.run_sync(
                partial(Started, url, name, data_dir / f"{name}-first", snapshot_every=1)
            )
        try:
            if not await wait_for_snapshot(nc, object_name, last):
                report.notes.append(
                    f"restart of {name}: no snapshot reached {last:,} in {SNAPSHOT_WAIT_S:.0f}s"
                )
                continue
        finally:
            if first is not None:
                await anyio.to_thread.run_sync(first.stop)
        progress(f"restarting {name} with {events:,} events in the log")
        load = os.getloadavg()[0]
        again = await anyio.to_thread.run_sync(
            partial(Started, url, name, data_dir / f"{name}-restart-{events}")
        )
        await anyio.to_thread.run_sync(again.stop)
        record(report, f"restart_{name}", events, again, load)
    progress(f"starting the scheduler with snapshots off: it folds all {events:,} events")
    load = os.getloadavg()[0]
    cold = await anyio.to_thread.run_sync(
        partial(Started, url, "scheduler", data_dir / f"scheduler-cold-{events}", snapshot_every=0)
    )
    await anyio.to_thread.run_sync(cold.stop)
    record(report, "restart_scheduler_full_fold", events, cold, load)
    sizes = report.figures.setdefault("restart_sizes", Figures(extra={}))
    sizes.extra[str(events)] = events
