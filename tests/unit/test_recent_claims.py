"""The scheduler's record of who claimed lately keeps only the claims that still count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.scheduler import RecentClaims

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_an_agent_counts_as_present_for_the_window_after_its_last_claim() -> None:
    claims = RecentClaims(window_s=30)
    claims.saw("a", at(0))
    claims.saw("b", at(10))
    assert claims.present(at(30)) == ["a", "b"]
    assert claims.present(at(35)) == ["b"]


def test_a_claim_older_than_the_window_is_forgotten_when_the_next_one_arrives() -> None:
    claims = RecentClaims(window_s=30)
    claims.saw("a", at(0))
    claims.saw("b", at(10))
    claims.saw("a", at(20))  # a claims again: its older claim is replaced, not kept
    assert len(claims) == 2
    claims.saw("c", at(45))
    assert claims.present(at(45)) == ["a", "c"] and len(claims) == 2
    claims.prune(at(100))
    assert len(claims) == 0
