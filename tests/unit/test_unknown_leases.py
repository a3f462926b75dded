"""Which live lease a claim shows its agent does not know of (the scheduler hands it back)."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

from shared.aggregates import Job, project_job
from shared.contract import Contract, Stopping
from shared.decide.leases import unknown_to
from shared.events import JobRequested, LeaseGranted, ProposalSubmitted, now
from shared.messages import Claim

CLAIM_SEQ = 40


def leased(agent: str = "a", *, proposed: bool = False) -> Job:
    job_id = uuid4()
    at = now()
    events = [
        JobRequested(
            originator_id=job_id,
            originator_version=1,
            idempotency_key="k",
            kind="noop",
            contract=Contract(stopping=Stopping(lease_ttl_s=60)),
        ),
        LeaseGranted(
            originator_id=job_id,
            originator_version=2,
            agent=agent,
            epoch=1,
            ttl_s=60,
            expires_at=at + timedelta(seconds=60),
            claim_seq=CLAIM_SEQ,
        ),
    ]
    if proposed:
        events.append(
            ProposalSubmitted(
                originator_id=job_id,
                originator_version=3,
                proposal_id=uuid4(),
                agent=agent,
                epoch=1,
                content_hash="h",
                size=1,
                input_seq=CLAIM_SEQ + 1,
            )
        )
    job = project_job(None, events)
    assert job is not None
    return job


def test_the_claim_a_lease_answered_delivered_again_gets_that_lease() -> None:
    assert unknown_to(leased(), "a", Claim(holding=None), CLAIM_SEQ)


def test_a_later_claim_that_does_not_name_the_lease_gets_it_back() -> None:
    assert unknown_to(leased(), "a", Claim(holding=[]), CLAIM_SEQ + 5)


def test_a_claim_naming_the_lease_or_naming_nothing_at_all_does_not() -> None:
    job = leased()
    assert not unknown_to(job, "a", Claim(holding=[job.id]), CLAIM_SEQ + 5)
    assert not unknown_to(job, "a", Claim(holding=None), CLAIM_SEQ + 5)  # an older client


def test_another_agents_lease_an_earlier_claim_or_a_proposed_job_is_never_handed_back() -> None:
    assert not unknown_to(leased("b"), "a", Claim(holding=[]), CLAIM_SEQ + 5)
    assert not unknown_to(leased(), "a", Claim(holding=[]), CLAIM_SEQ - 1)
    assert not unknown_to(leased(proposed=True), "a", Claim(holding=[]), CLAIM_SEQ + 5)
