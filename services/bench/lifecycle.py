"""Warden's own figures: governed throughput, time-to-failure-detection, revocation latency.

Agents run in this process on their own connections; Warden's services run in another process
(as a deployment would), so the cost of governance shows as what it is.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api as js_api

from services.bench.stats import Figures, percentile
from shared import bus, throttle, topology
from shared.contract import Contract, Scope, Stopping
from shared.events import AgentRevoked, AnyEvent, InputRejected, JobCompleted, JobRequested, LeaseExpired
from shared.messages import Accepted, JobRequest
from shared.persistence import written
from shared.sdk import AgentClient, AgentError, JobContext, Proposal


async def collect_events(
    nc: Client,
    predicate: Callable[[AnyEvent], bool],
    count: int,
    timeout: float,
    subject: str = f"{topology.EVENT_ROOT}.*",
) -> list[AnyEvent]:
    """The first `count` events (past or future) matching `predicate`, within `timeout`."""
    js = nc.jetstream()
    found: list[AnyEvent] = []
    done = anyio.Event()

    async def cb(msg: Msg) -> None:
        events = written.events_of(msg.subject, msg.headers, msg.data)
        for event in () if isinstance(events, str) else events:
            if predicate(event) and len(found) < count:
                found.append(event)
                if len(found) >= count:
                    done.set()

    sub = await js.subscribe(
        subject,
        stream=topology.EVENT_STREAM,
        ordered_consumer=True,
        cb=cb,
        deliver_policy=js_api.DeliverPolicy.ALL,
        pending_msgs_limit=1_000_000,
        pending_bytes_limit=1 << 30,
    )
    try:
        with anyio.move_on_after(timeout):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return found


async def _submit_all(nc: Client, requests: list[JobRequest]) -> None:
    """Submit through the request subject, pipelined, waiting for every verdict."""
    limiter = anyio.Semaphore(256)

    async def one(request: JobRequest) -> None:
        async with limiter:
            await _submit_one(nc, request)

    async with anyio.create_task_group() as tg:
        for request in requests:
            tg.start_soon(one, request)


class Watch:
    """The run's requests and completions as they are stored, from a core subscription taken
    before anything is submitted (so none is missed and the server serves no replaying
    consumer: the observer should not cost the path it measures)."""

    def __init__(self, run: str) -> None:
        self.kind = f"bench-{run}"
        self.agents = f"bench-{run}-"
        self.requested: dict[uuid.UUID, datetime] = {}
        self.completed: dict[uuid.UUID, JobCompleted] = {}
        self._changed = anyio.Event()

    async def on_msg(self, msg: Msg) -> None:
        events = written.events_of(msg.subject, msg.headers, msg.data)
        for event in () if isinstance(events, str) else events:
            if isinstance(event, JobRequested) and event.kind == self.kind:
                self.requested[event.originator_id] = event.timestamp
            elif isinstance(event, JobCompleted) and event.agent.startswith(self.agents):
                self.completed[event.originator_id] = event
                self._changed.set()
                self._changed = anyio.Event()

    async def until(self, done: Callable[[], bool], timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            while not done():
                await self._changed.wait()
        return done()


async def governed(
    nc: Client,
    agents: list[Client],
    jobs: int,
    payload: int,
    run: str,
    *,
    paced: bool = False,
    on_done: Callable[[int], None] | None = None,
) -> Figures:
    """N no-op jobs through the full path: request, lease, heartbeat, proposal, checks, decision,
    effect, completion, every step durable. Latency is request → job.completed.

    `paced`: one job at a time, each submitted once the one before completed, so the agents
    wait for work when it arrives (a fleet with capacity to spare): what each job stores then.
    `on_done(completed)` is called as the last job completes, before the run's figures are read
    back from the streams (so a CPU measurement taken there leaves that reading out)."""
    contract = Contract(
        scope=Scope(paths=["**"], effects=["none"]),
        inputs={"payload": "x" * payload} if payload else {},
        stopping=Stopping(lease_ttl_s=30, heartbeat_interval_s=10),
    )
    requests = [
        JobRequest(idempotency_key=f"bench-{run}-{i}", kind=f"bench-{run}", contract=contract)
        for i in range(jobs)
    ]
    all_done = anyio.Event()

    async def handler(ctx: JobContext) -> Proposal:
        # One heartbeat per job, so the path includes the lease's liveness step.
        await client_of[ctx.job_id].heartbeat(ctx)
        return Proposal(effect="none", output={"ok": True})

    client_of: dict[uuid.UUID, AgentClient] = {}
    refusals: list[str] = []

    async def agent_loop(index: int, conn: Client) -> None:
        agent = AgentClient(conn, f"bench-{run}-{index}", max_concurrent=1, kinds=[f"bench-{run}"])
        await agent.register()
        while not all_done.is_set():
            try:
                grant = await agent.claim()
            except AgentError as exc:  # throttled, say: the run's throttle figures show it
                refusals.append(str(exc))
                await anyio.sleep(1.0)
                continue
            if grant is None:  # the claim waited its whole wait at the scheduler: claim again
                continue
            client_of[grant.job_id] = agent
            await agent.work(grant, handler)

    watch = Watch(run)
    sub = await nc.subscribe(
        f"{topology.EVENT_ROOT}.*", cb=watch.on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
    )
    await nc.flush()  # the subscription is in place before the first request
    before = await stored_messages(nc)
    started = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            for i, conn in enumerate(agents):
                tg.start_soon(agent_loop, i, conn)
            if paced:
                for request in requests:
                    job_id = await _submit_one(nc, request)
                    if not await watch.until(partial(watch.completed.__contains__, job_id), timeout=60):
                        raise RuntimeError(f"bench job {job_id} did not complete within 60 s")
            else:
                await _submit_all(nc, requests)
            await watch.until(lambda: len(watch.completed) >= jobs, timeout=max(120.0, jobs / 5))
            elapsed = time.perf_counter() - started
            completed = len(watch.completed)
            if on_done is not None:
                on_done(completed)
            all_done.set()
            tg.cancel_scope.cancel()
    finally:
        await sub.unsubscribe()
    after = await stored_messages(nc)
    # Everything the run stored (agents' registrations and claims included), per completed job.
    per_job = {stream: round((after[stream] - before[stream]) / max(completed, 1), 2) for stream in after}
    latencies = [
        (e.timestamp - watch.requested[job_id]).total_seconds()
        for job_id, e in watch.completed.items()
        if job_id in watch.requested
    ]
    names = [f"bench-{run}-{i}" for i in range(len(agents))]
    return Figures(
        rate=completed / elapsed if completed else 0.0,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        count=completed,
        seconds=elapsed,
        extra={
            "requested": jobs,
            "completed": completed,
            "claims_refused": len(refusals),
            "stored_messages_per_job": {**per_job, "total": round(sum(per_job.values()), 2)},
            **await input_load(nc, names),
        },
    )


async def _submit_one(nc: Client, request: JobRequest) -> uuid.UUID:
    reply = await bus.request(nc, topology.REQUEST_SUBJECT, request, timeout=60)
    if not isinstance(reply, Accepted) or reply.job_id is None:
        raise RuntimeError(f"bench job refused: {reply}")
    return reply.job_id


async def stored_messages(nc: Client) -> dict[str, int]:
    """How many messages the event, input and proposal-object streams have stored so far (their
    last sequence: the agent stream keeps only each subject's latest, so its count would
    undercount; each proposal's record object is a chunk and a meta message)."""
    js = nc.jetstream()
    streams = (
        topology.EVENT_STREAM,
        topology.INPUT_STREAM,
        topology.AGENT_INPUT_STREAM,
        topology.PAYLOAD_STREAM,
    )
    return {stream: (await js.stream_info(stream)).state.last_seq for stream in streams}


async def input_load(nc: Client, names: list[str]) -> dict[str, object]:
    """How hard these agents pressed each service, against the throttle the services run with
    (they inherit this process's environment): the busiest agent's most inputs in one window,
    per service, and the throttle windows recorded against any of them."""
    limit, window_s = throttle.limit_from_env()
    js = nc.jetstream()
    service_of = {
        verb: spec.durable
        for spec in topology.CONSUMERS
        for verb in topology.AGENT_VERBS
        if topology.agent_subject_all(verb) in spec.filter_subjects
    }
    busiest: dict[str, int] = {}
    for name in names:
        stored: dict[str, list[datetime]] = {}
        for m in await bus.read_subject(js, topology.AGENT_INPUT_STREAM, topology.agent_input_root(name)):
            parsed = topology.parse_agent_subject(m.subject)
            if parsed is not None and parsed[1] in service_of:
                stored.setdefault(service_of[parsed[1]], []).append(m.time)
        for service, times in stored.items():
            busiest[service] = max(busiest.get(service, 0), throttle.busiest_window(times, window_s))
    throttled: Counter[str] = Counter()
    for m in await bus.read_subject(js, topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.*"):
        events = written.events_of(m.subject, m.headers, m.data)
        for event in () if isinstance(events, str) else events:  # not Warden's: nothing to count
            if (
                isinstance(event, InputRejected)
                and event.throttled_until is not None
                and event.sender in names
            ):
                throttled[event.throttled_by] += 1
    return {
        "throttle": {"limit": limit, "window_s": window_s},
        "busiest_agent_inputs_per_window": busiest,
        "throttled_windows": dict(throttled),
    }


def throttle_note(extra: dict[str, Any]) -> str:
    """One line on whether the governed run met the per-agent throttle, from `input_load`."""
    limit, window_s = extra["throttle"]["limit"], extra["throttle"]["window_s"]
    busiest = ", ".join(f"{k} {v:,}" for k, v in sorted(extra["busiest_agent_inputs_per_window"].items()))
    load = f"busiest agent's inputs per {window_s:g} s: {busiest} (throttle limit {limit:,})"
    if extra["throttled_windows"] or extra["claims_refused"]:
        windows = ", ".join(f"{k} {v}" for k, v in sorted(extra["throttled_windows"].items()))
        return (
            f"governed: THROTTLED ({windows or 'no window recorded'}; {extra['claims_refused']} claims "
            f"refused): the figure measures the throttle, not the path; {load}"
        )
    return f"governed: not throttled; {load}"


async def detection(
    nc: Client, connect: Callable[[str], object], leases: int, ttl: float, run: str
) -> tuple[Figures, Figures, Figures]:
    """Leases whose agents go silent: dead (connection closed) and hung (connected, silent).

    Each agent lets `repeated_lease_expiries` leases expire in a row, which is also the
    policy's revocation signal: the same run measures revocation latency.
    """
    from shared.policy import load_policy

    in_a_row = load_policy().revocation.repeated_lease_expiries
    contract = Contract(stopping=Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=1))
    per_kind = max(1, leases // 2)
    kinds = {"dead": per_kind, "hung": per_kind}
    requests = [
        JobRequest(idempotency_key=f"detect-{run}-{kind}-{i}", kind=f"detect-{run}-{kind}", contract=contract)
        for kind, n in kinds.items()
        for i in range(n * in_a_row)
    ]
    await _submit_all(nc, requests)

    async def silent_agent(kind: str, index: int) -> None:
        name = f"detect-{run}-{kind}-{index}"
        for _ in range(in_a_row):
            conn = await connect(name)  # type: ignore[misc]
            agent = AgentClient(conn, name, kinds=[f"detect-{run}-{kind}"])
            await agent.register()
            grant = await agent.claim()
            while grant is None:  # each claim waits at the scheduler for work
                grant = await agent.claim()
            if kind == "dead":
                await conn.close()  # gone: the lease can only expire
            job_id = grant.job_id

            def lost(e: AnyEvent, job_id: uuid.UUID = job_id) -> bool:
                return isinstance(e, LeaseExpired) and e.originator_id == job_id

            # One job's subject, not the whole stream: many agents wait at once.
            expired = await collect_events(nc, lost, 1, ttl * 20, topology.event_subject(job_id))
            if kind == "hung":
                await conn.close()
            if not expired:
                return

    async with anyio.create_task_group() as tg:
        for kind, n in kinds.items():
            for i in range(n):
                tg.start_soon(silent_agent, kind, i)

    expiries = await collect_events(
        nc, lambda e: isinstance(e, LeaseExpired) and e.agent.startswith(f"detect-{run}-"), len(requests), 30
    )
    dead = [e.detection_latency_ms for e in expiries if isinstance(e, LeaseExpired) and "-dead-" in e.agent]
    hung = [e.detection_latency_ms for e in expiries if isinstance(e, LeaseExpired) and "-hung-" in e.agent]
    revoked = await collect_events(
        nc, lambda e: isinstance(e, AgentRevoked) and e.name.startswith(f"detect-{run}-"), 2 * per_kind, 30
    )
    revocation = [
        (e.timestamp - e.signal_at).total_seconds() * 1000
        for e in revoked
        if isinstance(e, AgentRevoked) and e.signal_at is not None
    ]

    def figures(values: list[float]) -> Figures:
        return Figures(p50_ms=percentile(values, 50), p99_ms=percentile(values, 99), count=len(values))

    return figures(dead), figures(hung), figures(revocation)
