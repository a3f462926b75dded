"""`warden`: run the services, submit jobs, govern agents, and inspect the record."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from enum import IntEnum
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
from anyio.abc import TaskStatus

from services import registry
from services.api import BadAddress, ListenError
from services.api.auth import BadAuthSetting
from services.cli.readside_options import api_token_note, read_side_options
from shared import bus, datadir, runtime
from shared.bus import NoServerNamed
from shared.credentials import CredentialsError
from shared.forensics import ids
from shared.forensics.explain import JobNotFound
from shared.forensics.log import LogUnavailable
from shared.invariants import InvariantConfigError
from shared.policy import PolicyError
from shared.readmodel.store import ReadModelMissing, StoreURLError
from shared.server import ServerError
from shared.telemetry import TelemetryError
from shared.tokens import BadTokenName, TokenStoreError
from shared.topology import BadAgentName, TopologyError

T = TypeVar("T")

STATE_FILE = datadir.STATE_FILE
DEFAULT_TIMEOUT_S = 5.0


class Exit(IntEnum):
    """Every command's exit codes (README, "Exit codes")."""

    OK = 0
    FAILED = 1  # a check failed, a request was refused, or the command could not do its work
    USAGE = 2  # bad options, arguments or settings
    NOT_FOUND = 3  # the job, agent or proposal named is not in the record
    UNREACHABLE = 4  # no server named, or the one named does not answer


# Warden's own error types, each a user error reported as one line with its exit code
# (a traceback only with -v). Anything else is a bug and keeps its traceback.
KNOWN_ERRORS: tuple[tuple[type[BaseException], Exit], ...] = (
    (ids.BadId, Exit.USAGE),
    (ids.IdNotFound, Exit.NOT_FOUND),
    (JobNotFound, Exit.NOT_FOUND),
    (bus.Unreachable, Exit.UNREACHABLE),
    (NoServerNamed, Exit.UNREACHABLE),
    (datadir.StaleState, Exit.UNREACHABLE),
    (ReadModelMissing, Exit.UNREACHABLE),
    (bus.ReplyTimeout, Exit.UNREACHABLE),
    (bus.NotStored, Exit.UNREACHABLE),
    (bus.BadServerURL, Exit.USAGE),
    (BadAgentName, Exit.USAGE),
    (BadAddress, Exit.USAGE),
    (BadAuthSetting, Exit.USAGE),
    (BadTokenName, Exit.USAGE),
    (StoreURLError, Exit.USAGE),
    (TelemetryError, Exit.USAGE),
    (PolicyError, Exit.USAGE),
    (InvariantConfigError, Exit.USAGE),
    (datadir.DirInUse, Exit.FAILED),
    (ListenError, Exit.FAILED),
    (ServerError, Exit.FAILED),
    (TopologyError, Exit.FAILED),
    (LogUnavailable, Exit.FAILED),
    (CredentialsError, Exit.FAILED),
    (TokenStoreError, Exit.FAILED),
    (bus.PermissionDenied, Exit.FAILED),
)


def known_error(exc: BaseException) -> tuple[BaseException, Exit] | None:
    """The first of Warden's known errors in `exc`, looking inside task groups' exception groups."""
    for kind, code in KNOWN_ERRORS:
        if isinstance(exc, kind):
            return exc, code
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if found := known_error(inner):
                return found
    return None


