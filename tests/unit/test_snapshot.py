"""A view's snapshot: its live set, its position and its registered folded states, round trip."""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

import msgspec
import pytest

from shared import snapshot
from shared.contract import Contract
from shared.events import AgentRegistered, JobCancelled, JobRequested, agent_id_for, now
from shared.views import Views


class Counter:
    """A folded state as a service would register it."""

    def __init__(self) -> None:
        self.seen = 0

    def dump(self) -> bytes:
        return msgspec.msgpack.encode(self.seen)

    def load(self, data: bytes) -> Callable[[], None]:
        seen = msgspec.msgpack.decode(data, type=int)

        def adopt() -> None:
            self.seen = seen

        return adopt


def busy_view() -> Views:
    views = Views(forget_ended=True)
    live, ended = uuid4(), uuid4()
    for job_id in (live, ended):
        views.apply(
            JobRequested(
                originator_id=job_id,
                originator_version=1,
                idempotency_key=str(job_id),
                kind="noop",
                contract=Contract(),
            )
        )
    views.apply(JobCancelled(originator_id=ended, originator_version=2, reason="r", by="op"))
    views.apply(AgentRegistered(originator_id=agent_id_for("a"), originator_version=1, name="a"))
    views.advance(4)
    return views


def test_a_snapshot_restores_the_live_jobs_the_agents_and_the_position() -> None:
    views = busy_view()
    data = snapshot.encode(views.capture(now()))
    restored = Views(forget_ended=True)
    snap = snapshot.decode(data)
    assert snap is not None and restored.restore(snap)
    assert restored.jobs == views.jobs and len(restored.jobs) == 1
    assert restored.agents == views.agents
    assert restored.position == 4


def test_a_registered_folded_state_travels_in_the_snapshot() -> None:
    views = busy_view()
    counter = Counter()
    views.folded["counter"] = counter
    counter.seen = 7
    snap = snapshot.decode(snapshot.encode(views.capture(now())))
    assert snap is not None
    restored, again = Views(forget_ended=True), Counter()
    restored.register("counter", again)
    assert restored.restore(snap)
    assert again.seen == 7


def test_a_snapshot_lacking_a_registered_state_is_not_used_and_changes_nothing() -> None:
    snap = busy_view().capture(now())
    restored = Views(forget_ended=True)
    restored.register("counter", Counter())
    assert not restored.restore(snap)
    assert restored.jobs == {} and restored.agents == {} and restored.position == 0


def test_a_snapshot_whose_state_does_not_load_is_not_used_and_changes_nothing() -> None:
    views = busy_view()
    views.folded["counter"] = Counter()
    views.folded["other"] = Counter()
    snap = msgspec.structs.replace(views.capture(now()), folded={"counter": b"\x07", "other": b"not an int"})
    restored, first, second = Views(forget_ended=True), Counter(), Counter()
    restored.register("counter", first)
    restored.register("other", second)
    assert not restored.restore(snap)
    assert (first.seen, second.seen) == (0, 0)
    assert restored.jobs == {} and restored.position == 0


def test_a_state_registered_after_the_fold_started_is_refused() -> None:
    with pytest.raises(RuntimeError, match="registered after the view folded up to 4"):
        busy_view().register("counter", Counter())


@pytest.mark.parametrize(
    "change",
    [{"format": snapshot.FORMAT + 1}, {"shape": "a-job-of-another-shape"}],
    ids=["unknown-format", "other-shape"],
)
def test_a_snapshot_of_an_unknown_format_or_shape_does_not_decode(change: dict[str, object]) -> None:
    snap = msgspec.structs.replace(busy_view().capture(now()), **change)
    assert snapshot.decode(snapshot.encode(snap)) is None


def test_bytes_that_are_not_a_snapshot_do_not_decode() -> None:
    assert snapshot.decode(b"\xc1") is None
    assert snapshot.decode(msgspec.msgpack.encode({"format": snapshot.FORMAT})) is None


def test_snapshots_are_named_by_the_folded_states_they_carry() -> None:
    assert snapshot.object_name([]) == "view"
    assert snapshot.object_name(["revoker", "authority"]) == "view+authority+revoker"
