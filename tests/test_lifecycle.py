"""The job lifecycle against a real nats-server: leases, heartbeats, fencing, reclaim, tombstones."""

from __future__ import annotations

import uuid

import anyio
import pytest

from shared import bus, topology
from shared.contract import Contract, Stopping
from shared.events import (
    AnyEvent,
    InputRejected,
    JobCancelled,
    JobRequested,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    MessageRejected,
)
from shared.messages import Heartbeat, JobRequest, Rejected
from shared.sdk import AgentClient, JobContext
from shared.server import EmbeddedServer
from tests.harness import SlowHandler, client, events_of, running, submit, wait_for_event


def quick_contract(ttl: float = 0.6, attempts: int = 3, **kw: object) -> Contract:
    return Contract(
        stopping=Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=attempts),
        **kw,  # type: ignore[arg-type]
    )


def request(key: str | None = None, *, kind: str = "noop", contract: Contract | None = None) -> JobRequest:
    return JobRequest(
        idempotency_key=key or str(uuid.uuid4()), kind=kind, contract=contract or quick_contract()
    )


async def test_a_repeated_idempotency_key_makes_one_job(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        first = await submit(nc, request("same-key"))
        second = await bus.request(nc, topology.REQUEST_SUBJECT, request("same-key"))
        assert second.job_id == first  # type: ignore[union-attr]
        assert second.duplicate  # type: ignore[union-attr]
        events = await events_of(nc)
        assert [e.originator_id for e in events if isinstance(e, JobRequested)] == [first]


async def test_an_invalid_request_is_rejected_naming_every_bad_field(nats_server: EmbeddedServer) -> None:
    body = (
        b'{"kind": "noop", "contract": {"stopping": {"max_attempts": 0, '
        b'"lease_ttl_s": 5, "heartbeat_interval_s": 10}, "colour": "red"}}'
    )
    async with running(nats_server.url), client(nats_server.url) as nc:
        reply = await bus.request(nc, topology.REQUEST_SUBJECT, body)
        assert isinstance(reply, Rejected)
        paths = {e.path for e in reply.errors}
        assert "$.idempotency_key" in paths
        assert "$.contract.colour" in paths
        assert "$.contract.stopping.max_attempts" in paths
        rejection = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(rejection, InputRejected)
        assert rejection.subject == topology.REQUEST_SUBJECT
        assert {e.path for e in rejection.errors} == paths


async def test_a_request_whose_heartbeat_outlasts_its_ttl_is_rejected(nats_server: EmbeddedServer) -> None:
    body = request(contract=Contract(stopping=Stopping(lease_ttl_s=5, heartbeat_interval_s=10)))
    async with running(nats_server.url), client(nats_server.url) as nc:
        reply = await bus.request(nc, topology.REQUEST_SUBJECT, body)
        assert isinstance(reply, Rejected)
        assert [e.path for e in reply.errors] == ["$.contract.stopping.heartbeat_interval_s"]


async def test_a_hung_agent_loses_its_lease_to_another_agent(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        hung = AgentClient(nc, "hung")
        await hung.register()
        job_id = await submit(nc, request())
        grant = await hung.claim()
        assert grant is not None and grant.job_id == job_id and grant.epoch == 1
        # Alive and connected, but silent: no heartbeat is ever sent.
        expired = await wait_for_event(nc, lambda e: isinstance(e, LeaseExpired), timeout=10)
        assert isinstance(expired, LeaseExpired)
        assert expired.agent == "hung" and expired.epoch == 1
        assert expired.last_heartbeat is None
        assert expired.detection_latency_ms >= 0
        assert expired.detected_at >= expired.deadline

        other = AgentClient(nc, "rescuer")
        await other.register()
        regrant = await other.claim()
        assert regrant is not None and regrant.job_id == job_id and regrant.epoch == 2


async def test_messages_under_a_stale_epoch_are_rejected_and_recorded(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        first = AgentClient(nc, "first")
        await first.register()
        second = AgentClient(nc, "second")
        await second.register()
        job_id = await submit(nc, request())
        old = await first.claim()
        assert old is not None
        await wait_for_event(nc, lambda e: isinstance(e, LeaseExpired), timeout=10)
        new = await second.claim()
        assert new is not None and new.epoch == 2

        ack = await first.heartbeat(JobContext(grant=old))
        assert ack.standing == "expired"

        rejected = await wait_for_event(
            nc, lambda e: isinstance(e, MessageRejected) and e.verb == "heartbeat"
        )
        assert isinstance(rejected, MessageRejected)
        assert rejected.originator_id == job_id
        assert rejected.agent == "first" and rejected.epoch == 1 and rejected.current_epoch == 2
        assert "stale" in rejected.reason

        # The live lease is untouched by the stale message.
        ok = await second.heartbeat(JobContext(grant=new))
        assert ok.standing == "extended"


async def test_max_attempts_reached_leaves_a_tombstone_with_the_dossier(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "flaky")
        await agent.register()
        job_id = await submit(nc, request(contract=quick_contract(ttl=0.4, attempts=2)))
        for epoch in (1, 2):
            grant = await agent.claim()
            assert grant is not None and grant.epoch == epoch

            def expired(e: AnyEvent, ep: int = epoch) -> bool:
                return isinstance(e, LeaseExpired) and e.epoch == ep

            await wait_for_event(nc, expired, timeout=10)
        tomb = await wait_for_event(nc, lambda e: isinstance(e, JobTombstoned), timeout=10)
        assert isinstance(tomb, JobTombstoned)
        assert tomb.attempts == 2 and "max attempts (2)" in tomb.reason

        dossier = await events_of(nc, topology.event_subject(job_id))
        grants = [e for e in dossier if isinstance(e, LeaseGranted)]
        expiries = [e for e in dossier if isinstance(e, LeaseExpired)]
        assert [g.epoch for g in grants] == [1, 2]
        assert [x.epoch for x in expiries] == [1, 2]
        assert all(x.agent == "flaky" for x in expiries)
        assert await agent.claim(wait_s=1.0) is None  # a dead job is never offered again


async def test_an_operator_requeues_a_tombstoned_job_with_fresh_attempts(nats_server: EmbeddedServer) -> None:
    from shared.messages import Accepted, OperatorCommand

    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "a1")
        await agent.register()
        job_id = await submit(nc, request(contract=quick_contract(ttl=0.4, attempts=1)))
        assert await agent.claim() is not None
        await wait_for_event(nc, lambda e: isinstance(e, JobTombstoned), timeout=10)
        reply = await bus.request(
            nc,
            topology.operator_subject("requeue"),
            OperatorCommand(operator="alice", reason="flaky network fixed", job_id=job_id),
        )
        assert isinstance(reply, Accepted)
        grant = await agent.claim()
        assert grant is not None and grant.job_id == job_id and grant.epoch == 2


async def test_a_revocation_reaches_the_sdk_on_the_next_heartbeat_and_cancels_the_handler(
    nats_server: EmbeddedServer,
) -> None:
    from shared.messages import OperatorCommand

    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "worker")
        await agent.register()
        job_id = await submit(nc, request(contract=quick_contract(ttl=2.0)))
        grant = await agent.claim()
        assert grant is not None
        handler = SlowHandler()

        async def cancel_when_started() -> None:
            await handler.started.wait()
            await bus.request(
                nc,
                topology.operator_subject("cancel"),
                OperatorCommand(operator="bob", reason="wrong repository", job_id=job_id),
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_started)
            with anyio.fail_after(10):
                outcome = await agent.work(grant, handler)
        assert handler.cancelled == [True]
        assert outcome.status == "revoked"
        event = await wait_for_event(nc, lambda e: isinstance(e, JobCancelled))
        assert isinstance(event, JobCancelled) and event.by == "bob"


@pytest.mark.usefixtures("permissive_policy")
async def test_two_scheduler_replicas_never_grant_one_job_twice(nats_server: EmbeddedServer) -> None:
    jobs = 40
    async with (
        running(nats_server.url, ["scheduler", "reconciler"], name="replica-a"),
        running(nats_server.url, ["scheduler"], name="replica-b"),
        client(nats_server.url) as nc,
    ):
        for i in range(jobs):
            await submit(nc, request(f"race-{i}", contract=quick_contract(ttl=30)))
        agents = [AgentClient(nc, f"racer{i}", max_concurrent=jobs) for i in range(6)]
        for a in agents:
            await a.register()
        grants = []

        async def claim_all(a: AgentClient) -> None:
            while (g := await a.claim(wait_s=1.0)) is not None:
                grants.append((a.name, g.job_id, g.epoch))

        async with anyio.create_task_group() as tg:
            for a in agents:
                tg.start_soon(claim_all, a)
        granted_jobs = [job for _, job, _ in grants]
        assert len(granted_jobs) == jobs, sorted(grants, key=lambda g: str(g[1]))
        assert len(set(granted_jobs)) == jobs
        stored = [e for e in await events_of(nc) if isinstance(e, LeaseGranted)]
        assert len(stored) == jobs
        assert len({e.originator_id for e in stored}) == jobs


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"type": "agent.teleport"}',
        b'{"job_id": 7, "epoch": "x"}',
        b"x" * (topology.MAX_INPUT_BYTES + 100),
    ],
)
async def test_malformed_heartbeats_are_recorded_and_the_reconciler_keeps_running(
    nats_server: EmbeddedServer, body: bytes
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        reply = await bus.request(nc, topology.agent_subject("mallory", "heartbeat"), body)
        assert isinstance(reply, Rejected)
        event = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(event, InputRejected) and event.sender == "mallory"
        # Still serving: a well-formed heartbeat for an unknown job gets its own answer.
        reply = await bus.request(
            nc,
            topology.agent_subject("mallory", "heartbeat"),
            Heartbeat(job_id=uuid.uuid4(), epoch=1),
        )
        assert isinstance(reply, Rejected) and "no job" in reply.errors[0].message


async def test_a_retry_goes_to_another_present_agent_and_back_to_the_same_one_when_alone(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        liar = AgentClient(nc, "liar")
        await liar.register()
        job_id = await submit(nc, request(contract=quick_contract(ttl=5.0, attempts=5)))
        grant = await liar.claim()
        assert grant is not None and grant.job_id == job_id
        await liar.release(JobContext(grant=grant), "gave up")
        # Alone, the same agent gets the retry: no job waits for an agent that is not there.
        again = await liar.claim()
        assert again is not None and again.job_id == job_id and again.epoch == 2
        await liar.release(JobContext(grant=again), "gave up again")
        honest = AgentClient(nc, "honest")
        await honest.register()
        assert await honest.claim() is not None  # takes the retry...
        await wait_for_event(nc, lambda e: isinstance(e, LeaseGranted) and e.epoch == 3)
        granted = [
            e for e in await events_of(nc, topology.event_subject(job_id)) if isinstance(e, LeaseGranted)
        ]
        assert [(g.agent, g.epoch) for g in granted] == [("liar", 1), ("liar", 2), ("honest", 3)]


async def test_a_job_failed_by_one_agent_waits_for_another_present_agent(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        liar, honest = AgentClient(nc, "liar2"), AgentClient(nc, "honest2")
        await liar.register()
        await honest.register()
        assert await honest.claim(wait_s=1.0) is None  # present, asking for work
        job_id = await submit(nc, request(contract=quick_contract(ttl=5.0, attempts=5)))
        grant = await liar.claim()
        assert grant is not None and grant.job_id == job_id
        await liar.release(JobContext(grant=grant), "gave up")
        assert await liar.claim(wait_s=1.0) is None  # the retry is kept for the other agent
        retry = await honest.claim()
        assert retry is not None and retry.job_id == job_id and retry.epoch == 2


MALFORMED = {
    "not JSON": b"not json",
    "wrong types": b'{"job_id": 7, "epoch": "x", "operator": 5, "kind": [], "idempotency_key": {}}',
    "unknown tag": b'{"type": "agent.teleport"}',
    "oversize": b'{"note": "' + b"x" * topology.MAX_INPUT_BYTES + b'"}',
}


async def test_malformed_input_on_every_input_subject_is_recorded_and_the_consumers_keep_running(
    nats_server: EmbeddedServer,
) -> None:
    subjects = [
        topology.REQUEST_SUBJECT,
        *(topology.agent_subject("mallory", verb) for verb in topology.AGENT_VERBS),
        *(topology.operator_subject(verb) for verb in topology.OPERATOR_VERBS),
    ]
    async with running(nats_server.url), client(nats_server.url) as nc:
        for subject in subjects:
            for what, body in MALFORMED.items():
                reply = await bus.request(nc, subject, body)
                assert isinstance(reply, Rejected), (subject, what, reply)
                assert reply.errors, (subject, what)
        recorded = [e for e in await events_of(nc) if isinstance(e, InputRejected)]
        # One record per stored input (sequences count per input stream).
        assert len({(topology.stream_of(e.subject), e.input_seq) for e in recorded}) == len(recorded)
        assert all(e.errors and e.errors[0].message for e in recorded)
        assert sorted(e.subject for e in recorded) == sorted(s for s in subjects for _ in MALFORMED)
        # Every consumer still serves well-formed input afterwards.
        job_id = await submit(nc, request())
        agent = AgentClient(nc, "after-the-storm")
        await agent.register()
        grant = await agent.claim()
        assert grant is not None and grant.job_id == job_id
        assert (await agent.heartbeat(JobContext(grant=grant))).standing == "extended"
