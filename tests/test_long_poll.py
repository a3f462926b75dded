"""A claim that finds no work waits at the scheduler for some, instead of an immediate "no work"
the agent answers with another claim (each one a stored input).

Against a real nats-server with Warden's services: a claim is seen to wait when the scheduler
has acknowledged its input (the ack on `$JS.ACK.<stream>.<durable>...` names the claim's stream
sequence) and no answer has come; then work arrives, or the agent is suspended, or the wait ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import bus, topology
from shared.contract import Contract, Stopping
from shared.events import JobRequested, LeaseGranted
from shared.forensics import log
from shared.messages import (
    Accepted,
    AnyReply,
    Claim,
    LeaseGrant,
    OperatorCommand,
    Register,
    Rejected,
    reply_decoder,
)
from shared.sdk import AgentClient, JobContext, Proposal, ServeResult
from shared.server import EmbeddedServer
from tests.harness import client, events_of, job_request, running, submit

SERVICES = ["scheduler", "reconciler", "revoker"]
WAIT_S = 10.0


def contract() -> Contract:
    return Contract(stopping=Stopping(lease_ttl_s=60, heartbeat_interval_s=15, max_attempts=1))


def stream_seq(ack_subject: str) -> int:
    """The stream sequence an ack subject names ($JS.ACK.<stream>.<durable>.<delivered>.<sseq>...,
    or with a domain and account hash before the stream in the newer form)."""
    tokens = ack_subject.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


class Acks:
    """The scheduler's acks of agent inputs, as it sends them: a claim acked and not answered
    is a claim that waits."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self._changed = anyio.Event()

    async def on_ack(self, msg: Msg) -> None:
        if msg.data in (b"", b"+ACK"):
            self.seen.add(stream_seq(msg.subject))
            self._changed.set()
            self._changed = anyio.Event()

    async def of(self, seq: int) -> None:
        with anyio.fail_after(10):
            while seq not in self.seen:
                await self._changed.wait()


@asynccontextmanager
async def scheduler_acks(nc: Client) -> AsyncIterator[Acks]:
    acks = Acks()
    stream = topology.stream_of(topology.agent_subject("any", "claim"))
    sub = await nc.subscribe(f"$JS.ACK.{stream}.{topology.SCHEDULER_CONSUMER.durable}.>", cb=acks.on_ack)
    try:
        yield acks
    finally:
        await sub.unsubscribe()


@dataclass
class SentClaim:
    seq: int
    sent: float
    answers: Subscription

    async def answer(self, timeout: float = WAIT_S + 5) -> AnyReply:
        msg = await self.answers.next_msg(timeout=timeout)
        answer: AnyReply = reply_decoder.decode(msg.data)
        return answer

    @property
    def unanswered(self) -> bool:
        return self.answers.pending_msgs == 0


async def register(nc: Client, name: str) -> None:
    reply = await bus.request(
        nc,
        topology.agent_subject(name, "register"),
        Register(),
        inbox_prefix=topology.reply_inbox_prefix(name),
    )
    assert isinstance(reply, Accepted), reply


async def send_claim(nc: Client, name: str, wait_s: float = WAIT_S) -> SentClaim:
    """Store a claim of `name` as the SDK would, keeping its stream sequence and its answers."""
    inbox = f"{topology.reply_inbox_prefix(name)}.{uuid.uuid4().hex}"
    answers = await nc.subscribe(inbox)
    subject = topology.agent_subject(name, "claim")
    claim = Claim(wait_s=wait_s, sent_at=datetime.now(UTC), holding=[])
    sent = time.monotonic()
    ack = await nc.jetstream().publish(
        subject, msgspec.json.encode(claim), headers={topology.REPLY_HEADER: inbox}
    )
    return SentClaim(seq=ack.seq, sent=sent, answers=answers)


async def waiting(nc: Client, acks: Acks, name: str, wait_s: float = WAIT_S) -> SentClaim:
    """A claim of `name` that the scheduler has taken in and not answered: it waits."""
    claim = await send_claim(nc, name, wait_s)
    await acks.of(claim.seq)
    assert claim.unanswered, "answered at once: the claim did not wait"
    return claim


