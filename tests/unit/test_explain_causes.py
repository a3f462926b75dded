"""The cause rules, as pure functions of typed events: no server, one record per scenario.

Each test says what the log holds (given), explains it (when) and checks the cause class and
the evidence the sentence must name (then). The records are what the services append; the
tests against real servers (tests/test_forensics.py) check that they really do.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID, uuid4

import msgspec

from shared import topology
from shared.contract import Budgets, Contract, Stopping
from shared.events import (
    AgentRegistered,
    AgentRevoked,
    AnyEvent,
    EffectApplied,
    EffectFailed,
    Event,
    HeartbeatSeen,
    InvariantChecked,
    JobCancelled,
    JobCompleted,
    JobRequested,
    JobRequeued,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    Usage,
    agent_id_for,
    encode,
    proposal_id_for,
)
from shared.forensics import causes, explain, log
from shared.forensics.collect import JobLog
from shared.forensics.model import Explanation
from shared.messages import Heartbeat

T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)


class Record:
    """A job's record being written, one typed event at a time, with stream sequences and times."""

    def __init__(self, attempts: int = 1, budgets: Budgets | None = None) -> None:
        self.job_id = uuid4()
        self.seq = 100
        self.at = T0
        self.events: list[log.LoggedEvent] = []
        self.agents: dict[str, list[log.LoggedEvent]] = {}
        self.inputs: list[log.Stored] = []
        stopping = Stopping(
            lease_ttl_s=1.0, heartbeat_interval_s=0.25, max_attempts=attempts, budgets=budgets or Budgets()
        )
        self.add(
            JobRequested,
            idempotency_key="k",
            kind="refactor",
            contract=Contract(stopping=stopping),
            input_seq=1,
        )

    def _stored(self, subject: str, data: bytes) -> log.Stored:
        self.seq += 1
        ns = int((self.at - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1e9)
        return log.Stored(topology.EVENT_STREAM, self.seq, subject, ns, data)

    def later(self, seconds: float) -> datetime:
        self.at += timedelta(seconds=seconds)
        return self.at

    def add(self, event_type: type[Event], /, **fields: Any) -> Any:
        event = event_type(
            originator_id=self.job_id, originator_version=len(self.events) + 1, timestamp=self.at, **fields
        )
        stored = self._stored(topology.event_subject(self.job_id), encode(event))
        self.events.append(log.LoggedEvent(stored, cast(AnyEvent, event)))
        return event

    def agent_event(self, name: str, event_type: type[Event], /, **fields: Any) -> None:
        mine = self.agents.setdefault(name, [])
        event = event_type(
            originator_id=agent_id_for(name),
            originator_version=len(mine) + 1,
            timestamp=self.at,
            **{"name": name, **fields},  # every agent event names its agent; Event itself does not
        )
        stored = self._stored(topology.event_subject(agent_id_for(name)), encode(event))
        mine.append(log.LoggedEvent(stored, cast(AnyEvent, event)))

    def heartbeat(self, agent: str, epoch: int, note: str = "", usage: Usage | None = None) -> int:
        body = Heartbeat(job_id=self.job_id, epoch=epoch, note=note, usage=usage or Usage())
        stored = self._stored(topology.agent_subject(agent, "heartbeat"), msgspec.json.encode(body))
        self.inputs.append(stored)
        return stored.seq

    def grant(self, agent: str, epoch: int) -> None:
        self.add(LeaseGranted, agent=agent, epoch=epoch, ttl_s=1.0, expires_at=self.at + timedelta(seconds=1))

    def expire(self, agent: str, epoch: int, last_heartbeat_seq: int | None = None) -> None:
        seen = None
        if last_heartbeat_seq is not None:
            seen = HeartbeatSeen(at=self.at - timedelta(seconds=1), input_seq=last_heartbeat_seq)
        self.add(
            LeaseExpired,
            agent=agent,
            epoch=epoch,
            deadline=self.at,
            detected_at=self.at,
            detection_latency_ms=3.0,
            last_heartbeat=seen,
        )

    def propose(self, agent: str, epoch: int) -> UUID:
        pid = uuid4()
        self.add(
            ProposalSubmitted,
            proposal_id=pid,
            agent=agent,
            epoch=epoch,
            content_hash="h",
            size=10,
            input_seq=self.seq,
        )
        return pid

    def complete(self, agent: str, epoch: int) -> None:
        pid = self.propose(agent, epoch)
        self.add(ProposalAccepted, proposal_id=pid)
        self.add(EffectApplied, proposal_id=pid, kind="none", receipt={})
        self.add(JobCompleted, proposal_id=pid, agent=agent, epoch=epoch)

    def explained(self) -> Explanation:
        return explain.explain(
            JobLog(job_id=self.job_id, events=self.events, agent_events=self.agents, agent_inputs=self.inputs)
        )


def rejected_by(record: Record, agent: str, invariant: str, **evidence: Any) -> None:
    pid = record.propose(agent, 1)
    record.add(
        InvariantChecked, proposal_id=pid, invariant=invariant, version="1", verdict="fail", evidence=evidence
    )
    record.add(ProposalRejected, proposal_id=pid, violations=[invariant])


# --- silence: crashed, hung, or the log cannot tell -------------------------------------------------


def test_an_agent_that_speaks_again_under_its_lost_lease_is_called_hung_with_its_last_heartbeat() -> None:
    record = Record()
    record.grant("sleeper", 1)
    record.later(0.2)
    seq = record.heartbeat("sleeper", 1, note="thinking")
    record.later(1.5)
    record.expire("sleeper", 1, seq)
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)
    record.later(2.0)
    late = record.heartbeat("sleeper", 1)
    record.add(
        MessageRejected,
        agent="sleeper",
        epoch=1,
        verb="heartbeat",
        reason="lease 1 already expired",
        input_seq=late,
    )

    expl = record.explained()

    assert expl.cause_class == "hung"
    assert expl.attempts[0].cause is not None and expl.attempts[0].cause.cls == "hung"
    assert "spoke again 2.000s after losing its lease: heartbeat under lease 1" in expl.cause
    assert expl.attempts[0].cause.evidence["last_heartbeat_at"] == (T0 + timedelta(seconds=0.2)).isoformat()


