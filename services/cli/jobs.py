"""`warden submit`, `warden requeue`, `warden cancel`: a client service's and an operator's view."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import click
import msgspec
import yaml
from nats.aio.client import Client
from nats.js import api as js_api

from services.cli.finding import complete_job_ids
from services.cli.options import Exit, data_dir_option, json_option, nats_option, resolve_url
from shared import bus, topology
from shared.aggregates import TERMINAL, Job, evolve_job
from shared.contract import Contract
from shared.events import AnyEvent, tag_of
from shared.forensics import ids, sentences
from shared.messages import Accepted, JobRequest, OperatorCommand, Rejected
from shared.persistence import written
from shared.validation import InvalidInput, names_missing
from shared.validation import decode as decode_checked


def load_contract(path: Path | None, overrides: dict[str, Any]) -> Contract:
    """A contract from a YAML/JSON file, with flags layered on top; every bad field is named."""
    base: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"cannot read contract {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise click.BadParameter(f"contract {path} must be a mapping")
        base = loaded
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = base
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return decode_checked(json.dumps(base, default=str).encode(), Contract)
    except InvalidInput as exc:
        raise click.BadParameter("; ".join(f"{e.path}: {e.message}" for e in exc.errors)) from exc


def describe(event: AnyEvent) -> str:
    """A followed event: its time, version and type, then the one sentence explain prints."""
    when = f"{event.timestamp:%H:%M:%S.%f}"[:-3]
    return f"{when} v{event.originator_version} {tag_of(event)}: {sentences.describe(event)}"


async def follow_job(nc: Client, job_id: UUID, *, quiet: bool, timeout: float | None) -> Job | None:
    """Print a job's events as they are appended until it is terminal (or the wait runs out)."""
    js = nc.jetstream()
    done = anyio.Event()
    state: list[Job | None] = [None]

    async def cb(msg: Any) -> None:
        found = written.events_of(msg.subject, msg.headers, msg.data)
        if isinstance(found, str):
            seq = msg.metadata.sequence.stream
            click.echo(f"FINDING: stepped over message {seq}, not written by Warden: {found}", err=True)
            return
        for event in found:
            state[0] = evolve_job(state[0], event)
            if not quiet:
                click.echo(describe(event))
        if state[0] is not None and state[0].status in TERMINAL:
            done.set()

    sub = await js.subscribe(
        topology.event_subject(job_id),
        ordered_consumer=True,
        cb=cb,
        deliver_policy=js_api.DeliverPolicy.ALL,
    )
    try:
        with anyio.move_on_after(timeout):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return state[0]


@click.command()
@click.option("--kind", required=True, help="What kind of job (agents claim by kind).")
@click.option("--key", "idempotency_key", default=None, help="Idempotency key (default: random).")
@click.option(
    "--contract",
    "contract_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Execution contract as YAML or JSON.",
)
@click.option("--path", "paths", multiple=True, help="Scope: a path glob the change may touch.")
@click.option("--effect", "effects", multiple=True, help="Scope: an allowed effect kind.")
@click.option("--input", "inputs", multiple=True, metavar="KEY=VALUE", help="A job input.")
@click.option("--level", type=int, default=None, help="Autonomy level the job requires.")
@click.option("--max-attempts", type=int, default=None, help="Attempts before the job is tombstoned.")
@click.option("--ttl", "lease_ttl_s", type=float, default=None, help="Lease TTL in seconds.")
@click.option("--heartbeat", "heartbeat_interval_s", type=float, default=None, help="Heartbeat interval (s).")
@click.option("--deadline", type=click.DateTime(), default=None, help="Deadline (UTC unless offset given).")
@click.option("--repo", default=None, help="Target git repository for git.patch effects.")
@click.option("--branch", default=None, help="Target branch.")
@click.option("--submitter", default="cli", show_default=True, help="Who submits (recorded on the job).")
@click.option("--wait", is_flag=True, help="Follow the job to its end; exit 1 unless it completes.")
@click.option(
    "--wait-timeout",
    type=float,
    default=None,
    help="With --wait: stop following after this many seconds (exit 1).",
)
@nats_option
@data_dir_option
@json_option
def submit(
    kind: str,
    idempotency_key: str | None,
    contract_path: Path | None,
    paths: tuple[str, ...],
    effects: tuple[str, ...],
    inputs: tuple[str, ...],
    level: int | None,
    max_attempts: int | None,
    lease_ttl_s: float | None,
    heartbeat_interval_s: float | None,
    deadline: datetime | None,
    repo: str | None,
    branch: str | None,
    submitter: str,
    wait: bool,
    wait_timeout: float | None,
    nats_url: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """Submit a job request, as any client service would on the request subject."""
    parsed_inputs: dict[str, str] = {}
    for item in inputs:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"--input {item!r} must be KEY=VALUE")
        parsed_inputs[key] = value
    if deadline is not None and deadline.tzinfo is None:
        deadline = deadline.astimezone()
    contract = load_contract(
        contract_path,
        {
            "scope.paths": list(paths) or None,
            "scope.effects": list(effects) or None,
            "inputs": parsed_inputs or None,
            "required_level": level,
            "stopping.max_attempts": max_attempts,
            "stopping.lease_ttl_s": lease_ttl_s,
            "stopping.heartbeat_interval_s": heartbeat_interval_s,
            "stopping.deadline": deadline.isoformat() if deadline else None,
            "target.repo": repo,
            "target.branch": branch,
        },
    )
    request = JobRequest(
        idempotency_key=idempotency_key or str(uuid.uuid4()),
        kind=kind,
        contract=contract,
        submitter=submitter,
    )
    url = resolve_url(nats_url, data_dir)

    async def go() -> int:
        nc = await bus.connect(url, "warden-submit")
        try:
            reply = await bus.request(nc, topology.REQUEST_SUBJECT, request)
            if isinstance(reply, Rejected):
                if as_json:
                    click.echo(msgspec.json.encode(reply).decode())
                else:
                    click.echo(f"rejected ({len(reply.errors)} problem(s)):", err=True)
                    for err in reply.errors:
                        click.echo(f"  {err.path}: {err.message}", err=True)
                    if reply.job_id is not None:
                        click.echo(f"  the key names job {reply.job_id}", err=True)
                return Exit.FAILED
            assert isinstance(reply, Accepted) and reply.job_id is not None
            if as_json and not wait:
                click.echo(msgspec.json.encode(reply).decode())
            elif not as_json:
                click.echo(f"job {reply.job_id}" + (" (already submitted)" if reply.duplicate else ""))
            if not wait:
                return 0
            job = await follow_job(nc, reply.job_id, quiet=as_json, timeout=wait_timeout)
            if as_json:
                click.echo(msgspec.json.encode(job).decode())
            elif job is None or job.status not in TERMINAL:
                click.echo(f"still {job.status if job else 'unknown'} after {wait_timeout}s", err=True)
            else:
                click.echo(f"job {job.id} {job.status}" + (f": {job.reason}" if job.reason else ""))
            return 0 if job is not None and job.status == "completed" else 1
        finally:
            await nc.close()

    sys.exit(anyio.run(go))


