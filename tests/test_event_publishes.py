"""Each event is published once: a core subscriber on `warden.evt.>` hears what the stream stores.

Every write is a publish, and a core subscriber hears a publish whether or not the stream stored
it (a write that fails its expected sequence is still delivered). Services each in their own
process (here: their own connection, application and recorder) used to publish each write to an
aggregate they had not written before twice: the recorder took an uncached subject to be empty,
so the first attempt always conflicted. With one replica of each service nothing races, so the
counts must be equal, per event type.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from uuid import UUID

import anyio
from nats.aio.msg import Msg

from shared import topology
from shared.contract import Contract, Stopping
from shared.events import AnyEvent, JobCompleted
from shared.events import tag_of as tag_of_event
from shared.persistence.jetstream import TOPIC_HEADER, TOPIC_SEPARATOR
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, events_of, job_request, running, submit, wait_for_event

SERVICES = ["scheduler", "reconciler", "checker", "applier", "revoker"]
JOBS, AGENTS = 12, 3


def tags_of(msg: Msg) -> list[str]:
    """The tags of the events a message holds (a packed record names each, in order)."""
    return (msg.headers or {}).get(TOPIC_HEADER, "?").split(TOPIC_SEPARATOR)


async def test_a_core_subscriber_hears_each_stored_event_once_with_services_in_separate_processes(
    nats_server: EmbeddedServer,
) -> None:
    async with AsyncExitStack() as stack:
        for service in SERVICES:
            await stack.enter_async_context(running(nats_server.url, [service], name=service))
        nc = await stack.enter_async_context(client(nats_server.url))
        heard: Counter[str] = Counter()

        async def on_publish(msg: Msg) -> None:
            heard.update(tags_of(msg))

        await nc.subscribe(f"{topology.EVENT_ROOT}.*", cb=on_publish)  # events, not tracking
        contract = Contract(stopping=Stopping(lease_ttl_s=60, heartbeat_interval_s=15, max_attempts=1))
        jobs = {await submit(nc, job_request(contract)) for _ in range(JOBS)}

        async def agent(name: str) -> None:
            async def handler(ctx: JobContext) -> Proposal:
                return Proposal(output={"by": name})

            await AgentClient(nc, name).serve(handler, idle_exit_s=1.0)

        async with anyio.create_task_group() as tg:
            for i in range(AGENTS):
                tg.start_soon(agent, f"agent{i}")
        for job_id in jobs:

            def completed(e: AnyEvent, j: UUID = job_id) -> bool:
                return isinstance(e, JobCompleted) and e.originator_id == j

            await wait_for_event(nc, completed, timeout=30)
        stored_events = await events_of(nc)
        # The core subscription hears a publish before the stream's ack returns it to the writer;
        # a flush round-trip after the last stored event has been read settles the count.
        await nc.flush()
        stored: Counter[str] = Counter(tag_of_event(e) for e in stored_events)
        assert stored["job.completed"] == JOBS
        assert dict(heard) == dict(stored)
