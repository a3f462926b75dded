"""Flooding is bounded, against a real nats-server started from ops/nats/single.conf with users.

One agent floods its own input subjects from its own process, as fast as its credential lets it,
while another agent registers, claims and completes a job. The flood must not starve the other
agent, nor become a flood of events: the flooder's inputs are refused by the throttle, a few
records per window, and the server keeps serving. And it must not fill the disk: the agent input
stream keeps each subject's latest K messages, so whatever a credential sends, what it keeps
stored is bounded (`topology.agent_input_bound`), and requests and operator commands, in their
own stream, are never refused because of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.text import TextReceiveStream
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import bus, credentials, throttle, topology
from shared.contract import Contract, Stopping
from shared.events import AnyEvent, InputRejected, JobCompleted
from shared.messages import Accepted, JobRequest
from shared.sdk import AgentClient, JobContext, Outcome, Proposal, connect_agent
from tests import opsnats
from tests.harness import events_of, running, wait_for_event
from tests.test_credentials import add_agent

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ["scheduler", "reconciler", "checker", "applier"]
# How far ahead of the honest agent the flood is before it starts: its first inputs queue
# behind this many of the flooder's in every service's consumer.
HEAD_START = 5_000
# The whole flood: thousands of inputs, sent as fast as the server takes them.
FLOOD = 20_000
LEASE_TTL_S = 30.0


async def start_flooder(url: str, agent: str, password: str) -> anyio.abc.Process:
    env = {**os.environ, credentials.PASSWORD_ENV: password}
    cmd = [sys.executable, "-m", "tests.flood_agent", url, agent, "--count", str(FLOOD)]
    return await anyio.open_process(cmd, cwd=ROOT, env=env)


async def stop_flooder(process: anyio.abc.Process) -> int:
    """SIGTERM the flooder (this test started it, by its pid); how many messages it sent."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it finished its count meanwhile
            process.send_signal(signal.SIGTERM)
    assert process.stdout is not None
    lines = []
    with anyio.fail_after(30):
        async for text in TextReceiveStream(process.stdout):
            lines.append(text)
        await process.wait()
    last = json.loads("".join(lines).strip().splitlines()[-1])
    return int(last["sent"])


