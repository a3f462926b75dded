"""API: the read side over HTTP: JSON queries, live updates, /metrics and the web dashboard.

Serves on `--http HOST:PORT` (or WARDEN_HTTP; default 127.0.0.1:8765; port 0 picks a free one)
from the read model the projector maintains (`--projections URL` or WARDEN_PROJECTIONS_URL).
Who may call what follows `--auth` (WARDEN_API_AUTH) over the token store WARDEN_API_TOKENS
names (`api-tokens.json` in the data dir): see services/api/auth.py.
uvicorn runs on this process's loop, inside the service's task group; signals stay with the
Warden runtime, which cancels the service, and the server then closes its live streams and
finishes the requests in hand.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus

from services.api import metrics as readmodel_metrics
from services.api.app import Deps, build
from services.api.auth import AUTH_ENV, DEFAULT_AUTH, TOKENS_ENV, Auth, check_setting
from services.api.hub import Hub
from shared.readmodel import configured_url, open_read_model
from shared.runtime import Context
from shared.tokens import TokenStore

log = logging.getLogger("warden.api")

HTTP_ENV = "WARDEN_HTTP"
DEFAULT_HTTP = "127.0.0.1:8765"


class ListenError(OSError):
    """Raised when the api service cannot bind its address (taken, or not this host's)."""


class BadAddress(ValueError):
    """Raised when an HTTP address is not HOST:PORT."""


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) as a (host, port) pair."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise BadAddress(f"HTTP address {text!r} must be HOST:PORT, e.g. 127.0.0.1:8765")
    try:
        port = int(port_text)
    except ValueError:
        raise BadAddress(f"HTTP address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise BadAddress(f"HTTP address {text!r}: port must be 0-65535")
    return host.strip("[]"), port


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the Warden runtime owns SIGINT and SIGTERM."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Api:
    name = "api"

    def __init__(
        self,
        http: str | None = None,
        projections: str | None = None,
        *,
        auth: str | None = None,
        tokens: Path | None = None,
    ) -> None:
        self.address = parse_address(http or os.environ.get(HTTP_ENV) or DEFAULT_HTTP)
        self.store_url = configured_url(projections)
        mode = check_setting(auth or os.environ.get(AUTH_ENV) or DEFAULT_AUTH, self.address[0])
        tokens_file = tokens or (Path(os.environ[TOKENS_ENV]) if os.environ.get(TOKENS_ENV) else None)
        self.auth = Auth(mode, TokenStore(tokens_file))
        self.url = ""  # http://host:port, once listening
        self.hub: Hub | None = None

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        host, port = self.address
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise ListenError(
                f"the api service cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        store = await anyio.to_thread.run_sync(open_read_model, self.store_url)
        hub = self.hub = Hub(store)

        def latest_summary() -> dict[str, Any] | None:
            return hub.summary

        try:
            app = build(Deps(store=store, hub=hub, app=ctx.app, js=ctx.js, nc=ctx.nc, auth=self.auth))
            config = uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,  # keep Warden's logging configuration
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=2,
            )
            server = _Server(config)
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            self.url = f"http://{shown}:{bound_port}"

            async def serve() -> None:
                # Shielded: on cancellation it is told to exit (below) and finishes cleanly.
                with anyio.CancelScope(shield=True):
                    await server.serve(sockets=[sock])

            async with anyio.create_task_group() as tg:
                await tg.start(hub.run)
                readmodel_metrics.register(latest_summary)
                tg.start_soon(serve)
                log.info("dashboard and API on %s (--auth %s)", self.url, self.auth.mode)
                task_status.started()
                try:
                    await anyio.sleep_forever()
                finally:
                    hub.close()
                    server.should_exit = True
        finally:
            readmodel_metrics.unregister(latest_summary)
            sock.close()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.close)
