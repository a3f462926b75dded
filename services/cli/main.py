"""`warden`: run the services, submit jobs, govern agents, and inspect the record."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
from anyio.abc import TaskStatus

from services import registry
from services.cli.readside_options import api_token_note, read_side_options
from shared import runtime
from shared.bus import NoServerNamed

T = TypeVar("T")

STATE_FILE = "server.json"


def data_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("WARDEN_DATA_DIR", ".warden"),
        show_default=".warden (or WARDEN_DATA_DIR)",
        help="Where the embedded server keeps its store.",
    )(f)


def nats_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--nats",
        "nats_url",
        envvar="WARDEN_NATS_URL",
        default=None,
        help="NATS server URL (or WARDEN_NATS_URL). Without it, `up` and `run` start an "
        "embedded server; other commands use the one `warden up` started in --data-dir.",
    )(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def resolve_url(nats_url: str | None, data_dir: Path) -> str:
    """The server a client command talks to: named explicitly, or the one `warden up` runs here.

    Never a guess: no default port, no system server.
    """
    if nats_url:
        return nats_url
    state = data_dir / STATE_FILE
    if state.is_file():
        info = json.loads(state.read_text())
        pid = int(info.get("pid", 0))
        try:
            os.kill(pid, 0)
        except OSError:
            raise NoServerNamed(
                f"{state} names a server (pid {pid}) that is no longer running; start `warden up`"
            ) from None
        return str(info["url"])
    raise NoServerNamed(
        "no NATS server named: pass --nats URL, set WARDEN_NATS_URL, or run `warden up` "
        f"(data dir {data_dir})"
    )


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Warden: an event-sourced orchestrator that governs AI agents on NATS JetStream.

    Agents propose; the system decides. Every request, lease, heartbeat, proposal, verdict,
    effect and revocation is an event on a JetStream stream.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def _serve(names: list[str] | None, nats_url: str | None, data_dir: Path, replicas: int) -> None:
    services = registry.build(names)
    started = time.monotonic()
    token_note = api_token_note([s.name for s in services], data_dir)

    async def main() -> None:
        async def body(task_status: TaskStatus[None]) -> None:
            async with runtime.deployment(nats_url, data_dir, replicas=replicas) as (ctx, url):
                state = data_dir / STATE_FILE
                if nats_url is None:
                    state.write_text(
                        json.dumps({"url": url, "pid": os.getpid(), "monitor_url": ctx.monitor_url})
                    )
                try:
                    async with anyio.create_task_group() as tg:
                        await tg.start(runtime.run_services, ctx, services)
                        click.echo(
                            f"warden ready in {time.monotonic() - started:.2f}s: "
                            f"{', '.join(s.name for s in services)} on {url}"
                            + (f" (embedded, data in {data_dir})" if nats_url is None else ""),
                        )
                        if token_note:
                            click.echo(token_note)
                        task_status.started()
                finally:
                    if nats_url is None:
                        state.unlink(missing_ok=True)

        await runtime.until_signal(body)
        click.echo("warden stopped")

    anyio.run(main)


@cli.command()
@nats_option
@data_dir_option
@click.option(
    "--replicas",
    envvar="WARDEN_REPLICAS",
    default=1,
    show_default=True,
    help="Stream replicas: 3 on a three-node cluster (or WARDEN_REPLICAS).",
)
@read_side_options
def up(nats_url: str | None, data_dir: Path, replicas: int) -> None:
    """Run every service in one process (with an embedded server unless --nats is given).

    State persists in --data-dir, so the next `warden up` finds it. Ctrl-C drains and exits 0.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    _serve(None, nats_url, data_dir, replicas)


@cli.command("run")
@click.argument("service", type=click.Choice(sorted(registry.SERVICES)))
@nats_option
@data_dir_option
@click.option(
    "--replicas",
    envvar="WARDEN_REPLICAS",
    default=1,
    show_default=True,
    help="Stream replicas: 3 on a three-node cluster (or WARDEN_REPLICAS).",
)
@read_side_options
def run_service(service: str, nats_url: str | None, data_dir: Path, replicas: int) -> None:
    """Run one service (replicas of a service are safe to run side by side)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    _serve([service], nats_url, data_dir, replicas)


def main() -> None:
    from services.cli import agent, authority, bench, creds, demo, doctor, forensics, jobs, replay, schemas  # noqa: F401 - registers their commands

    try:
        cli(standalone_mode=True)
    except NoServerNamed as exc:
        fail(str(exc))
