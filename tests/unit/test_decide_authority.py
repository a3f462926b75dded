"""The revoker's decisions with no server: each operator verb's rule, the policy's automatic
triggers over an agent's authority record, and the bounds of that record."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID, uuid4

import msgspec
import pytest

from shared import topology
from shared.aggregates import Agent, Job, project_job
from shared.contract import Contract, Stopping
from shared.decide import Refusal, agents
from shared.decide.agents import Authority, behind, due, fold
from shared.decide.operators import VERBS, Given
from shared.events import (
    AgentLevelChanged,
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    EffectApplied,
    Event,
    InvariantChecked,
    JobCompleted,
    JobRequested,
    JobRequeued,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseRevoked,
    ProposalSubmitted,
    RollbackRequested,
    agent_id_for,
    ref,
)
from shared.messages import OperatorCommand
from shared.policy import Demotion, Level, Policy, Promotion, Revocation, Rollback
from shared.validation import names_missing

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RollbackMode = Literal["none", "offending", "since_level_change"]


def policy(rollback: RollbackMode = "since_level_change") -> Policy:
    return Policy(
        levels=[Level(level=n, name=f"l{n}", effects=["none"]) for n in (0, 1, 2)],
        promotion=Promotion(clean_completions=3, max_level=2),
        demotion=Demotion(on_failed_invariants=["ci_gate"]),
        revocation=Revocation(on_failed_invariants=["scope"], repeated_lease_expiries=3, budget_breaches=2),
        rollback=Rollback(on_revoke=rollback),
    )


def agent(
    name: str = "ada",
    *,
    level: int = 0,
    standing: Literal["active", "suspended", "revoked"] = "active",
    version: int = 4,
) -> Agent:
    return Agent(
        id=agent_id_for(name),
        version=version,
        created_on=AT,
        modified_on=AT,
        name=name,
        level=level,
        standing=standing,
    )


def leased_job(holder: str = "ada", *, max_attempts: int = 3) -> Job:
    job_id = uuid4()
    job = project_job(
        None,
        [
            JobRequested(
                originator_id=job_id,
                originator_version=1,
                idempotency_key=str(job_id),
                kind="noop",
                contract=Contract(stopping=Stopping(lease_ttl_s=60, max_attempts=max_attempts)),
            ),
            LeaseGranted(
                originator_id=job_id,
                originator_version=2,
                agent=holder,
                epoch=1,
                ttl_s=60,
                expires_at=AT + timedelta(seconds=60),
            ),
        ],
    )
    assert job is not None
    return job


def with_proposal(job: Job, agent: str = "ada") -> tuple[Job, UUID]:
    proposal_id = uuid4()
    proposed = project_job(job, [submitted(job.id, proposal_id, agent, version=job.version + 1)])
    assert proposed is not None
    return proposed, proposal_id


def command(**fields: object) -> OperatorCommand:
    return OperatorCommand(operator="alice", reason="paging", **fields)  # type: ignore[arg-type]


def operate(
    verb: str, cmd: OperatorCommand, given: Given, rules: Policy | None = None
) -> list[Event] | Refusal:
    return VERBS[verb].rule(cmd, given, rules or policy(), AT)


def events_of(decided: list[Event] | Refusal) -> list[Event]:
    assert isinstance(decided, list), decided
    return decided


def refusal_of(decided: list[Event] | Refusal) -> Refusal:
    assert isinstance(decided, Refusal), decided
    return decided


# --- the routing table --------------------------------------------------------------------


def test_the_table_routes_exactly_the_verbs_the_revokers_consumer_receives() -> None:
    received = {s.rsplit(".", 1)[-1] for s in topology.REVOKER_CONSUMER.filter_subjects}
    assert set(VERBS) == received


# --- suspend and reinstate ----------------------------------------------------------------


def test_suspending_an_active_agent_records_who_and_why_as_its_next_version() -> None:
    [event] = events_of(operate("suspend", command(agent="ada"), Given(agent=agent(version=4))))
    assert isinstance(event, AgentSuspended)
    assert (event.originator_id, event.originator_version) == (agent_id_for("ada"), 5)
    assert (event.by, event.reason, event.timestamp) == ("alice", "paging", AT)


def test_suspending_an_agent_that_is_not_active_is_refused_with_its_standing() -> None:
    refusal = refusal_of(operate("suspend", command(agent="ada"), Given(agent=agent(standing="suspended"))))
    assert refusal.reason == "agent ada is suspended"


def test_a_verb_naming_an_agent_warden_has_no_record_of_is_refused_as_missing() -> None:
    for verb in ("suspend", "reinstate", "revoke", "promote", "demote"):
        refusal = refusal_of(operate(verb, command(agent="nobody"), Given()))
        assert names_missing(refusal.errors), verb
        assert refusal.reason == "no agent nobody in the record"


def test_an_agent_verb_naming_no_agent_is_refused_on_that_field() -> None:
    refusal = refusal_of(operate("revoke", command(), Given()))
    assert (refusal.errors[0].path, refusal.reason) == ("$.agent", "revoke needs an agent")


def test_reinstating_a_suspended_agent_makes_it_active_again() -> None:
    [event] = events_of(operate("reinstate", command(agent="ada"), Given(agent=agent(standing="suspended"))))
    assert isinstance(event, AgentReinstated) and event.originator_version == 5 and event.by == "alice"


def test_reinstating_an_active_agent_is_refused() -> None:
    refusal = refusal_of(operate("reinstate", command(agent="ada"), Given(agent=agent())))
    assert refusal.reason == "agent ada is already active"


# --- revoke -------------------------------------------------------------------------------


def test_revoking_an_agent_ends_each_of_its_live_leases_in_the_same_save() -> None:
    first, second = leased_job(), leased_job()
    decided = events_of(operate("revoke", command(agent="ada"), Given(agent=agent(), leases=[first, second])))
    assert [(type(e), e.originator_id, e.originator_version) for e in decided] == [
        (AgentRevoked, agent_id_for("ada"), 5),
        (LeaseRevoked, first.id, 3),
        (JobRequeued, first.id, 4),
        (LeaseRevoked, second.id, 3),
        (JobRequeued, second.id, 4),
    ]
    revoked, lease_end = decided[0], decided[1]
    assert isinstance(revoked, AgentRevoked) and revoked.by == "alice" and revoked.signal_at == AT
    assert isinstance(lease_end, LeaseRevoked)
    assert (lease_end.agent, lease_end.epoch, lease_end.signal) == ("ada", 1, "agent-revoked")
    assert (lease_end.by, lease_end.reason) == ("revoker", "agent ada revoked")


def test_revoking_an_agent_on_its_last_attempt_tombstones_the_job() -> None:
    last = leased_job(max_attempts=1)
    decided = events_of(operate("revoke", command(agent="ada"), Given(agent=agent(), leases=[last])))
    assert isinstance(decided[-1], JobTombstoned) and decided[-1].originator_version == 4


def test_revoking_an_agent_leaves_a_lease_held_by_another_agent_alone() -> None:
    theirs = leased_job(holder="bo")
    decided = events_of(operate("revoke", command(agent="ada"), Given(agent=agent(), leases=[theirs])))
    assert [type(e) for e in decided] == [AgentRevoked]


def test_revoking_an_agent_already_revoked_is_refused() -> None:
    refusal = refusal_of(operate("revoke", command(agent="ada"), Given(agent=agent(standing="revoked"))))
    assert refusal.reason == "agent ada is already revoked"


# --- promote and demote -------------------------------------------------------------------


def test_promoting_with_no_level_named_moves_the_agent_one_level_up() -> None:
    [event] = events_of(operate("promote", command(agent="ada"), Given(agent=agent(level=0))))
    assert isinstance(event, AgentLevelChanged)
    assert (event.level, event.previous, event.by, event.originator_version) == (1, 0, "alice", 5)


def test_promoting_to_a_named_level_of_the_policy_moves_the_agent_there() -> None:
    [event] = events_of(operate("promote", command(agent="ada", level=2), Given(agent=agent(level=0))))
    assert isinstance(event, AgentLevelChanged) and event.level == 2


def test_promoting_beyond_the_policys_highest_level_is_refused_naming_its_levels() -> None:
    refusal = refusal_of(operate("promote", command(agent="ada"), Given(agent=agent(level=2))))
    assert refusal.errors[0].path == "$.level"
    assert "above the policy's highest level 2 (levels 0, 1, 2)" in refusal.reason


def test_demoting_below_the_policys_lowest_level_is_refused() -> None:
    refusal = refusal_of(operate("demote", command(agent="ada"), Given(agent=agent(level=0))))
    assert "below the policy's lowest level 0" in refusal.reason


def test_a_promotion_that_does_not_go_up_is_refused() -> None:
    refusal = refusal_of(operate("promote", command(agent="ada", level=1), Given(agent=agent(level=1))))
    assert refusal.reason.endswith("a promote must go up")


def test_a_demotion_that_does_not_go_down_is_refused() -> None:
    refusal = refusal_of(operate("demote", command(agent="ada", level=2), Given(agent=agent(level=1))))
    assert refusal.reason.endswith("a demote must go down")


def test_demoting_with_no_level_named_moves_the_agent_one_level_down() -> None:
    [event] = events_of(operate("demote", command(agent="ada"), Given(agent=agent(level=2))))
    assert isinstance(event, AgentLevelChanged) and (event.level, event.previous) == (1, 2)


# --- rollback -----------------------------------------------------------------------------


def test_a_rollback_of_a_proposal_asks_for_it_in_the_proposals_job() -> None:
    job, proposal_id = with_proposal(leased_job())
    [event] = events_of(operate("rollback", command(proposal_id=proposal_id), Given(job=job)))
    assert isinstance(event, RollbackRequested)
    assert (event.originator_id, event.originator_version) == (job.id, job.version + 1)
    assert (event.proposal_id, event.by, event.signal_at) == (proposal_id, "alice", AT)


def test_the_policys_own_rollback_is_not_asked_twice_but_an_operator_may_ask_again() -> None:
    job, proposal_id = with_proposal(leased_job())
    asked = project_job(job, events_of(operate("rollback", command(proposal_id=proposal_id), Given(job=job))))
    assert asked is not None
    again = agents.rollback(asked, proposal_id, reason="policy", by="revoker", at=AT, once=True)
    assert refusal_of(again).reason == f"the rollback of proposal {proposal_id} is requested"
    assert events_of(operate("rollback", command(proposal_id=proposal_id), Given(job=asked)))


def test_a_rollback_naming_no_proposal_is_refused_on_that_field() -> None:
    refusal = refusal_of(operate("rollback", command(), Given()))
    assert (refusal.errors[0].path, refusal.reason) == ("$.proposal_id", "rollback needs a proposal_id")


def test_a_rollback_of_a_proposal_warden_has_no_record_of_is_refused_as_missing() -> None:
    assert names_missing(refusal_of(operate("rollback", command(proposal_id=uuid4()), Given())).errors)
    # A job was found (named by the command) but the proposal is not one of its.
    refusal = refusal_of(operate("rollback", command(proposal_id=uuid4()), Given(job=leased_job())))
    assert names_missing(refusal.errors)


# --- the record and the policy's automatic triggers -----------------------------------------


class Log:
    """Events for one agent, folded into one record as they are written."""

    def __init__(self, rules: Policy | None = None, name: str = "ada") -> None:
        self.policy = rules or policy()
        self.state = Authority()
        self.name = name
        self.agent_version = 0
        self.versions: dict[UUID, int] = {}

    def add(self, event: Event) -> Event:
        fold(self.state, event, self.policy)
        return event

    def next_version(self, aggregate: UUID) -> int:
        self.versions[aggregate] = self.versions.get(aggregate, 0) + 1
        return self.versions[aggregate]

    def job(self) -> UUID:
        job_id = uuid4()
        self.add(
            JobRequested(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                idempotency_key=str(job_id),
                kind="noop",
                contract=Contract(),
            )
        )
        return job_id

    def granted(self, job_id: UUID, epoch: int = 1) -> Event:
        return self.add(
            LeaseGranted(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                agent=self.name,
                epoch=epoch,
                ttl_s=60,
                expires_at=AT,
            )
        )

    def completed(self) -> Event:
        job_id = self.job()
        self.granted(job_id)
        return self.add(
            JobCompleted(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                proposal_id=uuid4(),
                agent=self.name,
                epoch=1,
                timestamp=AT,
            )
        )

    def expired(self) -> Event:
        job_id = self.job()
        self.granted(job_id)
        return self.add(
            LeaseExpired(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                agent=self.name,
                epoch=1,
                deadline=AT,
                detected_at=AT,
                detection_latency_ms=1.0,
                timestamp=AT,
            )
        )

    def over_budget(self) -> Event:
        job_id = self.job()
        self.granted(job_id)
        return self.add(
            LeaseRevoked(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                agent=self.name,
                epoch=1,
                reason="tokens over budget",
                signal="budget",
            )
        )

    def proposed(self, job_id: UUID | None = None) -> tuple[UUID, UUID]:
        job_id = job_id or self.job()
        proposal_id = uuid4()
        self.add(submitted(job_id, proposal_id, self.name, version=self.next_version(job_id)))
        return job_id, proposal_id

    def checked(self, job_id: UUID, proposal_id: UUID, invariant: str, verdict: str = "fail") -> Event:
        return self.add(
            InvariantChecked(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                proposal_id=proposal_id,
                invariant=invariant,
                version="1",
                verdict=verdict,  # type: ignore[arg-type]
                timestamp=AT + timedelta(seconds=1),
            )
        )

    def applied(self, job_id: UUID, proposal_id: UUID) -> None:
        self.add(
            EffectApplied(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                proposal_id=proposal_id,
                kind="file.write",
                receipt={},
            )
        )

    def ended(self, job_id: UUID, proposal_id: UUID) -> None:
        self.add(
            JobCompleted(
                originator_id=job_id,
                originator_version=self.next_version(job_id),
                proposal_id=proposal_id,
                agent=self.name,
                epoch=1,
            )
        )

    def agent_event(self, event_type: Callable[..., Event], **fields: object) -> None:
        self.agent_version += 1
        self.add(
            event_type(
                originator_id=agent_id_for(self.name),
                originator_version=self.agent_version,
                name=self.name,
                **fields,
            )
        )

    def level(self, level: int) -> None:
        self.agent_event(AgentLevelChanged, level=level, previous=0, reason="x")

    def revoked(self) -> None:
        self.agent_event(AgentRevoked, reason="x", by="revoker")

    def rollbacks(self) -> set[UUID]:
        actions = due(self.state.agents.get(self.name), self.policy)
        return {a.proposal_id for a in actions if a.kind == "rollback" and a.proposal_id is not None}

    def due(self) -> list[tuple[str, object]]:
        actions = due(self.state.agents.get(self.name), self.policy)
        return [
            (a.kind, a.level if a.kind in ("promote", "demote") else (a.job_id, a.proposal_id))
            for a in actions
        ]


def submitted(job_id: UUID, proposal_id: UUID, agent: str, *, version: int) -> ProposalSubmitted:
    return ProposalSubmitted(
        originator_id=job_id,
        originator_version=version,
        proposal_id=proposal_id,
        agent=agent,
        epoch=1,
        content_hash="h",
        size=1,
        input_seq=1,
    )


def test_n_clean_completions_promote_one_level_citing_them() -> None:
    log = Log()
    done = [log.completed() for _ in range(2)]
    assert log.due() == []
    done.append(log.completed())
    [action] = due(log.state.agents["ada"], log.policy)
    assert (action.kind, action.level, action.signal_at) == ("promote", 1, AT)
    assert action.evidence == [ref(e) for e in done]


def test_an_agent_at_the_policys_highest_promotion_level_is_not_promoted() -> None:
    log = Log()
    log.level(2)
    for _ in range(3):
        log.completed()
    assert log.due() == []


def test_a_suspended_agent_earns_no_promotion() -> None:
    log = Log()
    log.agent_event(AgentSuspended, reason="x", by="op")
    for _ in range(3):
        log.completed()
    assert log.due() == []


def test_a_violation_since_the_last_change_of_level_blocks_promotion() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    log.checked(job_id, proposal_id, "output_shape")  # a failure the policy neither demotes nor revokes on
    for _ in range(3):
        log.completed()
    assert log.due() == []
    log.level(1)  # a new period of evidence
    for _ in range(3):
        log.completed()
    assert log.due() == [("promote", 2)]


def test_a_failed_check_the_policy_revokes_on_revokes_citing_it() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    check = log.checked(job_id, proposal_id, "scope")
    [action] = due(log.state.agents["ada"], log.policy)
    assert (action.kind, action.evidence) == ("revoke", [ref(check)])
    assert action.signal_at == check.timestamp and action.reason == "scope failed"


def test_repeated_lease_loss_revokes_and_a_completion_between_resets_the_count() -> None:
    log = Log()
    log.expired()
    log.expired()
    log.completed()
    log.expired()
    log.expired()
    assert log.due() == []
    third = log.expired()
    [action] = due(log.state.agents["ada"], log.policy)
    assert action.kind == "revoke" and action.evidence[-1] == ref(third) and len(action.evidence) == 3


def test_repeated_budget_breaches_revoke() -> None:
    log = Log()
    log.over_budget()
    assert log.due() == []
    log.over_budget()
    assert [kind for kind, _ in log.due()] == ["revoke"]


def test_a_failed_check_the_policy_demotes_on_demotes_one_level() -> None:
    log = Log()
    log.level(2)
    job_id, proposal_id = log.proposed()
    log.checked(job_id, proposal_id, "ci_gate")
    assert log.due() == [("demote", 1)]


def test_an_agent_at_the_lowest_level_is_not_demoted_further() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    log.checked(job_id, proposal_id, "ci_gate")
    assert log.due() == []


def test_a_revocation_folded_back_asks_for_no_second_revocation() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    log.checked(job_id, proposal_id, "scope")
    log.revoked()
    assert [kind for kind, _ in log.due()] == []


def test_a_revoked_agent_loses_its_live_leases_and_the_policy_rolls_back_what_it_applied() -> None:
    log = Log()
    earlier, applied = log.proposed()
    log.applied(earlier, applied)
    log.ended(earlier, applied)
    live = log.job()
    log.granted(live)
    bad_job, bad = log.proposed()
    log.checked(bad_job, bad, "scope")
    log.revoked()
    assert set(log.due()) == {("revoke_lease", (live, None)), ("rollback", (earlier, applied))}


@pytest.mark.parametrize(
    ("mode", "rolled_back"),
    [("none", set()), ("offending", {"bad"}), ("since_level_change", {"good", "bad"})],
)
def test_the_policys_rollback_mode_chooses_what_a_revocation_rolls_back(
    mode: RollbackMode, rolled_back: set[str]
) -> None:
    log = Log(policy(rollback=mode))
    good_job, good = log.proposed()
    log.applied(good_job, good)
    bad_job, bad = log.proposed()
    log.checked(bad_job, bad, "scope")
    log.applied(bad_job, bad)
    log.revoked()
    names = {good: "good", bad: "bad"}
    assert {names[p] for p in log.rollbacks()} == rolled_back


def test_a_rollback_already_asked_for_is_not_asked_again() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    log.applied(job_id, proposal_id)
    log.revoked()
    assert log.due() == [("rollback", (job_id, proposal_id))]
    log.add(
        RollbackRequested(
            originator_id=job_id,
            originator_version=log.next_version(job_id),
            proposal_id=proposal_id,
            reason="x",
            by="revoker",
        )
    )
    assert log.due() == []


def test_a_change_of_level_puts_earlier_effects_out_of_a_revocations_reach() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    log.applied(job_id, proposal_id)
    log.ended(job_id, proposal_id)
    log.level(1)
    log.revoked()
    assert log.due() == []
    assert proposal_id not in log.state.proposals


# --- the record's bounds ------------------------------------------------------------------


def test_the_record_keeps_only_as_many_completions_and_expiries_as_the_policy_counts() -> None:
    log = Log()
    log.level(2)  # no promotion resets the count
    for _ in range(10):
        log.completed()
    rec = log.state.agents["ada"]
    assert len(rec.clean) == log.policy.promotion.clean_completions
    log.revoked()  # revoked: expiries keep coming in, and no revocation folds back to reset them
    for _ in range(10):
        log.expired()
    assert len(rec.consecutive_expiries) == log.policy.revocation.repeated_lease_expiries


def test_a_job_leaves_the_record_when_it_ends_and_so_do_its_unapplied_proposals() -> None:
    log = Log(policy(rollback="none"))
    job_id, proposal_id = log.proposed()
    log.granted(job_id)
    assert job_id in log.state.jobs and proposal_id in log.state.proposals
    log.applied(job_id, proposal_id)
    log.ended(job_id, proposal_id)
    assert job_id not in log.state.jobs
    assert proposal_id not in log.state.proposals
    assert log.state.agents["ada"].live_leases == {}


def test_an_applied_proposal_a_rollback_may_reach_outlives_its_job() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    log.applied(job_id, proposal_id)
    log.ended(job_id, proposal_id)
    assert job_id not in log.state.jobs
    assert log.state.proposals[proposal_id].job_id == job_id


def test_the_record_survives_a_snapshot_round_trip() -> None:
    log = Log()
    job_id, proposal_id = log.proposed()
    log.checked(job_id, proposal_id, "scope")
    log.applied(job_id, proposal_id)
    restored = msgspec.json.decode(msgspec.json.encode(log.state), type=Authority)
    assert restored == log.state
    assert due(restored.agents["ada"], log.policy) == due(log.state.agents["ada"], log.policy)


# --- a state reloaded past what the record folded ---------------------------------------------


def test_a_job_reloaded_past_the_versions_the_record_folded_names_the_versions_to_read() -> None:
    log = Log()
    job_id = log.job()
    log.granted(job_id)  # the record has folded versions 1 and 2
    reloaded = leased_job()
    moved = project_job(reloaded, [submitted(reloaded.id, uuid4(), "ada", version=3)])
    assert moved is not None
    moved = msgspec.structs.replace(moved, id=job_id, version=5)
    assert behind(log.state, moved) == (2, 5)
    assert behind(log.state, msgspec.structs.replace(moved, version=2)) is None


def test_a_job_never_seen_reloaded_live_is_read_from_its_start_but_an_ended_one_is_not() -> None:
    log = Log()
    live = leased_job()
    assert behind(log.state, live) == (0, live.version)
    ended = msgspec.structs.replace(live, status="completed")
    assert behind(log.state, ended) is None  # folded to its end and let go, or never ours to count


def test_an_agent_reloaded_past_the_record_names_the_versions_to_read() -> None:
    log = Log()
    log.level(1)  # version 1 folded
    assert behind(log.state, agent(version=3)) == (1, 3)
    assert behind(log.state, agent(version=1)) is None
