"""The CLI loads a command's module only when that command runs, and nothing else notices.

`warden --help`, `--version` and completion of command names read the table in
services/cli/main.py; these tests check that table against what the modules register, that the
listing is exactly what click would print with every module loaded, and that the cheap paths
stay cheap (no NATS client, no OpenTelemetry SDK, no other command's module).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import click

from services.cli.main import COMMANDS, KNOWN_ERRORS, cli

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

    for listed in COMMANDS.values():
        __import__("services.cli." + listed.module)
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
    assert probe["after_listing"] == ["services.cli.main"]
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
    for listed in COMMANDS.values():
        importlib.import_module(f"services.cli.{listed.module}")
    return dict(cli.commands)


def test_the_table_names_every_registered_command_its_module_and_its_summary() -> None:
    registered = _every_command_loaded()
    assert set(registered) == set(COMMANDS)
    for name, command in registered.items():
        listed = COMMANDS[name]
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
