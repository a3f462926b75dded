"""`warden ledger verify`, `explain`, `at`, `backtest`, `dossier`: answers from the log alone.

Thin commands over shared/forensics. They only read: no stream or consumer is created, and a
server without Warden's streams is reported as such rather than set up. Each command imports the
forensics module it needs when it runs: `warden explain` is timed whole, start-up included.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import NoReturn, TypeVar
from uuid import UUID

import anyio
import click
import msgspec
from nats.js import JetStreamContext

from services.cli.options import data_dir_option, fail, json_option, nats_option, resolve_url
from shared import bus
from shared.events import agent_id_for
from shared.forensics import explain as explains
from shared.forensics import ids, log

T = TypeVar("T")


def _die(message: str) -> NoReturn:
    fail(message)
    raise SystemExit(2)  # fail exits; this tells the type checker so


def _read(
    url: str,
    name: str,
    work: Callable[[JetStreamContext], Awaitable[T]],
    *,
    jobs: Sequence[str] = (),
    resolved: list[UUID] | None = None,
) -> T:
    """Connect, check the log is there, resolve `jobs` (ids or unique prefixes) into `resolved`,
    then run `work`."""

    async def go() -> T:
        nc = await bus.connect(url, name)
        try:
            js = nc.jetstream()
            await log.check_streams(js)
            for text in jobs:
                found = await ids.resolve_job(nc, text)
                if resolved is not None:
                    resolved.append(found)
            return await work(js)
        finally:
            await nc.close()

    return anyio.run(go)  # (JobNotFound, IdNotFound, LogUnavailable: the CLI group reports them)


def _read_job(url: str, name: str, text: str, work: Callable[[JetStreamContext, UUID], Awaitable[T]]) -> T:
    """`work` on the job `text` names (a full id or a unique prefix of 8+ characters)."""
    resolved: list[UUID] = []
    return _read(url, name, lambda js: work(js, resolved[0]), jobs=[text], resolved=resolved)


def _print(data: msgspec.Struct | object) -> None:
    click.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


@click.group()
def ledger() -> None:
    """The phase ledger: every aggregate's events form a hash chain."""


