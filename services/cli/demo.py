"""`warden demo`: the README's main command."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio
import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.cli.options import Exit, json_option, nats_url_option
from services.demo.scenario import DemoOptions, Summary, run_demo

STATES = ("queued", "leased", "proposed", "accepted", "completed", "tombstoned", "cancelled")


def _board(counts: dict[str, int], total: int) -> Table:
    table = Table(title=f"warden demo: {total} jobs, agents failing by design")
    for state in STATES:
        table.add_column(state, justify="right")
    table.add_row(*(str(counts.get(s, 0)) for s in STATES))
    return table


def _words(value: Any) -> str:
    """A value as plain words: `k v, k v` for mappings, `a, b` for lists (never a Python repr)."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_words(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(_words(v) for v in value) or "none"
    return "-" if value is None else str(value)


def render(summary: Summary) -> list[str]:
    """The outcome as plain text lines: the same on a terminal, in a pipe or in a CI log."""
    lines = ["outcome", f"jobs: {_words(summary.jobs)}", "failures, each with how it was caught:"]
    for f in summary.failures:
        detail = {k: v for k, v in f.items() if k not in ("kind", "agent", "job")}
        lines.append(f"  {f['kind']}: agent {f['agent']}, job {f['job'][:8]}, {_words(detail)}")
    lines.append("revocations:")
    if not summary.revocations:
        lines.append("  none")
    for r in summary.revocations:
        lines.append(
            f"  {r['agent']} by {r['by']} ({_words(r['latency_ms'])} ms after the signal): {r['reason']}"
        )
    for r in summary.rollbacks:
        lines.append(
            f"  rolled back proposal {r['proposal'][:8]} of job {r['job'][:8]}: {_words(r['receipt'])}"
        )
    lines.append(f"effects: {_words(summary.effects)}")
    lines.append("guarantees")
    lines.extend(f"{'✔' if c.ok else '✘'} {c.name}: {c.detail}" for c in summary.checks)
    if summary.data_dir:
        lines.append(f"data kept in {summary.data_dir}")
    return lines


def kept_lines(summary: Summary) -> list[str]:
    return [
        f"NATS:      {summary.nats_url}",
        f"dashboard: {summary.dashboard}",
        f"data dir:  {summary.data_dir} (server.json there: `warden jobs --data-dir {summary.data_dir}`,",
        f"           or export WARDEN_DATA_DIR={summary.data_dir})",
        *(
            [
                f"operator token: {summary.operator_token} (also in {summary.operator_token_file};",
                "           the dashboard's Sign in takes it, for approve, revoke and the other actions)",
            ]
            if summary.operator_token
            else []
        ),
        "--keep: everything stays up until Ctrl-C",
    ]


@click.command()
@click.option("--jobs", type=int, default=10, show_default=True, help="How many jobs to run.")
@nats_url_option("Run against this server (default: an embedded one in a temporary folder).")
@click.option("--http", default=None, help="Dashboard address (default 127.0.0.1:8765, or a free port).")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave everything running (dashboard included) until Ctrl-C, and print where to find it.",
)
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
    ledger verified. Exit code 1 when any of those guarantees failed. Without --keep the
    temporary folder is removed (kept, and named, when a guarantee failed).
    """
    console = Console(stderr=True)
    options = DemoOptions(jobs=jobs, nats_url=nats_url, http=http, timeout=timeout)
    # The live board is for people at a terminal; a pipe or a log gets only the outcome.
    live_board = console.is_terminal and not as_json

    def emit(lines: list[str]) -> None:
        for line in lines:
            click.echo(line)

    kept: list[Summary] = []

    async def go() -> Summary:
        async def hold(summary: Summary) -> Any:
            if as_json:
                click.echo(json.dumps({**summary.as_dict(), "kept": True}, default=str))
            else:
                emit([*render(summary), *kept_lines(summary)])
            sys.stdout.flush()
            kept.append(summary)
            # Until Ctrl-C or SIGTERM: either stops the services, the server and the agents.
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _signum in signals:
                    break

        if not live_board:
            return await run_demo(options, lambda _c, _n: None, keep=hold if keep else None)
        with Live(_board({}, jobs), console=console, refresh_per_second=4, transient=True) as live:

            def progress(counts: dict[str, int], _note: str) -> None:
                live.update(_board(counts, jobs))

            async def hold_live(summary: Summary) -> Any:
                live.stop()
                await hold(summary)

            run: Callable[[Summary], Any] | None = hold_live if keep else None
            return await run_demo(options, progress, keep=run)

    try:
        summary = anyio.run(go)
    except KeyboardInterrupt:
        sys.exit(Exit.OK)
    if kept:
        click.echo("warden demo stopped")
    elif as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2, default=str))
    else:
        emit(render(summary))
    sys.exit(Exit.OK if summary.ok else Exit.FAILED)
