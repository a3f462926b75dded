"""The `warden` group: loads a command's module when the command is first named, and turns
Warden's known errors into one line and an exit code in one place.

The group knows no command by itself: services/cli/main.py lists every one in its table and
registers that table here. This module imports only click, the standard library and the
shared options, so `warden --help` stays cheap.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Mapping
from typing import Any, NamedTuple

import click
from click.shell_completion import CompletionItem

from services.cli.options import Exit


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
    """Where a command is defined, and what `warden --help` shows for it before it is loaded."""

    module: str  # in services.cli
    attribute: str  # the click command in that module
    summary: str  # the first sentence of the command's help


class WardenGroup(click.Group):
    """A group whose commands are listed in a table and each loaded from its module on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table: dict[str, Listed] = {}

    def register(self, table: Mapping[str, Listed]) -> None:
        self.table.update(table)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.table.keys() | self.commands.keys())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        listed = self.table.get(cmd_name)
        if cmd_name not in self.commands and listed is not None:
            module = importlib.import_module(f"services.cli.{listed.module}")
            command = getattr(module, listed.attribute)
            assert isinstance(command, click.Command), listed
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def _listing(self, name: str) -> click.Command:
        """The command if loaded, else a stand-in carrying its summary (shortened the same way)."""
        loaded = self.commands.get(name)
        return loaded if loaded is not None else click.Command(name, help=self.table[name].summary)

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