@ledger.command("verify")
@click.option("--job", "job", default=None, help="Verify one job's chain only.")
@click.option("--agent", "agent", default=None, help="Verify one agent's chain only.")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Verify a stored copy (a dossier, or a JSON list of records) instead of the stream.",
)
@click.option(
    "--against-log",
    is_flag=True,
    help="With --file: also compare every record with the stream (catches an edited last event).",
)
@nats_option
@data_dir_option
@json_option
def ledger_verify(
    job: str | None,
    agent: str | None,
    path: Path | None,
    against_log: bool,
    nats_url: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """Recompute the hash chains and report the first break of each.

    A message on an event subject that Warden did not write (no writer headers, or a payload
    that is not the Warden event its headers say) is no link of any chain: it is stepped over
    and listed as a FINDING with its stream sequence. Exit 0 when every chain is intact and
    there is no finding; 1 when a chain is broken or there is a finding (only the service
    credential may publish there, so a foreign message means a compromised or buggy writer).
    """
    from shared.forensics import ledger as ledgers

    if path is not None:
        try:
            document = json.loads(path.read_text())
            entries = ledgers.entries_from_copy(document)
        except (OSError, ValueError) as exc:
            _die(f"cannot verify {path}: {exc}")
        if against_log:
            url = resolve_url(nats_url, data_dir)
            report = _read(
                url, "warden-ledger", lambda js: ledgers.compare_with_log(js, entries, f"file {path}")
            )
        else:
            report = ledgers.verify(entries, f"file {path}")
    else:
        url = resolve_url(nats_url, data_dir)
        if job:
            report = _read_job(url, "warden-ledger", job, ledgers.verify_log)
        else:
            aggregate = agent_id_for(agent) if agent else None
            report = _read(url, "warden-ledger", lambda js: ledgers.verify_log(js, aggregate))
    if as_json:
        _print(report)
    else:
        click.echo(ledgers.render(report))
    sys.exit(0 if report.clean else 1)


@ledger.command("show")
@click.argument("job")
@nats_option
@data_dir_option
@json_option
def ledger_show(job: str, nats_url: str | None, data_dir: Path, as_json: bool) -> None:
    """JOB's phase ledger: every transition, its hash link, and the evidence behind it."""
    url = resolve_url(nats_url, data_dir)

    async def work(js: JetStreamContext, job_id: UUID) -> list[explains.Phase]:
        return explains.phases(await explains.collect(js, job_id))

    items = _read_job(url, "warden-ledger", job, work)
    if as_json:
        _print(items)
    else:
        click.echo(explains.render_phases(items))


@click.command()
@click.argument("job")
@nats_option
@data_dir_option
@json_option
def explain(job: str, nats_url: str | None, data_dir: Path, as_json: bool) -> None:
    """How JOB went, request to outcome, with the cause when it failed."""
    url = resolve_url(nats_url, data_dir)
    expl = _read_job(url, "warden-explain", job, explains.explain_job)
    if as_json:
        _print(expl)
    else:
        click.echo(explains.render(expl))


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        _die(f"{text!r} is not an ISO 8601 time (e.g. 2026-01-31T14:05:00+00:00)")
    return when if when.tzinfo is not None else when.astimezone()  # naive means local time


@click.command("at")
@click.argument("time", required=False)
@click.option("--seq", type=int, default=None, help="A stream sequence instead of a time.")
@click.option("--job", "jobs", multiple=True, help="Also show this job's full state (repeatable).")
@nats_option
@data_dir_option
@json_option
def at_command(
    time: str | None,
    seq: int | None,
    jobs: tuple[str, ...],
    nats_url: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """Jobs and agents as they stood at TIME (ISO 8601; naive means local) or --seq N."""
    from shared.forensics import timetravel

    if (time is None) == (seq is None):
        _die("give a TIME or --seq N (one of them)")
    when = _parse_time(time) if time is not None else None
    detail: list[UUID] = []
    url = resolve_url(nats_url, data_dir)
    world = _read(
        url,
        "warden-at",
        lambda js: timetravel.state_at(js, seq=seq, time=when, detail=detail),
        jobs=jobs,
        resolved=detail,
    )
    if as_json:
        _print(world)
        return
    click.echo(timetravel.render(world))
    for job in world.detail:
        click.echo(msgspec.json.format(msgspec.json.encode(job), indent=2).decode())


@click.command("backtest")
@click.option(
    "--invariant",
    "spec",
    required=True,
    help="module:callable, or the name of an invariant in the registry.",
)
@click.option("--job", default=None, help="Only this job's proposals.")
@click.option("--since", default=None, help="Only proposals submitted at or after this ISO time.")
@click.option("--all", "all_results", is_flag=True, help="List every proposal, not only disagreements.")
@nats_option
@data_dir_option
@json_option
def backtest_command(
    spec: str,
    job: str | None,
    since: str | None,
    all_results: bool,
    nats_url: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """Run an invariant over every past proposal; compare with what was recorded then."""
    from shared.forensics import backtest as backtests

    try:
        named = backtests.load(spec)
    except backtests.BacktestError as exc:
        _die(str(exc))
    start = _parse_time(since) if since else None
    url = resolve_url(nats_url, data_dir)
    chosen: list[UUID] = []

    async def work(js: JetStreamContext) -> backtests.BacktestReport:
        cases = await backtests.past_cases(js, job=chosen[0] if chosen else None, since=start)
        return await backtests.run(named, cases)

    try:
        report = _read(url, "warden-backtest", work, jobs=[job] if job else [], resolved=chosen)
    except backtests.BacktestError as exc:  # its invariant or window was badly named
        _die(str(exc))
    if as_json:
        _print(report)
    else:
        click.echo(backtests.render(report, all_results=all_results))


@click.command("dossier")
@click.argument("job")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (default: standard output).",
)
@nats_option
@data_dir_option
def dossier_command(job: str, out: Path | None, nats_url: str | None, data_dir: Path) -> None:
    """Everything about JOB in one JSON bundle, to attach to an incident."""
    from shared.forensics import dossier as dossiers

    url = resolve_url(nats_url, data_dir)
    bundle = _read_job(url, "warden-dossier", job, dossiers.dossier)
    data = dossiers.encode(bundle)
    if out is not None:
        out.write_bytes(data + b"\n")
        click.echo(f"dossier of {bundle.job_id} written to {out} ({len(data)} bytes)", err=True)
    else:
        click.echo(data.decode())
