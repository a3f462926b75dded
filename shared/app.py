"""Warden's eventsourcing application: the one write path for authoritative events.

Aggregates are saved through `Application.save`, which hands StoredEvents to the JetStream
recorder (shared/persistence/jetstream.py). The mapper stores each msgspec event as its own JSON
with the event's stable tag as topic, so the stream is readable by any NATS client.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder, Mapper, StoredEvent

from shared import events
from shared.aggregates import Agent, Job, project_agent, project_job
from shared.persistence import bridge as bridges

PERSISTENCE_MODULE = "shared.persistence.jetstream"


class MsgspecMapper(Mapper[UUID]):
    """StoredEvent <-> msgspec event, through the one event decoder."""

    def __init__(self) -> None:
        super().__init__(transcoder=JSONTranscoder())

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        return StoredEvent(
            originator_id=domain_event.originator_id,
            originator_version=domain_event.originator_version,
            topic=events.tag_of(domain_event),
            state=events.encode(domain_event),
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        return events.decode(stored_event.state)


class WardenApp(Application[UUID]):
    name = "warden"
    # A message on an aggregate's subject that Warden did not write is stepped over, not
    # decoded: it can neither fail a read of the aggregate nor wedge its next write.
    env = {"WARDEN_EVENT_CHECK": "shared.persistence.written:foreign_reason"}

    def construct_mapper(self) -> Mapper[UUID]:
        return MsgspecMapper()

    def job(self, job_id: UUID) -> Job:
        """The job as the store has it now (raises AggregateNotFoundError)."""
        job: Job = self.repository.get(job_id, projector_func=project_job)
        return job

    def events_of(self, aggregate_id: UUID) -> list[events.Event]:
        """An aggregate's events as stored (Warden's own only), oldest first."""
        return [e for e in self.repository.event_store.get(aggregate_id) if isinstance(e, events.Event)]

    def agent(self, agent_id: UUID) -> Agent:
        agent: Agent = self.repository.get(agent_id, projector_func=project_agent)
        return agent


def open_app(bridge: bridges.NatsBridge) -> WardenApp:
    """An application writing through this process's one NATS connection."""
    key = bridges.register(bridge)
    return WardenApp(env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, "WARDEN_NATS_BRIDGE": key})
