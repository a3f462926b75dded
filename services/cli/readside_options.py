"""`--http`, `--auth` and `--projections` for the commands that run services (`up`, `run`).

The projector and api services read their settings from WARDEN_PROJECTIONS_URL, WARDEN_HTTP,
WARDEN_API_AUTH and WARDEN_API_TOKENS (they are built by name, without arguments), so these
options set those for the process. The API's token store is `api-tokens.json` in --data-dir.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from services.api import BadAddress, parse_address
from services.api.auth import (
    AUTH_ENV,
    AUTH_MODES,
    DEFAULT_AUTH,
    TOKENS_ENV,
    BadAuthSetting,
    check_setting,
    is_loopback,
)
from shared.readmodel.store import URL_ENV, default_url
from shared.tokens import TokenStoreError, local_operator_token, tokens_path


def read_side_options(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.option(
        "--http",
        envvar="WARDEN_HTTP",
        default="127.0.0.1:8765",
        show_default=True,
        help="Where the api service serves the dashboard, the query API and /metrics (or WARDEN_HTTP).",
    )
    @click.option(
        "--auth",
        envvar=AUTH_ENV,
        type=click.Choice(AUTH_MODES),
        default=DEFAULT_AUTH,
        show_default=True,
        help="What the HTTP API needs a bearer token for (or WARDEN_API_AUTH): operators = writes "
        "(operator commands, POST /api/jobs), all = reads too, off = nothing (loopback binds only). "
        "Tokens: `warden creds add-operator NAME`.",
    )
    @click.option(
        "--projections",
        envvar=URL_ENV,
        default=None,
        help="The read model: sqlite:///PATH or postgresql://USER@HOST:PORT/DB?schema=NAME "
        f"(or {URL_ENV}; default: projections.sqlite in --data-dir).",
    )
    @functools.wraps(f)
    def wrapper(*args: Any, http: str, auth: str, projections: str | None, **kwargs: Any) -> Any:
        try:
            check_setting(auth, parse_address(http)[0])
        except (BadAddress, BadAuthSetting) as exc:
            raise click.UsageError(str(exc)) from None
        os.environ["WARDEN_HTTP"] = http
        os.environ[AUTH_ENV] = auth
        data_dir: Path | None = kwargs.get("data_dir")
        if data_dir is not None:
            os.environ[TOKENS_ENV] = str(tokens_path(data_dir))
        os.environ[URL_ENV] = projections or default_url(data_dir)
        return f(*args, **kwargs)

    return wrapper


def api_token_note(services: list[str], data_dir: Path) -> str | None:
    """What `up`/`run` say about the API's tokens. On a loopback address the local operator's
    token is written to the data dir (0600), so the quick start needs no set-up; elsewhere each
    operator gets one with `warden creds add-operator`."""
    if "api" not in services or os.environ.get(AUTH_ENV) == "off":
        return None
    if not is_loopback(parse_address(os.environ["WARDEN_HTTP"])[0]):
        return (
            f"the HTTP API needs bearer tokens (--auth {os.environ.get(AUTH_ENV, DEFAULT_AUTH)}): "
            f"`warden creds add-operator NAME --data-dir {data_dir}`"
        )
    try:
        _token, path = local_operator_token(data_dir)
    except (TokenStoreError, OSError) as exc:
        raise click.ClickException(f"cannot keep the local operator's API token: {exc}") from None
    return f'API token of operator "local": {path} (curl -H "Authorization: Bearer $(cat {path})" ...)'
