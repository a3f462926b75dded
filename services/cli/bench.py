"""`warden bench`: figures and ratios against raw JetStream measured in the same run."""

from __future__ import annotations

import json
from typing import Any

import anyio
import click
from rich.console import Console
from rich.table import Table

from services.bench.report import PARTS, Options, Report
from services.bench.runner import run
from services.cli.options import json_option, nats_url_option

TARGETS = {
    "governed_ratio": 0.3,
    "detection_p99_ms": 50.0,
    "revocation_p99_ms": 50.0,
    "replay_ratio": 0.5,
    "memory_growth": 0.10,
    "restart_s": 2.0,
    "fleet_detection_p99_ms": 50.0,
}


def _num(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}{unit}"


def render(report: Report, console: Console) -> None:
    f = report.figures
    table = Table(title="warden bench", show_lines=False)
    for column in ("measure", "rate", "p50", "p99", "vs raw / target"):
        table.add_column(column, justify="right" if column != "measure" else "left")

    def row(name: str, key: str, note: str = "") -> None:
        fig = f.get(key)
        if fig is None:
            return
        table.add_row(
            name, _num(fig.rate, "/s"), _num(fig.p50_ms, " ms", 1), _num(fig.p99_ms, " ms", 1), note
        )

    ratio = report.ratio("governed", "work_queue")
    row("raw JetStream work queue (jobs)", "work_queue", "baseline")
    row(
        "governed lifecycle (jobs)",
        "governed",
        f"{_num(ratio, '×', 2)} (target ≥ {TARGETS['governed_ratio']}×)",
    )
    row("raw acked publishes", "publish_raw")
    row("raw replay (ordered consumer)", "replay_raw")
    row("detection, dead agents", "detection_dead", f"p99 target ≤ {TARGETS['detection_p99_ms']:.0f} ms")
    row("detection, hung agents", "detection_hung", f"p99 target ≤ {TARGETS['detection_p99_ms']:.0f} ms")
    row("revocation (signal → event)", "revocation", f"p99 target ≤ {TARGETS['revocation_p99_ms']:.0f} ms")
    row("history written", "history_write")
    row("raw replay of the event stream", "replay_raw_events")
    replay_ratio = report.speed_ratio("replay_projections", "replay_raw_events")
    row(
        "projection rebuild (events)",
        "replay_projections",
        f"{_num(replay_ratio, '×', 2)} of raw replay's speed, same stream, by time (target ≥ {TARGETS['replay_ratio']}×)",
    )
    resumed = f.get("replay_resumed")
    if resumed is not None:
        row(
            "projection rebuild resumed (events)",
            "replay_resumed",
            f"{resumed.count:,} events after its checkpoint at {resumed.extra.get('resumed_from', 0):,}, "
            f"in {_num(resumed.seconds, ' s', 2)}",
        )
    row("fleet: leases granted", "fleet_grants")
    beats = f.get("fleet_heartbeats")
    if beats is not None:
        row(
            "fleet: heartbeats answered",
            "fleet_heartbeats",
            f"of {_num(beats.extra.get('expected_rate'), '/s')} sent; {beats.extra.get('unanswered', 0):,} unanswered",
        )
    row(
        "fleet: detection past deadline",
        "fleet_detection",
        f"p99 target ≤ {TARGETS['fleet_detection_p99_ms']:.0f} ms under the fleet's load",
    )
    console.print(table)
    for key, label in (("governed", "governed job"), ("work_queue", "bare queue job")):
        fig = f.get(key)
        split = fig.extra.get("cpu_ms_per_job") if fig is not None else None
        if split:
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in split.items() if k != "total")
            target = " (target ≤ 4 ms)" if key == "governed" else ""
            console.print(f"CPU per {label}: {split['total']:.2f} ms{target}: {parts}")
    for key, label in (
        ("governed", "governed job"),
        ("governed_paced", "governed job, agents waiting for it"),
    ):
        fig = f.get(key)
        stored = fig.extra.get("stored_messages_per_job") if fig is not None else None
        if stored:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in stored.items() if k != "total")
            console.print(f"stored messages per {label}: {stored['total']:.2f} (target ≤ 5): {parts}")
    fleet_memory = f.get("fleet_memory")
    if fleet_memory is not None:
        held = fleet_memory.extra.get("live_leases", 0)
        rss = ", ".join(
            f"{k[len('rss_kib_') :]} {_num(v / 1024, ' MiB', 1)}"
            for k, v in fleet_memory.extra.items()
            if k.startswith("rss_kib_")
        )
        console.print(f"fleet: resident memory holding {held:,} live leases: {rss}")
    explained = {k: v for k, v in f.items() if k.startswith("explain_")}
    if explained:
        latency = Table(title="warden explain on a large log (target: the command under 1 s)")
        for column in ("events in the log", "explain p50", "explain p99", "command p50", "command max"):
            latency.add_column(column, justify="right")
        for fig in explained.values():
            latency.add_row(
                _num(fig.extra.get("events"), ""),
                _num(fig.p50_ms, " ms", 1),
                _num(fig.p99_ms, " ms", 1),
                _num(fig.extra.get("command_p50_ms"), " ms", 0),
                _num(fig.extra.get("command_max_ms"), " ms", 0),
            )
        console.print(latency)
    memory = {k[len("memory_") :]: v for k, v in f.items() if k.startswith("memory_")}
    if memory:
        mem = Table(title="resident memory per service")
        first = next(iter(memory.values())).extra.get("first_events", 0)
        end = next(iter(memory.values())).extra.get("end_events", 0)
        for column in ("service", f"after {first:,} events", f"after {end:,}", "growth (target ≤ 10%)"):
            mem.add_column(column, justify="right" if column != "service" else "left")
        for name, fig in memory.items():
            mem.add_row(
                name,
                _num(fig.extra.get("rss_kib_first", 0) / 1024, " MiB", 1),
                _num(fig.extra.get("rss_kib_end", 0) / 1024, " MiB", 1)
                if "rss_kib_end" in fig.extra
                else "-",
                _num(100 * fig.extra["growth"], "%", 1) if "growth" in fig.extra else "-",
            )
        console.print(mem)
    restarts = {
        k[len("restart_") :]: v for k, v in f.items() if k.startswith("restart_") and k != "restart_sizes"
    }
    if restarts:
        sizes = sorted(int(n) for n in f["restart_sizes"].extra) if "restart_sizes" in f else []
        table = Table(
            title=f"time to serving on restart, spawn to ready (target ≤ {TARGETS['restart_s']:.0f} s at the largest log)"
        )
        table.add_column("service")
        for size in sizes:
            table.add_column(f"{size:,} events", justify="right")
            table.add_column("of which after imports", justify="right")
            table.add_column("load", justify="right")
        for name, fig in restarts.items():
            cells = [name.replace("_", " ")]
            for size in sizes:
                cells += [
                    _num(fig.extra.get(f"serving_s_{size}"), " s", 2),
                    _num(fig.extra.get(f"ready_s_{size}"), " s", 2),
                    _num(fig.extra.get(f"load_{size}"), "", 2),
                ]
            table.add_row(*cells)
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(f"machine: {report.machine}")


