"""Warden on the three-node JetStream cluster of ops/nats/cluster/, with R3 streams, through a
SIGKILL of the event stream's leader.

The workload is lease grants, releases and re-grants until each job's attempts run out and it
is tombstoned: the proposal/applier path (`job.completed`) is not in the service registry yet.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api as js_api

from shared import credentials, liveness, topology
from shared.contract import Contract, Stopping
from shared.events import AnyEvent, JobTombstoned, LeaseGranted, LeaseReleased, decode_all
from shared.messages import Accepted, JobRequest
from shared.sdk import AgentClient, JobContext, connect_agent
from tests import opsnats
from tests.harness import client, running, submit

JOBS = 8
ATTEMPTS = 3
AGENTS = ("w1", "w2")
# The services this workload exercises (leases, releases, expiries).
SERVICES = ["scheduler", "reconciler"]

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[list[opsnats.OpsServer], dict[str, str]]]:
    """The ops/ cluster with one user per test agent, and the services' credentials in the
    environment (as compose gives them); yields the nodes and each agent's password."""
    opsnats.set_passwords(monkeypatch)
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    users = tmp_path / "users.conf"
    users.write_text((opsnats.OPS_NATS / "users.conf").read_text())
    # Few bcrypt rounds: the test checks permissions, not the hash's cost.
    passwords = {name: credentials.add_agent(users, name, rounds=4) for name in AGENTS}
    nodes = opsnats.start_cluster(tmp_path / "cluster", users)
    try:
        yield nodes, passwords
    finally:
        for node in nodes:
            node.server.stop()


async def stored_events(nc: Client) -> dict[int, bytes]:
    """Every message on the event stream right now, by stream sequence."""
    js = nc.jetstream()
    info = await js.stream_info(topology.EVENT_STREAM)
    out: dict[int, bytes] = {}
    if info.state.messages == 0:
        return out
    done = anyio.Event()

    async def cb(msg: Any) -> None:
        out[msg.metadata.sequence.stream] = msg.data
        if msg.metadata.sequence.stream >= info.state.last_seq:
            done.set()

    sub = await js.subscribe(
        f"{topology.EVENT_ROOT}.>",
        stream=topology.EVENT_STREAM,
        ordered_consumer=True,
        cb=cb,
        deliver_policy=js_api.DeliverPolicy.ALL,
    )
    try:
        with anyio.fail_after(30):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return out


async def read_through_failover(nc: Client) -> dict[int, bytes]:
    """`stored_events`, retried while the cluster's JetStream API is electing leaders."""
    with anyio.fail_after(60):
        while True:
            try:
                return await stored_events(nc)
            except (NatsTimeout, NoRespondersError, TimeoutError):
                await anyio.sleep(0.2)  # no responders answers at once: do not spin


def decoded(stored: dict[int, bytes]) -> list[AnyEvent]:
    out = []
    for _seq, data in sorted(stored.items()):
        try:
            out.extend(decode_all(data))
        except msgspec.DecodeError:  # tracking records share the stream
            continue
    return out


class Workload:
    """Agents that claim, release at once, and claim again, riding out the failover: a request
    whose answer is lost is retried (claims carry their send time, so a stale one grants nothing;
    a repeated release is fenced)."""

    def __init__(self, job_ids: set[UUID]) -> None:
        self.job_ids = job_ids
        self.grants: set[tuple[UUID, int, str]] = set()
        self.releases: set[tuple[UUID, int]] = set()
        self.timeouts = 0
        self.progressed = anyio.Event()

    async def agent(self, nc: Client, name: str, done: anyio.Event) -> None:
        agent = AgentClient(nc, name, timeout=3.0)
        await self._retry(agent.register)
        while not done.is_set():
            grant = await self._retry(agent.claim)
            if grant is None:
                # Nothing runnable right now (jobs are held by the other agent or requeueing).
                with anyio.move_on_after(0.05):
                    await done.wait()
                continue
            self.grants.add((grant.job_id, grant.epoch, name))
            reply = await self._retry(lambda g=grant: agent.release(JobContext(grant=g), "cycle"))
            if isinstance(reply, Accepted):
                self.releases.add((grant.job_id, grant.epoch))
            if len(self.releases) >= JOBS:
                self.progressed.set()

    async def _retry(self, call: Any) -> Any:
        with anyio.fail_after(60):
            while True:
                try:
                    return await call()
                except (NatsTimeout, TimeoutError):  # ReplyTimeout and NotStored are TimeoutErrors
                    self.timeouts += 1