async def flood_stored(nc: Client, agent: str, count: int) -> None:
    """Returns once the input stream holds `count` of `agent`'s inputs (read as they are stored)."""
    seen = 0
    enough = anyio.Event()

    async def cb(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        if seen >= count:
            enough.set()

    js = nc.jetstream()
    sub = await js.subscribe(topology.agent_input_root(agent), ordered_consumer=True, cb=cb)
    try:
        await enough.wait()
    finally:
        await sub.unsubscribe()


async def honest_job(
    url: str, password: str, operator: Client, contract: Contract
) -> tuple[list[Outcome], AnyEvent]:
    """Submit a job, and have agent `honest` register, claim and complete it."""
    request = JobRequest(idempotency_key=str(uuid.uuid4()), kind="k", contract=contract)
    reply = await bus.request(operator, topology.REQUEST_SUBJECT, request, timeout=3 * LEASE_TTL_S)
    assert isinstance(reply, Accepted) and reply.job_id is not None, reply
    job_id = reply.job_id
    nc = await connect_agent(url, "honest", user=credentials.agent_user("honest"), password=password)
    try:
        honest = AgentClient(nc, "honest", timeout=3 * LEASE_TTL_S)

        async def work(ctx: JobContext) -> Proposal:
            return Proposal(output={"done": True})

        outcomes = await honest.run(work, jobs=1)
    finally:
        await nc.close()
    done = await wait_for_event(
        operator, lambda e: isinstance(e, JobCompleted) and e.originator_id == job_id, timeout=3 * LEASE_TTL_S
    )
    return outcomes, done


async def test_a_flooding_agent_is_throttled_while_another_agents_job_completes(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ops_server.server.url
    flooder_password = add_agent(ops_server, "flooder")
    honest_password = add_agent(ops_server, "honest")
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    # The throttle is the point here: a ring as wide as the flood keeps every flooded input for
    # the services to read (with the default ring they read a fraction, and are never throttled:
    # see the test below).
    monkeypatch.setenv("WARDEN_AGENT_INPUT_PER_SUBJECT", str(FLOOD))
    contract = Contract(stopping=Stopping(lease_ttl_s=LEASE_TTL_S, heartbeat_interval_s=5))
    async with (
        running(url, SERVICES),
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
        # Reading the input stream as it fills takes a consumer on it: the test observes as a
        # service would (operators read the record by direct gets).
        opsnats.connected(url, **opsnats.service_credentials()) as observer,
    ):
        flooder = await start_flooder(url, "flooder", flooder_password)
        try:
            with anyio.fail_after(60):
                await flood_stored(observer, "flooder", HEAD_START)
            started = time.monotonic()
            # The honest agent's whole job, from its submission, within the contract's own clock:
            # three lease lifetimes (each of its inputs may wait behind the flood in the stream).
            with anyio.fail_after(3 * LEASE_TTL_S):
                outcomes, done = await honest_job(url, honest_password, operator, contract)
            took = time.monotonic() - started
        finally:
            sent = await stop_flooder(flooder)
        assert [o.status for o in outcomes] == ["proposed"], outcomes
        assert isinstance(done, JobCompleted) and done.agent == "honest"
        # The server still serves (the operator reads the record); each service's ack floor
        # says how far it has handled its inputs, the flood included.
        js = observer.jetstream()
        assert (await operator.jetstream().stream_info(topology.EVENT_STREAM)).state.messages > 0
        floors = {}
        for spec in (topology.SCHEDULER_CONSUMER, topology.RECONCILER_CONSUMER, topology.CHECKER_CONSUMER):
            info = await js.consumer_info(topology.AGENT_INPUT_STREAM, spec.durable)
            assert info.ack_floor is not None
            floors[spec.durable] = info.ack_floor.stream_seq
        stored = await bus.read_subject(js, topology.AGENT_INPUT_STREAM, topology.agent_input_root("flooder"))
        consumed = [m for m in stored if not m.subject.endswith(f".{topology.PAYLOAD_VERB}")]
        records = [
            e for e in await events_of(operator) if isinstance(e, InputRejected) and e.sender == "flooder"
        ]
        windows = [r for r in records if r.throttled_until is not None]
        limit, window_s = throttle.limit_from_env()
        print(
            f"flood: sent {sent}, stored {len(stored)}, records {len(records)} "
            f"({len(windows)} throttle windows), stored over "
            f"{(stored[-1].time - stored[0].time).total_seconds():.1f}s, honest job took {took:.1f}s"
        )
        assert len(stored) == sent >= HEAD_START, "every flooded input was stored (NATS refuses none)"
        assert windows, "the flooder was throttled"
        # A flood is a few records per window and service, never one per message...
        per_service = {r.throttled_by for r in windows}
        assert per_service == {"scheduler", "reconciler", "checker"}
        assert len(records) <= (limit + 1) * (len(windows) + len(per_service))
        # However long the flood took to store, each service opened at most one window per
        # window_s of it (and admits what it reads after that input's window closed, one more
        # window's worth at most): the records are bounded by the flood's time, not by how many
        # messages it sent. (An agent below limit / window_s per service is never throttled.)
        span = (stored[-1].time - stored[0].time).total_seconds()
        bound = (limit + 1) * len(per_service) * (int(span // window_s) + 2)
        assert bound < len(consumed), f"the flood ({span:.1f}s) was too slow to test the throttle"
        assert len(records) <= bound, (len(records), bound, span)
        # ...and every input still has its reason: its own record, or a throttle window's.
        own = {r.input_seq for r in records}
        by_service = {
            "register": "scheduler",
            "claim": "scheduler",
            "heartbeat": "reconciler",
            "release": "reconciler",
            "propose": "checker",
        }
        for m in consumed:
            service = by_service[m.subject.rsplit(".", 1)[-1]]
            if m.seq in own or m.seq > floors[service]:
                continue
            assert any(
                w.throttled_by == service
                and w.throttled_until is not None
                and w.throttled_until - timedelta(seconds=window_s) <= m.time < w.throttled_until
                for w in windows
            ), f"input {m.seq} on {m.subject} has no recorded reason"


# The ring in the test below: small, so the flood passes it several times over in a few seconds.
RING = 8


async def flood_every_subject(nc: Client, agent: str, per_subject: int) -> dict[str, int]:
    """Max-size inputs on every subject `agent`'s credential may publish on, each acked (so each
    was stored); how many went to each subject."""
    js = nc.jetstream()
    body = b"x" * topology.INPUT_MAX_MSG_BYTES  # the most the stream takes (no headers sent)
    subjects = [
        *(topology.agent_subject(agent, v) for v in topology.AGENT_VERBS),
        topology.payload_subject(agent),
    ]
    sent = dict.fromkeys(subjects, 0)
    for _ in range(per_subject):
        for subject in subjects:
            await js.publish(subject, body, timeout=30)
            sent[subject] += 1
    return sent


async def test_a_flooding_agent_keeps_at_most_its_bound_stored_and_starves_no_one(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ops_server.server.url
    flooder_password = add_agent(ops_server, "flooder")
    honest_password = add_agent(ops_server, "honest")
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    monkeypatch.setenv("WARDEN_AGENT_INPUT_PER_SUBJECT", str(RING))
    # Low enough that the flooder is throttled by what it gets read before the ring evicts it.
    monkeypatch.setenv("WARDEN_AGENT_INPUT_LIMIT", "4")
    bound = topology.agent_input_bound()
    assert bound == 6 * RING * (topology.INPUT_MAX_MSG_BYTES + topology.STORED_MESSAGE_OVERHEAD)
    contract = Contract(stopping=Stopping(lease_ttl_s=LEASE_TTL_S, heartbeat_interval_s=5))
    async with (
        running(url, SERVICES),
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
        opsnats.connected(url, **opsnats.service_credentials()) as observer,
    ):
        js = observer.jetstream()
        inputs_before = (await js.stream_info(topology.INPUT_STREAM)).state.last_seq
        flooder = await connect_agent(
            url, "flooder", user=credentials.agent_user("flooder"), password=flooder_password
        )
        try:
            # A dotted verb is no subject of its credential: the server refuses it, stores nothing.
            with anyio.fail_after(10), pytest.raises(bus.PermissionDenied, match="publish"):
                await bus.request(flooder, "warden.in.agent.flooder.x.register", b"{}", timeout=30)
            sent: dict[str, int] = {}
            submitted: list[Accepted] = []

            async def flood() -> None:
                sent.update(await flood_every_subject(flooder, "flooder", 3 * RING))

            async def honest_and_a_client() -> None:
                outcomes, done = await honest_job(url, honest_password, operator, contract)
                assert [o.status for o in outcomes] == ["proposed"], outcomes
                assert isinstance(done, JobCompleted) and done.agent == "honest"
                # A client's new request is accepted too (a kind no agent here takes: it waits).
                request = JobRequest(idempotency_key=str(uuid.uuid4()), kind="later", contract=contract)
                reply = await bus.request(operator, topology.REQUEST_SUBJECT, request, timeout=LEASE_TTL_S)
                assert isinstance(reply, Accepted), reply
                submitted.append(reply)

            started = time.monotonic()
            with anyio.fail_after(3 * LEASE_TTL_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(flood)
                    tg.start_soon(honest_and_a_client)
            took = time.monotonic() - started
        finally:
            await flooder.close()
        assert submitted and sum(sent.values()) == 6 * 3 * RING

        # What the flooder keeps stored: each subject's latest RING, within the documented bound.
        info = await js.stream_info(
            topology.AGENT_INPUT_STREAM, subjects_filter=topology.agent_input_root("flooder")
        )
        kept = dict(info.state.subjects or {})
        assert set(kept) == set(sent) and all(n == RING for n in kept.values()), kept
        stored = await bus.read_subject(js, topology.AGENT_INPUT_STREAM, topology.agent_input_root("flooder"))
        size = sum(
            len(m.data) + len(m.subject) + sum(len(k) + len(v) for k, v in m.headers.items()) for m in stored
        )
        assert len(stored) == 6 * RING and size <= bound, (len(stored), size, bound)
        # The other stream took only the two job requests: nothing of the flooder's, nothing refused.
        requests = await bus.read_subject(js, topology.INPUT_STREAM, topology.REQUEST_SUBJECT)
        assert [m.seq for m in requests if m.seq > inputs_before] == [inputs_before + 1, inputs_before + 2]
        assert (await js.stream_info(topology.INPUT_STREAM)).state.last_seq == inputs_before + 2
        # The event stream holds nothing the flooder caused but the records of its refusals:
        # no registration, lease or job of its, and the honest agent was never refused.
        events = await events_of(operator)
        about_flooder = [
            e
            for e in events
            if getattr(e, "agent", None) == "flooder" or getattr(e, "sender", None) == "flooder"
        ]
        assert about_flooder and all(isinstance(e, InputRejected) for e in about_flooder)
        assert not [e for e in events if isinstance(e, InputRejected) and e.sender == "honest"]
        # The throttle recorded it: its windows stand for what the services read of the flood.
        windows = [e for e in about_flooder if isinstance(e, InputRejected) and e.throttled_until is not None]
        assert windows, "the flooder was throttled"
        print(
            f"ring flood: sent {sum(sent.values())} max-size inputs ({sum(sent.values()) * body_mib():.0f} MiB), "
            f"kept {len(stored)} ({size / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB), "
            f"{len(about_flooder)} records ({len(windows)} throttle windows), honest job and request took {took:.1f}s"
        )


def body_mib() -> float:
    return topology.INPUT_MAX_MSG_BYTES / 2**20
