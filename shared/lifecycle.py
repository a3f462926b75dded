"""The I/O side of the lease rules several services share: recording a fenced message.

The rules themselves (fencing, budgets, what follows an attempt) are pure and live in
`shared.decide.leases`; they are re-exported here for the services that still number versions
by hand (checker, applier, revoker) until they decide through `shared.decide` too.
"""

from __future__ import annotations

from datetime import datetime

from msgspec.structs import replace
from nats.aio.msg import Msg

from shared import telemetry
from shared.aggregates import Job
from shared.decide import leases
from shared.decide.leases import (
    HOLDER_ENDED,
    Fenced,
    budget_breach,
    fence_reason,
    late_heartbeat,
    since_progress_ms,
)
from shared.events import Event
from shared.handling import input_seq
from shared.runtime import Context

__all__ = [
    "HOLDER_ENDED",
    "Fenced",
    "after_attempt",
    "budget_breach",
    "fence",
    "fence_reason",
    "late_heartbeat",
    "since_progress_ms",
]


def after_attempt(job: Job, version: int, reason: str, at: datetime, by: str = "reconciler") -> Event:
    """`leases.after_lost_attempt` numbered `version` (for callers that number by hand)."""
    return replace(leases.after_lost_attempt(job, reason, at, by), originator_version=version)


async def fence(ctx: Context, msg: Msg, agent: str, verb: str, job: Job, epoch: int) -> Fenced | None:
    """None when (agent, job, epoch) names the live lease; else record `message.rejected`.

    Raises IntegrityError when the job moved meanwhile: reload it and fence again.
    """
    fenced = leases.fence(agent, verb, job, epoch, input_seq(msg), ctx.clock())
    if fenced is None:
        return None
    why, events = fenced
    await ctx.save(*events)
    telemetry.instruments().rejected_inputs.add(1, {"subject": verb, "fenced": "yes"})
    return why