async def test_jobs_run_on_through_a_sigkill_of_the_stream_leader(
    cluster: tuple[list[opsnats.OpsServer], dict[str, str]],
) -> None:
    nodes, passwords = cluster
    url = opsnats.cluster_url(nodes)
    contract = Contract(stopping=Stopping(lease_ttl_s=2.0, heartbeat_interval_s=0.5, max_attempts=ATTEMPTS))
    async with running(url, SERVICES, replicas=3) as ctx, client(url, "observer") as nc:
        info = await nc.jetstream().stream_info(topology.EVENT_STREAM)
        assert info.config.num_replicas == 3
        job_ids = {
            await submit(nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind="noop", contract=contract))
            for _ in range(JOBS)
        }
        work = Workload(job_ids)
        all_terminal = anyio.Event()

        def on_event(_event: object, _job: object, _agent: object) -> None:
            # The services' own view, fed by their appends and the stream they follow.
            if all((job := ctx.views.job(j)) is not None and job.terminal for j in job_ids):
                all_terminal.set()

        ctx.views.listeners.append(on_event)
        done = anyio.Event()
        agents = [
            await connect_agent(url, name, password=passwords[name], user=credentials.agent_user(name))
            for name in AGENTS
        ]
        try:
            async with anyio.create_task_group() as tg:
                for agent_nc, name in zip(agents, AGENTS, strict=True):
                    tg.start_soon(work.agent, agent_nc, name, done)

                with anyio.fail_after(30):
                    await work.progressed.wait()
                before = await read_through_failover(nc)
                leader = (await nc.jetstream().stream_info(topology.EVENT_STREAM)).cluster
                assert leader is not None and leader.leader
                victim = next(n for n in nodes if leader.leader == f"warden-{n.server.name}")
                await anyio.to_thread.run_sync(victim.server.kill)
                # The kill lands mid-run: most of the work is still to do.
                assert len(work.releases) < JOBS * ATTEMPTS

                # Every job reaches its end: all attempts granted and given back, then tombstoned.
                with anyio.move_on_after(90):
                    await all_terminal.wait()
                stuck = {
                    str(j): (job.status, job.version, job.live_lease)
                    for j in job_ids
                    if (job := ctx.views.job(j)) is not None and not job.terminal
                }
                if stuck:
                    js = nc.jetstream()
                    consumers = {
                        (stream, spec.durable): (await js.consumer_info(stream, spec.durable))
                        for spec in topology.CONSUMERS
                        if spec.durable in ("scheduler", "reconciler")
                        for stream in topology.consumer_streams(spec)
                    }
                    inputs = await js.stream_info(topology.AGENT_INPUT_STREAM)
                    standing = {
                        a: (ctx.views.agents[a].standing, ctx.views.live_leases_of(a)) for a in AGENTS
                    }
                    raise AssertionError(
                        f"jobs stuck after {victim.server.name} died: {stuck}; agents: {standing}; "
                        f"consumers: {consumers}; input stream: {inputs.cluster} {inputs.state}"
                    )
                done.set()
        finally:
            for agent_nc in agents:
                await agent_nc.close()

        after = await read_through_failover(nc)
        # Nothing acknowledged before the kill is lost or changed.
        assert {seq: after.get(seq) for seq in before} == before
        assert max(after) > max(before), "the services appended nothing after the leader died"
        events = decoded(after)

        # Every grant and release an agent was told about is in the record.
        granted = {(e.originator_id, e.epoch, e.agent) for e in events if isinstance(e, LeaseGranted)}
        released = {(e.originator_id, e.epoch) for e in events if isinstance(e, LeaseReleased)}
        assert work.grants <= granted
        assert work.releases <= released

        # No job stuck, none doubled: each ends tombstoned after exactly its attempts, epochs
        # 1..ATTEMPTS granted once each, and versions without gaps.
        tombs = [e for e in events if isinstance(e, JobTombstoned)]
        assert sorted(t.originator_id for t in tombs) == sorted(job_ids)
        per_job = Counter((g[0], g[1]) for g in granted)
        assert all(count == 1 for count in per_job.values())
        for job_id in job_ids:
            epochs = sorted(epoch for (j, epoch, _a) in granted if j == job_id)
            assert epochs == list(range(1, ATTEMPTS + 1)), (job_id, epochs)
            versions = [e.originator_version for e in events if e.originator_id == job_id]
            assert versions == list(range(1, len(versions) + 1)), (job_id, versions)

        # The in-process services are still serving, without a restart: each answers a ping
        # over its reconnected connection.
        for service in SERVICES:
            assert await liveness.ping(nc, service, timeout=5) is not None, service
