"""`warden revocations`: how fast each revocation took hold, computed from the log alone."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import click

from services.cli.options import data_dir_option, json_option, nats_option, resolve_url
from shared import bus
from shared.authority import RevocationFigures, revocation_figures


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


@click.command()
@nats_option
@data_dir_option
@json_option
def revocations(nats_url: str | None, data_dir: Path, as_json: bool) -> None:
    """List revocations with their latency: failure signal → revocation event, and how long
    after the signal the agent could still get a message accepted."""
    url = resolve_url(nats_url, data_dir)

    async def go() -> list[RevocationFigures]:
        nc = await bus.connect(url, "warden-revocations")
        try:
            return await revocation_figures(nc.jetstream())
        finally:
            await nc.close()

    figures = anyio.run(go)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        **f.__dict__,
                        **{k: v.isoformat() for k, v in f.__dict__.items() if hasattr(v, "isoformat")},
                    }
                    for f in figures
                ],
                indent=2,
            )
        )
        return
    if not figures:
        click.echo("no revocations recorded")
    for f in figures:
        click.echo(
            f"{f.revoked_at:%Y-%m-%d %H:%M:%S} {f.agent} by {f.by}: latency {_ms(f.latency_ms)}, "
            f"accepted after signal {_ms(f.exposure_ms)} — {f.reason}"
        )