def test_a_silent_agent_that_never_returns_is_undecidable_and_the_sentence_says_why() -> None:
    record = Record()
    record.grant("crasher", 1)
    record.later(1.2)
    record.expire("crasher", 1)
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "crashed_or_hung"
    assert "undecidable from the log" in expl.cause and "connection state is not recorded" in expl.cause


def test_a_silent_agent_whose_new_process_registers_later_is_called_crashed() -> None:
    record = Record()
    record.agent_event("crasher", AgentRegistered)
    record.grant("crasher", 1)
    record.later(1.2)
    record.expire("crasher", 1)
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)
    record.later(3)
    record.agent_event("crasher", AgentRegistered)

    expl = record.explained()

    assert expl.cause_class == "crashed"
    assert "a new process of it registered at 12:00:04.200" in expl.cause


# --- budgets, deadlines, revocations, operators -----------------------------------------------------


def test_a_wall_clock_breach_reads_its_exact_overrun_not_two_rounded_equal_numbers() -> None:
    record = Record(budgets=Budgets(wall_clock_s=4.0))
    record.grant("spender", 1)
    record.later(4.0132)
    record.add(
        LeaseRevoked,
        agent="spender",
        epoch=1,
        reason="budget exceeded: wall clock 4.0s > budget 4.0s",
        signal="budget",
        by="reconciler",
    )
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "budget"
    assert "wall clock 4.013s > budget 4s (over by 13 ms)" in expl.cause
    assert expl.ended_by is not None and round(expl.ended_by.evidence["over"], 4) == 0.0132


def test_a_token_budget_breach_names_usage_limit_and_overrun() -> None:
    text, evidence = causes.budget_overrun(Budgets(tokens=100), Usage(tokens=250), None)
    assert text == "tokens 250 > budget 100 (over by 150)"
    assert evidence == {"budget": "tokens", "used": 250, "limit": 100, "over": 150}


