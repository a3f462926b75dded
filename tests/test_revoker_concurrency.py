"""The revoker decides different agents side by side, and one agent's decisions one at a time in
order: a slow decision about one agent holds back no other agent's revocation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
from eventsourcing.persistence import OperationalError
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services import registry
from services.revoker import Revoker
from shared import bus, runtime, topology
from shared.contract import Contract, Stopping
from shared.decide.agents import Action
from shared.events import AgentReinstated, AgentRevoked, AgentSuspended, AnyEvent, LeaseExpired
from shared.messages import Accepted, AnyReply, JobRequest, OperatorCommand, reply_decoder
from shared.policy import load_policy
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import client, events_of, submit, wait_for_event

# Short leases: each agent loses the policy's count of them in a row, its revocation signal.
TTL_S = 0.3


class HeldRevoker(Revoker):
    """A revoker whose decision `step` (an action's kind or an operator's verb) about `agent` waits
    until the test releases it: a decision that is slow, at a point the test knows."""

    def __init__(self, agent: str, step: str) -> None:
        super().__init__()
        self.held_agent, self.held_step = agent, step
        self.holding = anyio.Event()
        self.release = anyio.Event()

    async def _hold(self, agent: str | None, step: str) -> None:
        if agent == self.held_agent and step == self.held_step and not self.holding.is_set():
            self.holding.set()
            await self.release.wait()

    async def _act(self, action: Action) -> None:
        await self._hold(action.agent, action.kind)
        await super()._act(action)

    async def _on_operator(self, msg: Msg, verb: str) -> None:
        agent = msgspec.json.decode(msg.data, type=OperatorCommand).agent
        await self._hold(agent, verb)
        await super()._on_operator(msg, verb)


@asynccontextmanager
async def _warden(url: str, revoker: Revoker | None, name: str) -> AsyncIterator[None]:
    """The services leases and revocations need; the revoker only when one is given."""
    services = [*registry.build(["scheduler", "reconciler"]), *([revoker] if revoker else [])]
    async with runtime.deployment(url, name=name) as (ctx, _url), anyio.create_task_group() as tg:
        await tg.start(runtime.run_services, ctx, services)
        yield
        tg.cancel_scope.cancel()


async def _operate(nc: Client, verb: str, agent: str) -> AnyReply:
    return await bus.request(
        nc,
        topology.operator_subject(verb),
        OperatorCommand(operator="alice", reason=f"test {verb}", agent=agent),
    )


async def _store(nc: Client, verb: str, agent: str) -> Subscription:
    """Store an operator command (stored once this returns); its verdict comes on the subscription."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    command = OperatorCommand(operator="alice", reason=f"test {verb}", agent=agent)
    await nc.jetstream().publish(
        topology.operator_subject(verb), msgspec.json.encode(command), headers={topology.REPLY_HEADER: inbox}
    )
    return sub


async def _verdict(sub: Subscription) -> AnyReply:
    msg = await sub.next_msg(timeout=10)
    verdict: AnyReply = reply_decoder.decode(msg.data)
    return verdict


async def _lose_leases(nc: Client, name: str) -> None:
    """The agent claims the policy's count of leases in a row and lets each one expire."""
    kind = f"held-{name}"
    stopping = Stopping(lease_ttl_s=TTL_S, heartbeat_interval_s=TTL_S / 4, max_attempts=1)
    for _ in range(load_policy().revocation.repeated_lease_expiries):
        await submit(
            nc, JobRequest(idempotency_key=str(uuid.uuid4()), kind=kind, contract=Contract(stopping=stopping))
        )
    agent = AgentClient(nc, name, kinds=[kind])
    await agent.register()
    for _ in range(load_policy().revocation.repeated_lease_expiries):
        grant = await agent.claim()
        assert grant is not None

        def expired(e: AnyEvent, job_id: uuid.UUID = grant.job_id) -> bool:
            return isinstance(e, LeaseExpired) and e.originator_id == job_id

        await wait_for_event(nc, expired, subject=topology.event_subject(grant.job_id))


