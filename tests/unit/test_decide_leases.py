"""The lease and job rules as pure functions: given a job (folded from its events), an agent and
a time, when a command arrives, then these events and this answer. No server, no real clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from shared.aggregates import Agent, Job, project_job
from shared.contract import Budgets, Contract, Scope, Stopping
from shared.decide import NEXT, Refusal, after
from shared.decide import jobs as job_rules
from shared.decide import leases as rules
from shared.events import (
    AgentRegistered,
    Event,
    HeartbeatSeen,
    JobCancelled,
    JobCompleted,
    JobRequested,
    JobRequeued,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalSubmitted,
    Usage,
    agent_id_for,
    job_id_for,
)
from shared.messages import (
    Accepted,
    Claim,
    HeartbeatAck,
    JobRequest,
    NoWork,
    OperatorCommand,
    Register,
    Release,
)
from shared.policy import Level, Policy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = 10.0
POLICY = Policy(
    levels=[
        Level(level=0, name="sandbox", effects=["none"], max_leases=2),
        Level(level=1, name="trusted", effects=["none"], max_leases=5),
    ]
)


def at(seconds: float) -> datetime:
    """The injected clock: `seconds` after the job was requested."""
    return T0 + timedelta(seconds=seconds)


def contract(
    *,
    attempts: int = 3,
    deadline: datetime | None = None,
    budgets: Budgets | None = None,
    level: int = 0,
) -> Contract:
    return Contract(
        required_level=level,
        scope=Scope(effects=["none"]),
        stopping=Stopping(
            lease_ttl_s=TTL,
            heartbeat_interval_s=TTL / 4,
            max_attempts=attempts,
            deadline=deadline,
            budgets=budgets or Budgets(),
        ),
    )


def fold(job: Job | None, *events: Event) -> Job:
    folded = project_job(job, events)
    assert folded is not None
    return folded


def requested(key: str = "", *, kind: str = "noop", created: float = 0, **terms: object) -> Job:
    key = key or str(uuid4())
    event = JobRequested(
        originator_id=job_id_for(key),
        originator_version=1,
        timestamp=at(created),
        idempotency_key=key,
        kind=kind,
        contract=contract(**terms),  # type: ignore[arg-type]
    )
    return fold(None, event)


def leased(job: Job, agent: str = "a", *, when: float = 0) -> Job:
    granted = LeaseGranted(
        originator_id=job.id,
        originator_version=NEXT,
        timestamp=at(when),
        agent=agent,
        epoch=job.attempts + 1,
        ttl_s=TTL,
        expires_at=at(when + TTL),
    )
    return fold(job, *after(job, granted))


def ended(job: Job, how: str, *, when: float = 1) -> Job:
    """The live lease ends `how` (expired, released, revoked) and the job is requeued."""
    lease = job.live_lease
    assert lease is not None
    end: Event
    if how == "expired":
        end = LeaseExpired(
            originator_id=job.id,
            originator_version=NEXT,
            agent=lease.agent,
            epoch=lease.epoch,
            deadline=at(when),
            detected_at=at(when),
            detection_latency_ms=0,
        )
    elif how == "released":
        end = LeaseReleased(
            originator_id=job.id, originator_version=NEXT, agent=lease.agent, epoch=lease.epoch
        )
    else:
        end = LeaseRevoked(
            originator_id=job.id,
            originator_version=NEXT,
            agent=lease.agent,
            epoch=lease.epoch,
            reason="operator said so",
            signal="operator",
        )
    return fold(job, *after(job, end, JobRequeued(originator_id=job.id, originator_version=NEXT, reason=how)))


def proposed(job: Job) -> Job:
    lease = job.live_lease
    assert lease is not None
    submitted = ProposalSubmitted(
        originator_id=job.id,
        originator_version=NEXT,
        proposal_id=uuid4(),
        agent=lease.agent,
        epoch=lease.epoch,
        content_hash="h",
        size=1,
        input_seq=7,
    )
    return fold(job, *after(job, submitted))


def agent(
    name: str = "a",
    *,
    level: int = 0,
    kinds: tuple[str, ...] = (),
    max_concurrent: int = 10,
    standing: str = "active",
) -> Agent:
    return Agent(
        id=agent_id_for(name),
        version=1,
        created_on=T0,
        modified_on=T0,
        name=name,
        level=level,
        kinds=kinds,
        max_concurrent=max_concurrent,
        standing=standing,  # type: ignore[arg-type]
        standing_reason="told to stop" if standing != "active" else "",
    )


def seen(when: float, **usage: float) -> HeartbeatSeen:
    return HeartbeatSeen(at=at(when), input_seq=99, usage=Usage(**usage))  # type: ignore[arg-type]


def grant(
    candidates: list[Job],
    claimant: Agent,
    *,
    present: list[Agent] | None = None,
    held: int = 0,
    when: float = 1,
) -> rules.Granted | NoWork:
    return rules.grant(
        candidates,
        claimant,
        Claim(),
        policy=POLICY,
        held=held,
        present=present or [],
        at=at(when),
        claim_seq=40,
    )


# --- fencing: every reason -------------------------------------------------------------------


def test_a_message_under_the_live_lease_is_not_fenced() -> None:
    assert rules.fence_reason("a", leased(requested()), 1) is None


def test_a_message_naming_an_older_epoch_is_fenced_as_stale_naming_the_current_holder() -> None:
    job = leased(ended(leased(requested()), "expired"), "b")
    fenced = rules.fence_reason("a", job, 1)
    assert fenced == rules.Fenced(
        standing="expired", reason="stale lease: a sent epoch 1; current epoch 2 held by b"
    )


def test_a_message_from_another_agent_under_the_current_epoch_is_fenced_as_stale() -> None:
    fenced = rules.fence_reason("mallory", leased(requested(), "a"), 1)
    assert fenced is not None and fenced.standing == "expired"
    assert "current epoch 1 held by a" in fenced.reason


def test_a_message_about_a_job_never_leased_is_fenced_saying_there_is_no_lease() -> None:
    fenced = rules.fence_reason("a", requested(), 1)
    assert fenced == rules.Fenced(standing="expired", reason="stale lease: a sent epoch 1; no lease")


@pytest.mark.parametrize(
    ("how", "standing"), [("expired", "expired"), ("revoked", "revoked"), ("released", "ended")]
)
def test_a_message_under_its_own_ended_lease_says_how_it_ended(how: str, standing: str) -> None:
    # Requeued but not yet regranted: the lease is the job's last, ended.
    fenced = rules.fence_reason("a", ended(leased(requested()), how), 1)
    assert fenced == rules.Fenced(standing=standing, reason=f"lease 1 already {how}")  # type: ignore[arg-type]


def test_a_message_under_the_expired_last_attempt_of_a_tombstoned_job_is_told_it_ended() -> None:
    job = leased(requested(attempts=1))
    then = rules.enforce(job, None, at(TTL + 1))
    fenced = rules.fence_reason("a", fold(job, *then.events), 1)
    assert fenced is not None and fenced.standing == "ended"


def test_a_message_about_a_cancelled_job_is_told_it_was_revoked() -> None:
    job = leased(requested())
    cancelled = fold(
        job, *after(job, JobCancelled(originator_id=job.id, originator_version=NEXT, reason="no", by="op"))
    )
    fenced = rules.fence_reason("a", cancelled, 1)
    assert fenced is not None and fenced.standing == "revoked"


def test_a_fenced_message_is_recorded_as_the_jobs_next_event() -> None:
    job = leased(ended(leased(requested()), "expired"), "b")
    decided = rules.fence("a", "heartbeat", job, 1, 55, at(3))
    assert decided is not None
    _why, [rejected] = decided
    assert isinstance(rejected, MessageRejected)
    assert (rejected.originator_version, rejected.verb, rejected.input_seq) == (
        job.version + 1,
        "heartbeat",
        55,
    )
    assert (rejected.epoch, rejected.current_epoch, rejected.timestamp) == (1, 2, at(3))


# --- heartbeats ------------------------------------------------------------------------------


def test_a_heartbeat_within_the_ttl_extends_the_lease_one_ttl_past_it_and_records_nothing() -> None:
    beat = rules.heartbeat(leased(requested()), "a", 1, seen(4), at(4))
    assert beat.events == []
    assert beat.reply == HeartbeatAck(standing="extended", expires_at=at(4 + TTL))
    assert beat.seen == seen(4)


def test_a_heartbeat_sent_long_before_it_was_handled_finds_its_lease_expired() -> None:
    # Sent at 1 s, handled at 30 s: its lease ran out at 11 s.
    beat = rules.heartbeat(leased(requested()), "a", 1, seen(1), at(30))
    assert beat.reply.standing == "expired"
    assert [type(e) for e in beat.events] == [LeaseExpired, JobRequeued]


def test_a_late_heartbeat_of_a_lease_its_holder_completed_is_answered_ended_and_not_fenced() -> None:
    job = leased(requested())
    done = fold(
        job,
        *after(
            job,
            JobCompleted(
                originator_id=job.id, originator_version=NEXT, proposal_id=uuid4(), agent="a", epoch=1
            ),
        ),
    )
    beat = rules.heartbeat(done, "a", 1, seen(5), at(5))
    assert beat.events == [] and beat.seen is None
    assert beat.reply.standing == "ended"


def test_a_heartbeat_under_a_stale_epoch_is_fenced_recorded_and_not_kept() -> None:
    job = leased(ended(leased(requested()), "expired"), "b")
    beat = rules.heartbeat(job, "a", 1, seen(5), at(5))
    assert [type(e) for e in beat.events] == [MessageRejected]
    assert beat.reply.standing == "expired" and beat.seen is None


def test_a_heartbeat_over_its_step_budget_revokes_the_lease_and_requeues_the_job() -> None:
    job = leased(requested(budgets=Budgets(steps=3)))
    beat = rules.heartbeat(job, "a", 1, seen(2, steps=5), at(2))
    revoked, requeued = beat.events
    assert isinstance(revoked, LeaseRevoked) and revoked.signal == "budget" and revoked.by == "reconciler"
    assert isinstance(requeued, JobRequeued)
    assert [e.originator_version for e in beat.events] == [job.version + 1, job.version + 2]
    assert beat.reply == HeartbeatAck(
        standing="budget_exceeded", reason="budget exceeded: steps 5 > budget 3"
    )
    assert beat.cause == "budget"


@pytest.mark.parametrize(
    ("budgets", "usage", "breach"),
    [
        (Budgets(steps=3), {"steps": 4}, "steps 4 > budget 3"),
        (Budgets(tokens=100), {"tokens": 101}, "tokens 101 > budget 100"),
        (Budgets(cost=0.5), {"cost": 0.75}, "cost 0.75 > budget 0.5"),
    ],
)
def test_each_usage_budget_is_breached_only_past_its_bound(
    budgets: Budgets, usage: dict[str, float], breach: str
) -> None:
    job = leased(requested(budgets=budgets))
    lease = job.live_lease
    assert lease is not None
    assert rules.budget_breach(job, Usage(**usage), lease, at(1)) == breach  # type: ignore[arg-type]
    at_bound = {k: v - 1 if isinstance(v, int) else v - 0.25 for k, v in usage.items()}
    assert rules.budget_breach(job, Usage(**at_bound), lease, at(1)) == ""  # type: ignore[arg-type]


def test_the_wall_clock_budget_counts_from_the_grant_and_is_enforced_without_a_heartbeat() -> None:
    job = leased(requested(budgets=Budgets(wall_clock_s=5)), when=2)
    assert rules.next_check(job, None) == at(7)  # before the TTL runs out at 12 s
    assert rules.enforce(job, None, at(6.5)).standing == "extended"
    then = rules.enforce(job, None, at(7.5))
    assert then.standing == "budget_exceeded" and then.cause == "budget"
    revoked = then.events[0]
    assert (
        isinstance(revoked, LeaseRevoked)
        and revoked.reason == "budget exceeded: wall clock 5.500s > budget 5s"
    )


def test_a_job_with_a_pending_proposal_or_accepted_is_extended_past_its_ttl() -> None:
    job = proposed(leased(requested()))
    assert rules.enforce(job, None, at(TTL * 5)) == rules.Enforced(standing="extended")
    pid = job.pending_proposal
    assert pid is not None
    accepted = fold(
        job, *after(job, ProposalAccepted(originator_id=job.id, originator_version=NEXT, proposal_id=pid))
    )
    assert rules.enforce(accepted, None, at(TTL * 5)).standing == "extended"
    assert rules.next_check(accepted, None) is None


# --- expiry, attempts and deadlines ------------------------------------------------------------


def test_a_lease_silent_past_its_ttl_expires_with_its_latency_and_the_job_is_requeued() -> None:
    job = leased(requested())
    then = rules.enforce(job, None, at(TTL + 0.25))
    expired, requeued = then.events
    assert isinstance(expired, LeaseExpired)
    assert (expired.deadline, expired.detected_at, expired.detection_latency_ms) == (
        at(TTL),
        at(TTL + 0.25),
        250,
    )
    assert expired.last_heartbeat is None
    assert isinstance(requeued, JobRequeued) and requeued.reason.endswith("(none ever received)")
    assert [e.originator_version for e in then.events] == [job.version + 1, job.version + 2]


def test_the_last_heartbeat_moves_the_expiry_and_is_its_evidence() -> None:
    job = leased(requested())
    last = seen(6)
    assert rules.next_check(job, last) == at(6 + TTL)
    assert rules.enforce(job, last, at(TTL + 1)).standing == "extended"
    expired = rules.enforce(job, last, at(6 + TTL + 1)).events[0]
    assert isinstance(expired, LeaseExpired) and expired.last_heartbeat == last


def test_an_expiry_of_the_last_attempt_tombstones_the_job() -> None:
    job = leased(requested(attempts=1))
    tomb = rules.enforce(job, None, at(TTL + 1)).events[1]
    assert isinstance(tomb, JobTombstoned) and tomb.attempts == 1
    assert tomb.reason.startswith("max attempts (1) reached; last attempt: lease 1 of a expired")


def test_an_operator_requeue_of_a_tombstone_grants_the_attempts_afresh() -> None:
    job = leased(requested(attempts=1))
    dead = fold(job, *rules.enforce(job, None, at(TTL + 1)).events)
    requeue = job_rules.requeue(dead, OperatorCommand(operator="op", reason="again"), at(20))
    assert isinstance(requeue, rules.Outcome)
    again = leased(fold(dead, *requeue.events), when=21)
    assert again.attempts_left == 0 and again.attempts == 2
    assert isinstance(rules.enforce(again, None, at(21 + TTL + 1)).events[1], JobTombstoned)
    assert isinstance(rules.after_lost_attempt(fold(dead, *requeue.events), "x", at(22)), JobRequeued)


def test_a_passed_deadline_revokes_the_live_lease_and_tombstones_the_job() -> None:
    job = leased(requested(deadline=at(5)))
    then = rules.enforce(job, seen(4), at(5))
    revoked, tomb = then.events
    assert isinstance(revoked, LeaseRevoked) and revoked.signal == "deadline"
    assert isinstance(tomb, JobTombstoned) and tomb.reason == f"deadline {at(5).isoformat()} passed"
    assert (then.standing, then.cause) == ("expired", "deadline")


def test_a_passed_deadline_tombstones_a_queued_job_without_revoking_anything() -> None:
    then = rules.enforce(requested(deadline=at(5)), None, at(6))
    assert [type(e) for e in then.events] == [JobTombstoned]
    assert rules.next_check(requested(deadline=at(5)), None) == at(5)


def test_an_attempt_lost_after_the_deadline_is_a_tombstone_whatever_attempts_remain() -> None:
    job = leased(requested(deadline=at(50), attempts=5))
    lost = rules.after_lost_attempt(job, "released", at(50), by="checker")
    assert isinstance(lost, JobTombstoned) and lost.by == "checker"
    assert lost.reason.startswith(f"deadline {at(50).isoformat()} passed; last attempt: released")


def test_a_terminal_job_has_nothing_due() -> None:
    job = leased(requested(attempts=1))
    dead = fold(job, *rules.enforce(job, None, at(TTL + 1)).events)
    assert rules.next_check(dead, None) is None
    assert rules.enforce(dead, None, at(1000)) == rules.Enforced(standing=None)


def test_a_stall_is_measured_from_the_last_progress_its_heartbeat_reported() -> None:
    beat = HeartbeatSeen(at=at(8), input_seq=1, progress_at=at(3))
    assert rules.since_progress_ms(beat, at(10)) == 7000
    assert rules.since_progress_ms(seen(8), at(10)) is None


# --- release ---------------------------------------------------------------------------------


def test_a_release_of_the_live_lease_spends_the_attempt() -> None:
    job = leased(requested())
    out = rules.release(job, "a", Release(job_id=job.id, epoch=1, reason="stuck"), 12, at(3))
    released, requeued = out.events
    assert isinstance(released, LeaseReleased) and released.reason == "stuck"
    assert isinstance(requeued, JobRequeued) and requeued.reason == "released by a: stuck"
    assert out.reply == Accepted(job_id=job.id, detail="lease released")


def test_a_release_under_a_stale_epoch_is_fenced() -> None:
    job = leased(ended(leased(requested()), "expired"), "b")
    out = rules.release(job, "a", Release(job_id=job.id, epoch=1), 12, at(3))
    assert [type(e) for e in out.events] == [MessageRejected]
    assert isinstance(out.reply, HeartbeatAck) and out.reply.standing == "expired"


# --- claims and grants -----------------------------------------------------------------------


def test_a_claim_is_granted_the_oldest_runnable_job_as_its_next_version() -> None:
    older, newer = requested(created=0), requested(created=1)
    decided = grant([older, newer], agent())
    assert isinstance(decided, rules.Granted) and decided.job is older
    event = decided.event
    assert (event.originator_version, event.epoch, event.agent, event.claim_seq) == (2, 1, "a", 40)
    assert (event.timestamp, event.expires_at, event.ttl_s) == (at(1), at(1 + TTL), TTL)


def test_a_claim_is_granted_only_jobs_of_the_kinds_it_or_its_agent_names() -> None:
    build, test = requested(kind="build"), requested(kind="test")
    for_test = rules.grant(
        [build, test],
        agent(),
        Claim(kinds=["test"]),
        policy=POLICY,
        held=0,
        present=[],
        at=at(1),
        claim_seq=1,
    )
    assert isinstance(for_test, rules.Granted) and for_test.job is test
    by_agent = grant([build, test], agent(kinds=("test",)))
    assert isinstance(by_agent, rules.Granted) and by_agent.job is test
    assert isinstance(grant([build], agent(kinds=("test",))), NoWork)


def test_a_job_requiring_a_higher_level_waits_for_an_agent_of_that_level() -> None:
    job = requested(level=1)
    assert grant([job], agent(level=0)) == NoWork(detail="no runnable job for this agent")
    assert isinstance(grant([job], agent(level=1)), rules.Granted)


def test_an_agent_at_its_lease_limit_is_given_no_work_and_its_level_caps_its_own_limit() -> None:
    assert grant([requested()], agent(max_concurrent=10), held=2) == NoWork(
        detail="agent a holds 2 of 2 leases (level 0)"
    )
    assert rules.lease_limit(agent(max_concurrent=1, level=1), POLICY) == 1
    assert rules.lease_limit(agent(max_concurrent=10, level=1), POLICY) == 5


def test_a_live_lease_counts_against_its_agent_until_something_is_proposed_under_it() -> None:
    working = leased(requested(), "a")
    awaiting = proposed(leased(requested(), "a"))
    pid = awaiting.pending_proposal
    assert pid is not None
    approved = fold(
        awaiting,
        *after(
            awaiting, ProposalAccepted(originator_id=awaiting.id, originator_version=NEXT, proposal_id=pid)
        ),
    )
    assert rules.occupies(working, "a") and not rules.occupies(working, "b")
    # Proposed, or accepted and waiting for its effect: the lease lives, but the agent is free.
    assert awaiting.live_lease is not None and not rules.occupies(awaiting, "a")
    assert approved.live_lease is not None and not rules.occupies(approved, "a")
    assert rules.held([working, awaiting, approved, requested()], "a") == 1


def test_an_ended_lease_or_a_finished_job_takes_up_no_lease_of_its_agent() -> None:
    job = leased(requested(), "a")
    done = JobCompleted(
        originator_id=job.id, originator_version=NEXT, proposal_id=uuid4(), agent="a", epoch=1
    )
    completed = fold(job, *after(job, done))
    assert not rules.occupies(ended(job, "expired"), "a")
    assert not rules.occupies(completed, "a")
    assert rules.held([ended(job, "released"), completed], "a") == 0


def test_an_agent_whose_only_lease_awaits_its_decision_is_granted_its_next_job() -> None:
    awaiting = proposed(leased(requested(), "a"))
    one = agent(max_concurrent=1)
    assert isinstance(grant([requested()], one, held=rules.held([awaiting], "a")), rules.Granted)
    assert grant([requested()], one, held=rules.held([leased(requested(), "a")], "a")) == NoWork(
        detail="agent a holds 1 of 1 leases (level 0)"
    )


def test_a_job_past_its_deadline_or_no_longer_queued_is_not_granted() -> None:
    assert isinstance(grant([requested(deadline=at(1))], agent(), when=1), NoWork)
    assert isinstance(grant([leased(requested())], agent()), NoWork)


def test_a_retry_goes_to_another_present_agent_rather_than_the_one_that_failed_it() -> None:
    job = ended(leased(requested(), "liar"), "expired")
    assert rules.failed_by(job, "liar") and not rules.failed_by(job, "honest")
    assert isinstance(grant([job], agent("liar"), present=[agent("honest")]), NoWork)
    honest = grant([job], agent("honest"), present=[agent("liar")])
    assert isinstance(honest, rules.Granted) and honest.event.epoch == 2


def test_with_no_one_else_able_to_take_it_the_agent_that_failed_a_job_gets_it_again() -> None:
    job = ended(leased(requested(kind="build", level=1), "liar"), "released")
    liar = agent("liar", level=1)
    unable = [
        agent("junior", level=0),
        agent("tester", level=1, kinds=("test",)),
        agent("suspended", level=1, standing="suspended"),
    ]
    also_failed = agent("second", level=1)
    twice = ended(leased(job, "second"), "expired")
    assert isinstance(grant([job], liar, present=unable), rules.Granted)
    assert isinstance(grant([twice], liar, present=[also_failed]), rules.Granted)
    assert isinstance(grant([job], liar, present=[]), rules.Granted)


def test_an_operator_requeue_forgives_the_agent_its_earlier_failures() -> None:
    job = leased(requested(attempts=1), "liar")
    dead = fold(job, *rules.enforce(job, None, at(TTL + 1)).events)
    assert rules.failed_by(dead, "liar")
    requeue = job_rules.requeue(dead, command(dead), at(20))
    assert isinstance(requeue, rules.Outcome)
    assert not rules.failed_by(fold(dead, *requeue.events), "liar")


def test_a_claim_that_arrives_after_its_wait_is_given_nothing() -> None:
    assert rules.claim_too_late(Claim(sent_at=at(0), wait_s=5), at(6))
    assert not rules.claim_too_late(Claim(sent_at=at(0), wait_s=5), at(4))
    assert not rules.claim_too_late(Claim(), at(1000))


def test_an_unregistered_or_suspended_agent_may_not_claim() -> None:
    missing = rules.claimant_refusal("ghost", None)
    assert missing is not None and "not registered" in missing.reason
    stopped = rules.claimant_refusal("a", agent(standing="suspended"))
    assert stopped is not None and stopped.reason == "agent a is suspended: told to stop"
    assert rules.claimant_refusal("a", agent()) is None


def test_a_lease_handed_back_is_the_same_lease() -> None:
    job = leased(requested())
    lease = job.live_lease
    assert lease is not None
    reply = rules.lease_grant(job, lease, [])
    assert (reply.job_id, reply.epoch, reply.expires_at, reply.heartbeat_interval_s) == (
        job.id,
        1,
        at(TTL),
        TTL / 4,
    )


# --- requests, registrations, operator verbs -----------------------------------------------------


def job_request(key: str = "k", kind: str = "noop") -> JobRequest:
    return JobRequest(idempotency_key=key, kind=kind, contract=contract())


def test_a_new_key_is_a_new_job_at_version_one() -> None:
    admitted = job_rules.admit(job_request(), None, max_level=1, input_seq=3, at=at(0))
    assert isinstance(admitted, rules.Outcome)
    [event] = admitted.events
    assert isinstance(event, JobRequested) and (event.originator_version, event.input_seq) == (1, 3)
    assert admitted.reply == Accepted(job_id=job_id_for("k"))


def test_the_same_key_and_body_again_is_the_same_job_and_records_nothing() -> None:
    first = job_rules.admit(job_request(), None, max_level=1, input_seq=3, at=at(0))
    assert isinstance(first, rules.Outcome)
    existing = fold(None, *first.events)
    again = job_rules.admit(job_request(), existing, max_level=1, input_seq=4, at=at(1))
    assert again == rules.Outcome(events=[], reply=Accepted(job_id=existing.id, duplicate=True))


def test_the_same_key_with_another_body_is_refused_naming_the_job_it_names() -> None:
    first = job_rules.admit(job_request(), None, max_level=1, input_seq=3, at=at(0))
    assert isinstance(first, rules.Outcome)
    existing = fold(None, *first.events)
    refused = job_rules.admit(job_request(kind="other"), existing, max_level=1, input_seq=4, at=at(1))
    assert isinstance(refused, Refusal) and refused.job_id == existing.id
    assert refused.errors[0].path == "$.idempotency_key"


def test_a_contract_that_cannot_be_enforced_is_refused_before_any_key_is_bound() -> None:
    request = JobRequest(idempotency_key="k", kind="noop", contract=contract(level=2))
    refused = job_rules.admit(request, None, max_level=1, input_seq=3, at=at(0))
    assert isinstance(refused, Refusal) and refused.errors[0].path == "$.contract.required_level"
    past = JobRequest(idempotency_key="k", kind="noop", contract=contract(deadline=at(0)))
    assert isinstance(job_rules.admit(past, None, max_level=1, input_seq=3, at=at(1)), Refusal)


def test_a_re_registration_updates_the_limits_and_keeps_the_level() -> None:
    [new] = job_rules.register(None, "a", Register(max_concurrent=2), at(0)).events
    assert isinstance(new, AgentRegistered) and (new.originator_version, new.level) == (1, 0)
    [again] = job_rules.register(agent(level=1), "a", Register(max_concurrent=4, kinds=["x"]), at(1)).events
    assert isinstance(again, AgentRegistered)
    assert (again.originator_version, again.level, again.max_concurrent) == (2, 1, 4)


def command(job: Job | None = None) -> OperatorCommand:
    return OperatorCommand(operator="op", reason="because", job_id=job.id if job else None)


def test_only_a_dead_job_is_requeued_and_only_a_live_one_cancelled() -> None:
    live = leased(requested())
    refused = job_rules.operate("requeue", live, command(live), at(1))
    assert isinstance(refused, Refusal) and refused.reason == "job is leased; only a dead job is requeued"
    cancelled = job_rules.operate("cancel", live, command(live), at(1))
    assert isinstance(cancelled, rules.Outcome)
    [event] = cancelled.events
    assert isinstance(event, JobCancelled) and event.originator_version == live.version + 1
    dead = fold(live, *cancelled.events)
    assert job_rules.operate("cancel", dead, command(dead), at(2)) == Refusal.of(
        "$.job_id", "job is already cancelled"
    )
    requeued = job_rules.operate("requeue", dead, command(dead), at(2))
    assert isinstance(requeued, rules.Outcome)
    assert requeued.reply == Accepted(job_id=dead.id, detail="requeue recorded")


def test_an_operator_verb_without_a_known_job_or_of_another_service_is_refused() -> None:
    assert job_rules.operate("cancel", None, command(), at(1)) == Refusal.of(
        "$.job_id", "cancel needs a job_id"
    )
    job = requested()
    nothing = job_rules.operate("cancel", None, command(job), at(1))
    assert isinstance(nothing, Refusal) and nothing.errors[0].message.startswith(f"no job {job.id}")
    other = job_rules.operate("promote", job, command(job), at(1))
    assert isinstance(other, Refusal)
