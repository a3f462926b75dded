"""Start nats-server processes from the configurations in `ops/nats/`, as deployed, with only
their ports, store directories and route addresses rewritten for a test on loopback.

Each server gets a directory holding its configuration, its log, its JetStream store, and copies
of the include files (accounts.conf, users.conf) beside it, so `include` resolves as deployed
and a test can edit that server's users.conf and reload it (SIGHUP) like an operator.
"""

from __future__ import annotations

import re
import shutil
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from shared import bus, credentials
from shared.server import EmbeddedServer, PortInUse, free_port

ROOT = Path(__file__).resolve().parents[1]
OPS_NATS = ROOT / "ops" / "nats"
SINGLE = OPS_NATS / "single.conf"
CLUSTER = [OPS_NATS / "cluster" / f"n{i}.conf" for i in (1, 2, 3)]
# The host names compose.yaml gives the cluster nodes, as the route URLs name them.
NODE_HOSTS = ["nats-1", "nats-2", "nats-3"]
RELOADED = "Reloaded server configuration"

SERVICE_PASSWORD = "service-secret-for-tests"
OPERATOR_PASSWORD = "operator-secret-for-tests"


class ConfigDrift(AssertionError):
    """Raised when an ops/ configuration no longer has a line these tests rewrite."""


def _sub(pattern: str, replacement: str, text: str, *, count: int = 1) -> str:
    new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if n != count:
        raise ConfigDrift(f"expected {count} match(es) of {pattern!r} in the ops/ configuration, found {n}")
    return new


def render(
    conf: Path,
    *,
    client_port: int,
    monitor_port: int,
    store_dir: Path,
    cluster_port: int | None = None,
    route_ports: list[int] | None = None,
) -> str:
    """The configuration as deployed, with loopback ports and a temporary store."""
    text = conf.read_text()
    text = _sub(r'^listen: "[^"]+"$', f'listen: "127.0.0.1:{client_port}"', text)
    text = _sub(r'^http: "[^"]+"$', f'http: "127.0.0.1:{monitor_port}"', text)
    text = _sub(r'^(\s+)store_dir: "[^"]+"$', rf'\1store_dir: "{store_dir}"', text)
    # The include files are copied beside the rendered configuration.
    text = _sub(r'^include "(?:\.\./)?accounts\.conf"$', 'include "accounts.conf"', text)
    if cluster_port is not None:
        assert route_ports is not None
        text = _sub(r'^(\s+)listen: "[^"]+:6222"$', rf'\1listen: "127.0.0.1:{cluster_port}"', text)
        for host, port in zip(NODE_HOSTS, route_ports, strict=True):
            text = _sub(rf"nats-route://{host}:6222", f"nats-route://127.0.0.1:{port}", text)
    return text


def set_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers read the service and operator passwords from their environment, as in compose."""
    monkeypatch.setenv(credentials.SERVICE_PASSWORD_ENV, SERVICE_PASSWORD)
    monkeypatch.setenv(credentials.OPERATOR_PASSWORD_ENV, OPERATOR_PASSWORD)


def service_credentials() -> dict[str, str]:
    return {"user": credentials.SERVICE_USER, "password": SERVICE_PASSWORD}


def operator_credentials() -> dict[str, str]:
    return {"user": credentials.OPERATOR_USER, "password": OPERATOR_PASSWORD}


@dataclass
class OpsServer:
    server: EmbeddedServer
    directory: Path
    cluster_port: int = 0

    @property
    def users_file(self) -> Path:
        return self.directory / "users.conf"

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, as an operator would after `warden creds`; returns once the server applied it."""
        assert self.server.process is not None
        before = self.server.log_path.read_text().count(RELOADED)
        self.server.process.send_signal(signal.SIGHUP)
        wait_for_log(self.server, RELOADED, timeout, after=before)


def wait_for_log(server: EmbeddedServer, text: str, timeout: float, *, after: int = 0) -> None:
    """Until the server's log holds `text` more than `after` times (it logs what it applied)."""
    waiter = threading.Event()
    deadline = timeout
    step = 0.02
    while server.log_path.read_text().count(text) <= after:
        if deadline <= 0:
            raise TimeoutError(f"{server.name} did not log {text!r} within {timeout}s: {server.log_path}")
        waiter.wait(step)
        deadline -= step


def _prepare(directory: Path, users_file: Path | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(OPS_NATS / "accounts.conf", directory / "accounts.conf")
    shutil.copy(users_file or OPS_NATS / "users.conf", directory / "users.conf")


def start_single(
    directory: Path, users_file: Path | None = None, edit: Callable[[str], str] | None = None
) -> OpsServer:
    """A server from ops/nats/single.conf (users from `users_file`, default the committed one);
    `edit` changes the configuration first, to start a misconfigured server on purpose."""
    _prepare(directory, users_file)
    for attempt in range(3):
        client, monitor = free_port(), free_port()
        text = render(SINGLE, client_port=client, monitor_port=monitor, store_dir=directory / "js")
        if edit is not None:
            text = edit(text)
        server = EmbeddedServer(
            store_dir=directory, port=client, monitor_port=monitor, config_text=text, name="single"
        )
        try:
            return OpsServer(server.start(), directory)
        except PortInUse:
            # Another process took a free port between choosing it and the server binding it.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_cluster(base: Path, users_file: Path | None = None) -> list[OpsServer]:
    """The three nodes of ops/nats/cluster/, each started in turn (routes connect as they come)."""
    ports = [(free_port(), free_port(), free_port()) for _ in CLUSTER]
    route_ports = [p[2] for p in ports]
    nodes: list[OpsServer] = []
    try:
        for i, (conf, (client, monitor, route)) in enumerate(zip(CLUSTER, ports, strict=True), start=1):
            directory = base / f"n{i}"
            _prepare(directory, users_file)
            text = render(
                conf,
                client_port=client,
                monitor_port=monitor,
                store_dir=directory / "js",
                cluster_port=route,
                route_ports=route_ports,
            )
            server = EmbeddedServer(
                store_dir=directory, port=client, monitor_port=monitor, config_text=text, name=f"n{i}"
            )
            nodes.append(OpsServer(server.start(), directory, route))
    except BaseException:
        for node in nodes:
            node.server.stop()
        raise
    return nodes


@asynccontextmanager
async def connected(url: str, name: str = "test", **options: Any) -> AsyncIterator[Client]:
    """A connection with the given credentials (or none), closed at the end."""
    nc = await bus.connect(url, name, **options)
    try:
        yield nc
    finally:
        await nc.close()


def cluster_url(nodes: list[OpsServer]) -> str:
    return ",".join(n.server.url for n in nodes)
