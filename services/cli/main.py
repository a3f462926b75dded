"""`warden`: run the services, submit jobs, govern agents, and inspect the record.

Start-up is kept cheap because every command pays it: a command's module (and what it imports)
is loaded only when that command runs, and this module imports only click and the standard
library. `warden --help` lists the commands from the table below without loading any of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import traceback
from collections.abc import Callable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import click
from click.shell_completion import CompletionItem

from shared import datadir

STATE_FILE = datadir.STATE_FILE
DEFAULT_TIMEOUT_S = 5.0


class Exit(IntEnum):
    """Every command's exit codes (README, "Exit codes")."""

    OK = 0
    FAILED = 1  # a check failed, a request was refused, or the command could not do its work
    USAGE = 2  # bad options, arguments or settings
    NOT_FOUND = 3  # the job, agent or proposal named is not in the record
    UNREACHABLE = 4  # no server named, or the one named does not answer


class KnownError(NamedTuple):
    module: str  # the module that defines the class (its __module__)
    name: str
    code: Exit


# Warden's own error types, each a user error reported as one line with its exit code
# (a traceback only with -v). Anything else is a bug and keeps its traceback. Named rather than
# imported: an instance of a class can only exist once its defining module has run, so a module
# not yet imported cannot have raised, and checking costs no imports.
KNOWN_ERRORS: tuple[KnownError, ...] = (
    KnownError("shared.forensics.ids", "BadId", Exit.USAGE),
    KnownError("shared.forensics.ids", "IdNotFound", Exit.NOT_FOUND),
    KnownError("shared.forensics.collect", "JobNotFound", Exit.NOT_FOUND),
    KnownError("shared.bus", "Unreachable", Exit.UNREACHABLE),
    KnownError("shared.bus", "NoServerNamed", Exit.UNREACHABLE),
    KnownError("shared.datadir", "StaleState", Exit.UNREACHABLE),
    KnownError("shared.readmodel.store", "ReadModelMissing", Exit.UNREACHABLE),
    KnownError("shared.bus", "ReplyTimeout", Exit.UNREACHABLE),
    KnownError("shared.bus", "NotStored", Exit.UNREACHABLE),
    KnownError("shared.bus", "InputRefused", Exit.FAILED),
    KnownError("shared.bus", "BadServerURL", Exit.USAGE),
    KnownError("shared.topology", "BadAgentName", Exit.USAGE),
    KnownError("services.api", "BadAddress", Exit.USAGE),
    KnownError("services.api.auth", "BadAuthSetting", Exit.USAGE),
    KnownError("shared.tokens", "BadTokenName", Exit.USAGE),
    KnownError("shared.readmodel.store", "StoreURLError", Exit.USAGE),
    KnownError("shared.telemetry", "TelemetryError", Exit.USAGE),
    KnownError("shared.policy", "PolicyError", Exit.USAGE),
    KnownError("shared.invariants", "InvariantConfigError", Exit.USAGE),
    KnownError("shared.datadir", "DirInUse", Exit.FAILED),
    KnownError("services.api", "ListenError", Exit.FAILED),
    KnownError("shared.server", "ServerError", Exit.FAILED),
    KnownError("shared.topology", "TopologyError", Exit.FAILED),
    KnownError("shared.forensics.log", "LogUnavailable", Exit.FAILED),
    KnownError("shared.credentials", "CredentialsError", Exit.FAILED),
    KnownError("shared.tokens", "TokenStoreError", Exit.FAILED),
    KnownError("shared.bus", "PermissionDenied", Exit.FAILED),
)


def known_error(exc: BaseException) -> tuple[BaseException, Exit] | None:
    """The first of Warden's known errors in `exc`, looking inside task groups' exception groups."""
    for known in KNOWN_ERRORS:
        module = sys.modules.get(known.module)
        if module is not None and isinstance(exc, getattr(module, known.name)):
            return exc, known.code
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if found := known_error(inner):
                return found
    return None


class Listed(NamedTuple):
    module: str  # in services.cli; importing it registers the command on `cli`
    summary: str  # the first sentence of the command's help, what `warden --help` shows


