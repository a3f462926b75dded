"""A stall's cost is measured from the work's last sign of progress, as the agent reported it on
its last heartbeat, and an agent cannot make it look smaller by claiming progress in the future."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.events import HeartbeatSeen
from shared.lifecycle import since_progress_ms

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def test_the_stall_is_measured_from_the_last_reported_sign_of_progress() -> None:
    seen = HeartbeatSeen(at=T0 + timedelta(seconds=10), input_seq=7, progress_at=T0)
    assert since_progress_ms(seen, T0 + timedelta(seconds=13)) == 13_000


def test_progress_claimed_after_the_heartbeat_that_carried_it_counts_from_the_heartbeat() -> None:
    seen = HeartbeatSeen(at=T0, input_seq=7, progress_at=T0 + timedelta(hours=1))
    assert since_progress_ms(seen, T0 + timedelta(seconds=3)) == 3_000


def test_without_a_reported_progress_time_there_is_no_figure() -> None:
    assert since_progress_ms(None, T0) is None
    assert since_progress_ms(HeartbeatSeen(at=T0, input_seq=1), T0) is None