def test_a_deadline_revocation_is_a_deadline() -> None:
    record = Record()
    record.grant("slow", 1)
    record.add(
        LeaseRevoked, agent="slow", epoch=1, reason="job deadline passed", signal="deadline", by="reconciler"
    )
    record.add(JobTombstoned, reason="deadline 2026-01-31T12:00:00+00:00 passed", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "deadline"
    assert expl.cause.startswith("deadline passed while agent slow held lease 1")


def test_an_agent_revoked_by_an_operator_in_flight_is_an_operator_action() -> None:
    record = Record()
    record.grant("rogue", 1)
    record.agent_event("rogue", AgentRevoked, reason="leaked a key", by="alice")
    record.add(
        LeaseRevoked, agent="rogue", epoch=1, reason="agent revoked", signal="agent-revoked", by="revoker"
    )
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "operator"
    assert expl.cause == "operator alice revoked agent rogue: leaked a key (lease 1 revoked in flight)"


def test_a_policy_revocation_is_a_revocation() -> None:
    record = Record()
    record.grant("rogue", 1)
    record.agent_event("rogue", AgentRevoked, reason="3 violations", by="revoker")
    record.add(
        LeaseRevoked, agent="rogue", epoch=1, reason="3 violations", signal="agent-revoked", by="revoker"
    )
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    assert record.explained().cause_class == "revocation"


def test_a_cancel_names_the_operator_and_the_lease_revoked_in_flight() -> None:
    record = Record()
    record.grant("worker", 1)
    record.add(JobCancelled, reason="wrong repository", by="bob")

    expl = record.explained()

    assert expl.cause_class == "operator"
    assert expl.cause == "cancelled by operator bob: wrong repository (lease 1 of worker revoked in flight)"
    assert expl.contained == []


def test_a_proposal_denied_by_a_person_is_an_operator_action() -> None:
    record = Record()
    record.grant("writer", 1)
    pid = record.propose("writer", 1)
    record.add(ProposalRejected, proposal_id=pid, violations=["not today"], by="carol")
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "operator"
    assert f"proposal {pid} denied by operator carol: not today" == expl.cause


# --- invariants ------------------------------------------------------------------------------------


def test_a_scope_breach_names_the_paths_outside_the_globs() -> None:
    record = Record()
    record.grant("wanderer", 1)
    rejected_by(record, "wanderer", "scope", outside=["secrets/key.pem"], globs=["src/**"])
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "scope_breach"
    assert expl.cause == "scope breach: secrets/key.pem outside contract globs ['src/**']"


def test_a_ci_failure_names_the_exit_code() -> None:
    record = Record()
    record.grant("breaker", 1)
    rejected_by(record, "breaker", "ci_gate", exit_code=3, timed_out=False, stdout_tail="2 failed")
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert (expl.cause_class, expl.cause) == ("ci_failure", "tests failed: ci_gate exit 3")
    assert expl.ended_by is not None and expl.ended_by.evidence["exit_code"] == 3


def test_a_stale_base_names_the_commits_since() -> None:
    record = Record()
    record.grant("builder", 1)
    rejected_by(
        record,
        "builder",
        "base_drift",
        reason="stale base: main is at abc, the proposal was built on def (2 commit(s) since)",
        commits_since_base=["abc1234 fix", "bcd2345 feature"],
    )
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "stale_base"
    assert expl.cause.endswith("commits since: abc1234 fix, bcd2345 feature")


# --- contained failures and incidents ---------------------------------------------------------------


def test_a_failure_the_retry_survived_is_contained_and_named_in_the_summary() -> None:
    record = Record(attempts=2)
    record.grant("wanderer", 1)
    rejected_by(record, "wanderer", "scope", outside=["etc/passwd"], globs=["src/**"])
    record.add(JobRequeued, reason="proposal rejected", by="checker")
    record.grant("rescuer", 2)
    record.complete("rescuer", 2)

    expl = record.explained()

    assert expl.status == "completed" and expl.ended_by is None
    assert [c.cls for c in expl.contained] == ["scope_breach"]
    assert expl.cause_class == "scope_breach"
    assert expl.cause == "contained: scope breach: etc/passwd outside contract globs ['src/**']"
    assert expl.summary == "completed after 1 failure(s) contained (scope_breach)"
    assert expl.attempts[1].cause is None


def test_a_late_proposal_on_a_tombstoned_job_is_named_with_the_lease_it_came_under() -> None:
    record = Record()
    record.grant("late", 1)
    record.later(1.5)
    record.expire("late", 1)
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)
    record.later(1)
    input_seq = 777
    record.add(
        MessageRejected,
        agent="late",
        epoch=1,
        verb="propose",
        reason="lease 1 already expired",
        input_seq=input_seq,
        current_epoch=1,
    )

    expl = record.explained()

    # It spoke again, so it was alive: hung, not crashed; and its proposal is named, not lost.
    assert expl.cause_class == "hung"
    late = [c for c in expl.contained if c.cls == "fenced_late_message"]
    assert len(late) == 1
    assert late[0].proposal_id == proposal_id_for(topology.AGENT_INPUT_STREAM, input_seq)
    assert (
        f"late proposal {late[0].proposal_id} (input #777) from late under lease 1 (expired at"
        in late[0].text
    )
    assert (
        expl.summary == "tombstoned: ended by hung; before that 1 failure(s) contained (fenced_late_message)"
    )


def test_an_effect_found_already_applied_is_a_receipt_reused_incident() -> None:
    record = Record()
    record.grant("writer", 1)
    pid = record.propose("writer", 1)
    record.add(ProposalAccepted, proposal_id=pid)
    record.add(
        EffectApplied, proposal_id=pid, kind="git.patch", receipt={"commit": "abc"}, reused_receipt=True
    )
    record.add(JobCompleted, proposal_id=pid, agent="writer", epoch=1)

    expl = record.explained()

    assert expl.cause_class == "receipt_reused"
    assert expl.contained[0].proposal_id == pid


def test_a_failed_effect_ends_its_attempt_as_an_effect_failure() -> None:
    record = Record()
    record.grant("writer", 1)
    pid = record.propose("writer", 1)
    record.add(ProposalAccepted, proposal_id=pid)
    record.add(EffectFailed, proposal_id=pid, kind="webhook", reason="HTTP 500 from the hook")
    record.add(JobTombstoned, reason="max attempts (1) reached", attempts=1)

    expl = record.explained()

    assert expl.cause_class == "effect_failed"
    assert expl.ended_by is not None and expl.ended_by.proposal_id == pid
    assert "HTTP 500 from the hook" in expl.cause


def test_a_clean_completion_has_no_cause() -> None:
    record = Record()
    record.grant("good", 1)
    record.complete("good", 1)

    expl = record.explained()

    assert (expl.cause, expl.cause_class, expl.contained) == ("", "", [])
    assert expl.summary == "completed with no failure"