class WardenGroup(click.Group):
    """The `warden` group: one place turns Warden's known errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException, SystemExit):
            raise
        except BaseException as exc:
            found = known_error(exc)
            if found is None:
                raise
            error, code = found
            if ctx.params.get("verbose"):
                traceback.print_exception(exc)
            click.echo(f"error: {error}", err=True)
            ctx.exit(int(code))


def data_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="WARDEN_DATA_DIR",
        default=".warden",
        show_default=".warden (or WARDEN_DATA_DIR)",
        help="Where the embedded server keeps its store and `warden up` says where it listens.",
    )(f)


def _nats_url_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--nats", "nats_url", envvar="WARDEN_NATS_URL", default=None, help=help_text)


service_nats_option = _nats_url_option(
    "NATS server URL (or WARDEN_NATS_URL). Without it, the command starts an embedded server "
    "in --data-dir, or joins the one a running `warden up` started there."
)


@contextlib.contextmanager
def connect_bound(seconds: float) -> Iterator[None]:
    """Client connections made inside give up after `seconds` (bus.Unreachable, exit 4)."""
    token = bus.CONNECT_BOUND.set(seconds)
    try:
        yield
    finally:
        bus.CONNECT_BOUND.reset(token)


def nats_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--nats` and `--timeout` for client commands: which server, and how long to try reaching it."""

    @_nats_url_option(
        "NATS server URL (or WARDEN_NATS_URL). Without it: the server `warden up` runs in --data-dir."
    )
    @click.option(
        "--timeout",
        "connect_timeout",
        envvar="WARDEN_TIMEOUT",
        type=click.FloatRange(min=0.1),
        default=DEFAULT_TIMEOUT_S,
        show_default=True,
        help="Seconds to try reaching the server before giving up with exit 4 (or WARDEN_TIMEOUT).",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, connect_timeout: float, **kwargs: Any) -> Any:
        with connect_bound(connect_timeout):
            return f(*args, **kwargs)

    return wrapper


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def resolve_url(nats_url: str | None, data_dir: Path) -> str:
    """The server a client command talks to: named explicitly, or the one `warden up` runs here.

    Never a guess: no default port, no system server.
    """
    if nats_url:
        return nats_url
    state = datadir.read_state(data_dir)
    if state is not None:
        return state.url
    raise NoServerNamed(
        "no NATS server named: pass --nats URL, set WARDEN_NATS_URL, or run `warden up` "
        f"(data dir {data_dir})"
    )


def fail(message: str, code: int = Exit.USAGE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(int(code))


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


@click.group(cls=WardenGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_version("warden"), "-V", "--version", prog_name="warden")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug); tracebacks on errors.")
def cli(verbose: int) -> None:
    """Warden: an event-sourced orchestrator that governs AI agents on NATS JetStream.

    Agents propose; the system decides. Every request, lease, heartbeat, proposal, verdict,
    effect and revocation is an event on a JetStream stream.

    Exit codes: 0 ok, 1 failed (a check failed, a request was refused), 2 usage,
    3 not found, 4 server unreachable.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


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


replicas_option = click.option(
    "--replicas",
    envvar="WARDEN_REPLICAS",
    default=1,
    show_default=True,
    help="Stream replicas: 3 on a three-node cluster (or WARDEN_REPLICAS).",
)


@cli.command()
@service_nats_option
@data_dir_option
@replicas_option
@read_side_options
def up(nats_url: str | None, data_dir: Path, replicas: int) -> None:
    """Run every service in one process (with an embedded server unless --nats is given).

    State persists in --data-dir, so the next `warden up` finds it; one `warden up` owns a data
    dir at a time (warden.lock names its pid). Ctrl-C drains and exits 0.
    """
    _serve(None, nats_url, data_dir, replicas, join=False)


@cli.command("run")
@click.argument("service", type=click.Choice(sorted(registry.SERVICES)))
@service_nats_option
@data_dir_option
@replicas_option
@read_side_options
def run_service(service: str, nats_url: str | None, data_dir: Path, replicas: int) -> None:
    """Run one service (replicas of a service are safe to run side by side).

    Against a data dir a running `warden up` owns, it runs on that process's server.
    """
    _serve([service], nats_url, data_dir, replicas, join=True)


def main() -> None:
    from services.cli import (  # noqa: F401 - registers their commands
        agent,
        authority,
        bench,
        creds,
        demo,
        doctor,
        finding,
        forensics,
        jobs,
        replay,
        schemas,
    )

    cli(prog_name="warden", standalone_mode=True)  # also names the completion variable: _WARDEN_COMPLETE