async def test_an_agent_is_revoked_by_policy_while_another_agents_revocation_is_still_being_decided(
    nats_server: EmbeddedServer,
) -> None:
    revoker = HeldRevoker("slow", "revoke")
    async with _warden(nats_server.url, revoker, "held-policy"), client(nats_server.url) as nc:
        await _lose_leases(nc, "slow")
        with anyio.fail_after(10):
            await revoker.holding.wait()
        # The slow agent's revocation is being decided; the quick agent's signal comes after it.
        await _lose_leases(nc, "quick")
        quick = await wait_for_event(nc, lambda e: isinstance(e, AgentRevoked) and e.name == "quick")
        assert isinstance(quick, AgentRevoked) and quick.by == "revoker"
        assert not [e for e in await events_of(nc) if isinstance(e, AgentRevoked) and e.name == "slow"]
        revoker.release.set()
        slow = await wait_for_event(nc, lambda e: isinstance(e, AgentRevoked) and e.name == "slow")
        assert isinstance(slow, AgentRevoked) and slow.signal_at is not None


async def test_an_operator_revokes_an_agent_while_another_agents_revocation_is_still_being_decided(
    nats_server: EmbeddedServer,
) -> None:
    revoker = HeldRevoker("slow", "revoke")
    async with _warden(nats_server.url, revoker, "held-operator"), client(nats_server.url) as nc:
        for name in ("slow", "quick"):
            await AgentClient(nc, name).register()
        slow = await _store(nc, "revoke", "slow")
        with anyio.fail_after(10):
            await revoker.holding.wait()
        # Same verb, so the same subject: only the agent it names tells the two apart.
        assert isinstance(await _operate(nc, "revoke", "quick"), Accepted)
        assert [e.name for e in await events_of(nc) if isinstance(e, AgentRevoked)] == ["quick"]
        revoker.release.set()
        assert isinstance(await _verdict(slow), Accepted)
        assert [e.name for e in await events_of(nc) if isinstance(e, AgentRevoked)] == ["quick", "slow"]


async def test_one_agents_two_commands_are_decided_one_after_the_other_in_the_order_stored(
    nats_server: EmbeddedServer,
) -> None:
    revoker = HeldRevoker("eve", "suspend")
    async with client(nats_server.url) as nc:
        async with _warden(nats_server.url, None, "held-before"):
            await AgentClient(nc, "eve").register()
            # Both stored before the revoker starts: it fetches them together, so only its own
            # ordering keeps the reinstatement behind the held suspension.
            suspended = await _store(nc, "suspend", "eve")
            reinstated = await _store(nc, "reinstate", "eve")
        async with _warden(nats_server.url, revoker, "held-order"):
            with anyio.fail_after(10):
                await revoker.holding.wait()
            revoker.release.set()
            assert isinstance(await _verdict(suspended), Accepted)
            # Decided after the suspension: an active agent could not have been reinstated.
            assert isinstance(await _verdict(reinstated), Accepted)
            standing = [
                type(e) for e in await events_of(nc) if isinstance(e, AgentSuspended | AgentReinstated)
            ]
            assert standing == [AgentSuspended, AgentReinstated]


class FaultyRevoker(Revoker):
    """A revoker whose store fails (times out) on the first decision it makes, as a busy or
    restarting broker would."""

    def __init__(self) -> None:
        super().__init__()
        self.faults = 0

    async def _act(self, action: Action) -> None:
        if self.faults == 0:
            self.faults += 1
            raise OperationalError("NATS request failed: TimeoutError()")
        await super()._act(action)


async def test_a_store_fault_while_deciding_delays_a_revocation_and_never_ends_the_revoker(
    nats_server: EmbeddedServer,
) -> None:
    revoker = FaultyRevoker()
    async with _warden(nats_server.url, revoker, "faulty-store"), client(nats_server.url) as nc:
        await _lose_leases(nc, "flaky")

        def revoked(e: AnyEvent) -> bool:
            return isinstance(e, AgentRevoked) and e.name == "flaky"

        await wait_for_event(nc, revoked, timeout=20)
        assert revoker.faults == 1
