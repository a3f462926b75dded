"""Large histories: replay rate of the projections against raw replay, and services' memory.

The history is written straight to the event stream in the recorder's format (complete,
well-formed job lifecycles), because pushing a million events through the governed path would
measure that path again, not replay.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import anyio
from nats.aio.client import Client

from services.bench import raw, restart
from services.bench.projections import rebuild_rate
from services.bench.report import Options, Progress, Report, Services
from services.bench.stats import Figures
from shared import topology
from shared.contract import Contract
from shared.events import (
    EffectApplied,
    Event,
    InvariantChecked,
    JobCompleted,
    JobRequested,
    LeaseGranted,
    ProposalAccepted,
    ProposalSubmitted,
    digest,
    encode,
    now,
    pack,
    tag_of,
)
from shared.persistence.jetstream import (
    ORIGINATOR_HEADER,
    TOPIC_HEADER,
    TOPIC_SEPARATOR,
    VERSION_HEADER,
    VERSIONS_HEADER,
)

EVENTS_PER_JOB = 11
BATCH = 1000  # the server's limit for one atomic batch
SERVICES_MEASURED = ("scheduler", "reconciler", "revoker", "checker", "applier", "projector")


def job_lifecycle(index: int) -> list[Event]:
    """One completed job's events, hash-chained as Warden's services would write them."""
    job_id = uuid.uuid4()
    proposal_id = uuid.uuid4()
    at = now()
    agent = f"history-{index % 50}"
    made: list[Event] = [
        JobRequested(
            originator_id=job_id,
            originator_version=1,
            idempotency_key=f"history-{job_id}",
            kind="history",
            contract=Contract(),
            timestamp=at,
        ),
        LeaseGranted(
            originator_id=job_id,
            originator_version=2,
            agent=agent,
            epoch=1,
            ttl_s=30,
            expires_at=at + timedelta(seconds=30),
            timestamp=at,
        ),
        ProposalSubmitted(
            originator_id=job_id,
            originator_version=3,
            proposal_id=proposal_id,
            agent=agent,
            epoch=1,
            content_hash="0" * 64,
            size=2,
            input_seq=0,
            effect="none",
            timestamp=at,
        ),
    ]
    for i, name in enumerate(("scope", "budget", "output_shape", "base_drift", "ci_gate")):
        made.append(
            InvariantChecked(
                originator_id=job_id,
                originator_version=4 + i,
                proposal_id=proposal_id,
                invariant=name,
                version="1",
                verdict="pass",
                timestamp=at,
            )
        )
    made += [
        ProposalAccepted(originator_id=job_id, originator_version=9, proposal_id=proposal_id, timestamp=at),
        EffectApplied(
            originator_id=job_id,
            originator_version=10,
            proposal_id=proposal_id,
            kind="none",
            receipt={},
            timestamp=at,
        ),
        JobCompleted(
            originator_id=job_id,
            originator_version=11,
            proposal_id=proposal_id,
            agent=agent,
            epoch=1,
            timestamp=at,
        ),
    ]
    chained: list[Event] = []
    prev = ""
    for event in made:
        from msgspec.structs import replace

        event = replace(event, prev_hash=prev)
        prev = digest(event)
        chained.append(event)
    return chained


# How the services save one job's events: request, grant and submission one save each; the
# checker's verdicts with its decision; the applier's effect with the completion. A save of
# several events is one packed record (shared/persistence/jetstream.py), as the services write.
SAVES = (1, 1, 1, 6, 2)


async def write_history(nc: Client, events: int, *, packed: bool = True) -> Figures:
    """Append `events` events (whole job lifecycles) to the event stream in atomic batches,
    one message per save as the services store them (or one per event, `packed=False`).

    With `sync_interval: always` every acknowledged write is an fsync; a batch of a thousand
    messages costs one, so a million events take seconds, not minutes.
    """
    jobs = max(1, events // EVENTS_PER_JOB)
    started = time.perf_counter()
    written = 0
    batch: list[tuple[str, bytes, dict[str, str]]] = []

    async def commit() -> None:
        batch_id = uuid.uuid4().hex
        for i, (subject, data, headers) in enumerate(batch, start=1):
            headers = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            if i < len(batch):
                await nc.publish(subject, data, headers=headers)
            else:
                ack = await nc.request(
                    subject, data, headers={**headers, "Nats-Batch-Commit": "1"}, timeout=30
                )
                if b'"error"' in ack.data:
                    raise RuntimeError(f"history batch refused: {ack.data[:300]!r}")
        batch.clear()

    for index in range(jobs):
        lifecycle = job_lifecycle(index)
        sizes = SAVES if packed else (1,) * len(lifecycle)
        at = 0
        for size in sizes:
            group = lifecycle[at : at + size]
            at += size
            first, last = group[0], group[-1]
            headers = {
                ORIGINATOR_HEADER: str(first.originator_id),
                VERSION_HEADER: str(last.originator_version),
                TOPIC_HEADER: TOPIC_SEPARATOR.join(tag_of(e) for e in group),
            }
            if size > 1:
                headers[VERSIONS_HEADER] = f"{first.originator_version}-{last.originator_version}"
            body = pack([encode(e) for e in group])
            batch.append((topology.event_subject(first.originator_id), body, headers))
            written += size
        if len(batch) >= BATCH - EVENTS_PER_JOB:
            await commit()
    if batch:
        await commit()
    elapsed = time.perf_counter() - started
    return Figures(rate=written / elapsed, count=written, seconds=elapsed)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def settled_rss(pid: int, quiet_s: float = 1.0, limit_s: float = 600.0) -> int:
    """RSS once the process has stopped burning CPU for `quiet_s` (it has caught up); 0 when it
    exited meanwhile."""
    try:
        return await _settled_rss(pid, quiet_s, limit_s)
    except FileNotFoundError:  # /proc/<pid> is gone: the caller notes the exit
        return 0


async def _settled_rss(pid: int, quiet_s: float, limit_s: float) -> int:
    deadline = time.monotonic() + limit_s
    last, quiet_since = cpu_ticks(pid), time.monotonic()
    while time.monotonic() < deadline:
        await anyio.sleep(0.25)
        ticks = cpu_ticks(pid)
        if ticks != last:
            last, quiet_since = ticks, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            break
    return rss_kib(pid)


class ServiceProcesses:
    """One process per service (`warden run NAME`), so each one's memory is its own."""

    def __init__(self, url: str, names: list[str], data_dir: Path) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            with open(data_dir / f"{name}.log", "wb") as log:  # the child has its own copy
                self.procs[name] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "services.cli",
                        "run",
                        name,
                        "--nats",
                        url,
                        "--data-dir",
                        str(data_dir / name),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "WARDEN_HTTP": "127.0.0.1:0"},
                )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def run(
    report: Report, nc: Client, url: str, options: Options, services: Services, progress: Progress
) -> None:
    from services.registry import SERVICES

    await anyio.to_thread.run_sync(services.stop)  # measured services run one per process below
    names = [n for n in SERVICES_MEASURED if n in SERVICES]
    # Memory is read at two sizes: 100k and the full history (10% of it in --quick mode).
    first = min(100_000, options.replay_events // 10 if options.quick else options.replay_events)
    data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"warden-bench-mem-{uuid.uuid4().hex[:6]}"
    procs = ServiceProcesses(url, names, data_dir) if "memory" in options.parts else None
    try:
        progress(f"writing a history of {first:,} events")
        report.figures["history_write"] = await write_history(nc, first)
        if procs is not None:
            progress(f"measuring each service's memory after {first:,} events")
            for name, proc in procs.procs.items():
                if proc.poll() is not None:
                    report.notes.append(f"{name} exited with {proc.returncode}: see {procs.logs / name}.log")
                    continue
                report.figures[f"memory_{name}"] = Figures(
                    extra={"rss_kib_first": await settled_rss(proc.pid), "first_events": first}
                )
        if "restart" in options.parts:
            await restart.measure(
                report,
                nc,
                url,
                names,
                first,
                data_dir,
                progress,
                running=procs.procs if procs is not None else None,
            )
        rest = options.replay_events - first
        if rest > 0:
            progress(f"writing {rest:,} more events")
            more = await write_history(nc, rest)
            report.figures["history_write"].count += more.count
        if procs is not None:
            progress(f"measuring each service's memory after {options.replay_events:,} events")
            for name, proc in procs.procs.items():
                figures = report.figures.get(f"memory_{name}")
                if figures is None:
                    continue  # it had exited by the first measure (noted then)
                if proc.poll() is not None:
                    report.notes.append(f"{name} exited with {proc.returncode}: see {procs.logs / name}.log")
                    continue
                figures.extra["rss_kib_end"] = await settled_rss(proc.pid)
                figures.extra["end_events"] = options.replay_events
                figures.extra["growth"] = (
                    figures.extra["rss_kib_end"] / max(1, figures.extra["rss_kib_first"]) - 1
                )
        if "restart" in options.parts and rest > 0:
            await restart.measure(
                report,
                nc,
                url,
                names,
                options.replay_events,
                data_dir,
                progress,
                running=procs.procs if procs is not None else None,
            )
    finally:
        if procs is not None:
            await anyio.to_thread.run_sync(procs.stop)
    if "replay" in options.parts:
        progress("raw replay of the event stream")
        report.figures["replay_raw_events"] = await raw.replay_rate(
            nc, topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.>"
        )
        with tempfile.TemporaryDirectory(prefix="warden-bench-replay-") as scratch:
            store = Path(scratch) / "rebuild.sqlite"
            progress("rebuilding every projection from the event stream")
            report.figures["replay_projections"] = await rebuild_rate(url, store)
            # What a checkpoint saves: the next rebuild folds only what the stream gained.
            extra = max(EVENTS_PER_JOB, options.replay_events // 10)
            progress(f"writing {extra:,} more events, then resuming the rebuild from its checkpoint")
            await write_history(nc, extra)
            report.figures["replay_resumed"] = await rebuild_rate(url, store)
        report.figures["replay_raw"] = report.figures["replay_raw_events"]
