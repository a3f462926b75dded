"""OpenTelemetry, configured once per process; trace context rides in NATS headers and events.

Exporters are chosen by the standard variables: `OTEL_TRACES_EXPORTER` and
`OTEL_METRICS_EXPORTER` (`none`, `console`, `otlp`; `WARDEN_OTEL_EXPORTER` names one for both
when they are unset), and for OTLP `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default,
or `grpc`; `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `..._METRICS_PROTOCOL` per signal). The OTLP
exporters read their own `OTEL_EXPORTER_OTLP_*` settings (endpoint, headers, timeout, ...).
Metric instruments are created here so every service reports the same names.

One job is one trace: a handler's span is parented by the trace context recorded with what it
handles (`span(parent=event.trace)`), and every event appended under a span carries it
(`Context.save` stamps `trace` with `current_traceparent()`).
"""

from __future__ import annotations

import importlib
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple
from uuid import UUID

import msgspec
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import topology

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter

_configured = False
# Whether anything takes finished spans: an exporter `configure` installed, or a processor added
# through `take_spans`. When nothing does, a span is only its ids (what events record and inputs
# carry, so traces still link), not the SDK's recording span: that was ~8% of the services' CPU
# in a governed run with nothing exporting.
_taking = False
# Events record W3C traceparents whatever OTEL_PROPAGATORS says the NATS headers carry.
_W3C = TraceContextTextMapPropagator()
_ids = random.Random()  # span and trace ids, as the SDK's RandomIdGenerator makes them
EXPORTERS = ("none", "console", "otlp")
# The OTLP protocols, and the package whose exporters speak each.
OTLP_PACKAGES = {
    "http/protobuf": ("http", "opentelemetry-exporter-otlp-proto-http"),
    "grpc": ("grpc", "opentelemetry-exporter-otlp-proto-grpc"),
}


class TelemetryError(RuntimeError):
    """Raised when the exporter or OTLP protocol named in the environment is unknown or not installed."""


class ExportChoice(NamedTuple):
    """Where one signal goes: `exporter` is none, console or otlp; `protocol` matters for otlp."""

    exporter: str
    protocol: str = "http/protobuf"


def export_choice(signal: str, env: Mapping[str, str], override: str | None = None) -> ExportChoice:
    """What the environment asks for `signal` ("traces" or "metrics"), by the OTEL_* rules.

    `override` (a caller's explicit choice) wins; then OTEL_<SIGNAL>_EXPORTER, then
    WARDEN_OTEL_EXPORTER; OTEL_SDK_DISABLED=true turns every signal off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" and override is None:
        return ExportChoice("none")
    upper = signal.upper()
    named, source = override, "the exporter asked for"
    for var in (f"OTEL_{upper}_EXPORTER", "WARDEN_OTEL_EXPORTER"):
        if named is None and env.get(var):
            named, source = env[var], var
    exporter = (named or "none").strip().lower()
    if exporter not in EXPORTERS:
        raise TelemetryError(f"{source} {named!r} is not an exporter: use {', '.join(EXPORTERS)}")
    protocol = (
        env.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    ).strip().lower() or "http/protobuf"
    if exporter == "otlp" and protocol not in OTLP_PACKAGES:
        raise TelemetryError(
            f"OTLP protocol {protocol!r} is not supported here (OTEL_EXPORTER_OTLP_PROTOCOL): "
            f"use {' or '.join(OTLP_PACKAGES)}"
        )
    return ExportChoice(exporter, protocol)


def _otlp(protocol: str, module: str, name: str) -> Any:
    """An OTLP exporter class, imported only when chosen (grpcio alone costs ~0.1 s to import)."""
    kind, package = OTLP_PACKAGES[protocol]
    try:
        return getattr(importlib.import_module(f"opentelemetry.exporter.otlp.proto.{kind}.{module}"), name)
    except ImportError as exc:
        raise TelemetryError(
            f"OTLP over {protocol} needs {package}: pip install 'warden[otlp]' (or {package})"
        ) from exc


def span_exporter(choice: ExportChoice) -> SpanExporter | None:
    """The span exporter `choice` names (it reads its own OTEL_EXPORTER_OTLP_* settings)."""
    if choice.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if choice.exporter == "otlp":
        exporter: SpanExporter = _otlp(choice.protocol, "trace_exporter", "OTLPSpanExporter")()
        return exporter
    return None


def metric_reader(choice: ExportChoice) -> MetricReader | None:
    """A periodic reader pushing to the metric exporter `choice` names, or None."""
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if choice.exporter == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter(), 10_000)
    if choice.exporter == "otlp":
        return PeriodicExportingMetricReader(
            _otlp(choice.protocol, "metric_exporter", "OTLPMetricExporter")()
        )
    return None


def configure(service: str, exporter: str | None = None) -> None:
    """Install tracer and meter providers; later calls are no-ops (one configuration per process)."""
    global _configured
    if _configured:
        return
    traces = export_choice("traces", os.environ, exporter)
    metric = export_choice("metrics", os.environ, exporter)
    # The SDK and the exporters are imported here, not at module level: every process that talks
    # to NATS imports this module (through shared.bus), and only the services configure
    # telemetry; a CLI command would pay ~0.1 s of start-up for nothing.
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME (read by Resource.create) names the process when it is set.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"warden-{service}"}
    resource = Resource.create(attributes)
    readers: list[MetricReader] = []
    pushed = metric_reader(metric)
    if pushed is not None:
        readers.append(pushed)
    # Always scrapeable: the api service serves this process's metrics at /metrics (pull costs
    # nothing until someone scrapes).
    readers.append(PrometheusMetricReader())
    provider = TracerProvider(resource=resource)
    exported = span_exporter(traces)
    if exported is not None:
        provider.add_span_processor(BatchSpanProcessor(exported))
    trace.set_tracer_provider(provider)
    global _taking
    _taking = exported is not None
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _configured = True


_tracer = trace.get_tracer("warden")  # a proxy: it uses the provider configure() installs


def tracer() -> trace.Tracer:
    return _tracer


def take_spans(processor: SpanProcessor) -> None:
    """Hand every span this process finishes from now on to `processor` (after `configure`)."""
    global _taking
    provider = trace.get_tracer_provider()
    add = getattr(provider, "add_span_processor", None)
    if add is None:
        raise TelemetryError("telemetry.configure() installs the tracer provider first")
    add(processor)
    _taking = True


def taking_spans() -> bool:
    """Whether spans are recorded (something takes them): else `span` makes ids only."""
    return _taking


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Put the current trace context into NATS headers."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context a NATS message carried (an empty one when it carried none or garbage)."""
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" outside one): what an event records."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def context_of(traceparent: str) -> Context | None:
    """The context a recorded traceparent names, or None when it names none validly (an event
    from before traces were kept, or a malformed header)."""
    if not traceparent:
        return None
    ctx = _W3C.extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def trace_id_of(traceparent: str) -> str:
    """The 32-hex-digit trace id a traceparent names, or ""."""
    ctx = context_of(traceparent)
    return format(trace.get_current_span(ctx).get_span_context().trace_id, "032x") if ctx else ""


