"""`warden replay`: rebuild the read model from the streams into a fresh store and compare it with
the live one, reporting every difference (exit 1 when there are any).

The rebuild stops at the live read model's tracked position, so a projector that is still
running is compared at the same point in the stream; live rows it has changed since (their
`seq` is past that position) are counted as skipped, not as differences. `--job` rebuilds and
compares one job's rows; `--since/--until` compare only rows last changed in that window (the
rebuild still folds everything before it, since a row's state depends on its whole history).

The rebuilt store is kept beside the live read model (`replay-checkpoints/`, or in --data-dir
when the live one is not a SQLite file) as a checkpoint: the next replay of the same scope
folds only the events after it, and a replay killed halfway resumes from its last commit.
`--fresh` folds the stream from the start instead; `--into` rebuilds into a store you name.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from services.cli.options import data_dir_option, fail, json_option, nats_option, resolve_url
from shared import topology
from shared.app import PERSISTENCE_MODULE, WardenApp
from shared.persistence.bridge import URL_ENV, BridgeError
from shared.persistence.jetstream import JetStreamApplicationRecorder
from shared.readmodel import StoreURLError, configured_url, open_read_model
from shared.readmodel import replay as replays
from shared.readmodel.store import sqlite_path
from shared.readmodel.tables import ts


def parse_when(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)", param_hint=name
        ) from None
    return ts(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 1] + "…"


def print_report(report: replays.Report, console: Console) -> None:
    compared = sum(report.compared.values())
    console.print(
        f"replayed {report.events} events (stream positions "
        + (f"{report.resumed_from + 1} to" if report.resumed_from else "up to")
        + f" {report.position}) into {report.store}"
        + (f", resuming its checkpoint at {report.resumed_from}" if report.resumed_from else "")
        + "; "
        f"compared {compared} rows in {len(report.compared)} tables"
        + (
            f"; skipped {sum(report.skipped.values())} rows the live projector changed since"
            if report.skipped
            else ""
        )
    )
    if not report.differences:
        console.print("[green]identical[/green]: the live read model is exactly what the streams produce")
        return
    console.print(f"[red]{len(report.differences)} difference(s)[/red]:")
    for diff in report.differences:
        key = ", ".join(str(k) for k in diff.key)
        console.print(f"  {diff.table} [{key}]: {diff.problem}", markup=False)
        for column, values in diff.columns.items():
            console.print(
                f"      {column}: live {_short(values['live'])}  replay {_short(values['replay'])}",
                markup=False,
            )


@click.command()
@nats_option
@data_dir_option
@click.option(
    "--projections",
    "live_url",
    envvar="WARDEN_PROJECTIONS_URL",
    default=None,
    help="The live read model (or WARDEN_PROJECTIONS_URL; default: projections.sqlite in --data-dir).",
)
@click.option("--job", "job_id", type=click.UUID, default=None, help="Rebuild and compare one job only.")
@click.option("--since", default=None, help="Compare rows last changed at or after this time (ISO 8601).")
@click.option("--until", default=None, help="Compare rows last changed at or before this time (ISO 8601).")
@click.option(
    "--into",
    default=None,
    help="Rebuild into this store (a URL or SQLite path; it must be empty). Default: the checkpoint store.",
)
@click.option(
    "--fresh",
    "fresh_start",
    is_flag=True,
    help="Fold the stream from the start, not from the checkpoint the last replay left.",
)
@json_option
def replay(
    nats_url: str | None,
    data_dir: Path,
    live_url: str | None,
    job_id: UUID | None,
    since: str | None,
    until: str | None,
    into: str | None,
    fresh_start: bool,
    as_json: bool,
) -> None:
    """Rebuild the read model from the streams and compare it with the live one.

    Exits 0 when they are identical, 1 when any row differs (every difference is listed).
    """
    since_ts, until_ts = parse_when(since, "--since"), parse_when(until, "--until")
    url = resolve_url(nats_url, data_dir)
    live_store = configured_url(live_url, data_dir)
    try:
        live = open_read_model(live_store)
        live_file = sqlite_path(live_store)
    except StoreURLError as exc:
        fail(str(exc))
        return
    folder = (Path(live_file).resolve().parent if live_file else data_dir) / "replay-checkpoints"
    scope = str(job_id) if job_id else "all"
    checkpoint = replays.checkpoint_path(folder, scope)
    target = into or f"sqlite:///{checkpoint}"
    try:
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: url})
    except BridgeError as exc:
        live.close()
        fail(str(exc))
        return
    try:
        position = live.position()
        subject = topology.event_subject(job_id) if job_id else f"{topology.EVENT_ROOT}.*"
        recorder = app.recorder
        assert isinstance(recorder, JetStreamApplicationRecorder)
        if into is None:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in replays.stale_checkpoints(folder, scope):
                stale.unlink(missing_ok=True)
        fresh = open_read_model(target, durable=False)
        try:
            if into is not None and fresh.position():
                fail(f"{target} already holds a read model: --into needs an empty store")
            if (
                into is None
                and fresh.position()
                and (
                    fresh_start
                    or fresh.position() > position
                    or not replays.checkpoint_holds(recorder, fresh, subject)
                )
            ):
                # Past the live read model's position (which was rebuilt, or is another one),
                # or not folded from this stream: the checkpoint cannot be resumed.
                fresh.close()
                for path in folder.glob(f"{checkpoint.name}*"):
                    path.unlink()
                fresh = open_read_model(target, durable=False)
            resumed_from = fresh.position()
            err = Console(stderr=True)
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
                disable=as_json or not err.is_terminal,
            ) as progress:
                task = progress.add_task("replaying", total=position or None)
                events = replays.rebuild(
                    recorder, fresh, subject, position, lambda at: progress.update(task, completed=at)
                )
            report = replays.Report(
                position=position,
                events=events,
                store=target if into else str(checkpoint),
                scope={"job": str(job_id) if job_id else None, "since": since_ts, "until": until_ts},
                resumed_from=resumed_from,
            )
            replays.compare(
                live, fresh, report, job=str(job_id) if job_id else None, since=since_ts, until=until_ts
            )
        finally:
            fresh.close()
    finally:
        live.close()
        app.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print_report(report, Console())
    sys.exit(1 if report.differences else 0)