@click.command()
@nats_url_option("Benchmark this server (default: start an embedded one in a temporary folder).")
@click.option("--quick", is_flag=True, help="Small sizes: finishes in about a minute on 2 cores.")
@click.option("--jobs", type=int, default=None, help="Jobs for the work queue and governed runs.")
@click.option("--workers", type=int, default=None, help="Workers (bare) and agents (governed).")
@click.option("--payload", type=int, default=None, help="Bytes of payload per job.")
@click.option("--events", "replay_events", type=int, default=None, help="History size for replay and memory.")
@click.option("--fleet-agents", type=int, default=None, help="Simulated agents in the fleet part.")
@click.option(
    "--fleet-leases", type=int, default=None, help="Live leases the fleet holds, shared by its agents."
)
@click.option("--part", "parts", multiple=True, type=click.Choice(PARTS), help="Run only these parts.")
@json_option
def bench(
    nats_url: str | None,
    quick: bool,
    jobs: int | None,
    workers: int | None,
    payload: int | None,
    replay_events: int | None,
    fleet_agents: int | None,
    fleet_leases: int | None,
    parts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Measure Warden against raw JetStream on the same server, in one run.

    Parts: raw baselines and the governed lifecycle (jobs/s, p50/p99), time-to-failure-detection
    for dead and hung agents, revocation latency, projection replay rate, each service's
    memory after 100k and after all events, each service's time to serving on restart at both
    sizes (from its snapshot; the scheduler also with a full fold), `warden explain` latency at both sizes, and a
    fleet (1,000 simulated agents holding 10,000 leases, heartbeating at their contract's
    interval: heartbeats answered per second, detection of leases killed under that load, the
    services' memory). Figures guide work; no test asserts them.
    """
    chosen = parts or PARTS
    options = Options.quick_mode(chosen) if quick else Options(parts=chosen)
    overrides: dict[str, Any] = {
        "jobs": jobs,
        "workers": workers,
        "payload": payload,
        "replay_events": replay_events,
        "fleet_agents": fleet_agents,
        "fleet_leases": fleet_leases,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    console = Console(stderr=as_json, width=max(Console().width, 110))

    async def go() -> Report:
        with console.status("benchmarking") as status:

            def progress(text: str) -> None:
                status.update(text)
                console.log(text)

            return await run(nats_url, options, progress)

    report = anyio.run(go)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        render(report, console)
