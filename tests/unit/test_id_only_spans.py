"""With nothing taking spans, a span is only its ids: traces still link as recorded spans would."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from shared import telemetry

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def nothing_takes_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_taking", False)


def ids(traceparent: str) -> tuple[str, str]:
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return trace_id, span_id


def test_a_span_under_a_recorded_parent_is_in_its_trace_with_a_new_span_id_and_records_nothing() -> None:
    with telemetry.span("scheduler grant", parent=PARENT, job_id=None) as current:
        assert not current.is_recording()
        inside = telemetry.current_traceparent()
    trace_id, span_id = ids(inside)
    assert trace_id == ids(PARENT)[0] and span_id != ids(PARENT)[1]
    assert inside.endswith("-01")  # sampled: an agent's own exporter keeps its spans in the trace
    assert telemetry.current_traceparent() == ""  # ended: no span is current any more


def test_a_span_without_a_parent_follows_the_headers_else_the_current_span_else_starts_a_trace() -> None:
    with telemetry.span("reconciler heartbeat", headers={"traceparent": PARENT}):
        sent = telemetry.current_traceparent()
        with telemetry.span("inner"):
            nested = telemetry.current_traceparent()
    assert ids(sent)[0] == ids(nested)[0] == ids(PARENT)[0]
    assert ids(nested)[1] != ids(sent)[1]
    with telemetry.span("root"):
        first = telemetry.current_traceparent()
    with telemetry.span("root"):
        second = telemetry.current_traceparent()
    assert ids(first)[0] != ids(second)[0] != ids(PARENT)[0]


def test_a_record_without_a_trace_makes_a_root_never_a_child_of_the_ambient_span() -> None:
    with telemetry.span("outer"):
        ambient = telemetry.current_traceparent()
        with telemetry.span("applier step", parent=""):
            own = telemetry.current_traceparent()
    assert ids(own)[0] != ids(ambient)[0]
    assert trace.get_current_span().get_span_context().is_valid is False
