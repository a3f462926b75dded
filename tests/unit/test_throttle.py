"""The throttle's rule on its own: windows on stored time, one recorded refusal per window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.throttle import Throttle, Verdict

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_past_the_limit_the_rest_of_the_window_is_refused_and_only_the_first_refusal_is_recorded() -> None:
    throttle = Throttle(limit=3, window_s=10)
    verdicts = [throttle.decide("a", at(i * 0.1)) for i in range(6)]
    assert verdicts == [Verdict.ADMIT] * 3 + [Verdict.REFUSE_FIRST, Verdict.REFUSE, Verdict.REFUSE]
    # A new window, by stored time, admits again; another agent was never affected.
    assert throttle.decide("b", at(1)) is Verdict.ADMIT
    assert throttle.decide("a", at(10)) is Verdict.ADMIT


def test_a_backlog_stored_slowly_is_never_throttled_however_fast_it_is_read() -> None:
    throttle = Throttle(limit=3, window_s=10)
    # Read all at once after an outage, but stored one every 5 s: at most 2 per window.
    assert {throttle.decide("a", at(i * 5)) for i in range(100)} == {Verdict.ADMIT}


def test_an_input_read_after_its_window_closed_is_admitted_not_refused_outside_its_window() -> None:
    throttle = Throttle(limit=1, window_s=10)
    assert throttle.decide("a", at(20)) is Verdict.ADMIT
    assert throttle.decide("a", at(21)) is Verdict.REFUSE_FIRST
    assert throttle.decide("a", at(19)) is Verdict.ADMIT  # stored before this window began
