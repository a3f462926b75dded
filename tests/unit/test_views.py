"""The services' view is bounded by what is live: ended jobs leave it, late events still fold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from shared.aggregates import Agent, Job
from shared.contract import Contract
from shared.decide import NEXT, after
from shared.events import (
    EffectApplied,
    EffectRolledBack,
    Event,
    JobCancelled,
    JobCompleted,
    JobRequested,
    JobRequeued,
    LeaseExpired,
    LeaseGranted,
    MessageRejected,
    ProposalAccepted,
    ProposalSubmitted,
    RollbackRequested,
)
from shared.snapshot import Snapshot
from shared.views import Views


def requested(job_id: UUID) -> JobRequested:
    return JobRequested(
        originator_id=job_id,
        originator_version=1,
        idempotency_key=str(job_id),
        kind="noop",
        contract=Contract(),
    )


def fold(views: Views, *events: Event) -> None:
    for event in events:
        views.apply(event)


def cancel(views: Views, job_id: UUID) -> None:
    job = views.job(job_id)
    fold(views, *after(job, JobCancelled(originator_id=job_id, originator_version=NEXT, reason="r", by="op")))


def fenced(views: Views, job_id: UUID) -> MessageRejected:
    draft = MessageRejected(
        originator_id=job_id,
        originator_version=NEXT,
        agent="a",
        epoch=1,
        verb="heartbeat",
        reason="late",
        input_seq=9,
    )
    return after(views.job(job_id), draft)[0]


def test_a_cancelled_job_leaves_the_live_jobs_and_listeners_still_see_its_end() -> None:
    views = Views(forget_ended=True)
    heard: list[tuple[Event | None, Job | None]] = []

    def listener(event: Event | None, job: Job | None, _agent: Agent | None) -> None:
        heard.append((event, job))

    views.listeners.append(listener)
    job_id = uuid4()
    fold(views, requested(job_id))
    cancel(views, job_id)
    assert job_id not in views.jobs
    ended = views.job(job_id)
    assert ended is not None and ended.status == "cancelled"
    last_event, last_job = heard[-1]
    assert isinstance(last_event, JobCancelled) and last_job == ended


def test_a_late_event_of_a_recently_ended_job_folds_into_it() -> None:
    views = Views(forget_ended=True)
    job_id = uuid4()
    fold(views, requested(job_id))
    cancel(views, job_id)
    assert views.apply(fenced(views, job_id))
    assert views.require_job(job_id).version == 3


def test_a_requeued_ended_job_is_live_again() -> None:
    views = Views(forget_ended=True)
    job_id = uuid4()
    fold(views, requested(job_id))
    cancel(views, job_id)
    fold(
        views,
        *after(views.job(job_id), JobRequeued(originator_id=job_id, originator_version=NEXT, reason="again")),
    )
    assert views.jobs[job_id].status == "queued"
    assert job_id not in views.ended


def test_the_ended_jobs_kept_are_bounded_and_the_least_recently_used_go_first() -> None:
    views = Views(forget_ended=True, ended_cache=2)
    first, second, third = uuid4(), uuid4(), uuid4()
    for job_id in (first, second):
        fold(views, requested(job_id))
        cancel(views, job_id)
    assert views.job(first) is not None  # used: now the most recent
    fold(views, requested(third))
    cancel(views, third)
    assert list(views.ended) == [first, third]
    assert views.job(second) is None


def test_an_event_of_a_forgotten_job_is_not_folded_and_is_reported_for_a_store_read() -> None:
    views = Views(forget_ended=True, ended_cache=1)
    asked: list[UUID] = []
    views.on_unknown = asked.append
    old, new = uuid4(), uuid4()
    fold(views, requested(old))
    cancel(views, old)
    late = fenced(views, old)
    fold(views, requested(new))
    cancel(views, new)  # pushes the old job out of the cache
    assert not views.apply(late)
    assert asked == [old]
    assert views.job(old) is None


def test_a_job_reloaded_from_the_store_after_it_was_forgotten_is_adopted_among_the_ended() -> None:
    views = Views(forget_ended=True, ended_cache=1)
    old = uuid4()
    fold(views, requested(old))
    cancel(views, old)
    stored = views.require_job(old)
    fold(views, requested(other := uuid4()))
    cancel(views, other)
    views.replace_job(stored)
    assert views.job(old) == stored and old not in views.jobs


def test_a_completed_job_with_a_rollback_outstanding_stays_live_until_it_is_done() -> None:
    views = Views(forget_ended=True)
    job_id, pid = uuid4(), uuid4()
    fold(views, requested(job_id))
    drafts: list[Event] = [
        ProposalSubmitted(
            originator_id=job_id,
            originator_version=NEXT,
            proposal_id=pid,
            agent="a",
            epoch=1,
            content_hash="h",
            size=1,
            input_seq=1,
        ),
        ProposalAccepted(originator_id=job_id, originator_version=NEXT, proposal_id=pid),
        EffectApplied(
            originator_id=job_id, originator_version=NEXT, proposal_id=pid, kind="file.write", receipt={}
        ),
        JobCompleted(originator_id=job_id, originator_version=NEXT, proposal_id=pid, agent="a", epoch=1),
    ]
    fold(views, *after(views.job(job_id), *drafts))
    assert job_id not in views.jobs
    asked = RollbackRequested(
        originator_id=job_id, originator_version=NEXT, proposal_id=pid, reason="bad", by="op"
    )
    fold(views, *after(views.job(job_id), asked))
    assert views.jobs[job_id].status == "completed"  # completed, and the applier has work on it
    done = EffectRolledBack(
        originator_id=job_id, originator_version=NEXT, proposal_id=pid, kind="file.write", receipt={}
    )
    fold(views, *after(views.job(job_id), done))
    assert job_id not in views.jobs


def test_a_view_for_forensics_keeps_every_job() -> None:
    views = Views()
    job_id = uuid4()
    fold(views, requested(job_id))
    cancel(views, job_id)
    assert views.jobs[job_id].status == "cancelled"


def _leases_by_walking(views: Views) -> dict[str, set[UUID]]:
    """Who holds which live job's live lease, found the slow way: every live job looked at."""
    out: dict[str, set[UUID]] = {}
    for job in views.jobs.values():
        lease = job.live_lease
        if lease is not None and not job.terminal:
            out.setdefault(lease.agent, set()).add(job.id)
    return out


