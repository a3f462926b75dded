"""What every `warden` command shares: its exit codes, the options declared once, and how a
client command finds its server.

Command modules import this, never the group (services/cli/app.py) or the command table
(services/cli/main.py), so the group can load them lazily without an import cycle.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

import click

from shared import datadir

DEFAULT_TIMEOUT_S = 5.0

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class Exit(IntEnum):
    """Every command's exit codes (README, "Exit codes")."""

    OK = 0
    FAILED = 1  # a check failed, a request was refused, or the command could not do its work
    USAGE = 2  # bad options, arguments or settings
    NOT_FOUND = 3  # the job, agent or proposal named is not in the record
    UNREACHABLE = 4  # no server named, or the one named does not answer


def data_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="WARDEN_DATA_DIR",
        default=".warden",
        show_default=".warden (or WARDEN_DATA_DIR)",
        help="Where the embedded server keeps its store and `warden up` says where it listens.",
    )(f)


def nats_url_option(help_text: str) -> Decorator:
    """`--nats` alone (commands that may start their own server say what they do without it)."""
    return click.option("--nats", "nats_url", envvar="WARDEN_NATS_URL", default=None, help=help_text)


def replicas_option(help_text: str) -> Decorator:
    """`--replicas`: how many copies of each stream (3 on a three-node cluster)."""
    return click.option("--replicas", envvar="WARDEN_REPLICAS", default=1, show_default=True, help=help_text)


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


def fail(message: str, code: int = Exit.USAGE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(int(code))
