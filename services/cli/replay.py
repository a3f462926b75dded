"""`warden replay`: rebuild the read model from the streams into a fresh store and compare it with
the live one, reporting every difference (exit 1 when there are any).

The rebuild stops at the live read model's tracked position, so a projector that is still
running is compared at the same point in the stream; live rows it has changed since (their
`seq` is past that position) are counted as skipped, not as differences. `--job` rebuilds and
compares one job's rows; `--since/--until` compare only rows last changed in that window (the
rebuild still folds everything before it, since a row's state depends on its whole history).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import click
from eventsourcing.persistence import Notification
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from services.cli.options import data_dir_option, fail, json_option, nats_option, resolve_url
from shared import topology
from shared.app import PERSISTENCE_MODULE, WardenApp
from shared.persistence.bridge import URL_ENV, BridgeError
from shared.persistence.jetstream import TOPIC_HEADER, VERSION_HEADER, JetStreamApplicationRecorder
from shared.readmodel import StoreURLError, configured_url, open_read_model, queries
from shared.readmodel.runner import decode_notification
from shared.readmodel.store import ReadModel
from shared.readmodel.tables import TABLES, Table, ts

PAGE = 1000


@dataclass
class Difference:
    table: str
    key: list[Any]
    problem: str  # "differs", "missing from the live read model", "not reproduced by replay"
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Report:
    position: int
    events: int
    store: str
    scope: dict[str, Any]
    compared: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "events": self.events,
            "rebuilt_into": self.store,
            "scope": self.scope,
            "compared": self.compared,
            "skipped_moved_on": self.skipped,
            "identical": not self.differences,
            "differences": [d.__dict__ for d in self.differences],
        }


def notifications(
    recorder: JetStreamApplicationRecorder, subject: str, start: int, stop: int
) -> Iterator[list[Notification]]:
    """Pages of the events on `subject` from `start` up to stream sequence `stop`."""
    io = recorder.io

    def keep(record: Any) -> bool:
        return TOPIC_HEADER in record.headers and VERSION_HEADER in record.headers

    while start <= stop:
        records = io.run(partial(io.scan, subject, start, limit=PAGE, stop=stop, keep=keep))
        page = [n for r in records if (n := recorder._notification(r)) is not None]
        if not page:
            return
        yield page
        start = page[-1].id + 1


def rebuild(
    recorder: JetStreamApplicationRecorder,
    fresh: ReadModel,
    subject: str,
    position: int,
    progress: Progress,
) -> int:
    task = progress.add_task("replaying", total=position or None)
    count = 0
    for page in notifications(recorder, subject, 1, position):
        fresh.project([(n.id, decode_notification(n)) for n in page])
        count += len(page)
        progress.update(task, completed=page[-1].id)
    progress.update(task, completed=position)
    return count


def compare(
    live: ReadModel,
    fresh: ReadModel,
    report: Report,
    *,
    job: str | None,
    since: str | None,
    until: str | None,
) -> None:
    tables: list[Table] = [t for t in TABLES if job is None or t.job_column is not None]
    for table in tables:
        live_rows = queries.dump(live, table, job_id=job)
        fresh_rows = queries.dump(fresh, table, job_id=job)
        compared = skipped = 0
        for key in sorted(set(live_rows) | set(fresh_rows), key=repr):
            got, want = live_rows.get(key), fresh_rows.get(key)
            row = want or got
            assert row is not None
            when = row[table.time]
            if (since and (when is None or when < since)) or (until and (when is None or when > until)):
                continue
            if got is not None and int(got["seq"]) > report.position:
                skipped += 1  # changed by the live projector after the position we replayed to
                continue
            compared += 1
            if got is None:
                report.differences.append(
                    Difference(table.name, list(key), "missing from the live read model")
                )
            elif want is None:
                report.differences.append(Difference(table.name, list(key), "not reproduced by replay"))
            elif got != want:
                columns = {
                    c: {"live": got[c], "replay": want[c]} for c in table.column_names if got[c] != want[c]
                }
                report.differences.append(Difference(table.name, list(key), "differs", columns))
        report.compared[table.name] = compared
        if skipped:
            report.skipped[table.name] = skipped


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


def print_report(report: Report, console: Console) -> None:
    compared = sum(report.compared.values())
    console.print(
        f"replayed {report.events} events (stream positions up to {report.position}) into {report.store}; "
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
    help="Rebuild into this store (a URL or SQLite path; it must be empty). Default: a temporary SQLite file.",
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
    as_json: bool,
) -> None:
    """Rebuild the read model from the streams and compare it with the live one.

    Exits 0 when they are identical, 1 when any row differs (every difference is listed).
    """
    since_ts, until_ts = parse_when(since, "--since"), parse_when(until, "--until")
    url = resolve_url(nats_url, data_dir)
    try:
        live = open_read_model(configured_url(live_url, data_dir))
    except StoreURLError as exc:
        fail(str(exc))
        return
    scratch = tempfile.TemporaryDirectory(prefix="warden-replay-")
    target = into or f"sqlite:///{Path(scratch.name) / 'replay.sqlite'}"
    try:
        app = WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, URL_ENV: url})
    except BridgeError as exc:
        live.close()
        fail(str(exc))
        return
    try:
        fresh = open_read_model(target)
        try:
            if fresh.position():
                fail(f"{target} already holds a read model: --into needs an empty store")
            position = live.position()
            subject = topology.event_subject(job_id) if job_id else f"{topology.EVENT_ROOT}.*"
            err = Console(stderr=True)
            recorder = app.recorder
            assert isinstance(recorder, JetStreamApplicationRecorder)
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
                disable=as_json or not err.is_terminal,
            ) as progress:
                events = rebuild(recorder, fresh, subject, position, progress)
            report = Report(
                position=position,
                events=events,
                store=target if into else "a temporary SQLite store",
                scope={"job": str(job_id) if job_id else None, "since": since_ts, "until": until_ts},
            )
            compare(live, fresh, report, job=str(job_id) if job_id else None, since=since_ts, until=until_ts)
        finally:
            fresh.close()
    finally:
        live.close()
        app.close()
        scratch.cleanup()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print_report(report, Console())
    sys.exit(1 if report.differences else 0)