def _leases_by_index(views: Views, agents: list[str]) -> dict[str, set[UUID]]:
    return {a: {j.id for j in views.leased_to(a)} for a in agents if views.leased_to(a)}


@pytest.mark.parametrize("forget_ended", [True, False])
def test_the_leases_each_agent_holds_are_indexed_as_walking_every_live_job_finds_them(
    forget_ended: bool,
) -> None:
    agents = ["a", "b"]
    at = datetime(2026, 1, 1, tzinfo=UTC)
    views = Views(forget_ended=forget_ended)

    def check() -> None:
        assert _leases_by_index(views, agents) == _leases_by_walking(views)
        for name in agents:
            assert views.live_leases_of(name) == len(_leases_by_walking(views).get(name, ()))

    def grant(job_id: UUID, agent: str, epoch: int) -> None:
        draft = LeaseGranted(
            originator_id=job_id,
            originator_version=NEXT,
            agent=agent,
            epoch=epoch,
            ttl_s=30,
            expires_at=at + timedelta(seconds=30),
        )
        fold(views, *after(views.job(job_id), draft))
        check()

    one, two, three = uuid4(), uuid4(), uuid4()
    for job_id in (one, two, three):
        fold(views, requested(job_id))
    check()
    grant(one, "a", 1)
    grant(two, "a", 1)
    grant(three, "b", 1)
    assert {j.id for j in views.leased_to("a")} == {one, two}
    # Expired: no longer held by a; requeued and granted to b, it is b's.
    expired = LeaseExpired(
        originator_id=one,
        originator_version=NEXT,
        agent="a",
        epoch=1,
        deadline=at,
        detected_at=at,
        detection_latency_ms=1.0,
    )
    fold(views, *after(views.job(one), expired))
    check()
    assert one not in {j.id for j in views.leased_to("a")}
    requeued = JobRequeued(originator_id=one, originator_version=NEXT, reason="expired")
    fold(views, *after(views.job(one), requeued))
    grant(one, "b", 2)
    assert {j.id for j in views.leased_to("b")} == {one, three}
    # Cancelled with a live lease: the lease no longer counts.
    cancel(views, two)
    check()
    assert two not in {j.id for j in views.leased_to("a")}
    # Restored from a snapshot, the index is rebuilt from the jobs it holds.
    snap = views.capture(at)
    assert isinstance(snap, Snapshot)
    fresh = Views(forget_ended=forget_ended)
    assert fresh.restore(snap)
    assert _leases_by_index(fresh, agents) == _leases_by_walking(fresh) == _leases_by_walking(views)