async def test_a_claim_sent_before_any_job_exists_is_granted_the_job_submitted_while_it_waits(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc, scheduler_acks(nc) as acks:
        await register(nc, "early")
        claim = await waiting(nc, acks, "early")
        submitted = time.monotonic()
        job_id = await submit(nc, job_request(contract()))
        grant = await claim.answer()
        answered = time.monotonic()
    assert isinstance(grant, LeaseGrant) and grant.job_id == job_id
    print(
        f"claim waited {submitted - claim.sent:.3f}s before the job existed; granted "
        f"{answered - submitted:.3f}s after its submission (wait {WAIT_S:g}s)"
    )
    # Granted as the job arrived, not when the wait ended: well inside the claim's wait.
    assert answered - claim.sent < WAIT_S / 2


async def test_a_job_submitted_to_a_waiting_claim_is_requested_and_granted_in_one_stored_message(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc, scheduler_acks(nc) as acks:
        await register(nc, "ready")
        claim = await waiting(nc, acks, "ready")
        job_id = await submit(nc, job_request(contract()))
        grant = await claim.answer()
        assert isinstance(grant, LeaseGrant) and grant.job_id == job_id
        logged = await log.job_events(nc.jetstream(), job_id)
        subject = topology.event_subject(job_id)
        info = await nc.jetstream().stream_info(topology.EVENT_STREAM, subjects_filter=subject)
    # The request's save carries the grant: one message, the request first, versions 1 and 2.
    assert info.state.subjects == {subject: 1}
    requested, granted = (e.event for e in logged)
    assert isinstance(requested, JobRequested) and requested.originator_version == 1
    assert isinstance(granted, LeaseGranted) and granted.originator_version == 2
    assert len({e.seq for e in logged}) == 1
    assert (granted.agent, granted.claim_seq, granted.epoch) == ("ready", claim.seq, 1)


async def test_a_claim_with_a_one_second_wait_and_no_work_is_answered_no_work_after_about_a_second(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        agent = AgentClient(nc, "patient")
        await agent.register()
        asked = time.monotonic()
        grant = await agent.claim(wait_s=1.0)
        took = time.monotonic() - asked
        subject = topology.agent_subject("patient", "claim")
        info = await nc.jetstream().stream_info(topology.stream_of(subject), subjects_filter=subject)
    assert grant is None
    print(f"no work after {took:.3f}s of a 1 s wait")
    # It waited (an immediate answer takes milliseconds) and was answered before the agent's
    # wait ended, with a margin for the answer to travel.
    assert 0.6 <= took < 1.0 + 0.5
    assert info.state.subjects == {subject: 1}, "one stored claim for the whole wait"


async def test_a_waiting_claim_of_an_agent_suspended_meanwhile_is_answered_refused(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc, scheduler_acks(nc) as acks:
        await register(nc, "doomed")
        claim = await waiting(nc, acks, "doomed")
        suspended = await bus.request(
            nc,
            topology.operator_subject("suspend"),
            OperatorCommand(operator="alice", reason="paging", agent="doomed"),
        )
        assert isinstance(suspended, Accepted), suspended
        refused = await claim.answer()
    assert isinstance(refused, Rejected), refused
    assert any("doomed is suspended" in e.message for e in refused.errors), refused.errors


async def test_two_waiting_claims_and_one_job_make_one_grant_to_the_older_and_the_other_waits_on(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc, scheduler_acks(nc) as acks:
        await register(nc, "first")
        await register(nc, "second")
        older = await waiting(nc, acks, "first")
        newer = await waiting(nc, acks, "second")
        one = await submit(nc, job_request(contract()))
        granted = await older.answer()
        assert isinstance(granted, LeaseGrant) and granted.job_id == one
        assert newer.unanswered  # no "no work" for it: it waits on
        two = await submit(nc, job_request(contract()))
        later = await newer.answer()
        assert isinstance(later, LeaseGrant) and later.job_id == two
        grants = [e for e in await events_of(nc) if isinstance(e, LeaseGranted)]
    assert sorted((g.agent, g.originator_id) for g in grants) == sorted([("first", one), ("second", two)])
    assert {g.claim_seq for g in grants} == {older.seq, newer.seq}


async def test_claims_waiting_at_two_scheduler_replicas_are_granted_each_job_once(
    nats_server: EmbeddedServer,
) -> None:
    names = [f"fleet{i}" for i in range(4)]
    async with (
        running(nats_server.url, SERVICES, name="replica-a"),
        running(nats_server.url, ["scheduler"], name="replica-b"),
        client(nats_server.url) as nc,
        scheduler_acks(nc) as acks,
    ):
        for name in names:
            await register(nc, name)
        # Each claim lands on whichever replica fetches it, and waits there.
        claims = [await waiting(nc, acks, name) for name in names]
        answers: dict[str, AnyReply] = {}
        two = anyio.Event()

        async def hear(name: str, claim: SentClaim) -> None:
            answers[name] = await claim.answer()
            if len(answers) == 2:
                two.set()

        async with anyio.create_task_group() as tg:
            for name, claim in zip(names, claims, strict=True):
                tg.start_soon(hear, name, claim)
            jobs = [await submit(nc, job_request(contract())) for _ in range(2)]
            with anyio.fail_after(WAIT_S / 2):
                await two.wait()
            first_two = dict(answers)
            jobs += [await submit(nc, job_request(contract())) for _ in range(2)]
        grants = [e for e in await events_of(nc) if isinstance(e, LeaseGranted)]
    assert all(isinstance(a, LeaseGrant) for a in answers.values()), answers
    # Two jobs, two grants: the other two claims waited on (no "no work"), for the next two.
    assert len(first_two) == 2
    assert sorted(a.job_id for a in first_two.values() if isinstance(a, LeaseGrant)) == sorted(jobs[:2])
    assert sorted(g.originator_id for g in grants) == sorted(jobs), "each job granted once"
    assert {g.agent for g in grants} == set(names)


async def test_an_idle_agent_told_to_stop_stops_waiting_for_work_at_once(nats_server: EmbeddedServer) -> None:
    async def handler(ctx: JobContext) -> Proposal:
        raise AssertionError("no job exists")

    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc, scheduler_acks(nc) as acks:
        agent = AgentClient(nc, "idler")
        served: list[ServeResult] = []

        async def serve() -> None:
            served.append(await agent.serve(handler))

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            # Its registration and its first claim are the agent stream's first two inputs.
            await acks.of(2)
            stopped = time.monotonic()
            agent.stop("test over")
        took = time.monotonic() - stopped
    assert [r.reason for r in served] == ["test over"]
    print(f"stopped {took:.3f}s after being told to (its claim could wait {agent.claim_wait_s:g}s)")
    assert took < agent.claim_wait_s / 4
