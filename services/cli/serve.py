"""`warden up` and `warden run`: the services, in this process."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import anyio
import click
from anyio.abc import TaskStatus

from services import registry
from services.cli.options import data_dir_option, nats_url_option, replicas_option
from services.cli.readside_options import api_token_note, read_side_options
from shared import datadir, runtime

service_nats_option = nats_url_option(
    "NATS server URL (or WARDEN_NATS_URL). Without it, the command starts an embedded server "
    "in --data-dir, or joins the one a running `warden up` started there."
)

stream_replicas_option = replicas_option("Stream replicas: 3 on a three-node cluster (or WARDEN_REPLICAS).")


def _serve(
    names: list[str] | None, nats_url: str | None, data_dir: Path, replicas: int, *, join: bool
) -> None:
    """Run services on the named server, or own `data_dir` and run its embedded server; with
    `join`, a directory a live process owns means running on that process's server instead."""
    services = registry.build(names)
    started = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    token_note = api_token_note([s.name for s in services], data_dir)

    with contextlib.ExitStack() as stack:
        ownership, joined = None, None
        if nats_url is None:
            ownership, joined = stack.enter_context(datadir.owned_or_joined(data_dir, join=join))
        where = f" (embedded, data in {data_dir})" if ownership is not None else ""
        if joined is not None:
            where = f" (joined warden pid {joined.pid}, data in {data_dir})"

        async def body(task_status: TaskStatus[None]) -> None:
            server = joined.url if joined is not None else nats_url
            async with runtime.deployment(server, data_dir, replicas=replicas) as (ctx, url):
                if ownership is not None:
                    ownership.publish(url, ctx.monitor_url)
                async with anyio.create_task_group() as tg:
                    await tg.start(runtime.run_services, ctx, services)
                    click.echo(
                        f"warden ready in {time.monotonic() - started:.2f}s: "
                        f"{', '.join(s.name for s in services)} on {url}{where}"
                    )
                    if token_note:
                        click.echo(token_note)
                    task_status.started()

        async def main() -> None:
            await runtime.until_signal(body)
            click.echo("warden stopped")

        anyio.run(main)


@click.command()
@service_nats_option
@data_dir_option
@stream_replicas_option
@read_side_options
def up(nats_url: str | None, data_dir: Path, replicas: int) -> None:
    """Run every service in one process (with an embedded server unless --nats is given).

    State persists in --data-dir, so the next `warden up` finds it; one `warden up` owns a data
    dir at a time (warden.lock names its pid). Ctrl-C drains and exits 0.
    """
    _serve(None, nats_url, data_dir, replicas, join=False)


@click.command("run")
@click.argument("service", type=click.Choice(sorted(registry.SERVICES)))
@service_nats_option
@data_dir_option
@stream_replicas_option
@read_side_options
def run_service(service: str, nats_url: str | None, data_dir: Path, replicas: int) -> None:
    """Run one service (replicas of a service are safe to run side by side).

    Against a data dir a running `warden up` owns, it runs on that process's server.
    """
    _serve([service], nats_url, data_dir, replicas, join=True)
