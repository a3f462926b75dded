"""The kill schedule: a pure function of the seed, so a run that broke can be run again.

Victims are named slots ("checker#2", "agent#1", "broker"), not processes: which process holds
a slot at kill time depends on timing, the slot does not. A killed slot is restarted at once
(a service as itself, an agent under a new name: a fresh process is a fresh identity, and
three lease expiries in a row under one name would get it revoked by policy).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BROKER = "broker"

# Service replicas that take part in decisions; the read side runs once (one read model).
REPLICATED = ("scheduler", "reconciler", "checker", "applier", "revoker")
SINGLE = ("projector", "api")


@dataclass(frozen=True)
class Kill:
    at_s: float  # seconds after the start of the schedule
    slot: str


def service_slots(replicas: int) -> list[str]:
    """Every service process slot: `replicas` of each deciding service, one of the read side."""
    slots = [f"{name}#{i}" for name in REPLICATED for i in range(1, replicas + 1)]
    return slots + [f"{name}#1" for name in SINGLE]


def agent_slots(agents: int) -> list[str]:
    return [f"agent#{i}" for i in range(1, agents + 1)]


def slot_service(slot: str) -> str:
    """The service (or "agent", or "broker") a slot runs."""
    return slot.partition("#")[0]


def plan(seed: int, kills: int, duration_s: float, slots: list[str], broker_kills: int = 0) -> list[Kill]:
    """`kills` kills spread over `duration_s` (one in each equal window, at a random point in
    its middle, so two kills are never on top of each other), `broker_kills` of them the broker,
    the rest a slot drawn from `slots`: an agent or a service with even odds (there are far
    more service slots), then which one."""
    if kills < 0 or broker_kills < 0 or broker_kills > kills:
        raise ValueError(f"need 0 <= broker kills ({broker_kills}) <= kills ({kills})")
    if kills > broker_kills and not slots:
        raise ValueError("no process slots to kill")
    rng = random.Random(seed)
    start, span = 0.1 * duration_s, 0.85 * duration_s  # settle in first; leave the tail quiet
    window = span / kills if kills else 0.0
    brokers = set(rng.sample(range(kills), broker_kills))
    groups = [
        g
        for g in (
            [s for s in slots if slot_service(s) == "agent"],
            [s for s in slots if slot_service(s) != "agent"],
        )
        if g
    ]
    out = []
    for i in range(kills):
        at = start + window * (i + rng.uniform(0.2, 0.8))
        slot = BROKER if i in brokers else rng.choice(rng.choice(groups))
        out.append(Kill(at_s=round(at, 2), slot=slot))
    return out
