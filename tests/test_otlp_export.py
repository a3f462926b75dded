"""OTLP export is chosen by the standard OTEL_* variables, and really arrives over each protocol.

Spans are exported to receivers these tests run (an HTTP server taking POST /v1/traces, a gRPC
TraceService), decoded from protobuf, and looked for by name: the choice of protocol and
endpoint is the exporters' own reading of the environment, not a guess of ours.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from shared import telemetry
from shared.telemetry import ExportChoice, TelemetryError, export_choice

ROOT = Path(__file__).resolve().parent.parent


def test_the_standard_variables_choose_exporter_and_protocol_per_signal() -> None:
    assert export_choice("traces", {}) == ExportChoice("none", "http/protobuf")
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert export_choice("traces", env) == ExportChoice("otlp", "grpc")
    assert export_choice("metrics", env).exporter == "none"  # each signal is asked for on its own
    env = {
        "WARDEN_OTEL_EXPORTER": "otlp",  # names both signals when the standard ones are unset
        "OTEL_METRICS_EXPORTER": "console",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert export_choice("traces", env) == ExportChoice("otlp", "http/protobuf")
    assert export_choice("metrics", env).exporter == "console"
    assert export_choice("traces", {**env, "OTEL_SDK_DISABLED": "true"}).exporter == "none"


def test_an_unknown_exporter_or_protocol_is_refused_naming_the_variable() -> None:
    with pytest.raises(TelemetryError, match="OTEL_TRACES_EXPORTER 'jaeger' is not an exporter"):
        export_choice("traces", {"OTEL_TRACES_EXPORTER": "jaeger"})
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(TelemetryError, match="'http/json' is not supported here"):
        export_choice("traces", env)


def export_one_span(choice: ExportChoice, name: str) -> None:
    exporter = telemetry.span_exporter(choice)
    assert exporter is not None
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span(name):
        pass
    provider.shutdown()


def span_names(request: trace_service_pb2.ExportTraceServiceRequest) -> list[str]:
    return [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    received: list[tuple[str, str, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_spans_go_over_otlp_http_to_the_endpoint_the_environment_names(
    http_receiver: tuple[str, list[tuple[str, str, bytes]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    choice = export_choice("traces", {"OTEL_TRACES_EXPORTER": "otlp"})
    export_one_span(choice, "over http")
    assert len(received) == 1
    path, content_type, body = received[0]
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    assert span_names(trace_service_pb2.ExportTraceServiceRequest.FromString(body)) == ["over http"]


def test_spans_go_over_otlp_grpc_when_the_protocol_says_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    # protoc's generated gRPC module is untyped.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        export_one_span(export_choice("traces", env), "over grpc")
    finally:
        server.stop(grace=None)
    assert [span_names(r) for r in received] == [["over grpc"]]


def test_importing_the_bus_loads_no_sdk_and_no_exporter() -> None:
    """The SDK and exporters load inside configure(): a CLI command pays nothing for them."""
    probe = (
        "import sys, shared.bus, shared.telemetry\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
        "'opentelemetry.exporter', 'grpc', 'google.protobuf'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]"
