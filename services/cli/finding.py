"""`warden jobs`, `warden agents`, `warden status`, `warden logs`: finding things.

Lists read the read model (the projection database the projector keeps: projections.sqlite in
--data-dir, or --projections URL), the same rows the HTTP API serves. `status` asks the live
deployment (service pings, consumer backlogs) and the read model; `logs` reads the log alone.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import click
import msgspec
from click.shell_completion import CompletionItem
from nats.js.errors import NotFoundError

from services import registry
from services.cli.options import Exit, data_dir_option, json_option, nats_option, resolve_url
from shared import bus, liveness, topology
from shared.aggregates import JobStatus
from shared.forensics import ids, log
from shared.forensics import output as outputs
from shared.readmodel import queries
from shared.readmodel.store import (
    URL_ENV,
    ReadModel,
    ReadModelMissing,
    configured_url,
    open_read_model,
    redacted,
    sqlite_path,
)
from shared.readmodel.tables import AGENTS, JOBS, ts

JOB_STATES: tuple[str, ...] = JobStatus.__args__  # type: ignore[attr-defined]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def projections_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--projections",
        envvar=URL_ENV,
        default=None,
        help=f"The read model to read (or {URL_ENV}; default: projections.sqlite in --data-dir).",
    )(f)


def page_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--page", type=click.IntRange(min=1), default=1, show_default=True, help="Which page.")(
        f
    )
    return click.option(
        "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Rows per page."
    )(f)


@contextmanager
def read_model(projections: str | None, data_dir: Path) -> Iterator[ReadModel]:
    """The read model, opened only if it exists: reading never creates an empty one."""
    url = configured_url(projections, data_dir)
    path = sqlite_path(url)
    if path is not None and path != ":memory:" and not Path(path).is_file():
        raise ReadModelMissing(
            f"no read model at {path}: run `warden up` (its projector builds it) with this "
            "--data-dir, or pass --projections"
        )
    store = open_read_model(url)
    try:
        yield store
    finally:
        store.close()


def parse_since(text: str) -> str:
    """`--since`: a duration back from now (30s, 15m, 2h, 7d) or a time (ISO 8601, UTC unless an
    offset is given), as the read model stores timestamps."""
    if match := _DURATION.match(text.strip()):
        amount, unit = float(match.group(1)), _UNITS[match.group(2)]
        return ts(datetime.now(UTC) - timedelta(**{unit: amount}))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use a duration (30s, 15m, 2h, 7d) or an ISO time") from None
    return ts(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Plain text columns (what a terminal, a pager and grep all read)."""
    cells = [[header for _key, header in columns]]
    cells += [["" if row.get(key) is None else str(row.get(key)) for key, _header in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def print_page(
    result: queries.Page, columns: Sequence[tuple[str, str]], page: int, as_json: bool, what: str
) -> None:
    if as_json:
        body = {"items": result.items, "total": result.total, "limit": result.limit, "offset": result.offset}
        click.echo(json.dumps(body, indent=2, default=str))
        return
    if not result.items:
        click.echo(f"no {what}" + (f" on page {page} (there are {result.total})" if result.total else ""))
        return
    click.echo(table(result.items, columns))
    shown_to = result.offset + len(result.items)
    if result.total > shown_to or page > 1:
        more = f"; --page {page + 1} for more" if result.total > shown_to else ""
        click.echo(f"{what} {result.offset + 1}-{shown_to} of {result.total}{more}", err=True)


def complete_job_ids(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Job ids from the read model for shell completion; nothing (never an error) without one."""
    try:
        data_dir = Path(ctx.params.get("data_dir") or ".warden")
        with read_model(ctx.params.get("projections"), data_dir) as store:
            return [CompletionItem(i) for i in queries.job_ids_starting(store, incomplete)]
    except Exception:
        return []


JOB_COLUMNS = (
    ("job_id", "JOB"),
    ("kind", "KIND"),
    ("state", "STATE"),
    ("agent", "AGENT"),
    ("attempts", "ATTEMPTS"),
    ("created_at", "CREATED"),
    ("reason", "REASON"),
)


@click.command("jobs")
@click.option("--state", type=click.Choice(JOB_STATES), default=None, help="Only jobs in this state.")
@click.option("--agent", default=None, help="Only jobs whose latest lease is this agent's.")
@click.option("--kind", default=None, help="Only jobs of this kind.")
@click.option(
    "--since", default=None, help="Only jobs created since: a duration (15m, 2h, 7d) or an ISO time."
)
@page_options
@projections_option
@data_dir_option
@json_option
def jobs_command(
    state: str | None,
    agent: str | None,
    kind: str | None,
    since: str | None,
    limit: int,
    page: int,
    projections: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """List jobs, newest first, from the read model."""
    after = ("created_at", parse_since(since)) if since else None
    with read_model(projections, data_dir) as store:
        filters = {"state": state, "agent": agent, "kind": kind}
        result = queries.page(store, JOBS, filters, limit, (page - 1) * limit, since=after)
    print_page(result, JOB_COLUMNS, page, as_json, "jobs")


AGENT_COLUMNS = (
    ("name", "AGENT"),
    ("level", "LEVEL"),
    ("standing", "STANDING"),
    ("leases", "LEASES"),
    ("completed", "COMPLETED"),
    ("expired", "EXPIRED"),
    ("revoked", "REVOKED"),
    ("rejected", "REJECTED"),
    ("updated_at", "UPDATED"),
)


@click.command("agents")
@click.option("--level", type=int, default=None, help="Only agents at this autonomy level.")
@click.option(
    "--standing",
    type=click.Choice(["active", "suspended", "revoked"]),
    default=None,
    help="Only agents standing so.",
)
@page_options
@projections_option
@data_dir_option
@json_option
def agents_command(
    level: int | None,
    standing: str | None,
    limit: int,
    page: int,
    projections: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """List agents with their level, standing and what their leases came to."""
    with read_model(projections, data_dir) as store:
        result = queries.page(
            store, AGENTS, {"level": level, "standing": standing}, limit, (page - 1) * limit
        )
    print_page(result, AGENT_COLUMNS, page, as_json, "agents")


@dataclass
class ConsumerState:
    durable: str
    stream: str  # a durable spanning both input streams has one state per stream
    pending: int  # stored, not yet delivered: the backlog
    in_hand: int  # delivered, not yet acknowledged
    last_active: str | None


@click.command("status")
@projections_option
@nats_option
@data_dir_option
@json_option
def status_command(projections: str | None, nats_url: str | None, data_dir: Path, as_json: bool) -> None:
    """The deployment at a glance: server, each service alive, backlog per consumer, the read
    model's lag, live leases and the oldest queued job. Exit 1 when a service does not answer."""
    url = resolve_url(nats_url, data_dir)

    async def live() -> dict[str, Any]:
        nc = await bus.connect(url, "warden-status")
        try:
            js = nc.jetstream()
            answers: dict[str, dict[str, Any] | None] = {}

            async def ping(name: str) -> None:
                answers[name] = await liveness.ping(nc, name, timeout=2.0)

            async with anyio.create_task_group() as tg:
                for name in sorted(registry.SERVICES):
                    tg.start_soon(ping, name)
            consumers = []
            for spec in topology.CONSUMERS:
                for stream in topology.consumer_streams(spec):
                    try:
                        info = await js.consumer_info(stream, spec.durable)
                    except NotFoundError:
                        continue
                    last = info.delivered.last_active if info.delivered else None
                    consumers.append(
                        ConsumerState(
                            durable=spec.durable,
                            stream=stream,
                            pending=int(info.num_pending or 0),
                            in_hand=int(info.num_ack_pending or 0),
                            last_active=str(last) if last else None,
                        )
                    )
            try:
                last_event = int((await js.get_last_msg(topology.EVENT_STREAM, log.EVENT_SUBJECTS)).seq or 0)
            except NotFoundError:
                last_event = 0
            version = nc.connected_server_version
            return {
                "server": {"url": url, "version": f"{version.major}.{version.minor}.{version.patch}"},
                "services": {
                    name: ({"alive": True, **answer.get("metadata", {})} if answer else {"alive": False})
                    for name, answer in sorted(answers.items())
                },
                "consumers": [c.__dict__ for c in consumers],
                "stream_last_event": last_event,
            }
        finally:
            await nc.close()

    report = anyio.run(live)
    try:
        with read_model(projections, data_dir) as store:
            report["read_model"] = {"store": redacted(store.url), **queries.operations(store)}
            report["read_model"]["behind"] = max(
                0, report["stream_last_event"] - report["read_model"]["position"]
            )
    except ReadModelMissing as exc:
        report["read_model"] = {"error": str(exc)}
    down = [name for name, s in report["services"].items() if not s["alive"]]
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(render_status(report))
    sys.exit(Exit.FAILED if down else Exit.OK)


def render_status(report: dict[str, Any]) -> str:
    server = report["server"]
    lines = [f"server    {server['url']} (nats-server {server['version']}): reachable"]
    for name, service in report["services"].items():
        where = f"pid {service.get('pid')} on {service.get('host')}" if service["alive"] else "NO ANSWER"
        lines.append(f"service   {name:<11} {'alive' if service['alive'] else 'down '}  {where}")
    for c in report["consumers"]:
        lines.append(
            f"consumer  {c['durable']:<11} {c['stream']:<18} backlog {c['pending']}, in hand {c['in_hand']}, "
            f"last active {c['last_active'] or 'never'}"
        )
    model = report["read_model"]
    if "error" in model:
        lines.append(f"read model {model['error']}")
        return "\n".join(lines)
    lines.append(
        f"read model {model['store']}: position {model['position']}, {model['behind']} events behind"
    )
    expiry = f", next expiry {model['next_lease_expiry']}" if model["next_lease_expiry"] else ""
    lines.append(f"leases    {model['live_leases']} live{expiry}")
    oldest = model["oldest_queued"]
    queued = f"{model['queued_jobs']} queued"
    if oldest:
        queued += f"; oldest {oldest['job_id']} ({oldest['kind']}) since {oldest['created_at']}"
    lines.append(f"jobs      {queued}")
    return "\n".join(lines)


@click.command("logs")
@click.argument("job", shell_complete=complete_job_ids)
@nats_option
@data_dir_option
@json_option
def logs_command(job: str, nats_url: str | None, data_dir: Path, as_json: bool) -> None:
    """What each attempt of JOB printed (the output tails `warden agent exec` records on its
    proposals), with how each attempt ended. JOB: an id or a unique prefix (8+ characters)."""
    url = resolve_url(nats_url, data_dir)

    async def go() -> outputs.JobOutput:
        nc = await bus.connect(url, "warden-logs")
        try:
            js = nc.jetstream()
            await log.check_streams(js)
            return await outputs.job_output(js, await ids.resolve_job(nc, job))
        finally:
            await nc.close()

    found = anyio.run(go)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
    else:
        click.echo(outputs.render(found))
