"""`--http` and `--projections` for the commands that run services (`up`, `run`).

The projector and api services read their settings from WARDEN_PROJECTIONS_URL and WARDEN_HTTP
(they are built by name, without arguments), so these options set those for the process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from shared.readmodel.store import URL_ENV, default_url


def read_side_options(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.option(
        "--http",
        envvar="WARDEN_HTTP",
        default="127.0.0.1:8765",
        show_default=True,
        help="Where the api service serves the dashboard, the query API and /metrics (or WARDEN_HTTP).",
    )
    @click.option(
        "--projections",
        envvar=URL_ENV,
        default=None,
        help="The read model: sqlite:///PATH or postgresql://USER@HOST:PORT/DB?schema=NAME "
        f"(or {URL_ENV}; default: projections.sqlite in --data-dir).",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, http: str, projections: str | None, **kwargs: Any) -> Any:
        os.environ["WARDEN_HTTP"] = http
        data_dir: Path | None = kwargs.get("data_dir")
        os.environ[URL_ENV] = projections or default_url(data_dir)
        return f(*args, **kwargs)

    return wrapper
