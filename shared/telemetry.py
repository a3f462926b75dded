"""OpenTelemetry, configured once per process; trace context rides in NATS headers.

The exporter is chosen by `WARDEN_OTEL_EXPORTER`: `none` (default), `console`, or `otlp` (when
opentelemetry-exporter-otlp is installed). Metric instruments are created here so every service
reports the same names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from opentelemetry import metrics, propagate, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace.export import SpanExporter

_configured = False


class TelemetryError(RuntimeError):
    """Raised when the exporter named in WARDEN_OTEL_EXPORTER is unknown or not installed."""


def configure(service: str, exporter: str | None = None) -> None:
    """Install tracer and meter providers; later calls are no-ops (one configuration per process)."""
    global _configured
    if _configured:
        return
    choice = (exporter or os.environ.get("WARDEN_OTEL_EXPORTER", "none")).lower()
    # The SDK and the Prometheus exporter are imported here, not at module level: every process
    # that talks to NATS imports this module (through shared.bus), and only the services
    # configure telemetry; a CLI command would pay ~0.1 s of start-up for nothing.
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": f"warden-{service}"})
    span_exporter: SpanExporter | None = None
    readers: list[MetricReader] = []
    if choice == "console":
        span_exporter = ConsoleSpanExporter()
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(), 10_000))
    elif choice == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found]
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise TelemetryError(
                "WARDEN_OTEL_EXPORTER=otlp needs: pip install opentelemetry-exporter-otlp"
            ) from exc
        span_exporter = OTLPSpanExporter()
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    elif choice != "none":
        raise TelemetryError(f"unknown WARDEN_OTEL_EXPORTER {choice!r}: use none, console or otlp")
    # Always scrapeable: the api service serves this process's metrics at /metrics (pull costs
    # nothing until someone scrapes).
    readers.append(PrometheusMetricReader())
    provider = TracerProvider(resource=resource)
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _configured = True


def tracer() -> trace.Tracer:
    return trace.get_tracer("warden")


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Put the current trace context into NATS headers."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> object:
    """The trace context a NATS message carried, to parent the span that handles it."""
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> str:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


class Instrument(NamedTuple):
    """One shared instrument: its name, and the attribute keys its recordings carry (the labels
    a dashboard may group by; a test checks them against the call sites and ops/grafana)."""

    name: str  # OpenTelemetry's; the Prometheus exporter appends the unit: ms -> _milliseconds
    description: str
    labels: tuple[str, ...] = ()
    unit: str = ""


# Keyed by the Metrics attribute that holds each. A unit is named once, in `unit`, never in the
# name: "warden_x_ms" with unit ms is scraped as warden_x_ms_milliseconds.
INSTRUMENTS: dict[str, Instrument] = {
    "jobs": Instrument("warden_jobs_total", "jobs by the state they reached", ("state",)),
    "lease_expiries": Instrument("warden_lease_expiries_total", "leases that expired without a heartbeat"),
    "detection_latency": Instrument(
        "warden_detection_latency", "time from a lease's deadline to its lease.expired event", unit="ms"
    ),
    "decisions": Instrument(
        "warden_decisions_total", "proposal decisions (accepted, rejected)", ("decision",)
    ),
    "revocations": Instrument("warden_revocations_total", "revocations by signal", ("signal",)),
    "revocation_latency": Instrument(
        "warden_revocation_latency", "time from a failure signal to the revocation it caused", unit="ms"
    ),
    "rejected_inputs": Instrument(
        "warden_rejected_inputs_total",
        "inputs rejected as malformed or fenced",
        ("subject", "fenced"),
    ),
}


class Metrics:
    """The instruments every service shares; created lazily against the configured provider."""

    def __init__(self) -> None:
        meter = metrics.get_meter("warden")

        def counter(key: str) -> metrics.Counter:
            made = INSTRUMENTS[key]
            return meter.create_counter(made.name, unit=made.unit, description=made.description)

        def histogram(key: str) -> metrics.Histogram:
            made = INSTRUMENTS[key]
            return meter.create_histogram(made.name, unit=made.unit, description=made.description)

        self.jobs = counter("jobs")
        self.lease_expiries = counter("lease_expiries")
        self.detection_latency = histogram("detection_latency")
        self.decisions = counter("decisions")
        self.revocations = counter("revocations")
        self.revocation_latency = histogram("revocation_latency")
        self.rejected_inputs = counter("rejected_inputs")


_metrics: Metrics | None = None


def instruments() -> Metrics:
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics
