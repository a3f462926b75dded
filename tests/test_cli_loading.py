"""The CLI loads a command's module only when that command runs, and nothing else notices.

`warden --help`, `--version` and completion of command names read the table in
services/cli/main.py; these tests check that table against the commands the modules define, that
the listing is exactly what click would print with every module loaded, that the cheap paths
stay cheap (no NATS client, no OpenTelemetry SDK, no other command's module), and that importing
a command's module registers nothing (main.py's table is the only registration).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import click

from services.cli.app import KNOWN_ERRORS
from services.cli.main import COMMANDS, cli

PROBE = textwrap.dedent(
    """
    import json, sys
    import click
    from services.cli.main import COMMANDS, cli

    def loaded():
        return sorted(m for m in sys.modules if m.startswith(("services.cli.", "nats", "shared.bus",
            "opentelemetry.sdk", "shared.forensics.")))

    ctx = click.Context(cli, info_name="warden")
    lazy = ctx.make_formatter()
    cli.format_commands(ctx, lazy)
    lazy_completion = [(i.value, i.help) for i in cli.shell_complete(ctx, "")]
    after_listing = loaded()

    cli.get_command(ctx, "explain")
    after_explain = loaded()

    for name in COMMANDS:
        cli.get_command(ctx, name)
    eager = ctx.make_formatter()
    click.Group.format_commands(cli, ctx, eager)  # click's own listing, every command loaded
    eager_completion = [(i.value, i.help) for i in click.Group.shell_complete(cli, ctx, "")]
    print(json.dumps({
        "after_listing": after_listing,
        "after_explain": after_explain,
        "lazy": lazy.getvalue(),
        "eager": eager.getvalue(),
        "lazy_completion": lazy_completion,
        "eager_completion": eager_completion,
    }))
    """
)


def _probe() -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_command_listing_and_completion_load_no_command_and_match_clicks_own() -> None:
    probe = _probe()
    # The group, the options it shares with every command, and the table: no command's module.
    assert probe["after_listing"] == ["services.cli.app", "services.cli.main", "services.cli.options"]
    assert probe["lazy"] == probe["eager"]
    assert "explain" in str(probe["lazy"]) and "revocations" in str(probe["lazy"])
    assert "chaos" in str(probe["lazy"])
    assert probe["lazy_completion"] == probe["eager_completion"]


def test_explain_loads_its_module_without_other_commands_or_the_telemetry_sdk() -> None:
    after = _probe()["after_explain"]
    assert isinstance(after, list)
    assert "services.cli.forensics" in after and "shared.forensics.explain" in after
    unwanted = {"services.cli.jobs", "services.cli.serve", "shared.forensics.backtest"}
    assert not unwanted & set(after)
    assert not [m for m in after if m.startswith("opentelemetry.sdk")]


def _every_command_loaded() -> dict[str, click.Command]:
    ctx = click.Context(cli, info_name="warden")
    loaded = {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}
    return {name: command for name, command in loaded.items() if command is not None}


def test_the_table_names_every_command_its_module_and_its_summary() -> None:
    registered = _every_command_loaded()
    assert set(registered) == set(COMMANDS)
    for name, command in registered.items():
        listed = COMMANDS[name]
        assert command.name == name  # the name it is defined with, so its own usage line agrees
        assert command.callback is not None
        assert command.callback.__module__ == f"services.cli.{listed.module}", name
        stand_in = click.Command(name, help=listed.summary)
        for limit in (20, 45, 60, 80, 120, 400):
            # What --help and completion show for it, unloaded and loaded, at any terminal width.
            assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit), (name, limit)


def test_each_known_error_is_named_by_the_module_that_defines_it() -> None:
    # known_error() looks a class up only in an already-imported module: that is sound only when
    # the module named is the one whose execution creates the class.
    for known in KNOWN_ERRORS:
        kind = getattr(importlib.import_module(known.module), known.name)
        assert isinstance(kind, type) and issubclass(kind, BaseException), known
        assert kind.__module__ == known.module, known


ISOLATED = textwrap.dedent(
    """
    import importlib, json, sys
    importlib.import_module("services.cli." + sys.argv[1])
    print(json.dumps(sorted(m for m in sys.modules if m in ("services.cli.app", "services.cli.main"))))
    """
)


def test_a_command_module_imported_on_its_own_loads_neither_the_group_nor_the_table() -> None:
    # Each module imported first, in a fresh interpreter: no path back to the group means no
    # import cycle through it, and no way to register a command as a side effect of importing.
    for module in sorted({listed.module for listed in COMMANDS.values()}):
        done = subprocess.run(
            [sys.executable, "-c", ISOLATED, module], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, (module, done.stderr)
        assert json.loads(done.stdout) == [], module
