"""`warden demo`: the README's main command."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.cli.main import cli, json_option
from services.demo.scenario import DemoOptions, Summary, run_demo


def _board(counts: dict[str, int], total: int) -> Table:
    table = Table(title=f"warden demo: {total} jobs, agents failing by design")
    for state in ("queued", "leased", "proposed", "accepted", "completed", "tombstoned", "cancelled"):
        table.add_column(state, justify="right")
    table.add_row(
        *(
            str(counts.get(s, 0))
            for s in ("queued", "leased", "proposed", "accepted", "completed", "tombstoned", "cancelled")
        )
    )
    return table


def render(summary: Summary, console: Console) -> None:
    console.rule("outcome")
    console.print(f"jobs: {summary.jobs}")
    console.print("failures, each with how it was caught:")
    for f in summary.failures:
        detail = {k: v for k, v in f.items() if k not in ("kind", "agent", "job")}
        console.print(f"  [bold]{f['kind']}[/] agent={f['agent']} job={f['job'][:8]} {detail}")
    console.print("revocations:")
    for r in summary.revocations or [{"agent": "-", "reason": "none", "by": "-", "latency_ms": None}]:
        console.print(f"  {r['agent']} by {r['by']} ({r['latency_ms']} ms after the signal): {r['reason']}")
    for r in summary.rollbacks:
        console.print(f"  rolled back proposal {r['proposal'][:8]} of job {r['job'][:8]}: {r['receipt']}")
    console.print(f"effects: {summary.effects}")
    console.rule("guarantees")
    for check in summary.checks:
        mark = "[green]✔[/]" if check.ok else "[red]✘[/]"
        console.print(f"{mark} {check.name}: {check.detail}")
    console.print(f"dashboard: {summary.dashboard}   data: {summary.data_dir}")


@cli.command()
@click.option("--jobs", type=int, default=10, show_default=True, help="How many jobs to run.")
@click.option(
    "--nats",
    "nats_url",
    envvar="WARDEN_NATS_URL",
    default=None,
    help="Run against this server (default: an embedded one in a temporary folder).",
)
@click.option("--http", default=None, help="Dashboard address (default 127.0.0.1:8765, or a free port).")
@click.option("--keep", is_flag=True, help="Leave everything running (dashboard included) until Ctrl-C.")
@click.option(
    "--timeout", type=float, default=240.0, show_default=True, help="Give up after this many seconds."
)
@json_option
def demo(
    jobs: int, nats_url: str | None, http: str | None, keep: bool, timeout: float, as_json: bool
) -> None:
    """Run a fleet of agents, some failing by design, through Warden against a real git repo.

    The fleet: two good agents; one whose process crashes mid-job; one that hangs (stopped,
    still connected); one that edits outside its scope; one that reports passing tests that
    fail; one that proposes after its lease timed out (a repeated side effect). The summary
    shows how each failure was caught, revocations, effects applied exactly once and the
    ledger verified. Exit code 1 when any of those guarantees failed.
    """
    console = Console(stderr=as_json)
    options = DemoOptions(jobs=jobs, nats_url=nats_url, http=http, timeout=timeout)

    async def go() -> Summary:
        with Live(_board({}, jobs), console=console, refresh_per_second=4, transient=as_json) as live:

            def progress(counts: dict[str, int], _note: str) -> None:
                live.update(_board(counts, jobs))

            async def hold(summary: Summary) -> Any:
                if keep:
                    live.stop()
                    render(summary, console)
                    console.print(f"[bold]--keep[/]: dashboard at {summary.dashboard}; Ctrl-C to stop")
                    await anyio.sleep_forever()

            return await run_demo(options, progress, keep=hold if keep else None)

    try:
        summary = anyio.run(go)
    except KeyboardInterrupt:
        sys.exit(0)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2, default=str))
    else:
        render(summary, console)
    sys.exit(0 if summary.ok else 1)
