"""Claims waiting for work: at most one per agent, at most `cap` in all, served oldest first.

A claim that finds no runnable job is parked here instead of answered "no work" at once, so an
idle agent sends one claim per wait rather than one every few milliseconds (each one a stored
input). The book only keeps order and deadlines; what a claim is granted is still decided by
`shared.decide.leases` when work turns up.

Nothing here survives the process, by design: a parked claim's input is already acknowledged,
so a scheduler that crashes drops its waiting claims, each agent's wait runs out, and the agent
claims again (to whichever replica fetches it). Persisting them would store what the long poll
exists to stop storing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from shared.messages import Claim

# Enough for every agent of a large fleet to wait at once; past it a claim is answered "no
# work" at once (the agent claims again after its SDK's pause), so memory stays bounded.
WAITING_CAP = 4096

M = TypeVar("M")


@dataclass(eq=False)
class Parked(Generic[M]):
    """One waiting claim: what to answer (`msg`), and until when it may wait."""

    name: str
    claim: Claim
    seq: int
    until: datetime
    msg: M
    # Why its last try found nothing: the "no work" it is answered with when the wait ends.
    detail: str = "no runnable job for this agent"
    order: int = field(default=0)


class Waiting(Generic[M]):
    """The waiting claims by agent, in arrival order, with their deadlines."""

    def __init__(self, cap: int = WAITING_CAP) -> None:
        self.cap = cap
        # Insertion order is arrival order: iteration is oldest first.
        self._by_name: dict[str, Parked[M]] = {}
        # (until, order, name): entries whose claim was taken or replaced are skipped when seen.
        self._deadlines: list[tuple[datetime, int, str]] = []
        self._orders = itertools.count(1)

    def park(self, parked: Parked[M]) -> Parked[M] | None:
        """Add `parked`; return the claim of the same agent it replaces (one per agent: the
        agent stopped waiting on that one when it sent this), or None. Raises `Full` when the
        book holds `cap` claims of other agents."""
        previous = self._by_name.pop(parked.name, None)
        if previous is None and len(self._by_name) >= self.cap:
            raise Full(f"{len(self._by_name)} claims already wait for work (the cap)")
        parked.order = next(self._orders)
        self._by_name[parked.name] = parked
        heapq.heappush(self._deadlines, (parked.until, parked.order, parked.name))
        if len(self._deadlines) > 4 * len(self._by_name) + 1024:
            self._compact()  # claims served before their deadline leave entries behind
        return previous

    def _compact(self) -> None:
        self._deadlines = [(p.until, p.order, p.name) for p in self._by_name.values()]
        heapq.heapify(self._deadlines)

    def restore(self, parked: Parked[M]) -> bool:
        """Put back a claim taken out to be served that found nothing after all, in its old
        place; False (not put back) when its agent has sent a newer claim meanwhile."""
        if parked.name in self._by_name:
            return False
        items = [*self._by_name.values(), parked]
        items.sort(key=lambda p: p.order)
        self._by_name = {p.name: p for p in items}
        heapq.heappush(self._deadlines, (parked.until, parked.order, parked.name))
        return True

    def take(self, name: str) -> Parked[M] | None:
        """Remove and return `name`'s waiting claim (to serve it, or to refuse it)."""
        return self._by_name.pop(name, None)

    def due(self, at: datetime) -> list[Parked[M]]:
        """Remove and return the claims whose wait has ended by `at`."""
        ended: list[Parked[M]] = []
        while self._deadlines and self._deadlines[0][0] <= at:
            _until, order, name = heapq.heappop(self._deadlines)
            parked = self._by_name.get(name)
            if parked is not None and parked.order == order:
                del self._by_name[name]
                ended.append(parked)
        return ended

    def next_due(self) -> datetime | None:
        """When the next waiting claim's wait ends (None: none waits)."""
        while self._deadlines:
            until, order, name = self._deadlines[0]
            parked = self._by_name.get(name)
            if parked is not None and parked.order == order:
                return until
            heapq.heappop(self._deadlines)  # taken or replaced since
        return None

    def oldest_first(self) -> Iterator[Parked[M]]:
        return iter(list(self._by_name.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)


class Full(Exception):
    """The book holds its cap of waiting claims."""
