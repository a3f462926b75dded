"""Test harness: real nats-server processes on free ports with temporary stores.

Servers start from sync fixtures (pytest-asyncio >= 1.0 has no event_loop fixture), so an async
test and the server it talks to never share a loop's lifetime.
"""

from __future__ import annotations

# CPython 3.11.7 keeps the AST constructor's recursion depth in per-interpreter state (gh-106905,
# fixed in 3.11.8 and 3.12.1), so two threads building ASTs at once (pytest's assertion rewriting
# on an import, a worker thread's traceback whose carets come from ast.parse) can fail either with
# "SystemError: AST constructor recursion depth mismatch". Two runs failed so (one at session end,
# one in test_dashboard). Every Python-level parse goes through ast.parse: serialise it here.
# hypothesis is imported at start-up, before any thread, so its plugin is not parsed at session end.
import ast
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401
import pytest

from shared.server import EmbeddedServer
from tests import opsnats

if sys.version_info < (3, 11, 8):
    _PARSE_LOCK = threading.RLock()
    _parse: Callable[..., Any] = ast.parse

    def _serialised_parse(*args: Any, **kwargs: Any) -> Any:
        with _PARSE_LOCK:
            return _parse(*args, **kwargs)

    ast.parse = _serialised_parse


@pytest.fixture(autouse=True)
def isolated_read_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test that runs all services gets its own read model and a free HTTP port, never
    ./.warden/projections.sqlite or the default port 8765 (tests run side by side)."""
    monkeypatch.setenv("WARDEN_PROJECTIONS_URL", f"sqlite:///{tmp_path / 'projections.sqlite'}")
    monkeypatch.setenv("WARDEN_HTTP", "127.0.0.1:0")
    # `warden up/run` in-process (CliRunner) set these for the API; never let one test's leak.
    monkeypatch.delenv("WARDEN_API_AUTH", raising=False)
    monkeypatch.delenv("WARDEN_API_TOKENS", raising=False)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A fresh single nats-server with JetStream, on a free port, its store under tmp_path."""
    server = EmbeddedServer(store_dir=tmp_path / "nats", name="test").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """Start several servers (cluster and fault tests); every one is stopped at teardown."""
    started: list[EmbeddedServer] = []

    def start(name: str = "s", **kwargs: object) -> EmbeddedServer:
        server = EmbeddedServer(store_dir=tmp_path / f"nats-{name}-{len(started)}", name=name, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


PERMISSIVE_POLICY = """
levels:
  - {level: 0, name: open, effects: [none, file.write, git.patch, webhook], branches: target, max_leases: 1000}
promotion: {clean_completions: 1000, max_level: 0}
"""


@pytest.fixture
def permissive_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A policy without lease limits or promotions, for tests about something else."""
    path = tmp_path / "permissive-policy.yaml"
    path.write_text(PERMISSIVE_POLICY)
    monkeypatch.setenv("WARDEN_POLICY", str(path))
    return path


@pytest.fixture
def ops_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[opsnats.OpsServer]:
    """A server from ops/nats/single.conf with users and permissions as deployed (no agents yet)."""
    opsnats.set_passwords(monkeypatch)
    node = opsnats.start_single(tmp_path / "nats")
    try:
        yield node
    finally:
        node.server.stop()
