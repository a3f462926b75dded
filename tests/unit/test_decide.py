"""The decision helpers: version numbering in one place, and the one retry-on-conflict policy."""

from __future__ import annotations

from uuid import uuid4

import pytest
from eventsourcing.persistence import IntegrityError

from shared.decide import NEXT, Contended, Refusal, after, numbered, retry
from shared.events import JobCancelled


def _cancel(job_id: object) -> JobCancelled:
    return JobCancelled(originator_id=job_id, originator_version=NEXT, reason="r", by="op")  # type: ignore[arg-type]


class _State:
    def __init__(self, version: int) -> None:
        self.id = uuid4()
        self.version = version


def test_after_numbers_drafts_as_the_versions_following_the_state() -> None:
    state = _State(version=7)
    events = after(state, _cancel(state.id), _cancel(state.id))
    assert [e.originator_version for e in events] == [8, 9]


def test_after_a_missing_state_starts_at_version_one() -> None:
    job = uuid4()
    assert [e.originator_version for e in after(None, _cancel(job))] == [1]


def test_numbered_counts_each_aggregate_on_its_own() -> None:
    a, b = uuid4(), uuid4()
    events = numbered([_cancel(a), _cancel(b), _cancel(a)], {a: 3})
    assert [(e.originator_id, e.originator_version) for e in events] == [(a, 4), (b, 1), (a, 5)]


def test_refusal_of_one_field_names_it() -> None:
    refusal = Refusal.of("$.job_id", "job is completed")
    assert refusal.errors[0].path == "$.job_id"
    assert refusal.reason == "job is completed"


async def test_retry_reloads_after_a_lost_race_and_decides_again() -> None:
    calls: list[str] = []

    async def step() -> str:
        calls.append("step")
        if calls.count("step") < 3:
            raise IntegrityError("moved")
        return "saved"

    async def reload() -> None:
        calls.append("reload")

    assert await retry(step, reload) == "saved"
    assert calls == ["step", "reload", "step", "reload", "step"]


async def test_retry_raises_contended_when_every_try_loses() -> None:
    reloads = 0

    async def step() -> None:
        raise IntegrityError("moved")

    async def reload() -> None:
        nonlocal reloads
        reloads += 1

    with pytest.raises(Contended, match="lost the race 3 times"):
        await retry(step, reload, tries=3)
    assert reloads == 3
