"""Services started together against a fresh store never fail, and every one becomes ready.

Each trial starts a fresh nats-server (no streams, no consumers, no read model) and releases one
`warden run SERVICE` process per service at the same instant, each its own process as an
operator runs them: they race to create the streams, the durable consumers and the SQLite read
model. Every one must print its ready line, stay up, answer its liveness ping, and leave a
deployment `warden doctor` finds healthy.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from services import registry
from shared import doctor, liveness
from shared.server import EmbeddedServer
from tests import service_processes
from tests.harness import client

TRIALS = 3
RELEASE_AFTER_S = 3.0  # past every process's imports on a loaded machine, so they race


async def _answers(url: str, services: list[str]) -> dict[str, object]:
    async with client(url) as nc:
        return {service: await liveness.ping(nc, service, timeout=5.0) for service in services}


async def _doctor(url: str, monitor: str, services: list[str]) -> list[doctor.Finding]:
    async with client(url) as nc:
        return await doctor.diagnose(nc, [monitor], doctor.Expectations(services=tuple(services)))


def test_every_service_started_in_parallel_on_a_fresh_server_becomes_ready(tmp_path: Path) -> None:
    services = sorted(registry.SERVICES)
    for trial in range(TRIALS):
        workdir = tmp_path / f"trial-{trial}"
        server = EmbeddedServer(store_dir=workdir / "nats", name=f"fresh{trial}").start()
        release = time.time() + RELEASE_AFTER_S
        procs = [service_processes.start(server.url, s, workdir, release_at=release) for s in services]
        try:
            for proc in procs:
                proc.wait_ready()
            answers = anyio.run(_answers, server.url, services)
            assert [s for s, answer in answers.items() if answer is None] == [], f"trial {trial}"
            findings = anyio.run(_doctor, server.url, server.monitor_url, services)
            assert doctor.healthy(findings), [f for f in findings if not f.ok]
            assert [p.service for p in procs if p.proc.poll() is not None] == [], f"trial {trial}"
        finally:
            codes = {p.service: p.stop() for p in procs}
            server.stop()
        # A drained service exits 0; a crash after ready would show here.
        assert codes == dict.fromkeys(services, 0), f"trial {trial}: {codes}"
