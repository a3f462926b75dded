"""The throttle's rule on its own: windows on stored time, one recorded refusal per window."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta

from shared.sdk import AgentClient
from shared.throttle import LIMIT, Throttle, Verdict, busiest_window

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


def steady(per_second: float, seconds: float) -> list[datetime]:
    return [at(i / per_second) for i in range(int(per_second * seconds))]


def test_the_default_limit_admits_the_busiest_legitimate_agents_measured() -> None:
    # An idle `warden agent exec --concurrency 20`: every worker polls at the SDK's own interval.
    poll_s = inspect.signature(AgentClient.serve).parameters["poll_s"].default
    idle = steady(20 / poll_s, 60)
    # One agent doing no-op jobs back to back, as `warden bench` measured it (busiest window:
    # about 400 claims on the scheduler), with headroom for a machine twice as fast.
    bench = steady(80, 60)
    for stored in (idle, bench):
        throttle = Throttle()
        assert {throttle.decide("a", t) for t in stored} == {Verdict.ADMIT}
        assert busiest_window(stored) <= LIMIT


def test_the_default_limit_still_refuses_a_flood_past_its_first_inputs() -> None:
    # 20,000 inputs in 8 s (the server's fsync rate here): one window, one record for the rest.
    throttle = Throttle()
    verdicts = [throttle.decide("flooder", t) for t in steady(2_500, 8)]
    assert verdicts.count(Verdict.ADMIT) == LIMIT
    assert verdicts.count(Verdict.REFUSE_FIRST) == 1
    assert verdicts[LIMIT] is Verdict.REFUSE_FIRST


def test_the_busiest_window_counts_a_burst_that_straddles_two_throttle_windows() -> None:
    # The throttle opens windows at 0 s (31 inputs) and 10.1 s (30): the sliding count sees the
    # 60 inputs between 9.6 s and 10.4 s together, so it never understates a window's load.
    stored = [at(0)] + [at(9.6 + i * 0.01) for i in range(30)] + [at(10.1 + i * 0.01) for i in range(30)]
    throttle = Throttle(limit=31, window_s=10)
    assert {throttle.decide("a", t) for t in stored} == {Verdict.ADMIT}
    assert busiest_window(stored, 10) == 60
    assert busiest_window(stored[:31], 10) == 31
    assert busiest_window([], 10) == 0
