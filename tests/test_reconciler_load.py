"""The reconciler under a flood of heartbeats, against a real nats-server: a silent lease is
still declared expired within its TTL of its deadline, and the leases beating in the flood are
not expired by it."""

from __future__ import annotations

import anyio
import msgspec

from shared import topology
from shared.contract import Contract, Stopping
from shared.events import AnyEvent, LeaseExpired
from shared.messages import Heartbeat, LeaseGrant
from shared.server import EmbeddedServer
from tests.harness import client, events_of, lease_job, running, wait_for_event

TTL_S = 3.0
BUSY_AGENTS = 16
# Every heartbeat the stream keeps per subject: each busy agent keeps its whole ring queued.
BURST = topology.AGENT_INPUT_PER_SUBJECT
# Below the per-agent throttle (1,000 per 10 s): every flooded heartbeat is handled in full.
BURST_EVERY_S = 0.4


def contract() -> Contract:
    return Contract(stopping=Stopping(lease_ttl_s=TTL_S, heartbeat_interval_s=TTL_S / 4, max_attempts=3))


async def test_a_silent_lease_expires_on_time_while_a_flood_of_heartbeats_is_queued(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        _silent, leased = await lease_job(nc, "silent", contract())
        grant: LeaseGrant = leased.grant
        busy: list[tuple[str, LeaseGrant]] = []
        for i in range(BUSY_AGENTS):
            _agent, held = await lease_job(nc, f"busy-{i}", contract())
            busy.append((f"busy-{i}", held.grant))

        flooding = anyio.Event()

        async def flood() -> None:
            while not flooding.is_set():
                for name, lease in busy:
                    body = msgspec.json.encode(Heartbeat(job_id=lease.job_id, epoch=lease.epoch))
                    for _ in range(BURST):
                        await nc.publish(topology.agent_subject(name, "heartbeat"), body)
                with anyio.move_on_after(BURST_EVERY_S):
                    await flooding.wait()

        def silent_expired(e: AnyEvent) -> bool:
            return isinstance(e, LeaseExpired) and e.originator_id == grant.job_id

        async with anyio.create_task_group() as tg:
            tg.start_soon(flood)
            expired = await wait_for_event(nc, silent_expired, timeout=TTL_S * 4)
            flooding.set()

        assert isinstance(expired, LeaseExpired)
        # The contract's own bound: detected within one TTL of the deadline, however busy.
        assert 0 <= expired.detection_latency_ms < TTL_S * 1000
        beaten = {lease.job_id for _, lease in busy}
        false_expiries = [
            e for e in await events_of(nc) if isinstance(e, LeaseExpired) and e.originator_id in beaten
        ]
        assert false_expiries == []
