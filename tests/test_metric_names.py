"""Every metric the Grafana dashboard queries is scraped under that name with the labels it uses.

The names come from a real scrape: a fresh process configures telemetry as a service does,
records each shared instrument once with its declared labels, registers the read model's gauges,
and prints what /metrics would serve (the Prometheus exporter appends units, so a name is only
known once exported). The labels come from the services' own call sites (read from the source),
so a dashboard grouping by a label no service sets fails here.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shared.telemetry import INSTRUMENTS

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "warden.json"
SCRAPE = textwrap.dedent(
    """
    from prometheus_client import generate_latest
    from services.api import metrics as readmodel_metrics
    from shared import telemetry

    telemetry.configure("probe", exporter="none")
    made = telemetry.instruments()
    for attr, declared in telemetry.INSTRUMENTS.items():
        labels = {label: "x" for label in declared.labels}
        instrument = getattr(made, attr)
        (instrument.record if hasattr(instrument, "record") else instrument.add)(1, labels)
    one = {"x": 1}
    readmodel_metrics.register(lambda: {
        "position": 1, "jobs": {"by_state": one}, "agents": {"by_level": one},
        "detection_latency_ms": {"p50": 1.0, "p99": 2.0}, "failures": one,
        "revocations": {"by_kind": one}, "decisions": one,
    })
    print(generate_latest().decode())
    """
)
# Labels the exporter adds to every sample, and the histogram bucket bound.
NOT_OURS = re.compile(r"^(otel_|service_|job$|instance$|le$)")


def _scraped() -> dict[str, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", SCRAPE], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(done.stdout):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def _queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every target of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels
        for target in panel.get("targets", [])
    ]


def _labels_used(expr: str, legend: str) -> set[str]:
    grouped = {
        label.strip()
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
    }
    selected = set(re.findall(r"[{,]\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", expr))
    legends = set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend))
    return {label for label in grouped | selected | legends if label and label != "le"}


def test_every_dashboard_query_names_a_scraped_metric_and_only_its_labels() -> None:
    scraped = _scraped()
    problems = []
    for title, expr, legend in _queries():
        names = set(re.findall(r"\bwarden_[a-z0-9_]+\b", expr))
        assert names, f"{title}: {expr} queries no warden metric"
        missing = sorted(names - scraped.keys())
        if missing:
            problems.append(f"{title}: {missing} not scraped")
            continue
        labels = set().union(*(scraped[n] for n in names))
        unknown = sorted(_labels_used(expr, legend) - labels)
        if unknown:
            problems.append(f"{title}: labels {unknown} not on {sorted(names)} (it has {sorted(labels)})")
    assert problems == []


def test_no_exported_name_repeats_its_unit_and_the_latencies_are_in_milliseconds() -> None:
    scraped = _scraped()
    ours = [name for name in scraped if name.startswith("warden_")]
    assert [name for name in ours if re.search(r"_ms_|_ms$", name)] == []
    assert "warden_revocation_latency_milliseconds_bucket" in scraped
    assert "warden_detection_latency_milliseconds_bucket" in scraped
    decision_labels = {label for label in scraped["warden_decisions_total"] if not NOT_OURS.match(label)}
    assert decision_labels == {"decision"}


def _recorded_labels() -> dict[str, set[str]]:
    """Per instrument (Metrics attribute), the attribute keys its call sites record with."""
    found: dict[str, set[str]] = {attr: set() for attr in INSTRUMENTS}
    for path in [*(ROOT / "services").rglob("*.py"), *(ROOT / "shared").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            target = node.func.value
            if node.func.attr not in ("add", "record") or not isinstance(target, ast.Attribute):
                continue
            if target.attr not in INSTRUMENTS or len(node.args) < 2:
                continue
            attributes = node.args[1]
            assert isinstance(attributes, ast.Dict), f"{path}:{node.lineno}: attributes not a dict literal"
            for key in attributes.keys:
                assert isinstance(key, ast.Constant), f"{path}:{node.lineno}: a computed label name"
                found[target.attr].add(str(key.value))
    return found


def test_each_instrument_declares_exactly_the_labels_its_call_sites_record() -> None:
    recorded = _recorded_labels()
    assert recorded["decisions"] == {"decision"}  # the call sites were found at all
    assert {attr: set(declared.labels) for attr, declared in INSTRUMENTS.items()} == recorded
