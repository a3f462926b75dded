"""Claims that wait for work: how long one may wait, what wakes the waiting, and the scheduler's
bounded book of them (one per agent, a cap in all, oldest first, each until its deadline)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.scheduler.waiting import Full, Parked, Waiting
from shared.decide import leases as rules
from shared.messages import Claim
from tests.unit.test_decide_leases import ended, leased, proposed, requested

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def parked(name: str, until: float, seq: int = 1) -> Parked[str]:
    return Parked(name=name, claim=Claim(), seq=seq, until=at(until), msg=f"{name}-{seq}")


# --- how long a claim waits ------------------------------------------------------------------


def test_a_claim_waits_until_its_senders_wait_ends_less_a_margin_for_the_answer_to_arrive() -> None:
    claim = Claim(wait_s=20, sent_at=at(0))
    assert rules.wait_until(claim, at(0.1)) == at(20 - rules.WAIT_MARGIN_S)


def test_a_short_wait_keeps_a_fifth_of_itself_as_the_margin() -> None:
    assert rules.wait_until(Claim(wait_s=1, sent_at=at(0)), at(0)) == at(0.8)


def test_a_claim_with_no_send_time_waits_from_its_arrival() -> None:
    assert rules.wait_until(Claim(wait_s=20), at(5)) == at(24)


def test_a_sender_whose_clock_runs_ahead_waits_from_the_claims_arrival() -> None:
    assert rules.wait_until(Claim(wait_s=20, sent_at=at(30)), at(5)) == at(24)


def test_a_claim_arriving_with_less_than_the_margin_left_waits_not_at_all() -> None:
    assert rules.wait_until(Claim(wait_s=5, sent_at=at(0)), at(4.5)) is None


def test_a_claim_asking_to_wait_an_hour_waits_at_most_the_schedulers_longest_wait() -> None:
    claim = Claim(wait_s=3600, sent_at=at(0))
    assert rules.wait_until(claim, at(0)) == at(rules.MAX_WAIT_S)


def test_a_claim_waits_no_longer_than_its_agent_counts_as_present_for_a_retry() -> None:
    until = rules.wait_until(Claim(wait_s=3600, sent_at=at(0)), at(0))
    assert until is not None and until <= at(rules.RECENT_CLAIM_S)


# --- what may bring work to a waiting claim ---------------------------------------------------


def test_a_job_runnable_again_may_bring_work_to_anyone_waiting() -> None:
    job = requested()
    assert rules.may_bring_work(job, set())
    assert rules.may_bring_work(ended(leased(job, "a"), "expired"), set())


def test_a_change_to_a_waiting_agents_lease_may_free_a_place_under_its_limit() -> None:
    job = proposed(leased(requested(), "a"))
    assert rules.may_bring_work(job, {"a"})
    assert not rules.may_bring_work(job, {"b"})


def test_a_job_leased_by_an_agent_that_waits_for_nothing_brings_no_work() -> None:
    assert not rules.may_bring_work(leased(requested(), "a"), set())


# --- the book of waiting claims --------------------------------------------------------------


def test_waiting_claims_are_served_oldest_first() -> None:
    book: Waiting[str] = Waiting()
    for name in ("c", "a", "b"):
        assert book.park(parked(name, until=10)) is None
    assert [p.name for p in book.oldest_first()] == ["c", "a", "b"]


def test_an_agents_newer_claim_replaces_its_waiting_one_and_joins_the_end_of_the_line() -> None:
    book: Waiting[str] = Waiting()
    book.park(parked("a", until=10, seq=1))
    book.park(parked("b", until=10, seq=2))
    replaced = book.park(parked("a", until=12, seq=3))
    assert replaced is not None and replaced.seq == 1
    assert [(p.name, p.seq) for p in book.oldest_first()] == [("b", 2), ("a", 3)]
    assert len(book) == 2


def test_past_the_cap_a_claim_of_another_agent_is_refused_a_place() -> None:
    book: Waiting[str] = Waiting(cap=2)
    book.park(parked("a", until=10))
    book.park(parked("b", until=10))
    with pytest.raises(Full):
        book.park(parked("c", until=10))
    assert book.park(parked("a", until=11, seq=2)) is not None  # a replacement needs no new place
    assert "c" not in book and len(book) == 2


def test_claims_whose_wait_ended_are_due_in_deadline_order_and_leave_the_book() -> None:
    book: Waiting[str] = Waiting()
    book.park(parked("late", until=9))
    book.park(parked("early", until=3))
    book.park(parked("later", until=20))
    assert book.next_due() == at(3)
    assert [p.name for p in book.due(at(10))] == ["early", "late"]
    assert [p.name for p in book.oldest_first()] == ["later"]
    assert book.next_due() == at(20)


def test_a_claim_taken_out_or_replaced_is_never_due_under_its_old_deadline() -> None:
    book: Waiting[str] = Waiting()
    book.park(parked("a", until=3, seq=1))
    book.park(parked("b", until=4))
    book.park(parked("a", until=30, seq=2))  # replaced: its deadline of 3 no longer counts
    assert book.take("b") is not None
    assert book.next_due() == at(30)
    assert book.due(at(10)) == []


def test_a_claim_served_in_vain_goes_back_to_its_old_place_in_the_line() -> None:
    book: Waiting[str] = Waiting()
    for name in ("a", "b", "c"):
        book.park(parked(name, until=10))
    served = book.take("b")
    assert served is not None
    assert book.restore(served)
    assert [p.name for p in book.oldest_first()] == ["a", "b", "c"]
    assert [p.name for p in book.due(at(10))] == ["a", "b", "c"]


def test_a_claim_served_in_vain_is_not_put_back_over_a_newer_claim_of_its_agent() -> None:
    book: Waiting[str] = Waiting()
    book.park(parked("a", until=10, seq=1))
    served = book.take("a")
    assert served is not None
    book.park(parked("a", until=12, seq=2))
    assert not book.restore(served)
    assert [p.seq for p in book.oldest_first()] == [2]


def test_deadlines_of_claims_served_early_do_not_pile_up() -> None:
    book: Waiting[str] = Waiting()
    for seq in range(10_000):  # one agent, granted before each wait ends, claims again
        book.park(parked("a", until=10 + seq, seq=seq))
        book.take("a")
    assert len(book._deadlines) < 2_000
    assert book.next_due() is None
