"""Per-agent input throttle: one agent's flood costs each service a few records per window.

NATS has no per-user rate or storage limit in a configuration-file deployment, so every agent's
input is stored, and each service reads its consumer in stream order. Without a throttle, each
input of a flood is handled in full (most of a flood is malformed: one `input.rejected` write
each), and everyone else's inputs wait behind that work. With it, an agent may have `limit`
inputs handled per service in each window of `window_s` seconds; past that, the rest of the
window is refused cheaply: the first refusal is recorded once, as an `input.rejected` whose
`throttled_until` and `throttled_by` say it stands for every later input of that agent the
consumer reads, stored before the window ends; the others are only answered (the window's
rejection id) and acked. A flood becomes `limit + 1` records per window and service, never one
per message, and every input still has its recorded reason.

Windows are measured on the time the server stored each input, not the time a service reads
it: an agent's backlog read quickly after an outage is not mistaken for a flood, and the
decision for a stored input is the same on every replay. Redeliveries are never throttled
(their first delivery was admitted, or refused and acked), so a throttled window never covers
an earlier input. Each replica of a service keeps its own windows: with N replicas an agent
may have N x limit inputs handled per window.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from nats.aio.msg import Msg

from shared import bus, topology
from shared.events import rejection_id_for
from shared.handling import reject_input
from shared.messages import Rejected
from shared.runtime import Context
from shared.validation import FieldError

# Sized from what a legitimate agent sends, measured with `warden bench` (which reports each
# run's busiest agent per window): one agent working no-op jobs back to back takes the whole
# deployment's governed throughput (about 17 jobs/s on two cores) and sends about 400 inputs
# per 10 s to the scheduler (a claim per job, and a re-claim while the scheduler has not yet
# seen its last job complete) and 200 each to the reconciler and checker; an idle agent polls
# 50 times per 10 s per worker (AgentClient.serve, poll_s 0.2). 1,000 is 2.5x the busiest of
# these, and idle polling by up to 20 workers. Each admitted input of a flood costs a durable
# write, so the limit is also the drain: a flood is at most 1,001 records per window and service.
LIMIT = 1000
WINDOW_S = 10.0


def limit_from_env() -> tuple[int, float]:
    """(limit, window_s): WARDEN_AGENT_INPUT_LIMIT inputs per WARDEN_AGENT_INPUT_WINDOW_S."""
    limit = os.environ.get("WARDEN_AGENT_INPUT_LIMIT")
    window = os.environ.get("WARDEN_AGENT_INPUT_WINDOW_S")
    return (int(limit) if limit else LIMIT, float(window) if window else WINDOW_S)


class Verdict(enum.Enum):
    ADMIT = "admit"
    REFUSE_FIRST = "refuse-first"  # the window's first refusal: the one that is recorded
    REFUSE = "refuse"


@dataclass
class Window:
    start: datetime
    admitted: int = 0
    refused: int = 0
    rejection_id: UUID | None = None  # the window's record, once written

    def end(self, window_s: float) -> datetime:
        return self.start + timedelta(seconds=window_s)


@dataclass
class Throttle:
    """The windows of one consumer, one per agent; `decide` is the whole rule."""

    limit: int = LIMIT
    window_s: float = WINDOW_S
    windows: dict[str, Window] = field(default_factory=dict)

    def decide(self, agent: str, stored_at: datetime) -> Verdict:
        window = self.windows.get(agent)
        if window is None or stored_at >= window.end(self.window_s):
            window = self.windows[agent] = Window(start=stored_at)
        elif stored_at < window.start:
            # Read late (another subject's queue ran first): it belongs to an earlier window,
            # and a refused input is always one stored inside its window.
            return Verdict.ADMIT
        if window.refused == 0 and window.admitted < self.limit:
            window.admitted += 1
            return Verdict.ADMIT
        window.refused += 1
        return Verdict.REFUSE_FIRST if window.refused == 1 else Verdict.REFUSE


def busiest_window(stored: list[datetime], window_s: float = WINDOW_S) -> int:
    """The most of these inputs (one agent's, to one service) stored within any `window_s`.

    A sliding window: never fewer than any window `Throttle.decide` opens would count, so an
    agent whose busiest window is at most the limit was never throttled."""
    ordered = sorted(stored)
    span = timedelta(seconds=window_s)
    most = start = 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - span:
            start += 1
        most = max(most, end - start + 1)
    return most


def guard(ctx: Context, durable: str, handler: bus.Handler, throttle: Throttle | None = None) -> bus.Handler:
    """`handler` behind a per-agent throttle; inputs that are not an agent's pass straight on."""
    if throttle is None:
        limit, window_s = limit_from_env()
        throttle = Throttle(limit=limit, window_s=window_s)
    active = throttle

    async def guarded(msg: Msg) -> None:
        parsed = topology.parse_agent_subject(msg.subject)
        meta = msg.metadata
        if parsed is None or meta.num_delivered > 1:
            await handler(msg)
            return
        agent = parsed[0]
        verdict = active.decide(agent, meta.timestamp)
        if verdict is Verdict.ADMIT:
            await handler(msg)
            return
        window = active.windows[agent]
        until = window.end(active.window_s)
        if verdict is Verdict.REFUSE_FIRST:
            # Recorded before this input is acked: a crash here leaves it to be redelivered.
            window.rejection_id = rejection_id_for(meta.stream, int(meta.sequence.stream))
            error = FieldError(
                path="$",
                message=(
                    f"throttled: agent {agent} sent more than {active.limit} inputs to the "
                    f"{durable} in {active.window_s:g}s; its inputs stored from "
                    f"{window.start.isoformat()} until {until.isoformat()} past the first "
                    f"{active.limit} are refused (this record stands for all of them)"
                ),
            )
            await reject_input(ctx, msg, [error], agent, throttled_until=until, throttled_by=durable)
            return
        error = FieldError(path="$", message=f"throttled until {until.isoformat()}")
        await bus.reply(
            ctx.nc, msg, Rejected(errors=[error], rejection_id=window.rejection_id), ctx.views.agents
        )

    return guarded
