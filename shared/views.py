"""The in-memory view a service decides on: every job and agent, folded from the event stream.

A view may lag the store (another replica wrote first); then a save fails with IntegrityError,
and the service reloads that aggregate from the store and decides again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from uuid import UUID

import anyio
from msgspec.structs import replace

from shared.aggregates import Agent, Job, evolve_agent, evolve_job, is_agent_event
from shared.events import AnyEvent, Event, InputRejected, ReplyRefused, digest

# Called with each folded event; with event None when a state was reloaded from the store.
Listener = Callable[[Event | None, Job | None, Agent | None], None]


class Views:
    def __init__(self) -> None:
        self.jobs: dict[UUID, Job] = {}
        self.agents: dict[str, Agent] = {}
        self._agents_by_id: dict[UUID, str] = {}
        self.position = 0  # the last stream sequence folded (event or not)
        self.listeners: list[Listener] = []
        self._waiters: list[tuple[int, anyio.Event]] = []

    def on_stream_event(self, seq: int, event: AnyEvent) -> None:
        self.apply(event)

    def advance(self, seq: int) -> None:
        self.position = max(self.position, seq)
        if self._waiters:
            for target, reached in self._waiters:
                if target <= self.position:
                    reached.set()
            self._waiters = [(t, e) for t, e in self._waiters if not e.is_set()]

    async def reached(self, seq: int) -> None:
        """Returns once the view has folded the stream up to `seq`."""
        if self.position >= seq:
            return
        reached = anyio.Event()
        self._waiters.append((seq, reached))
        await reached.wait()

    def apply(self, event: Event) -> bool:
        """Fold one event if it is the next version of its aggregate; False if already seen."""
        if isinstance(event, InputRejected | ReplyRefused):
            return False
        if is_agent_event(event):  # type: ignore[arg-type]
            name = self._agents_by_id.get(event.originator_id)
            agent_before = self.agents.get(name) if name else None
            if not _next(agent_before, event):
                return False
            agent = evolve_agent(agent_before, event)
            if agent is not None:
                self.agents[agent.name] = agent
                self._agents_by_id[agent.id] = agent.name
            self._notify(event, None, agent)
            return True
        job_before = self.jobs.get(event.originator_id)
        if not _next(job_before, event):
            return False
        job = evolve_job(job_before, event)
        if job is not None:
            self.jobs[job.id] = job
        self._notify(event, job, None)
        return True

    def chain(self, events: Sequence[Event]) -> list[Event]:
        """Link each event to its aggregate's previous one (the phase ledger's hash chain)."""
        out: list[Event] = []
        last: dict[UUID, str] = {}
        for event in events:
            prev = last.get(event.originator_id)
            if prev is None and event.originator_version > 1:
                state: Job | Agent | None = self.jobs.get(event.originator_id)
                if state is None:
                    name = self._agents_by_id.get(event.originator_id)
                    state = self.agents.get(name) if name else None
                if state is not None and state.version == event.originator_version - 1:
                    prev = state.last_hash
            if prev and not event.prev_hash:
                event = replace(event, prev_hash=prev)
            last[event.originator_id] = digest(event)
            out.append(event)
        return out

    def replace_job(self, job: Job) -> None:
        """Adopt a job reloaded from the store (after a conflict) if it is newer."""
        current = self.jobs.get(job.id)
        if current is None or current.version < job.version:
            self.jobs[job.id] = job
            self._notify(None, job, None)  # timers and queues must see a reloaded state too

    def replace_agent(self, agent: Agent) -> None:
        current = self.agents.get(agent.name)
        if current is None or current.version < agent.version:
            self.agents[agent.name] = agent
            self._agents_by_id[agent.id] = agent.name
            self._notify(None, None, agent)

    def _notify(self, event: Event | None, job: Job | None, agent: Agent | None) -> None:
        for listener in self.listeners:
            listener(event, job, agent)

    def live_leases_of(self, agent: str) -> int:
        return sum(
            1
            for job in self.jobs.values()
            if not job.terminal and job.live_lease is not None and job.live_lease.agent == agent
        )


def _next(state: Job | Agent | None, event: Event) -> bool:
    if state is None:
        return event.originator_version == 1
    return event.originator_version == state.version + 1