# Every subcommand. A test checks this against the commands the modules register, summaries
# included, so a command cannot go missing from --help or completion.
COMMANDS: dict[str, Listed] = {
    "agent": Listed("agent", "Run an agent under Warden's governance."),
    "agents": Listed("finding", "List agents with their level, standing and what their leases came to."),
    "approve": Listed("jobs", "Operator: Approve a proposal whose contract requires a person's approval."),
    "at": Listed(
        "forensics", "Jobs and agents as they stood at TIME (ISO 8601; naive means local) or --seq N."
    ),
    "backtest": Listed(
        "forensics", "Run an invariant over every past proposal; compare with what was recorded then."
    ),
    "bench": Listed("bench", "Measure Warden against raw JetStream on the same server, in one run."),
    "cancel": Listed(
        "jobs", "Operator: Cancel a job; a live lease is revoked and its agent learns on its next heartbeat."
    ),
    "chaos": Listed(
        "chaos",
        "Kill services, agents and the broker on a seeded schedule; check that no guarantee bent.",
    ),
    "creds": Listed("creds", "Per-agent NATS credentials: each agent gets its own user and password."),
    "demo": Listed(
        "demo", "Run a fleet of agents, some failing by design, through Warden against a real git repo."
    ),
    "demote": Listed("jobs", "Operator: Lower an agent's autonomy level (one level, or --level)."),
    "deny": Listed("jobs", "Operator: Deny a proposal whose contract requires a person's approval."),
    "doctor": Listed(
        "doctor",
        "Check a running deployment: server versions, JetStream and `sync_interval: always`, stream "
        "settings (replicas, deny delete/purge, duplicate window), consumers' ack wait and max ack "
        "pending, and that every service answers.",
    ),
    "dossier": Listed("forensics", "Everything about JOB in one JSON bundle, to attach to an incident."),
    "explain": Listed("forensics", "How JOB went, request to outcome, with the cause when it failed."),
    "jobs": Listed("finding", "List jobs, newest first, from the read model."),
    "ledger": Listed("forensics", "The phase ledger: every aggregate's events form a hash chain."),
    "logs": Listed(
        "finding",
        "What each attempt of JOB printed (the output tails `warden agent exec` records on its "
        "proposals), with how each attempt ended.",
    ),
    "promote": Listed("jobs", "Operator: Raise an agent's autonomy level (one level, or --level)."),
    "reinstate": Listed("jobs", "Operator: Reinstate a revoked or suspended agent."),
    "replay": Listed("replay", "Rebuild the read model from the streams and compare it with the live one."),
    "requeue": Listed("jobs", "Operator: Give a dead (tombstoned or cancelled) job fresh attempts."),
    "revocations": Listed(
        "authority",
        "List revocations with their latency: failure signal → revocation event, and how long after "
        "the signal the agent could still get a message accepted.",
    ),
    "revoke": Listed(
        "jobs", "Operator: Revoke an agent: no more leases, its live leases end, policy rollback applies."
    ),
    "rollback": Listed(
        "jobs", "Operator: Roll back the applied effect of a proposal with its compensating effect."
    ),
    "run": Listed("serve", "Run one service (replicas of a service are safe to run side by side)."),
    "schemas": Listed("schemas", "JSON Schema generated from the message Structs."),
    "status": Listed(
        "finding",
        "The deployment at a glance: server, each service alive, backlog per consumer, the read "
        "model's lag, live leases and the oldest queued job.",
    ),
    "submit": Listed("jobs", "Submit a job request, as any client service would on the request subject."),
    "suspend": Listed(
        "jobs", "Operator: Suspend an agent: no new leases until reinstated (live leases run on)."
    ),
    "up": Listed(
        "serve", "Run every service in one process (with an embedded server unless --nats is given)."
    ),
}


class WardenGroup(click.Group):
    """The `warden` group: loads a command's module when it is first named, and turns Warden's
    known errors into one line and an exit code in one place."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS.keys() | self.commands.keys())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        listed = COMMANDS.get(cmd_name)
        if cmd_name not in self.commands and listed is not None:
            importlib.import_module(f"services.cli.{listed.module}")  # registers it on `cli`
        return self.commands.get(cmd_name)

    def _listing(self, name: str) -> click.Command:
        """The command if loaded, else a stand-in carrying its summary (shortened the same way)."""
        loaded = self.commands.get(name)
        return loaded if loaded is not None else click.Command(name, help=COMMANDS[name].summary)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self._listing(name)) for name in self.list_commands(ctx)]
        rows = [(name, command) for name, command in rows if not command.hidden]
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)  # as click's own
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in rows])

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        # Command names from the table (loading every module would cost each completion a second).
        items = []
        for name in self.list_commands(ctx):
            command = self._listing(name)
            if name.startswith(incomplete) and not command.hidden:
                items.append(CompletionItem(name, help=command.get_short_help_str()))
        return items + click.Command.shell_complete(self, ctx, incomplete)  # and the options

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


def nats_url_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--nats", "nats_url", envvar="WARDEN_NATS_URL", default=None, help=help_text)


@contextlib.contextmanager
def connect_bound(seconds: float) -> Iterator[None]:
    """Client connections made inside give up after `seconds` (bus.Unreachable, exit 4)."""
    from shared import bus  # the NATS client is most of start-up: only commands that connect pay

    token = bus.CONNECT_BOUND.set(seconds)
    try:
        yield
    finally:
        bus.CONNECT_BOUND.reset(token)


def nats_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--nats` and `--timeout` for client commands: which server, and how long to try reaching it."""

    @nats_url_option(
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
    from shared.bus import NoServerNamed

    raise NoServerNamed(
        "no NATS server named: pass --nats URL, set WARDEN_NATS_URL, or run `warden up` "
        f"(data dir {data_dir})"
    )


def fail(message: str, code: int = Exit.USAGE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(int(code))


@click.group(cls=WardenGroup, context_settings={"help_option_names": ["-h", "--help"]})
# The version is read from the installed metadata only when asked for (importlib.metadata is slow).
@click.version_option(None, "-V", "--version", package_name="warden", prog_name="warden")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug); tracebacks on errors.")
def cli(verbose: int) -> None:
    """Warden: an event-sourced orchestrator that governs AI agents on NATS JetStream.

    Agents propose; the system decides. Every request, lease, heartbeat, proposal, verdict,
    effect and revocation is an event on a JetStream stream.

    Exit codes: 0 ok, 1 failed (a check failed, a request was refused), 2 usage,
    3 not found, 4 server unreachable.
    """
    import logging

    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def main() -> None:
    cli(prog_name="warden", standalone_mode=True)  # also names the completion variable: _WARDEN_COMPLETE
