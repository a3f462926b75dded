"""Metrics the read model knows, as OpenTelemetry observable gauges (scraped at /metrics).

The services count what they do as it happens (shared/telemetry.py: lease expiries, detection
latency, decisions, revocations); those counters live in the process that did the work. The
read model knows the whole history wherever the API runs, so it reports current totals as
gauges: jobs by state, failures, revocations and decisions by kind, detection latency
percentiles, and how far it has folded the stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from shared.readmodel.tables import JOB_STATES

_sources: list[Callable[[], dict[str, Any] | None]] = []
_lock = threading.Lock()
_registered = False


def _summary() -> dict[str, Any] | None:
    with _lock:
        sources = list(_sources)
    for source in sources:
        found = source()
        if found is not None:
            return found
    return None


def _by(section: Callable[[dict[str, Any]], dict[str, int]], label: str, every: Iterable[str] = ()) -> Any:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        summary = _summary()
        if summary is None:
            return []
        counts = dict.fromkeys(every, 0) | section(summary)
        return [Observation(v, {label: k}) for k, v in sorted(counts.items())]

    return callback


def _value(pick: Callable[[dict[str, Any]], float | None]) -> Any:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        summary = _summary()
        value = None if summary is None else pick(summary)
        return [] if value is None else [Observation(value)]

    return callback


def register(source: Callable[[], dict[str, Any] | None]) -> None:
    """Report from `source` (the latest read-model summary); instruments are created once."""
    global _registered
    with _lock:
        _sources.append(source)
        if _registered:
            return
        _registered = True
    meter = metrics.get_meter("warden.readmodel")
    meter.create_observable_gauge(
        "warden_readmodel_jobs",
        callbacks=[_by(lambda s: s["jobs"]["by_state"], "state", JOB_STATES)],
        description="jobs by state, from the read model",
    )
    meter.create_observable_gauge(
        "warden_readmodel_failures",
        callbacks=[_by(lambda s: s["failures"], "kind")],
        description="detected failures by kind, from the read model",
    )
    meter.create_observable_gauge(
        "warden_readmodel_revocations",
        callbacks=[_by(lambda s: s["revocations"]["by_kind"], "kind")],
        description="revocations by kind, from the read model",
    )
    meter.create_observable_gauge(
        "warden_readmodel_decisions",
        callbacks=[_by(lambda s: s["decisions"], "verdict")],
        description="proposals by verdict, from the read model",
    )
    meter.create_observable_gauge(
        "warden_readmodel_agents",
        callbacks=[_by(lambda s: s["agents"]["by_level"], "level")],
        description="agents by autonomy level, from the read model",
    )
    meter.create_observable_gauge(
        "warden_readmodel_detection_latency_p50",
        unit="ms",
        callbacks=[_value(lambda s: s["detection_latency_ms"]["p50"])],
        description="median time from a lease's deadline to its detection",
    )
    meter.create_observable_gauge(
        "warden_readmodel_detection_latency_p99",
        unit="ms",
        callbacks=[_value(lambda s: s["detection_latency_ms"]["p99"])],
        description="99th percentile time from a lease's deadline to its detection",
    )
    meter.create_observable_gauge(
        "warden_readmodel_position",
        callbacks=[_value(lambda s: s["position"])],
        description="stream sequence the read model has folded up to",
    )


def unregister(source: Callable[[], dict[str, Any] | None]) -> None:
    with _lock:
        if source in _sources:
            _sources.remove(source)
