"""Helpers for read-side tests: run services with a projector (and API) we hold handles to."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import anyio
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services import registry
from services.api import Api
from services.projector import Projector
from shared import runtime, topology
from shared.contract import Contract, Stopping
from shared.events import (
    AgentLevelChanged,
    AgentRegistered,
    AgentRevoked,
    AnyEvent,
    Event,
    InvariantChecked,
    JobRequested,
    JobRequeued,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseRevoked,
    MessageRejected,
    ProposalRejected,
    ProposalSubmitted,
    agent_id_for,
    now,
)
from shared.messages import JobRequest
from shared.runtime import Context


@dataclass
class ReadSide:
    ctx: Context
    projector: Projector
    api: Api | None

    async def caught_up(self, timeout: float = 15.0) -> int:
        """Wait until the projector has folded every event stored so far; returns that position."""
        last = await last_event_seq(self.ctx.js)
        await self.projector.wait_for(last, timeout)
        return last


@asynccontextmanager
async def read_side(
    nats_url: str,
    store_url: str,
    *,
    services: list[str] | None = None,
    api: bool = False,
    auth: str = "operators",
    tokens: Path | None = None,
    name: str = "read-side",
) -> AsyncIterator[ReadSide]:
    """Run a projector into `store_url` (plus an API on a free port, with `auth` over the token
    file `tokens`, and any named services)."""
    projector = Projector(store_url, max_batch=200)
    http = Api("127.0.0.1:0", store_url, auth=auth, tokens=tokens) if api else None
    chosen = [projector, *([http] if http else []), *(registry.build(services) if services else [])]
    async with runtime.deployment(nats_url, name=name) as (ctx, _url), anyio.create_task_group() as tg:
        await tg.start(runtime.run_services, ctx, chosen)
        yield ReadSide(ctx=ctx, projector=projector, api=http)
        tg.cancel_scope.cancel()


async def last_event_seq(js: JetStreamContext) -> int:
    """The stream sequence of the newest event (not counting tracking records)."""
    try:
        msg = await js.get_last_msg(topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.*")
    except NotFoundError:
        return 0
    return int(msg.seq or 0)


def quick_contract(ttl: float = 0.6, attempts: int = 3) -> Contract:
    return Contract(stopping=Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=attempts))


def job_request(*, kind: str = "noop", contract: Contract | None = None) -> JobRequest:
    return JobRequest(idempotency_key=str(uuid.uuid4()), kind=kind, contract=contract or quick_contract())


def job_history(agent: str, outcome: str, index: int) -> list[AnyEvent]:
    """A plausible event history for one job (what the services would append), built directly.

    Appending histories through the application is much faster than driving agents, and covers
    every kind of row the read model has.
    """
    job_id = uuid.uuid4()
    t = now()
    contract = quick_contract(attempts=2)
    out: list[AnyEvent] = [
        JobRequested(
            originator_id=job_id,
            originator_version=1,
            idempotency_key=f"k-{job_id}",
            kind="refactor",
            contract=contract,
        )
    ]

    def nxt(cls: type[Event], **fields: object) -> None:
        out.append(cls(originator_id=job_id, originator_version=len(out) + 1, **fields))  # type: ignore[arg-type]

    nxt(LeaseGranted, agent=agent, epoch=1, ttl_s=0.6, expires_at=t + timedelta(seconds=0.6))
    if outcome == "expire":
        nxt(
            LeaseExpired,
            agent=agent,
            epoch=1,
            deadline=t,
            detected_at=t + timedelta(milliseconds=index % 50),
            detection_latency_ms=float(index % 50),
        )
        nxt(MessageRejected, agent=agent, epoch=1, verb="heartbeat", reason="stale epoch", input_seq=index)
        nxt(JobRequeued, reason="lease expired")
        nxt(LeaseGranted, agent=agent, epoch=2, ttl_s=0.6, expires_at=t + timedelta(seconds=2))
        nxt(
            LeaseExpired,
            agent=agent,
            epoch=2,
            deadline=t,
            detected_at=t + timedelta(milliseconds=3),
            detection_latency_ms=3.0,
        )
        nxt(JobTombstoned, reason="max attempts (2) reached", attempts=2)
    elif outcome == "reject":
        proposal = uuid.uuid4()
        nxt(
            ProposalSubmitted,
            proposal_id=proposal,
            agent=agent,
            epoch=1,
            content_hash="sha256:00",
            size=10,
            input_seq=index,
        )
        nxt(InvariantChecked, proposal_id=proposal, invariant="scope", version="1", verdict="pass")
        nxt(
            InvariantChecked,
            proposal_id=proposal,
            invariant="budget",
            version="1",
            verdict="fail",
            evidence={"tokens": 900, "limit": 500},
        )
        nxt(ProposalRejected, proposal_id=proposal, violations=["budget"])
        nxt(LeaseRevoked, agent=agent, epoch=1, reason="budget breached", signal="violation", signal_at=t)
    return out


def agent_history(name: str) -> list[AnyEvent]:
    agent_id = agent_id_for(name)
    t = now()
    return [
        AgentRegistered(originator_id=agent_id, originator_version=1, name=name, kinds=["refactor"]),
        AgentLevelChanged(
            originator_id=agent_id, originator_version=2, name=name, level=1, previous=0, reason="3 clean"
        ),
        AgentLevelChanged(
            originator_id=agent_id, originator_version=3, name=name, level=0, previous=1, reason="ci failed"
        ),
        AgentRevoked(
            originator_id=agent_id,
            originator_version=4,
            name=name,
            reason="scope breach",
            by="ops",
            signal_at=t,
        ),
    ]


async def append_histories(
    ctx: Context, jobs: int, *, start: int = 0, agents: tuple[str, ...] = ("a1", "a2")
) -> None:
    """Append `jobs` job histories (cycling through outcomes) and, first time, the agents."""
    if start == 0:
        for name in agents:
            await ctx.save(*agent_history(name)[:1])
    outcomes = ("expire", "reject", "hold")
    for i in range(start, start + jobs):
        await ctx.save(*job_history(agents[i % len(agents)], outcomes[i % len(outcomes)], i))
