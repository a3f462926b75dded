"""`warden schemas export|check`: JSON Schema for every wire message, kept in `schemas/`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shared import schemas


@click.group("schemas")
def schemas_group() -> None:
    """JSON Schema generated from the message Structs."""


@schemas_group.command("export")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("schemas"),
    show_default=True,
    help="The folder of JSON Schema files.",
)
def export(out: Path) -> None:
    """Write a schema file per event, input and reply type."""
    written = schemas.export(out)
    click.echo(f"wrote {len(written)} schemas under {out}")


@schemas_group.command("check")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("schemas"),
    show_default=True,
    help="The folder of JSON Schema files.",
)
def check(out: Path) -> None:
    """Exit 1 when the files under --out disagree with the code."""
    problems = schemas.drift(out)
    for p in problems:
        click.echo(p, err=True)
    sys.exit(1 if problems else 0)
