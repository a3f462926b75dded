"""`warden bench`'s fleet part, at a size a test can afford: it runs, and its figures mean what
they say (every lease granted and heartbeating, every killed lease detected within its TTL)."""

from __future__ import annotations

import anyio

from services.bench import fleet
from shared import bus, topology
from shared.server import EmbeddedServer


async def test_the_fleet_part_grants_every_lease_and_times_each_killed_one(
    nats_server: EmbeddedServer,
) -> None:
    nc = await bus.connect(nats_server.url, "bench")
    try:
        await topology.ensure_when_ready(nc.jetstream(), str(nc.connected_server_version), 1)
        options = fleet.FleetOptions(agents=4, leases=12, ttl_s=3.0, interval_s=0.5, hold_s=1.0, kill=3)
        with anyio.fail_after(240):
            figures = await fleet.run(nats_server.url, nc, options, lambda _m: None)
    finally:
        await nc.close()
    assert figures["fleet_grants"].count == 12
    beats = figures["fleet_heartbeats"]
    assert beats.count > 0 and beats.rate is not None
    detection = figures["fleet_detection"]
    assert detection.extra["detected"] == 3
    # The reconciler's own figure is bounded by the contract: detected within one TTL past the deadline.
    assert detection.p99_ms is not None and 0 <= detection.p99_ms < options.ttl_s * 1000
    memory = figures["fleet_memory"].extra
    assert memory["rss_kib_scheduler"] > 0 and memory["rss_kib_reconciler"] > 0
