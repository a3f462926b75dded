"""The scheduler's queue of runnable jobs: oldest first across the kinds a claim takes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from services.scheduler.runnable import Runnable

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def queued(*spec: tuple[str, int]) -> tuple[Runnable, list[UUID]]:
    runnable = Runnable()
    ids = []
    for kind, minute in spec:
        job_id = uuid4()
        runnable.add(job_id, kind, T0 + timedelta(minutes=minute))
        ids.append(job_id)
    return runnable, ids


def test_a_claim_walks_only_its_kinds_oldest_first_and_an_empty_claim_walks_every_kind() -> None:
    runnable, (a3, b1, a2, c0) = queued(("a", 3), ("b", 1), ("a", 2), ("c", 0))
    assert list(runnable.oldest_first(["a"])) == [a2, a3]
    assert list(runnable.oldest_first(["a", "b"])) == [b1, a2, a3]
    assert list(runnable.oldest_first()) == [c0, b1, a2, a3]
    assert list(runnable.oldest_first(["nobody submits this"])) == []


def test_a_removed_job_is_offered_no_more_and_adding_a_queued_job_again_changes_nothing() -> None:
    runnable, (a1, a2, b0) = queued(("a", 1), ("a", 2), ("b", 0))
    runnable.add(a1, "a", T0 + timedelta(minutes=9))  # already queued: keeps its place
    runnable.remove(a1)
    runnable.remove(a1)  # twice: nothing more happens
    assert list(runnable.oldest_first()) == [b0, a2]
    assert a1 not in runnable and a2 in runnable and len(runnable) == 2
    runnable.remove(b0)
    assert list(runnable.oldest_first(["b"])) == []
    assert runnable.kinds == {"a"}  # no queue is kept for a kind with no queued job


def test_jobs_requested_at_the_same_moment_are_each_kept_and_removed_exactly() -> None:
    runnable = Runnable()
    same = [uuid4() for _ in range(5)]
    for job_id in same:
        runnable.add(job_id, "k", T0)
    runnable.remove(same[2])
    assert sorted(runnable.oldest_first(["k"])) == sorted(same[:2] + same[3:])
