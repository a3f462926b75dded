"""The queued jobs, oldest first, by kind: what a claim may be offered.

A claim names the kinds it takes (or its agent's), so it walks only the queues of those kinds:
an agent that waits for a kind nobody submits costs nothing however long the other kinds'
queues grow, where one queue of every job made each waiting claim walk all of them on every
new job (quadratic in the queue, a third of the scheduler's CPU in a 1,500-job burst with the
claims of an earlier run's agents still waiting).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable, Iterator
from datetime import datetime
from uuid import UUID


class Runnable:
    """Queued job ids by kind, each kind's in request order (a requeue keeps its place)."""

    def __init__(self) -> None:
        self._by_kind: dict[str, list[tuple[datetime, UUID]]] = {}
        self._place: dict[UUID, tuple[str, datetime]] = {}

    def add(self, job_id: UUID, kind: str, created: datetime) -> None:
        if job_id in self._place:
            return
        self._place[job_id] = (kind, created)
        bisect.insort(self._by_kind.setdefault(kind, []), (created, job_id))

    def remove(self, job_id: UUID) -> None:
        place = self._place.pop(job_id, None)
        if place is None:
            return
        kind, created = place
        queue = self._by_kind[kind]
        i = bisect.bisect_left(queue, (created, job_id))
        del queue[i]
        if not queue:
            del self._by_kind[kind]

    def oldest_first(self, kinds: Iterable[str] = ()) -> Iterator[UUID]:
        """The queued ids of `kinds` (all kinds when empty), oldest first. Do not add or remove
        while iterating: the queues are walked as they are, not copied."""
        wanted = set(kinds)
        queues = [q for k, q in self._by_kind.items() if not wanted or k in wanted]
        for _created, job_id in queues[0] if len(queues) == 1 else heapq.merge(*queues):
            yield job_id

    @property
    def kinds(self) -> set[str]:
        """The kinds with a queued job (a kind's queue goes when its last job does)."""
        return set(self._by_kind)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._place

    def __len__(self) -> int:
        return len(self._place)
