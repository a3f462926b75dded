"""`warden at TIME`: jobs and agents as they stood at a moment, folded from the log up to it.

The fold is the services' own (`Views`, over the evolve functions in shared/aggregates.py) on a
fresh, private instance: live state and projections are never read or touched. "At" means what
the log held then: events stored at or before TIME (the stream's stored time), or up to and
including stream sequence N.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal
from uuid import UUID

from msgspec import Struct, field
from nats.js import JetStreamContext

from shared.aggregates import Agent, Job
from shared.forensics import log
from shared.views import Views


class JobAt(Struct, frozen=True, kw_only=True):
    id: UUID
    kind: str
    status: str
    version: int
    attempts: int
    lease_agent: str = ""
    lease_epoch: int = 0
    lease_ended: str = ""  # "" while the lease lives
    reason: str = ""
    modified_on: datetime


class AgentAt(Struct, frozen=True, kw_only=True):
    name: str
    level: int
    standing: str
    standing_reason: str
    version: int
    live_leases: int


class World(Struct, frozen=True, kw_only=True):
    """Every job and agent as of `seq` (the last event folded) and `time` (its stored time)."""

    seq: int
    time: datetime | None
    events: int
    jobs: list[JobAt]
    agents: list[AgentAt]
    # Full state of the jobs asked for by id (contract, every lease), when asked.
    detail: list[Job] = field(default_factory=list)

    def job(self, job_id: UUID) -> JobAt | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def agent(self, name: str) -> AgentAt | None:
        return next((a for a in self.agents if a.name == name), None)


def _job_at(job: Job) -> JobAt:
    lease = job.lease
    return JobAt(
        id=job.id,
        kind=job.kind,
        status=job.status,
        version=job.version,
        attempts=job.attempts,
        lease_agent=lease.agent if lease else "",
        lease_epoch=lease.epoch if lease else 0,
        lease_ended=lease.ended if lease else "",
        reason=job.reason,
        modified_on=job.modified_on,
    )


def _agent_at(agent: Agent, views: Views) -> AgentAt:
    return AgentAt(
        name=agent.name,
        level=agent.level,
        standing=agent.standing,
        standing_reason=agent.standing_reason,
        version=agent.version,
        live_leases=views.live_leases_of(agent.name),
    )


def fold(events: Iterable[log.LoggedEvent], detail: Iterable[UUID] = ()) -> World:
    """Fold stored events (stream order) with the services' own evolve functions."""
    views = Views()
    count, last_seq, last_time = 0, 0, None
    for item in events:
        if item.event is not None:
            views.on_stream_event(item.seq, item.event)
        count += 1
        last_seq, last_time = item.seq, item.time
    jobs = sorted((_job_at(j) for j in views.jobs.values()), key=lambda j: (j.modified_on, str(j.id)))
    agents = sorted((_agent_at(a, views) for a in views.agents.values()), key=lambda a: a.name)
    return World(
        seq=last_seq,
        time=last_time,
        events=count,
        jobs=jobs,
        agents=agents,
        detail=[views.jobs[i] for i in detail if i in views.jobs],
    )


async def state_at(
    js: JetStreamContext,
    *,
    seq: int | None = None,
    time: datetime | None = None,
    detail: Iterable[UUID] = (),
) -> World:
    """The world as the log held it at `seq` or `time` (now, when neither is given)."""
    events = await log.read_events(js, until_seq=seq, until=time)
    return fold(events, detail)


class Change(Struct, frozen=True, kw_only=True):
    what: Literal["job", "agent"]
    id: str
    before: JobAt | AgentAt | None
    after: JobAt | AgentAt | None
    fields: list[str]  # the fields that differ (all, for one that appeared or vanished)


def diff(before: World, after: World) -> list[Change]:
    """What differs between two moments, job by job and agent by agent."""
    changes: list[Change] = []
    old_jobs = {str(j.id): j for j in before.jobs}
    new_jobs = {str(j.id): j for j in after.jobs}
    for key in sorted(old_jobs.keys() | new_jobs.keys()):
        a, b = old_jobs.get(key), new_jobs.get(key)
        if a != b:
            changes.append(Change(what="job", id=key, before=a, after=b, fields=_fields(a, b)))
    old_agents = {a.name: a for a in before.agents}
    new_agents = {a.name: a for a in after.agents}
    for key in sorted(old_agents.keys() | new_agents.keys()):
        x, y = old_agents.get(key), new_agents.get(key)
        if x != y:
            changes.append(Change(what="agent", id=key, before=x, after=y, fields=_fields(x, y)))
    return changes


def _fields(a: Struct | None, b: Struct | None) -> list[str]:
    template = a if a is not None else b
    assert template is not None
    names = list(template.__struct_fields__)
    if a is None or b is None:
        return names
    return [n for n in names if getattr(a, n) != getattr(b, n)]


def render(world: World) -> str:
    when = world.time.isoformat() if world.time else "the beginning"
    lines = [f"as of stream sequence {world.seq} ({when}): {world.events} events folded"]
    lines.append(f"agents ({len(world.agents)}):")
    for a in world.agents:
        reason = f": {a.standing_reason}" if a.standing_reason else ""
        lines.append(f"  {a.name:<20} level {a.level}  {a.standing}{reason}  live leases {a.live_leases}")
    lines.append(f"jobs ({len(world.jobs)}):")
    for j in world.jobs:
        lease = (
            f"lease {j.lease_epoch} {j.lease_agent} {j.lease_ended or 'live'}"
            if j.lease_agent
            else "no lease"
        )
        reason = f"  ({j.reason})" if j.reason else ""
        lines.append(f"  {j.id} {j.kind:<12} {j.status:<10} attempts {j.attempts}  {lease}{reason}")
    return "\n".join(lines)
