"""The read-model queries behind the dashboard, on SQLite and PostgreSQL: job search (id prefix,
text, state, time), what a job's folded state says (approval, rollback), the approvals queue,
and what the failures feed counts (rejected proposals, not an operator's mistyped command)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.contract import Contract, Scope
from shared.events import (
    AnyEvent,
    EffectApplied,
    EffectRolledBack,
    Event,
    InputRejected,
    JobRequested,
    LeaseGranted,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    RollbackRequested,
)
from shared.readmodel import open_read_model, queries
from shared.readmodel.store import ReadModel
from shared.readmodel.tables import FAILURES, ts
from shared.topology import agent_subject, operator_subject
from shared.validation import FieldError

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReadModel]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.sqlite'}"
        schema = ""
    else:
        base = os.environ.get("WARDEN_TEST_POSTGRES_URL")
        if not base:
            pytest.skip("WARDEN_TEST_POSTGRES_URL is not set")
        schema = f"warden_test_{uuid.uuid4().hex[:12]}"
        url = f"{base}?schema={schema}"
    opened = open_read_model(url)
    try:
        yield opened
    finally:
        opened.close()
        if schema:
            import psycopg

            with psycopg.connect(os.environ["WARDEN_TEST_POSTGRES_URL"], autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class History:
    """Events for several jobs, numbered as the stream would."""

    def __init__(self) -> None:
        self.events: list[AnyEvent] = []
        self.versions: dict[uuid.UUID, int] = {}

    def add(self, cls: type[Event], job: uuid.UUID, at: datetime, **fields: object) -> None:
        version = self.versions[job] = self.versions.get(job, 0) + 1
        self.events.append(cls(originator_id=job, originator_version=version, timestamp=at, **fields))  # type: ignore[arg-type]

    def job(self, kind: str, at: datetime, *, approval: bool = False, submitter: str = "") -> uuid.UUID:
        job = uuid.uuid4()
        contract = Contract(scope=Scope(effects=["none"]), approval_required=approval)
        self.add(
            JobRequested,
            job,
            at,
            idempotency_key=f"k-{job}",
            kind=kind,
            contract=contract,
            submitter=submitter,
        )
        return job

    def proposal(self, job: uuid.UUID, agent: str, at: datetime) -> uuid.UUID:
        pid = uuid.uuid4()
        self.add(LeaseGranted, job, at, agent=agent, epoch=1, ttl_s=1.0, expires_at=at + timedelta(seconds=1))
        self.add(
            ProposalSubmitted,
            job,
            at,
            proposal_id=pid,
            agent=agent,
            epoch=1,
            content_hash="h",
            size=3,
            input_seq=1,
        )
        return pid

    def fold(self, store: ReadModel) -> None:
        store.project(list(enumerate(self.events, start=1)))


def ids(page: queries.Page) -> list[str]:
    return [j["job_id"] for j in page.items]


def search(store: ReadModel, text: str | None = None, **kw: object) -> queries.Page:
    args: dict[str, object] = {"since": None, "until": None, "limit": 50, "offset": 0, **kw}
    filters = {"state": args.pop("state", None), "kind": None, "agent": None}
    return queries.search_jobs(store, filters, text=text, **args)  # type: ignore[arg-type]


def test_job_search_by_id_prefix_text_state_and_time_and_paged(store: ReadModel) -> None:
    h = History()
    old = h.job("Rename-Module", T0, submitter="ci-bot")
    literal = h.job("50%_off", T0 + timedelta(hours=1))
    decoy = h.job("500-off", T0 + timedelta(hours=1))
    leased = h.job("refactor", T0 + timedelta(hours=2))
    h.proposal(leased, "Careful", T0 + timedelta(hours=2))
    bulk = [h.job(f"bulk-{i}", T0 + timedelta(hours=3, seconds=i)) for i in range(30)]
    h.fold(store)

    assert ids(search(store, str(old)[:8])) == [str(old)]
    assert ids(search(store, "rename-mod")) == [str(old)]  # any case
    assert ids(search(store, "CI-BOT")) == [str(old)]  # the submitter
    assert ids(search(store, "careful")) == [str(leased)]  # the agent
    # % and _ are the text itself, not wildcards: "50%_" finds one kind, not "500-".
    assert ids(search(store, "50%_")) == [str(literal)]
    assert str(decoy) in ids(search(store, "0-off"))
    assert ids(search(store, state="proposed")) == [str(leased)]
    window = search(
        store, since=ts(T0 + timedelta(minutes=30)), until=ts(T0 + timedelta(hours=2, minutes=30))
    )
    assert set(ids(window)) == {str(literal), str(decoy), str(leased)}
    # Newest first, paged through all of them.
    seen: list[str] = []
    for offset in range(0, 40, 25):
        page = search(store, "bulk-", limit=25, offset=offset)
        assert page.total == 30
        seen += ids(page)
    assert seen == [str(j) for j in reversed(bulk)]


def test_flags_approvals_rollbacks_and_the_failures_feed(store: ReadModel) -> None:
    h = History()
    waiting = h.job("needs-a-person", T0, approval=True)
    waiting_pid = h.proposal(waiting, "careful", T0)
    plain = h.job("checker-decides", T0)
    h.proposal(plain, "quick", T0)
    rolled = h.job("undone", T0)
    rolled_pid = h.proposal(rolled, "quick", T0)
    h.add(ProposalAccepted, rolled, T0, proposal_id=rolled_pid)
    h.add(EffectApplied, rolled, T0, proposal_id=rolled_pid, kind="none", receipt={})
    h.add(RollbackRequested, rolled, T0, proposal_id=rolled_pid, reason="broke a user", by="alice")
    h.add(EffectRolledBack, rolled, T0, proposal_id=rolled_pid, kind="none", receipt={})
    denied = h.job("denied", T0, approval=True)
    denied_pid = h.proposal(denied, "hopeful", T0)
    h.add(
        ProposalRejected, denied, T0, proposal_id=denied_pid, violations=["denied by alice: no"], by="alice"
    )
    typo = FieldError(path="$.proposal_id", message="no proposal")
    h.add(
        InputRejected,
        uuid.uuid4(),
        T0,
        subject=operator_subject("approve"),
        input_seq=9,
        errors=[typo],
        sender="bob",
    )
    garbage = FieldError(path="$", message="not JSON")
    h.add(
        InputRejected,
        uuid.uuid4(),
        T0,
        subject=agent_subject("mallory", "claim"),
        input_seq=10,
        errors=[garbage],
    )
    h.fold(store)

    flags = {j["job_id"]: j for j in search(store).items}
    assert flags[str(waiting)]["awaiting_approval"] is True
    assert flags[str(waiting)]["pending_proposal"] == str(waiting_pid)
    assert flags[str(plain)]["awaiting_approval"] is False  # its checker decides, not a person
    assert flags[str(denied)]["awaiting_approval"] is False  # decided
    assert flags[str(rolled)]["rollback"] == "done" and flags[str(rolled)]["state"] == "accepted"
    detail = queries.job_detail(store, str(rolled))
    assert detail is not None and detail["rollback"] == "done"
    assert detail["proposals"][0]["rolled_back_at"] is not None

    queue = queries.approvals(store, 50, 0)
    assert [(p["proposal_id"], p["kind"]) for p in queue.items] == [(str(waiting_pid), "needs-a-person")]

    feed = queries.page(store, FAILURES, {}, 50, 0).items
    kinds = sorted(f["kind"] for f in feed)
    assert kinds == ["input.rejected", "proposal.rejected"]  # mallory's garbage, the denial
    rejected = next(f for f in feed if f["kind"] == "proposal.rejected")
    assert rejected["job_id"] == str(denied) and rejected["agent"] == "hopeful"
    assert rejected["reason"] == "denied by alice: no" and rejected["detail"]["by"] == "alice"
    assert queries.summary(store)["failures"] == {"input.rejected": 1, "proposal.rejected": 1}
