"""The service runtime: each service is a task group started with `tg.start`, over one connection.

`serve` connects (or starts the embedded server), ensures the topology, builds the shared
context, starts the named services (a start-up failure reaches the caller), and on SIGINT or
SIGTERM cancels them: consumers finish the message in hand, ack it, and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import anyio
import msgspec
from anyio.abc import TaskStatus
from eventsourcing.application import AggregateNotFoundError
from nats.aio.client import Client
from nats.js import JetStreamContext

from shared import bus, liveness, snapshot, telemetry, topology
from shared.aggregates import Agent, Job, is_job_event
from shared.app import WardenApp, open_app
from shared.decide import Clock
from shared.events import Event, agent_id_for, now
from shared.persistence.bridge import NatsBridge
from shared.persistence.jetstream import JetStreamApplicationRecorder
from shared.server import EmbeddedServer
from shared.views import Views

log = logging.getLogger("warden.runtime")

DEFAULT_DATA_DIR = Path(".warden")
# Events between checkpoints of the view (0: none, and every start folds the whole log).
SNAPSHOT_EVERY_ENV = "WARDEN_SNAPSHOT_EVERY"


@dataclass
class Context:
    """What every service in a process shares: one connection, one application, one view."""

    nc: Client
    js: JetStreamContext
    app: WardenApp
    # Bounded by what is live: ended jobs are forgotten (see shared/views.py) and read back
    # from the store when something asks for one (`job`).
    views: Views = field(default_factory=lambda: Views(forget_ended=True))
    followed: bool = False
    # The embedded server's monitoring endpoint (`warden doctor --monitor`); "" when external.
    monitor_url: str = ""
    # Every decision reads time from here (tests inject a clock), never from the system directly.
    clock: Clock = now
    # Checkpoints of the view (shared/snapshot.py): written once it has folded this many events
    # past the last one, or this many seconds after it when the stream moved at all; 0: never.
    snapshot_every_events: int = 10_000
    snapshot_every_s: float = 60.0
    # The stream position of the snapshot this process started from (0: it folded the whole log).
    restored_at: int = 0
    _snapshot_at: int = 0

    async def save(self, *events: Event) -> list[Event]:
        """Append events (atomically when several) and return them as stored (with their trace
        and hash chain); raises IntegrityError on a lost race.

        Written from this loop straight through the JetStream recorder's write protocol (same
        subjects, expectations and encoding as eventsourcing's save, without its worker-thread
        hop: 8.5 ms against 3.0 ms at p50 under load, DESIGN.md). Any other recorder (or a loop
        that is not the recorder's) goes through the synchronous application in a worker
        thread. The events are folded into the view as soon as they are stored.
        """
        # Every event carries the span that appended it (one job is one trace), unless it was
        # built inside a narrower one (an invariant's verdict).
        traced = telemetry.current_traceparent()
        if traced:
            events = tuple(e if e.trace else msgspec.structs.replace(e, trace=traced) for e in events)
        for event in events:
            # The hash chain links to the aggregate's previous event: a job the view has
            # forgotten (ended long ago, then rolled back or requeued) is read back first.
            if (
                is_job_event(event)  # type: ignore[arg-type]
                and event.originator_version > 1
                and self.views.job(event.originator_id) is None
            ):
                await self.job_from_store(event.originator_id)
        chained = self.views.chain(events)
        recorder = self.app.recorder
        if isinstance(recorder, JetStreamApplicationRecorder) and recorder.io.bridge.in_loop_thread():
            mapper = self.app.mapper
            # One message per aggregate (a packed record): no atomic batch for one job's events.
            await recorder.write([mapper.to_stored_event(e) for e in chained], packed=True)
        else:
            await anyio.to_thread.run_sync(lambda: self.app.save(*chained))
        for event in chained:
            self.views.apply(event)
        return chained

    async def reload_job(self, job_id: Any) -> None:
        job = await anyio.to_thread.run_sync(self.app.job, job_id)
        self.views.replace_job(job)

    # The view lags the store after an outage or while a replica writes: before refusing an
    # input because the view lacks what it names, a service asks the store (by subject).

    async def job_from_store(self, job_id: UUID) -> Job | None:
        """The job as the store has it (adopted into the view: live jobs, or the bounded cache of
        ended ones), or None when it has no such job."""
        try:
            job = await anyio.to_thread.run_sync(self.app.job, job_id)
        except AggregateNotFoundError:
            return None
        self.views.replace_job(job)
        return self.views.job(job_id) or job

    async def job(self, job_id: UUID) -> Job | None:
        """The job as the view has it, or (ended and forgotten, or not yet folded) as the store
        has it; None when neither knows it. What a service needs about an old job is read here."""
        return self.views.job(job_id) or await self.job_from_store(job_id)

    async def agent_from_store(self, name: str) -> Agent | None:
        """The agent as the store has it (adopted into the view), or None when never registered."""
        try:
            agent = await anyio.to_thread.run_sync(self.app.agent, agent_id_for(name))
        except AggregateNotFoundError:
            return None
        self.views.replace_agent(agent)
        return self.views.agents[name]

    async def follow_events(self, tg: anyio.abc.TaskGroup) -> None:
        """Start folding the event stream into the view once per process."""
        if not self.followed:
            self.followed = True
            start = await self._restore()
            tg.start_soon(self._read_back_forgotten)
            await tg.start(
                partial(bus.follow, from_seq=start, on_position=self.views.advance),
                self.js,
                self.views.on_stream_event,
            )
            if self.snapshot_every_events > 0:
                tg.start_soon(self._checkpoint)

    def _snapshot_name(self) -> str:
        return snapshot.object_name(list(self.views.folded))

    async def _restore(self) -> int:
        """Load the newest snapshot of this kind of view; the stream sequence to fold from."""
        if self.snapshot_every_events <= 0:
            return 1
        try:
            data = await snapshot.read(self.js, self._snapshot_name())
            info = await self.js.stream_info(topology.EVENT_STREAM)
        except Exception:  # a snapshot is an optimisation: without one, fold the log
            log.warning("could not read the view's snapshot: folding the whole log", exc_info=True)
            return 1
        snap = snapshot.decode(data) if data is not None else None
        if snap is None:
            return 1
        if snap.position > info.state.last_seq:
            log.warning(
                "ignoring a snapshot at %d, past the event stream's end (%d)",
                snap.position,
                info.state.last_seq,
            )
            return 1
        if not self.views.restore(snap):
            return 1
        self.restored_at = self._snapshot_at = snap.position
        log.info(
            "view restored from its snapshot at %d (%d live jobs, %d agents); folding from %d",
            snap.position,
            len(snap.jobs),
            len(snap.agents),
            snap.position + 1,
        )
        return snap.position + 1

    async def write_snapshot(self) -> int:
        """Checkpoint the view now; returns the position written."""
        snap = self.views.capture(self.clock())
        await snapshot.write(self.js, self._snapshot_name(), snapshot.encode(snap))
        self._snapshot_at = snap.position
        return snap.position

    async def _checkpoint(self) -> None:
        last = anyio.current_time()
        while True:
            await anyio.sleep(min(1.0, self.snapshot_every_s))
            moved = self.views.position - self._snapshot_at
            due = moved >= self.snapshot_every_events or (
                moved > 0 and anyio.current_time() - last >= self.snapshot_every_s
            )
            if not due:
                continue
            last = anyio.current_time()
            try:
                await self.write_snapshot()
            except Exception:  # the next checkpoint tries again; serving never depends on it
                log.warning("could not write the view's snapshot", exc_info=True)

    async def _read_back_forgotten(self) -> None:
        """Jobs the view forgot but the stream still speaks of are read back from the store
        (adopted as a reload: listeners hear of them, a requeued one is runnable again)."""
        wanted: dict[UUID, None] = {}
        wake = anyio.Event()

        def want(job_id: UUID) -> None:
            wanted[job_id] = None
            wake.set()

        self.views.on_unknown = want
        while True:
            await wake.wait()
            wake = anyio.Event()
            while wanted:
                job_id = next(iter(wanted))
                del wanted[job_id]
                try:
                    await self.job_from_store(job_id)
                except Exception:  # the store is away for now: the next event for it asks again
                    log.warning("could not read job %s back from the store", job_id, exc_info=True)

    async def view_current(self, timeout: float = 2.0) -> bool:
        """Wait (bounded) until the view holds everything the store held when asked: the barrier
        before an answer that only the absence of something justifies ("no work"). True when
        the view had to catch up (the caller decides again), False when it already was current."""
        info = await self.js.stream_info(topology.EVENT_STREAM)
        if self.views.position >= info.state.last_seq:
            return False
        with anyio.move_on_after(timeout):
            await self.views.reached(info.state.last_seq)
        return True


async def close_connection(nc: Client, grace_s: float = 5.0) -> None:
    """Drain (deliver what is in hand, flush what is pending), but never hang on a dead server."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(grace_s):
            await nc.drain()
            return
        await nc.close()


class Service(Protocol):
    """A service may also define `attach(ctx)`: called before the process's view starts
    folding, it adds the listeners and registers the folded states (`Views.register`, kept in
    the view's snapshot) that must see every event."""

    name: str

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None: ...


ServiceFactory = Callable[[], Service]


def nats_url_from_env(url: str | None) -> str | None:
    return url or os.environ.get("WARDEN_NATS_URL") or None


@asynccontextmanager
async def deployment(
    url: str | None, data_dir: Path = DEFAULT_DATA_DIR, *, replicas: int = 1, name: str = "warden"
) -> AsyncIterator[tuple[Context, str]]:
    """Connect to the named server, or start the embedded one under `data_dir`; ensure topology.

    Never connects to a server it was not pointed at: with no URL, it starts its own.
    """
    server: EmbeddedServer | None = None
    if url is None:
        server = await anyio.to_thread.run_sync(
            lambda: EmbeddedServer(store_dir=data_dir / "nats", name=name).start()
        )
        url = server.url
    try:
        nc = await bus.connect(url, name)
        try:
            js = nc.jetstream()
            await topology.ensure_when_ready(js, nc.connected_server_version.__str__(), replicas)
            bridge = NatsBridge.attach(nc)
            app = open_app(bridge)
            monitor = server.monitor_url if server is not None else ""
            ctx = Context(nc=nc, js=js, app=app, monitor_url=monitor)
            every = os.environ.get(SNAPSHOT_EVERY_ENV)
            if every:  # "0" turns checkpoints (and starting from one) off
                ctx.snapshot_every_events = int(every)
            yield ctx, url
        finally:
            await close_connection(nc)
    finally:
        if server is not None:
            with anyio.CancelScope(shield=True):  # stopping is cleanup: a cancelled caller still owes it
                await anyio.to_thread.run_sync(server.stop)


async def run_services(
    ctx: Context,
    services: Sequence[Service],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Start every service (each reports ready through task_status) and run until cancelled."""
    async with anyio.create_task_group() as tg:
        # A service that folds its own state beside the view listens from the log's start.
        for service in services:
            attach = getattr(service, "attach", None)
            if attach is not None:
                attach(ctx)
        await ctx.follow_events(tg)
        # One configuration per process, named for every service it runs.
        telemetry.configure("+".join(s.name for s in services) or "warden")
        for service in services:
            await tg.start(service.run, ctx)
            log.info("service %s started", service.name)
        # Answer liveness pings only once every service is serving (`warden doctor` asks).
        await tg.start(liveness.serve, ctx.nc, [s.name for s in services])
        task_status.started()


async def until_signal(
    main: Callable[..., Coroutine[Any, Any, None]],
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run `main` until SIGINT or SIGTERM, then cancel it (draining in-flight work).

    The signals are caught from before `main` starts: a SIGTERM sent as soon as it reports
    ready (or while it starts) drains it instead of killing it with the default handler."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(main)
            if on_ready:
                on_ready()
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                break
            tg.cancel_scope.cancel()
