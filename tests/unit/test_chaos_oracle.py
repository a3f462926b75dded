"""The chaos schedule is a pure function of its seed, and the oracle catches each violation it
names (a lost or unexpected input, a change landed twice or recorded failed once landed, a
stuck job, a rejected valid proposal)."""

from __future__ import annotations

import itertools
import uuid

import pytest

from services.chaos import oracle, schedule
from services.chaos.oracle import Attempt
from shared.events import LeaseExpired, ProposalRejected, now

SLOTS = schedule.service_slots(2) + schedule.agent_slots(3)


def test_the_same_seed_gives_the_same_schedule_spread_over_the_duration() -> None:
    first = schedule.plan(42, 20, 100.0, SLOTS, broker_kills=3)
    assert first == schedule.plan(42, 20, 100.0, SLOTS, broker_kills=3)
    assert first != schedule.plan(43, 20, 100.0, SLOTS, broker_kills=3)
    times = [k.at_s for k in first]
    assert times == sorted(times) and times[0] >= 10.0 and times[-1] <= 95.0
    assert min(b - a for a, b in itertools.pairwise(times)) > 0.0
    assert sum(k.slot == schedule.BROKER for k in first) == 3
    assert {k.slot for k in first} - {schedule.BROKER} <= set(SLOTS)
    assert any(schedule.slot_service(k.slot) == "agent" for k in first)


def test_a_schedule_that_cannot_be_met_is_refused() -> None:
    with pytest.raises(ValueError, match="broker kills"):
        schedule.plan(1, 2, 10.0, SLOTS, broker_kills=3)
    with pytest.raises(ValueError, match="no process slots"):
        schedule.plan(1, 2, 10.0, [], broker_kills=1)
    assert [k.slot for k in schedule.plan(1, 2, 10.0, [], broker_kills=2)] == ["broker", "broker"]


def test_inputs_acked_but_missing_or_different_are_lost_and_strangers_are_unexpected() -> None:
    attempts = [
        Attempt("k1", "a" * 64, 5),
        Attempt("k2", "b" * 64, None),  # no ack: its write may or may not have happened
        Attempt("k2", "b" * 64, 9),
        Attempt("k3", "c" * 64, 12),
    ]
    stored_at = {5: "a" * 64, 9: "b" * 64, 12: "d" * 64}  # 12 holds other bytes than sent
    namespace = {5: "a" * 64, 7: "b" * 64, 9: "b" * 64, 12: "d" * 64}
    check, figures = oracle.inputs(attempts, stored_at, namespace)
    assert not check.ok
    assert figures == {
        "sent": 4,
        "acked": 3,
        "unacked": 1,
        "stored": 4,
        "lost": 1,
        "unexpected": 1,
        "recovered": 1,
    }
    assert {"key": "k3", "seq": 12, "found": "d" * 64} in check.violations
    assert {"seq": 12, "sha256": "d" * 64} in check.violations
    clean, _ = oracle.inputs(attempts[:3], stored_at, {5: "a" * 64, 9: "b" * 64})
    assert clean.ok


def test_a_change_landed_twice_or_recorded_failed_after_landing_is_a_violation() -> None:
    accepted = {"p1": "j1", "p2": "j2", "p3": "j3", "p4": "j4"}
    applied = {"p1": 1, "p2": 1, "p4": 0}
    failed = {"p3": 1, "p4": 1}
    proposal_commits = {"p1": {"c1"}, "p2": {"c2", "c2b"}, "p3": {"c3"}, "p4": set()}
    job_commits = {"j1": {"c1"}, "j2": {"c2", "c2b"}, "j3": {"c3"}, "j4": set()}
    statuses = {"j1": "completed", "j2": "completed", "j3": "queued", "j4": "tombstoned"}
    check, figures = oracle.exactly_once(accepted, applied, failed, proposal_commits, job_commits, statuses)
    assert not check.ok and figures["violations"] == 4
    flagged = {v.get("proposal") or v.get("job") for v in check.violations}
    assert flagged == {"p2", "p3", "j2", "j3"}  # p4 failed cleanly: nothing landed, nothing claimed
    good, _ = oracle.exactly_once(
        {"p1": "j1"}, {"p1": 1}, {}, {"p1": {"c1"}}, {"j1": {"c1"}}, {"j1": "completed"}
    )
    assert good.ok


def test_a_job_not_terminal_or_never_created_fails_and_a_rejected_proposal_is_named() -> None:
    assert oracle.terminal({"j1": "completed", "j2": "tombstoned"}, 2).ok
    stuck = oracle.terminal({"j1": "completed", "j2": "leased"}, 3)
    assert not stuck.ok and {"job": "j2", "status": "leased"} in stuck.violations
    assert {"missing_jobs": 1} in stuck.violations

    job = uuid.uuid4()
    pid = uuid.uuid4()
    rejected = ProposalRejected(
        originator_id=job, originator_version=5, proposal_id=pid, violations=["authority: not registered"]
    )
    expired = LeaseExpired(
        originator_id=job,
        originator_version=4,
        agent="cabc-1-0",
        epoch=1,
        deadline=now(),
        detected_at=now(),
        detection_latency_ms=3.0,
    )
    check, figures = oracle.no_valid_rejection(
        [(str(job), expired), (str(job), rejected)], {str(job)}, "cabc-"
    )
    assert not check.ok and figures["lease_expired"] == 1
    assert check.violations == [
        {"job": str(job), "proposal_rejected": str(pid), "violations": ["authority: not registered"]}
    ]
    drift = ProposalRejected(
        originator_id=job,
        originator_version=6,
        proposal_id=uuid.uuid4(),
        violations=[
            "base_drift: stale base: main is at 7d6f, the proposal was built on 5edf",
            "ci_gate: not run",
        ],
    )
    costs_only, figures = oracle.no_valid_rejection(
        [(str(job), expired), (str(job), drift)], {str(job)}, "cabc-"
    )
    assert costs_only.ok and figures["stale_base"] == 1