OPERATOR_HELP = {
    "requeue": "Give a dead (tombstoned or cancelled) job fresh attempts.",
    "cancel": "Cancel a job; a live lease is revoked and its agent learns on its next heartbeat.",
    "revoke": "Revoke an agent: no more leases, its live leases end, policy rollback applies.",
    "suspend": "Suspend an agent: no new leases until reinstated (live leases run on).",
    "reinstate": "Reinstate a revoked or suspended agent.",
    "promote": "Raise an agent's autonomy level (one level, or --level).",
    "demote": "Lower an agent's autonomy level (one level, or --level).",
    "rollback": "Roll back the applied effect of a proposal with its compensating effect.",
    "approve": "Approve a proposal whose contract requires a person's approval.",
    "deny": "Deny a proposal whose contract requires a person's approval.",
}


def level_option(verb: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--level, only on the commands that set one."""
    if verb not in ("promote", "demote"):
        return lambda f: f
    return click.option("--level", type=int, default=None, help=f"The new level (default: one step; {verb}).")


def operator_command(verb: str, *, needs: str) -> click.Command:
    @click.command(
        verb,
        help=f"Operator: {OPERATOR_HELP.get(verb, verb)} TARGET is the {needs}"
        f"{' name' if needs == 'agent' else ' id'}. Recorded as an event naming who and why. "
        "Exit 1 when refused, 3 when TARGET is not in the record.",
    )
    @click.argument("target", shell_complete=complete_job_ids if needs == "job" else None)
    @click.option("--reason", required=True, help="Why (recorded).")
    @click.option(
        "--operator",
        default=lambda: __import__("getpass").getuser(),
        show_default="$USER",
        help="Who is acting (recorded with the command).",
    )
    @level_option(verb)
    @nats_option
    @data_dir_option
    @json_option
    def command(
        target: str,
        reason: str,
        operator: str,
        nats_url: str | None,
        data_dir: Path,
        as_json: bool,
        level: int | None = None,
    ) -> None:
        fields: dict[str, Any] = {"operator": operator, "reason": reason, "level": level}
        if needs == "agent":
            fields["agent"] = target
        url = resolve_url(nats_url, data_dir)

        async def go() -> int:
            nc = await bus.connect(url, "warden-operator")
            try:
                # A full id or a unique prefix (8+ characters), resolved from the log
                # (ids.BadId exits 2, ids.IdNotFound 3: the CLI group reports them).
                if needs == "job":
                    fields["job_id"] = await ids.resolve_job(nc, target)
                elif needs == "proposal":
                    # Its job too: the service loads that job from the store, where a job
                    # that ended long ago still is (its views keep only recent ones).
                    found = await ids.resolve_proposal(nc, target)
                    fields["proposal_id"], fields["job_id"] = found.proposal_id, found.job_id
                reply = await bus.request(nc, topology.operator_subject(verb), OperatorCommand(**fields))
            finally:
                await nc.close()
            if as_json:
                click.echo(msgspec.json.encode(reply).decode())
            elif isinstance(reply, Rejected):
                for err in reply.errors:
                    click.echo(f"refused: {err.path}: {err.message}", err=True)
            else:
                click.echo(f"{verb}: {getattr(reply, 'detail', '') or 'recorded'}")
            if isinstance(reply, Rejected):
                return Exit.NOT_FOUND if names_missing(reply.errors) else Exit.FAILED
            return Exit.OK

        sys.exit(anyio.run(go))

    return command


requeue = operator_command("requeue", needs="job")
cancel = operator_command("cancel", needs="job")
revoke = operator_command("revoke", needs="agent")
suspend = operator_command("suspend", needs="agent")
reinstate = operator_command("reinstate", needs="agent")
promote = operator_command("promote", needs="agent")
demote = operator_command("demote", needs="agent")
rollback = operator_command("rollback", needs="proposal")
approve = operator_command("approve", needs="proposal")
deny = operator_command("deny", needs="proposal")