class Names(msgspec.Struct):
    """What an input says it is about, read before it is validated: only to pick its span's parent."""

    job_id: UUID | None = None
    # Bounded: a span attribute past int64 would fail the whole export batch.
    epoch: Annotated[int, msgspec.Meta(ge=0, le=2**31)] | None = None
    proposal_id: UUID | None = None


def names_in(data: bytes) -> Names:
    """The job, lease and proposal an input names, or none of them when it is not that shape.

    Hostile bytes (too large, nested thousands deep, not JSON) name nothing and raise nothing:
    the handler records why the input is refused; its span only needs a parent."""
    if len(data) > topology.MAX_INPUT_BYTES:
        return Names()
    try:
        return msgspec.json.decode(data, type=Names)
    except (msgspec.MsgspecError, RecursionError, ValueError):
        return Names()


Attribute = str | int | float | bool | UUID | None


def _attributes(attributes: Mapping[str, Attribute]) -> dict[str, str | int | float | bool]:
    return {
        f"warden.{k}": str(v) if isinstance(v, UUID) else v for k, v in attributes.items() if v is not None
    }


def annotate(**attributes: Attribute) -> None:
    """Add `warden.<key>` attributes to the current span (what a handler learns as it goes)."""
    trace.get_current_span().set_attributes(_attributes(attributes))


@contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    headers: Mapping[str, str] | None = None,
    link: str = "",
    **attributes: Attribute,
) -> Iterator[trace.Span]:
    """The current span of one handler, named "<service> <what>".

    `parent` is the traceparent recorded with what the handler acts on (the event, the lease or
    the job an input runs under): Warden's own record, so a sender cannot move a job's spans
    into a trace of its choosing. The context an input's `headers` carry parents the span when
    no record names one, and is otherwise kept as a link. With neither, the span is a child of
    the current one (an invariant inside its proposal's span). `link` is the traceparent of a
    cause in another trace (the claim a grant answers, the revocation a rollback follows).
    Attributes go in as `warden.<key>` (None values are left out).
    """
    sent = extract(headers) if headers is not None else None
    context: Context | None = None
    links: list[trace.Link] = []
    if parent is not None:
        context = context_of(parent)
    if context is None and sent is not None:
        context, sent = sent, None
    elif parent is not None and context is None:
        context = Context()  # a record with no trace: a root, never the ambient span
    if not _taking:
        with trace.use_span(_ids_only(context), end_on_exit=False) as current:
            yield current
        return
    for linked_context in (sent, context_of(link)):
        if linked_context is not None:
            linked = trace.get_current_span(linked_context).get_span_context()
            if linked.is_valid:
                links.append(trace.Link(linked))
    values = _attributes(attributes)
    with tracer().start_as_current_span(name, context=context, links=links, attributes=values) as current:
        yield current


def _ids_only(context: Context | None) -> trace.Span:
    """A span that is only its ids: a child of `context`'s span (None: the current one) in its
    trace, or the root of a new trace. Nothing is recorded, so nothing is exported."""
    parent = trace.get_current_span(context).get_span_context()
    trace_id = parent.trace_id if parent.is_valid else _ids.getrandbits(128) or 1
    span_id = _ids.getrandbits(64) or 1
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
    return trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags))


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
