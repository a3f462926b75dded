"""A proposal's rules, given a job and what was measured, with no server: admit (every fence),
check and decide (accept, reject, wait for approval), approve and deny, record the effect
(a receipt found is never a second effect), roll back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from msgspec.structs import replace

from shared.aggregates import Agent, Job, ProposalState, evolve_job, project_job
from shared.contract import Contract, Stopping
from shared.decide import Refusal
from shared.decide import proposals as decide
from shared.events import (
    EffectApplied,
    EffectFailed,
    EffectRolledBack,
    Event,
    InvariantChecked,
    JobCancelled,
    JobCompleted,
    JobRequested,
    JobRequeued,
    JobTombstoned,
    LeaseGranted,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    RollbackRequested,
    agent_id_for,
)
from shared.policy import Level, Policy

AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SEQ = 70
POLICY = Policy(
    levels=[
        Level(level=0, name="sandbox", effects=["none", "git.patch"]),
        Level(level=1, name="trusted", effects=["none", "git.patch", "file.write"], branches="target"),
    ]
)


# --- given -----------------------------------------------------------------------------------


def requested(**contract: Any) -> Job:
    job_id = uuid4()
    first = JobRequested(
        originator_id=job_id,
        originator_version=1,
        timestamp=AT,
        idempotency_key=str(job_id),
        kind="noop",
        contract=Contract(stopping=Stopping(lease_ttl_s=60, max_attempts=2), **contract),
    )
    job = project_job(None, [first])
    assert job is not None
    return job


def then(job: Job, *drafts: Event) -> Job:
    """The job after `drafts`, each numbered as the next version (as a save would)."""
    for draft in drafts:
        next_job = evolve_job(job, _numbered(job, draft))
        assert next_job is not None
        job = next_job
    return job


def _numbered(job: Job, draft: Event) -> Event:
    return replace(draft, originator_version=job.version + 1)


def granted(job: Job, agent: str = "ann", epoch: int = 1) -> Job:
    return then(
        job,
        LeaseGranted(
            originator_id=job.id,
            originator_version=0,
            timestamp=AT,
            agent=agent,
            epoch=epoch,
            ttl_s=60,
            expires_at=AT + timedelta(seconds=60),
        ),
    )


def submitted(
    job: Job, agent: str = "ann", epoch: int = 1, effect: str = "none"
) -> tuple[Job, ProposalState]:
    pid = uuid4()
    job = then(
        job,
        ProposalSubmitted(
            originator_id=job.id,
            originator_version=0,
            timestamp=AT,
            proposal_id=pid,
            agent=agent,
            epoch=epoch,
            content_hash="h",
            size=1,
            input_seq=SEQ,
            effect=effect,
        ),
    )
    state = job.proposal(pid)
    assert state is not None
    return job, state


def checked(
    job: Job, state: ProposalState, invariant: str, verdict: str = "pass"
) -> tuple[Job, ProposalState]:
    job = then(
        job,
        InvariantChecked(
            originator_id=job.id,
            originator_version=0,
            proposal_id=state.id,
            invariant=invariant,
            version="1",
            verdict=verdict,  # type: ignore[arg-type]
        ),
    )
    now_state = job.proposal(state.id)
    assert now_state is not None
    return job, now_state


def accepted(effect: str = "none", **contract: Any) -> tuple[Job, ProposalState]:
    job, state = submitted(granted(requested(**contract)), effect=effect)
    job = then(job, ProposalAccepted(originator_id=job.id, originator_version=0, proposal_id=state.id))
    now_state = job.proposal(state.id)
    assert now_state is not None
    return job, now_state


def applied_and_rollback_asked(effect: str = "file.write") -> tuple[Job, ProposalState]:
    job, state = accepted(effect)
    job = then(
        job,
        EffectApplied(
            originator_id=job.id, originator_version=0, proposal_id=state.id, kind=effect, receipt={}
        ),
        JobCompleted(
            originator_id=job.id, originator_version=0, proposal_id=state.id, agent=state.agent, epoch=1
        ),
        RollbackRequested(
            originator_id=job.id, originator_version=0, proposal_id=state.id, reason="r", by="op"
        ),
    )
    now_state = job.proposal(state.id)
    assert now_state is not None
    return job, now_state


def agent(name: str = "ann", level: int = 0, standing: str = "active") -> Agent:
    return Agent(
        id=agent_id_for(name),
        version=1,
        created_on=AT,
        modified_on=AT,
        name=name,
        level=level,
        standing=standing,  # type: ignore[arg-type]
        standing_reason="operator said so" if standing != "active" else "",
    )


def passes(*names: str) -> list[decide.Judgement]:
    return [decide.Judgement(invariant=n, verdict="pass") for n in names]


def versions_follow(job: Job, events: list[Event]) -> bool:
    return [e.originator_version for e in events] == list(
        range(job.version + 1, job.version + 1 + len(events))
    )


def fenced(outcome: decide.Fenced | Refusal | None) -> decide.Fenced:
    assert isinstance(outcome, decide.Fenced), outcome
    return outcome


# --- admit: every fence reason ---------------------------------------------------------------


def admit(
    job: Job | None, agent_name: str = "ann", epoch: int = 1, job_id: UUID | None = None
) -> decide.Fenced | Refusal | None:
    return decide.admit(job, job_id or (job.id if job else uuid4()), agent_name, epoch, input_seq=SEQ, at=AT)


def test_the_holder_of_the_live_lease_is_admitted() -> None:
    assert admit(granted(requested())) is None


def test_an_unknown_job_is_refused_as_input_naming_it() -> None:
    job_id = uuid4()
    refusal = admit(None, job_id=job_id)
    assert isinstance(refusal, Refusal)
    assert refusal.errors[0].path == "$.job_id" and str(job_id) in refusal.reason


def test_a_proposal_under_an_earlier_epoch_is_fenced_and_recorded_naming_the_current_one() -> None:
    job = granted(requested(), epoch=2)
    out = fenced(admit(job, epoch=1))
    [rejected] = out.events
    assert isinstance(rejected, MessageRejected)
    assert rejected.verb == "propose" and rejected.current_epoch == 2 and rejected.input_seq == SEQ
    assert "stale lease" in rejected.reason and out.refusal.errors[0].path == "$.epoch"
    assert out.why == "lease" and versions_follow(job, out.events) and rejected.timestamp == AT


def test_a_proposal_for_a_lease_that_does_not_exist_yet_is_fenced() -> None:
    out = fenced(admit(granted(requested()), epoch=9))
    assert "stale lease: ann sent epoch 9; current epoch 1 held by ann" in out.refusal.reason


def test_a_proposal_on_a_job_never_leased_is_fenced_as_stale() -> None:
    out = fenced(admit(requested()))
    assert "no lease" in out.refusal.reason
    assert isinstance(out.events[0], MessageRejected) and out.events[0].current_epoch == 0


def test_another_agent_proposing_under_the_holders_epoch_is_fenced() -> None:
    out = fenced(admit(granted(requested(), agent="ann"), agent_name="mallory"))
    assert "mallory sent epoch 1; current epoch 1 held by ann" in out.refusal.reason


def test_a_proposal_under_a_revoked_lease_is_fenced_naming_the_revocation() -> None:
    job = granted(requested())
    job = then(
        job,
        LeaseRevoked(
            originator_id=job.id, originator_version=0, agent="ann", epoch=1, reason="r", signal="operator"
        ),
    )
    out = fenced(admit(job))
    assert out.refusal.reason == "lease 1 already revoked"


def test_a_proposal_on_a_cancelled_job_is_fenced() -> None:
    job = granted(requested())
    job = then(job, JobCancelled(originator_id=job.id, originator_version=0, reason="r", by="op"))
    assert "already revoked" in fenced(admit(job)).refusal.reason


def test_a_second_proposal_under_one_lease_is_refused_and_recorded_naming_the_first() -> None:
    job, first = submitted(granted(requested()))
    out = fenced(admit(job))
    assert out.why == "pending" and out.refusal.errors[0].path == "$"
    assert f"proposal {first.id} is already pending under lease 1" == out.refusal.reason
    assert isinstance(out.events[0], MessageRejected) and out.events[0].current_epoch == 1


def test_an_admitted_proposal_is_stored_as_received_at_the_next_version() -> None:
    job = granted(requested())
    pid = uuid4()
    received = decide.Received(
        proposal_id=pid, agent="ann", epoch=1, input_seq=SEQ, content_hash="c", size=10, effect="git.patch"
    )
    [event] = decide.submit(job, received, AT)
    assert isinstance(event, ProposalSubmitted)
    assert (event.proposal_id, event.effect, event.size, event.timestamp) == (pid, "git.patch", 10, AT)
    assert versions_follow(job, [event])


# --- check and decide ---------------------------------------------------------------------------


def test_a_proposal_whose_checks_all_pass_is_accepted_with_the_unsaved_verdicts_in_one_write() -> None:
    job, state = submitted(granted(requested()))
    verdict = decide.verdict(job, state.id, "scope", "1", "pass", {}, trace="", at=AT)
    out = decide.check_and_decide(
        job, state, passes("scope"), agent=agent(), policy=POLICY, at=AT, unsaved=[verdict]
    )
    assert out.outcome == "accepted"
    check, acceptance = out.events
    assert isinstance(check, InvariantChecked) and isinstance(acceptance, ProposalAccepted)
    assert acceptance.checks == ["scope"] and acceptance.by == "checker"
    assert versions_follow(job, out.events)


def test_accepted_git_change_of_a_low_level_agent_lands_on_its_sandbox_branch() -> None:
    job, state = submitted(granted(requested()), effect="git.patch")
    out = decide.check_and_decide(job, state, [], agent=agent(level=0), policy=POLICY, at=AT)
    acceptance = out.events[0]
    assert isinstance(acceptance, ProposalAccepted)
    assert acceptance.branch == f"warden/ann/{job.id}"


def test_accepted_git_change_of_a_trusted_agent_lands_on_the_target_branch() -> None:
    job, state = submitted(granted(requested()), effect="git.patch")
    out = decide.check_and_decide(job, state, [], agent=agent(level=1), policy=POLICY, at=AT)
    assert isinstance(out.events[0], ProposalAccepted) and out.events[0].branch == "main"


def test_a_failed_check_rejects_naming_every_violation_and_requeues_the_job() -> None:
    job, state = submitted(granted(requested()))
    judged = [
        decide.Judgement(invariant="scope", verdict="fail", reason="src/x.py is out of scope"),
        decide.Judgement(invariant="schema", verdict="error", recorded=True),
        decide.Judgement(invariant="ci_gate", verdict="not run"),
    ]
    out = decide.check_and_decide(job, state, judged, agent=agent(), policy=POLICY, at=AT)
    assert out.outcome == "rejected"
    rejection, requeue = out.events
    assert isinstance(rejection, ProposalRejected) and isinstance(requeue, JobRequeued)
    assert rejection.violations == [
        "scope: src/x.py is out of scope",
        "schema: error (recorded)",
        "ci_gate: not run, an earlier invariant already failed",
    ]
    assert versions_follow(job, out.events) and requeue.by == "checker"


def test_a_rejection_on_the_last_attempt_tombstones_the_job() -> None:
    job = granted(requested(), epoch=2)  # max_attempts is 2
    job, state = submitted(job, epoch=2)
    judged = [decide.Judgement(invariant="scope", verdict="fail")]
    out = decide.check_and_decide(job, state, judged, agent=agent(), policy=POLICY, at=AT)
    assert isinstance(out.events[-1], JobTombstoned)


def test_an_expensive_check_is_not_run_after_a_cheap_one_failed_but_runs_otherwise() -> None:
    failed = [decide.Judgement(invariant="scope", verdict="fail")]
    assert decide.not_run("ci_gate", True, failed) == decide.Judgement(invariant="ci_gate", verdict="not run")
    assert decide.not_run("ci_gate", True, passes("scope")) is None
    assert decide.not_run("schema", False, failed) is None


def test_a_contract_wanting_approval_waits_after_its_checks_passed_recording_only_the_verdicts() -> None:
    job, state = submitted(granted(requested(approval_required=True)))
    verdict = decide.verdict(job, state.id, "scope", "1", "pass", {}, trace="", at=AT)
    out = decide.check_and_decide(
        job, state, passes("scope"), agent=agent(), policy=POLICY, at=AT, unsaved=[verdict]
    )
    assert out.outcome == "awaiting approval"
    assert [type(e) for e in out.events] == [InvariantChecked] and versions_follow(job, out.events)


def test_a_contract_wanting_approval_is_still_rejected_by_a_failed_check() -> None:
    job, state = submitted(granted(requested(approval_required=True)))
    judged = [decide.Judgement(invariant="scope", verdict="fail")]
    assert (
        decide.check_and_decide(job, state, judged, agent=agent(), policy=POLICY, at=AT).outcome == "rejected"
    )


def test_an_effect_above_the_agents_level_is_rejected_by_authority() -> None:
    job, state = submitted(granted(requested()), effect="file.write")
    out = decide.check_and_decide(job, state, [], agent=agent(level=0), policy=POLICY, at=AT)
    assert out.outcome == "rejected"
    assert isinstance(out.events[0], ProposalRejected)
    assert out.events[0].violations == [
        "authority: level 0 (sandbox) may not perform file.write; allowed: none, git.patch"
    ]


def test_a_suspended_an_unregistered_or_an_underlevel_agent_is_refused_authority() -> None:
    job, state = submitted(granted(requested(required_level=1)))
    assert decide.authority_refusals(job, state, POLICY, None) == [
        "authority: agent ann is not registered (the store has no such agent)"
    ]
    suspended = decide.authority_refusals(job, state, POLICY, agent(level=1, standing="suspended"))
    assert suspended == ["authority: agent ann is suspended: operator said so"]
    assert decide.authority_refusals(job, state, POLICY, agent(level=0)) == [
        "authority: the job needs level 1, ann is at 0"
    ]
    assert decide.authority_refusals(job, state, POLICY, agent(level=1)) == []


def test_a_proposal_on_an_ended_job_or_with_an_unusable_payload_is_rejected_before_any_check() -> None:
    job, state = submitted(granted(requested()))
    payload = decide.before_checks(job, state, "payload is 9 bytes; the limit is 1", AT)
    assert payload is not None and payload.detail == "payload: payload is 9 bytes; the limit is 1"
    ended = then(job, JobCancelled(originator_id=job.id, originator_version=0, reason="stop", by="op"))
    decided = decide.before_checks(ended, state, None, AT)
    assert decided is not None and decided.detail == "job is cancelled: stop"
    assert [type(e) for e in decided.events] == [ProposalRejected]  # no requeue of an ended job
    assert decide.before_checks(job, state, None, AT) is None


# --- approve and deny ---------------------------------------------------------------------------


def approve(
    job: Job, state: ProposalState, required: list[str], who: Agent | None = None
) -> decide.Decision | Refusal:
    return decide.approve(
        job,
        state,
        operator="alice",
        reason="reviewed",
        required=required,
        agent=who or agent(),
        policy=POLICY,
        at=AT,
    )


def refused(outcome: decide.Decision | list[Event] | decide.Perform | Refusal) -> str:
    assert isinstance(outcome, Refusal), outcome
    assert outcome.errors[0].path == "$.proposal_id"
    return outcome.reason


def test_an_approval_after_the_checks_passed_accepts_naming_the_operator() -> None:
    job, state = checked(*submitted(granted(requested(approval_required=True))), "scope")
    out = approve(job, state, ["scope"])
    assert isinstance(out, decide.Decision) and out.outcome == "accepted"
    assert out.detail == f"proposal {state.id} approved by alice"
    [acceptance] = out.events
    assert isinstance(acceptance, ProposalAccepted)
    assert (acceptance.by, acceptance.reason, acceptance.checks) == ("alice", "reviewed", ["scope"])


def test_an_approval_while_checks_still_run_is_refused_naming_them() -> None:
    job, state = checked(*submitted(granted(requested(approval_required=True))), "scope")
    assert "checks still running (ci_gate)" in refused(approve(job, state, ["scope", "ci_gate"]))


def test_an_approval_of_a_job_that_does_not_wait_for_one_is_refused() -> None:
    job, state = submitted(granted(requested()))
    assert "does not wait for approval" in refused(approve(job, state, []))


def test_an_approval_of_a_decided_proposal_is_refused() -> None:
    job, state = accepted(approval_required=True)
    assert refused(approve(job, state, [])) == f"proposal {state.id} is already accepted"


def test_an_approval_on_an_ended_job_is_refused() -> None:
    job, state = submitted(granted(requested(approval_required=True)))
    job = then(job, JobCancelled(originator_id=job.id, originator_version=0, reason="r", by="op"))
    assert refused(approve(job, state, [])) == f"job {job.id} is cancelled"


def test_an_approval_the_agents_authority_no_longer_allows_rejects_instead() -> None:
    job, state = submitted(granted(requested(approval_required=True)))
    out = approve(job, state, [], who=agent(standing="revoked"))
    assert isinstance(out, decide.Decision) and out.outcome == "rejected"
    assert out.detail == f"proposal {state.id} rejected: the agent's authority no longer allows it"


def test_a_denial_rejects_naming_who_and_why_and_spends_the_attempt() -> None:
    job, state = submitted(granted(requested(approval_required=True)))
    out = decide.deny(job, state, operator="bob", reason="too risky", at=AT)
    assert isinstance(out, decide.Decision) and out.detail == f"proposal {state.id} denied"
    rejection, requeue = out.events
    assert isinstance(rejection, ProposalRejected) and isinstance(requeue, JobRequeued)
    assert rejection.violations == ["denied by bob: too risky"] and rejection.by == "bob"


def test_a_denial_of_a_decided_proposal_is_refused() -> None:
    job, state = accepted()
    assert refused(decide.deny(job, state, operator="bob", reason="r", at=AT)) == (
        f"proposal {state.id} is already accepted"
    )


# --- apply and record ----------------------------------------------------------------------------

RECEIPT: dict[str, Any] = {"repo": "/r", "branch": "main", "commit": "c0ffee"}


def test_an_accepted_proposal_with_no_receipt_is_performed() -> None:
    job, state = accepted()
    assert decide.apply(job, state, None, AT) is decide.PERFORM


def test_a_receipt_found_is_recorded_as_reused_and_completes_the_job_with_no_second_effect() -> None:
    job, state = accepted("git.patch")
    out = decide.apply(job, state, RECEIPT, AT)
    assert isinstance(out, list)
    effect, completion = out
    assert isinstance(effect, EffectApplied) and isinstance(completion, JobCompleted)
    assert effect.reused_receipt and effect.receipt == RECEIPT and versions_follow(job, out)


def test_an_effect_performed_is_recorded_with_its_receipt_and_the_job_completes() -> None:
    job, state = accepted("git.patch")
    out = decide.applied(job, state, RECEIPT, reused=False, at=AT)
    assert isinstance(out, list) and [type(e) for e in out] == [EffectApplied, JobCompleted]
    assert isinstance(out[0], EffectApplied) and not out[0].reused_receipt
    assert isinstance(out[1], JobCompleted) and (out[1].agent, out[1].epoch) == ("ann", 1)


def test_a_job_ended_after_the_decision_gets_no_effect_but_a_failure_and_no_requeue() -> None:
    job, state = accepted()
    job = then(job, JobCancelled(originator_id=job.id, originator_version=0, reason="stop", by="op"))
    out = decide.apply(job, state, None, AT)
    assert isinstance(out, list) and [type(e) for e in out] == [EffectFailed]
    assert (
        isinstance(out[0], EffectFailed) and out[0].reason == "job became cancelled before the effect: stop"
    )


def test_a_receipt_found_on_an_ended_job_is_still_recorded_but_completes_nothing() -> None:
    job, state = accepted()
    job = then(job, JobCancelled(originator_id=job.id, originator_version=0, reason="stop", by="op"))
    out = decide.apply(job, state, RECEIPT, AT)
    assert isinstance(out, list) and [type(e) for e in out] == [EffectApplied]


def test_a_failed_effect_spends_the_attempt() -> None:
    job, state = accepted("webhook")
    out = decide.failed(job, state, "apply", "HTTP 422", {"status": 422}, at=AT)
    assert isinstance(out, list) and [type(e) for e in out] == [EffectFailed, JobRequeued]
    assert isinstance(out[0], EffectFailed) and out[0].evidence == {"status": 422}
    assert isinstance(out[1], JobRequeued) and out[1].by == "applier" and versions_follow(job, out)


def test_an_effect_already_recorded_is_not_recorded_again() -> None:
    job, state = applied_and_rollback_asked()
    assert "not accepted" in refused(decide.apply(job, state, RECEIPT, AT))
    assert "not accepted" in refused(decide.applied(job, state, RECEIPT, reused=True, at=AT))


def test_the_applier_owes_an_accepted_proposal_its_effect_and_an_asked_rollback_its_undoing() -> None:
    job, state = accepted()
    assert decide.owed(job) == ("apply", state)
    rolled, asked = applied_and_rollback_asked()
    assert decide.owed(rolled) == ("rollback", asked)
    assert decide.owed(granted(requested())) is None


# --- roll back -----------------------------------------------------------------------------------


def test_a_rollback_asked_of_an_applied_effect_is_recorded_with_its_receipt_and_reason() -> None:
    job, state = applied_and_rollback_asked()
    out = decide.rolled_back(job, state, {"restored": {}}, reused=False, at=AT)
    assert isinstance(out, list)
    [undone] = out
    assert isinstance(undone, EffectRolledBack) and undone.reason == "r" and versions_follow(job, out)


def test_a_rollback_that_cannot_be_made_is_a_failure_that_leaves_the_job_be() -> None:
    job, state = applied_and_rollback_asked("webhook")
    out = decide.failed(job, state, "rollback", "a webhook cannot be compensated", {}, at=AT)
    assert isinstance(out, list) and [type(e) for e in out] == [EffectFailed]
    assert isinstance(out[0], EffectFailed) and out[0].phase == "rollback"


def test_a_rollback_of_an_effect_never_applied_is_refused() -> None:
    job, state = accepted()
    assert "was never applied" in refused(decide.rolled_back(job, state, {}, reused=False, at=AT))
    assert "was never applied" in refused(decide.failed(job, state, "rollback", "x", {}, at=AT))


def test_a_rollback_nobody_asked_for_or_already_done_is_refused() -> None:
    job, state = applied_and_rollback_asked()
    done = decide.rolled_back(job, state, {}, reused=False, at=AT)
    assert isinstance(done, list)
    job = then(job, *done)
    state_done = job.proposal(state.id)
    assert state_done is not None
    assert "already rolled back" in refused(decide.rolled_back(job, state_done, {}, reused=False, at=AT))
    unasked, _ = accepted()
    job2 = then(
        unasked,
        EffectApplied(
            originator_id=unasked.id,
            originator_version=0,
            proposal_id=unasked.proposal_log[0].id,
            kind="none",
            receipt={},
        ),
    )
    assert "no rollback" in refused(decide.rolled_back(job2, job2.proposal_log[0], {}, reused=False, at=AT))
