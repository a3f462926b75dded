"""`warden bench`'s restart part, small: each service is timed from spawn to serving, after a
snapshot of its kind of view reflects the whole log (written by a first start of its own)."""

from __future__ import annotations

from pathlib import Path

import anyio

from services.bench import restart
from services.bench.history import write_history
from services.bench.report import Report
from shared import bus, topology
from shared.server import EmbeddedServer


async def test_the_restart_part_times_each_service_from_its_snapshot_and_the_full_fold_beside_it(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    nc = await bus.connect(nats_server.url, "bench")
    try:
        await topology.ensure_when_ready(nc.jetstream(), str(nc.connected_server_version), 1)
        await write_history(nc, 1_100)
        last = (await nc.jetstream().stream_info(topology.EVENT_STREAM)).state.last_seq
        report = Report(machine={}, options={})
        with anyio.fail_after(240):
            await restart.measure(
                report,
                nc,
                nats_server.url,
                ["scheduler", "revoker"],
                last,
                tmp_path,
                lambda _m: None,
                running=None,
            )
        # Each kind of view (the revoker's carries its authority record) has its own snapshot.
        for name in ("scheduler", "revoker"):
            assert await restart.snapshot_position(nc, restart.snapshot_name(name)) == last
    finally:
        await nc.close()
    assert report.notes == []
    for key in ("restart_scheduler", "restart_revoker", "restart_scheduler_full_fold"):
        extra = report.figures[key].extra
        # From spawn (interpreter and imports) to ready, of which the process's own part is less.
        assert 0 < extra[f"ready_s_{last}"] < extra[f"serving_s_{last}"]
    assert restart.snapshot_name("revoker") == "view+authority"
    assert restart.snapshot_name("scheduler") == "view"
