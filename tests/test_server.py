"""The embedded nats-server: real processes, real failures."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from shared.server import EmbeddedServer, PortInUse, ServerBinaryMissing, StoreUnusable


def test_embedded_server_runs_jetstream_with_fsync_always(tmp_path: Path) -> None:
    with EmbeddedServer(store_dir=tmp_path / "s") as server:
        assert server.running
        varz = json.load(urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5))
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert varz["port"] == server.port
    assert not server.running


def test_a_taken_port_is_reported_as_such(tmp_path: Path) -> None:
    with (
        EmbeddedServer(store_dir=tmp_path / "a") as first,
        pytest.raises(PortInUse, match=str(first.port)),
    ):
        EmbeddedServer(store_dir=tmp_path / "b", port=first.port).start()


def test_an_unwritable_store_is_reported_as_such(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnusable, match="not writable"):
        EmbeddedServer(store_dir=blocker / "store").start()


def test_a_missing_binary_is_reported_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_NATS_SERVER_BIN", str(tmp_path / "no-such-binary"))
    with pytest.raises(ServerBinaryMissing, match="WARDEN_NATS_SERVER_BIN"):
        EmbeddedServer(store_dir=tmp_path / "s").start()


def test_a_restarted_server_keeps_its_port_and_store(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "s").start()
    try:
        port = server.port
        server.restart()
        assert server.port == port
        assert (tmp_path / "s" / "jetstream").is_dir()
    finally:
        server.stop()
    assert os.path.exists(server.log_path)


def test_a_port_taken_between_choosing_it_and_binding_it_makes_the_server_start_on_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from shared import server as server_module

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real = server_module.free_port
    handed = iter([port, port])  # the race: both ports it chooses first are taken by then

    def racing() -> int:
        return next(handed, None) or real()

    monkeypatch.setattr(server_module, "free_port", racing)
    started = EmbeddedServer(store_dir=tmp_path / "nats", name="race")
    try:
        started.start()
        assert started.running and started.port != port and started.monitor_port != port
    finally:
        started.stop()
        taken.close()
