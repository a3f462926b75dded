"""The in-memory view a service decides on: live jobs and every agent, folded from the event stream.

A view may lag the store (another replica wrote first); then a save fails with IntegrityError,
and the service reloads that aggregate from the store and decides again.

A services' view (`forget_ended=True`) is bounded by what is live, not by the log's length: a job
leaves `jobs` once it is `settled` (ended, and no effect or rollback of it outstanding; listeners
still see the event that settled it, with the job)
and lands in `ended`, a bounded LRU of recently ended jobs, for the late events that still come
for them (a fenced message, a rollback, an operator's requeue). An event for a job the view has
forgotten altogether cannot be folded (its earlier state is gone): the view reports it through
`on_unknown`, and the process reads that job back from the store (`Context.job_from_store`),
which adopts it like any reload. The log stays the truth; the view is a working set.

A view built for forensics (`Views()`) keeps every job: it answers questions about the past.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol
from uuid import UUID

import anyio
from msgspec.structs import replace

from shared import snapshot
from shared.aggregates import Agent, Job, evolve_agent, evolve_job, is_agent_event
from shared.decide.proposals import owed
from shared.events import AnyEvent, Event, InputRejected, ReplyRefused, digest
from shared.snapshot import Snapshot

log = logging.getLogger("warden.views")

# Called with each folded event; with event None when a state was reloaded from the store.
Listener = Callable[[Event | None, Job | None, Agent | None], None]


class Folded(Protocol):
    """State a service folds from the view's listeners and keeps in its snapshot (the revoker's
    authority record): encoded by its owner, restored before the tail is folded."""

    def dump(self) -> bytes: ...

    def load(self, data: bytes) -> Callable[[], None]:
        """Decode `data` (raising when it cannot) and return what adopts it: nothing is adopted
        until every state in the snapshot has decoded, so a failure leaves all of them as they
        were and the whole log is folded instead."""
        ...


# How many recently ended jobs a services' view keeps for their late events (about 10 KiB each).
ENDED_CACHE = 2048


class Views:
    def __init__(self, *, forget_ended: bool = False, ended_cache: int = ENDED_CACHE) -> None:
        # Live jobs (every job, in a view that does not forget ended ones).
        self.jobs: dict[UUID, Job] = {}
        # The live jobs whose live lease each agent holds (a claim asks about its agent's, and
        # must not walk every live job of a fleet to find them), kept by `_set_job`.
        self._leased: dict[str, set[UUID]] = {}
        self.forget_ended = forget_ended
        self.ended: OrderedDict[UUID, Job] = OrderedDict()
        self._ended_cache = ended_cache
        # Told the id of a job whose event the view could not fold because it forgot the job.
        self.on_unknown: Callable[[UUID], None] | None = None
        # Folded states registered by services, by name: kept in the view's snapshot.
        self.folded: dict[str, Folded] = {}
        self.agents: dict[str, Agent] = {}
        self._agents_by_id: dict[UUID, str] = {}
        self.position = 0  # the last stream sequence folded (event or not)
        self.stream_events = 0  # how many events the stream delivered (a restart: only the tail)
        self.listeners: list[Listener] = []
        self._waiters: list[tuple[int, anyio.Event]] = []

    def register(self, name: str, state: Folded) -> None:
        """Keep `state` in this view's snapshots. Register before the fold starts (a service's
        `attach`), with its listener: a state registered later misses what was folded before."""
        if self.position:
            raise RuntimeError(f"{name} registered after the view folded up to {self.position}")
        self.folded[name] = state

    def capture(self, at: datetime) -> Snapshot:
        """The live set and the position it reflects (it may hold more: the service's own saves
        are folded before the stream delivers them, and folding them again changes nothing)."""
        return Snapshot(
            format=snapshot.FORMAT,
            shape=snapshot.shape(),
            position=self.position,
            taken_at=at,
            jobs=list(self.jobs.values()),
            agents=list(self.agents.values()),
            folded={name: state.dump() for name, state in self.folded.items()},
        )

    def restore(self, snap: Snapshot) -> bool:
        """Start from a snapshot instead of the beginning of the stream; False (and nothing
        changed) when it lacks a registered state or the view has folded already."""
        if self.position or self.jobs or self.agents:
            return False
        missing = [name for name in self.folded if name not in snap.folded]
        if missing:
            log.info("snapshot at %d lacks %s: folding the whole log", snap.position, ", ".join(missing))
            return False
        try:
            adopt = [state.load(snap.folded[name]) for name, state in self.folded.items()]
        except Exception:  # written by another version of its owner: the log is the truth
            log.warning("snapshot at %d has a state that does not load: folding the whole log", snap.position)
            return False
        for job in snap.jobs:
            self._set_job(job)
        for agent in snap.agents:
            self.agents[agent.name] = agent
            self._agents_by_id[agent.id] = agent.name
        for adopted in adopt:
            adopted()
        self.position = snap.position
        return True

    def on_stream_event(self, seq: int, event: AnyEvent) -> None:
        self.stream_events += 1
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
        job_before = self.job(event.originator_id)
        if not _next(job_before, event):
            if self.forget_ended and _beyond(job_before, event):
                self._unknown(event.originator_id)
            return False
        job = evolve_job(job_before, event)
        if job is not None:
            self._place(job)
        self._notify(event, job, None)
        return True

    def job(self, job_id: UUID) -> Job | None:
        """The job if live, or ended lately (then marked as just used); None when forgotten."""
        job = self.jobs.get(job_id)
        if job is None and (job := self.ended.get(job_id)) is not None:
            self.ended.move_to_end(job_id)
        return job

    def require_job(self, job_id: UUID) -> Job:
        """The job a handler has just loaded (it is live, or among the recently ended)."""
        job = self.job(job_id)
        if job is None:
            raise KeyError(f"job {job_id} is not in the view (load it from the store first)")
        return job

    def _place(self, job: Job) -> None:
        if not (self.forget_ended and settled(job)):
            self._set_job(job)
            self.ended.pop(job.id, None)
            return
        self._drop_job(job.id)
        self.ended[job.id] = job
        self.ended.move_to_end(job.id)
        while len(self.ended) > self._ended_cache:
            self.ended.popitem(last=False)

    def _set_job(self, job: Job) -> None:
        self._unlease(self.jobs.get(job.id))
        self.jobs[job.id] = job
        holder = _holder(job)
        if holder is not None:
            self._leased.setdefault(holder, set()).add(job.id)

    def _drop_job(self, job_id: UUID) -> None:
        self._unlease(self.jobs.pop(job_id, None))

    def _unlease(self, job: Job | None) -> None:
        holder = _holder(job) if job is not None else None
        if job is None or holder is None or holder not in self._leased:
            return
        self._leased[holder].discard(job.id)
        if not self._leased[holder]:
            del self._leased[holder]

    def leased_to(self, agent: str) -> list[Job]:
        """The live jobs whose live lease `agent` holds."""
        return [self.jobs[job_id] for job_id in self._leased.get(agent, ())]

    def _unknown(self, job_id: UUID) -> None:
        if self.on_unknown is not None:
            self.on_unknown(job_id)

    def chain(self, events: Sequence[Event]) -> list[Event]:
        """Link each event to its aggregate's previous one (the phase ledger's hash chain)."""
        out: list[Event] = []
        last: dict[UUID, str] = {}
        for event in events:
            prev = last.get(event.originator_id)
            if prev is None and event.originator_version > 1:
                state: Job | Agent | None = self.job(event.originator_id)
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
        current = self.job(job.id)
        if current is None or current.version < job.version:
            self._place(job)
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
        return len(self._leased.get(agent, ()))


def _holder(job: Job) -> str | None:
    """The agent holding `job`'s live lease, if it is live."""
    lease = job.live_lease
    return lease.agent if lease is not None and not job.terminal else None


def settled(job: Job) -> bool:
    """Ended, with nothing left for Warden to do: nothing the applier owes it (an effect accepted
    before a cancellation, a rollback asked and not done). Until then an ended job stays live,
    so a restarted applier finds its work among the live jobs."""
    return job.terminal and owed(job) is None


def _beyond(state: Job | None, event: Event) -> bool:
    """Is `event` later than the next one the view could fold (it lacks what came between)?"""
    if state is None:
        return event.originator_version > 1
    return event.originator_version > state.version + 1


def _next(state: Job | Agent | None, event: Event) -> bool:
    if state is None:
        return event.originator_version == 1
    return event.originator_version == state.version + 1
