"""The fleet part: many agents holding many live leases, heartbeating at their contract's interval.

What a deployment of a thousand agents asks of the reconciler every second, measured: heartbeats
answered per second (and their round trip), how long past its deadline a lease killed under that
load is declared expired, and each service's memory while it holds the live set.

The agents are simulated in this process, lean on purpose: one connection per shard, one
subscription for every agent's inbox in it, inputs published without waiting for the stream's
ack (the verdict arriving proves it was stored). Each agent still speaks only on its own input
subjects and receives only under its own inbox prefix, as a real one must. The scheduler and
reconciler run as their own processes, so their RSS is theirs.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from uuid import UUID

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.bench.history import rss_kib
from services.bench.lifecycle import _submit_all, collect_events
from services.bench.stats import Figures, percentile
from shared import bus, liveness, topology
from shared.contract import Contract, Scope, Stopping
from shared.events import LeaseExpired, now
from shared.messages import (
    Accepted,
    AnyReply,
    Claim,
    Heartbeat,
    HeartbeatAck,
    JobRequest,
    LeaseGrant,
    NoWork,
    Register,
    reply_decoder,
)

SERVICES = ("scheduler", "reconciler")
SHARDS = 8  # connections the simulated agents share


@dataclass(frozen=True)
class FleetOptions:
    agents: int = 1000
    leases: int = 10_000
    ttl_s: float = 30.0
    interval_s: float = 10.0
    hold_s: float = 30.0  # steady heartbeating measured for this long
    kill: int = 100  # leases that stop heartbeating, to time their detection under load

    @classmethod
    def quick(cls) -> FleetOptions:
        return cls(agents=50, leases=500, ttl_s=4.0, interval_s=1.0, hold_s=5.0, kill=20)


class _Shard:
    """One connection for many agents: every verdict for them arrives on one subscription."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.waiting: dict[str, anyio.Event] = {}
        self.answers: dict[str, AnyReply] = {}

    async def start(self) -> None:
        await self.nc.subscribe(f"{topology.INBOX_ROOT}.*.fleet.>", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        done = self.waiting.pop(msg.subject, None)
        if done is None:
            return  # answered after its asker stopped waiting
        with contextlib.suppress(msgspec.DecodeError):  # the waiter counts a missing answer
            self.answers[msg.subject] = reply_decoder.decode(msg.data)
        done.set()

    async def ask(self, agent: str, verb: str, body: msgspec.Struct, timeout: float) -> AnyReply | None:
        inbox = f"{topology.reply_inbox_prefix(agent)}.fleet.{uuid.uuid4().hex}"
        done = self.waiting[inbox] = anyio.Event()
        await self.nc.publish(
            topology.agent_subject(agent, verb),
            msgspec.json.encode(body),
            headers={topology.REPLY_HEADER: inbox},
        )
        with anyio.move_on_after(timeout):
            await done.wait()
        self.waiting.pop(inbox, None)
        return self.answers.pop(inbox, None)


@dataclass
class _Lease:
    agent: str
    shard: _Shard
    grant: LeaseGrant
    deadline: datetime
    killed: bool = False


def _policy_file(directory: Path, per_agent: int) -> Path:
    """Level 0 may hold every lease the fleet gives an agent (the shipped policy allows 1)."""
    path = directory / "fleet-policy.yaml"
    path.write_text(
        "levels:\n"
        "  - level: 0\n"
        "    effects: [none]\n"
        f"    max_leases: {per_agent}\n"
        "    invariants: []\n"
        "    name: fleet\n"
        "promotion:\n"
        "  max_level: 0\n"
        "revocation:\n"
        "  repeated_lease_expiries: 1000000\n"
    )
    return path


def _start_services(url: str, directory: Path, policy: Path) -> dict[str, subprocess.Popen[bytes]]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    env = {**os.environ, "WARDEN_HTTP": "127.0.0.1:0", "WARDEN_POLICY": str(policy)}
    for name in SERVICES:
        with open(directory / f"{name}.log", "wb") as log:  # the child has its own copy
            procs[name] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "run",
                    name,
                    "--nats",
                    url,
                    "--data-dir",
                    str(directory / name),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
    return procs


async def _serving(nc: Client, names: tuple[str, ...], limit_s: float = 120.0) -> None:
    with anyio.fail_after(limit_s):
        for name in names:
            # A ping waits up to its timeout for an answer: this polls no faster than that.
            while await liveness.ping(nc, name, timeout=1.0) is None:
                pass


async def run(
    url: str, nc: Client, options: FleetOptions, progress: Callable[[str], None]
) -> dict[str, Figures]:
    run_id = uuid.uuid4().hex[:6]
    kind = f"fleet-{run_id}"
    per_agent = max(1, -(-options.leases // options.agents))
    directory = Path(tempfile.mkdtemp(prefix="warden-bench-fleet-"))
    procs = _start_services(url, directory, _policy_file(directory, per_agent))
    shards = [_Shard(await bus.connect(url, f"bench-fleet-{i}")) for i in range(SHARDS)]
    figures: dict[str, Figures] = {}
    try:
        for shard in shards:
            await shard.start()
        await _serving(nc, SERVICES)
        contract = Contract(
            scope=Scope(paths=["**"], effects=["none"]),
            stopping=Stopping(
                lease_ttl_s=options.ttl_s, heartbeat_interval_s=options.interval_s, max_attempts=100
            ),
        )
        progress(f"fleet: submitting {options.leases:,} jobs")
        await _submit_all(
            nc,
            [
                JobRequest(idempotency_key=f"{kind}-{i}", kind=kind, contract=contract)
                for i in range(options.leases)
            ],
        )
        names = [f"fleet-{run_id}-{i}" for i in range(options.agents)]
        shard_of = {name: shards[i % SHARDS] for i, name in enumerate(names)}
        limiter = anyio.Semaphore(256)

        async def register(name: str) -> None:
            async with limiter:
                reply = await shard_of[name].ask(
                    name, "register", Register(max_concurrent=per_agent, kinds=[kind]), 60
                )
            if not isinstance(reply, Accepted):
                raise RuntimeError(f"fleet agent {name} not registered: {reply}")

        progress(f"fleet: registering {options.agents:,} agents")
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(register, name)

        leases: list[_Lease] = []
        refused: list[str] = []

        acks: list[float] = []
        missing = 0
        stop_all = anyio.Event()
        window = {"from": float("inf"), "to": float("inf")}

        async def beat(lease: _Lease) -> None:
            """Heartbeat at the contract's interval until killed or the run ends."""
            nonlocal missing
            await anyio.sleep(random.uniform(0, options.interval_s / 2))
            while not stop_all.is_set() and not lease.killed:
                at = time.perf_counter()
                body = Heartbeat(job_id=lease.grant.job_id, epoch=lease.grant.epoch)
                reply = await lease.shard.ask(lease.agent, "heartbeat", body, options.interval_s)
                took = time.perf_counter() - at
                in_window = window["from"] <= at < window["to"]
                if isinstance(reply, HeartbeatAck) and reply.expires_at is not None:
                    lease.deadline = reply.expires_at
                    if in_window:
                        acks.append(took * 1000)
                elif in_window:
                    missing += 1
                with anyio.move_on_after(max(0.0, options.interval_s - took)):
                    await stop_all.wait()

        async def claim_all(name: str, beats: anyio.abc.TaskGroup) -> None:
            """Claim this agent's share; each lease heartbeats from its grant on (a lease
            waiting for the rest of the fleet to be granted would expire)."""
            held: list[UUID] = []
            misses = 0
            while len(held) < per_agent and misses < 20:
                async with limiter:
                    body = Claim(kinds=[kind], wait_s=60, sent_at=now(), holding=list(held))
                    reply = await shard_of[name].ask(name, "claim", body, 60)
                if isinstance(reply, LeaseGrant):
                    held.append(reply.job_id)
                    lease = _Lease(name, shard_of[name], reply, reply.expires_at)
                    leases.append(lease)
                    beats.start_soon(beat, lease)
                    continue
                misses += 1
                if reply is None or not isinstance(reply, NoWork):
                    refused.append(repr(reply)[:200])
                await anyio.sleep(0.05)

        progress(f"fleet: claiming {options.leases:,} leases")
        started = time.perf_counter()
        async with anyio.create_task_group() as beats:
            async with anyio.create_task_group() as claims:
                for name in names:
                    claims.start_soon(claim_all, name, beats)
            granted = time.perf_counter() - started
            figures["fleet_grants"] = Figures(
                rate=len(leases) / granted if granted else None,
                count=len(leases),
                seconds=granted,
                extra={"agents": options.agents, "refusals": len(refused), "sample_refusal": refused[:1]},
            )
            progress(f"fleet: {len(leases):,} live leases; heartbeating for {options.hold_s:.0f}s")
            window["from"] = time.perf_counter()
            await anyio.sleep(options.hold_s)  # the measured window itself, not a wait for a condition
            window["to"] = time.perf_counter()
            held_for = window["to"] - window["from"]
            figures["fleet_heartbeats"] = Figures(
                rate=len(acks) / held_for if held_for else None,
                p50_ms=percentile(acks, 50),
                p99_ms=percentile(acks, 99),
                count=len(acks),
                seconds=held_for,
                extra={"unanswered": missing, "expected_rate": len(leases) / options.interval_s},
            )
            figures["fleet_memory"] = Figures(
                extra={f"rss_kib_{name}": rss_kib(proc.pid) for name, proc in procs.items()}
                | {"live_leases": len(leases)}
            )
            # Kill some leases under the load; the rest keep heartbeating until they are detected.
            victims = random.sample(leases, min(options.kill, len(leases)))
            victim_jobs = {v.grant.job_id for v in victims}
            progress(f"fleet: {len(victims)} leases stop heartbeating; timing their detection")
            for victim in victims:
                victim.killed = True
            expired = await collect_events(
                nc,
                lambda e: isinstance(e, LeaseExpired) and e.originator_id in victim_jobs,
                len(victims),
                timeout=options.ttl_s * 3 + 30,
            )
            stop_all.set()
        # The reconciler's own figure (detected_at - the lease's deadline as it had it), and the
        # same against the deadline each victim was last told (a heartbeat answered too late for
        # its sender may still have extended the lease).
        detected = [e for e in expired if isinstance(e, LeaseExpired)]
        told = {v.grant.job_id: v.deadline for v in victims}
        late = [e.detection_latency_ms for e in detected]
        late_told = [(e.detected_at - told[e.originator_id]).total_seconds() * 1000 for e in detected]
        figures["fleet_detection"] = Figures(
            p50_ms=percentile(late, 50),
            p99_ms=percentile(late, 99),
            count=len(late),
            extra={
                "killed": len(victims),
                "detected": len(late),
                "past_told_deadline_p50_ms": percentile(late_told, 50),
                "past_told_deadline_p99_ms": percentile(late_told, 99),
            },
        )
    finally:
        for shard in shards:
            await shard.nc.close()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return figures
