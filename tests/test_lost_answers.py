"""Answers lost in an outage spend no attempt and fence nothing valid.

A broker restart can lose a claim's answer after the lease was recorded (the agent never learns
it holds the lease, which would expire and spend an attempt), and can deliver an already handled
heartbeat again after the lease ended (which would be recorded as a fenced message). Both are
driven here directly, against real services on a real nats-server.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from shared import bus, topology
from shared.contract import Contract, Stopping
from shared.events import JobCompleted, LeaseGranted, MessageRejected
from shared.messages import Accepted, Claim, LeaseGrant, NoWork, Register
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, events_of, job_request, running, submit, wait_for_event


def contract() -> Contract:
    return Contract(stopping=Stopping(lease_ttl_s=60, heartbeat_interval_s=15, max_attempts=1))


async def raw_claim(nc: object, name: str, holding: list[UUID] | None, wait_s: float = 5.0) -> object:
    """A claim as any client may send it: the SDK's bookkeeping bypassed."""
    return await bus.request(
        nc,  # type: ignore[arg-type]
        topology.agent_subject(name, "claim"),
        Claim(wait_s=wait_s, holding=holding),
        timeout=wait_s,
        inbox_prefix=topology.reply_inbox_prefix(name),
    )


async def test_a_lease_whose_grant_never_reached_its_agent_is_handed_back_on_its_next_claim(
    nats_server: EmbeddedServer, permissive_policy: Path
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        reply = await bus.request(
            nc,
            topology.agent_subject("forgetful", "register"),
            Register(max_concurrent=2),
            inbox_prefix=topology.reply_inbox_prefix("forgetful"),
        )
        assert isinstance(reply, Accepted)
        first = await submit(nc, job_request(contract()))
        second = await submit(nc, job_request(contract()))

        lost = await raw_claim(nc, "forgetful", holding=[])  # granted; say its answer was lost
        assert isinstance(lost, LeaseGrant) and lost.job_id == first

        # Its next claim says it holds nothing: the lease it does not know of comes back.
        again = await raw_claim(nc, "forgetful", holding=[])
        assert isinstance(again, LeaseGrant)
        assert (again.job_id, again.epoch) == (first, lost.epoch)

        # A claim that names the lease gets new work; an old client that names nothing does too.
        other = await raw_claim(nc, "forgetful", holding=[first])
        assert isinstance(other, LeaseGrant) and other.job_id == second
        full = await raw_claim(nc, "forgetful", holding=None, wait_s=1.0)
        assert isinstance(full, NoWork), full  # at its limit of 2

        grants = [e for e in await events_of(nc) if isinstance(e, LeaseGranted)]
        assert sorted((e.originator_id, e.epoch) for e in grants) == sorted([(first, 1), (second, 1)])

        # The SDK names what it holds: the same agent through it works the lease it got back.
        agent = AgentClient(nc, "forgetful")
        handed = await agent.claim()
        assert handed is not None and handed.job_id in (first, second)
        assert await agent.claim() is not None  # the other one, also unknown to this client
        assert await agent.claim(wait_s=1.0) is None  # it now knows both: at its limit


async def test_a_heartbeat_arriving_after_its_own_lease_completed_is_answered_and_not_fenced(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        agent = AgentClient(nc, "prompt")
        await agent.register()
        job_id = await submit(nc, job_request(contract()))
        grant = await agent.claim()
        assert grant is not None and grant.job_id == job_id
        ctx = JobContext(grant=grant)
        assert isinstance(await agent.propose(ctx, Proposal(output={"ok": True})), Accepted)
        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted) and e.originator_id == job_id)

        # As a heartbeat sent while the verdict was on its way, or one delivered again.
        ack = await agent.heartbeat(ctx)
        assert ack.standing == "ended"
        assert [e for e in await events_of(nc) if isinstance(e, MessageRejected)] == []
