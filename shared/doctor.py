"""`warden doctor`: check a running deployment against what Warden's guarantees rest on.

Each check yields a Finding: what was checked, whether it holds, what was seen, and how to fix
it. A `fail` breaks a guarantee (acked writes lost on power loss, a stream that can be purged,
a service nobody runs); a `warn` is worth a look but breaks none (a replica catching up).

Servers are checked through their monitoring endpoints (`/varz`): version, JetStream, and
`sync_interval: always`, which no client connection can see. Streams and consumers are checked
through JetStream against shared/topology.py, and services by pinging them (shared/liveness.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import anyio
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from shared import liveness, topology

Status = Literal["ok", "warn", "fail"]
MIN_PAYLOAD = 8 * 1024 * 1024


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Expectations:
    """What the deployment should look like: stream replicas, and the services that must run."""

    replicas: int = 1
    services: tuple[str, ...] = ()
    ping_timeout_s: float = 2.0
    http_timeout_s: float = 5.0


def _version_text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def _fetch_varz(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url.rstrip('/')}/varz", timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def server_findings(url: str, varz: dict[str, Any]) -> list[Finding]:
    """What one server's /varz says about the guarantees Warden needs from it."""
    name = f"server {varz.get('server_name') or url}"
    out: list[Finding] = []
    version = str(varz.get("version", "0"))
    if topology.parse_version(version) < topology.MIN_SERVER_VERSION:
        need = _version_text(topology.MIN_SERVER_VERSION)
        out.append(
            Finding(
                f"{name}: version",
                "fail",
                f"nats-server {version} is older than {need}",
                f"upgrade nats-server to {need} or newer (atomic batches, multi-filter consumers)",
            )
        )
    else:
        out.append(Finding(f"{name}: version", "ok", f"nats-server {version}"))
    js_config = (varz.get("jetstream") or {}).get("config")
    if not js_config:
        out.append(
            Finding(
                f"{name}: jetstream",
                "fail",
                "JetStream is not enabled",
                "add a `jetstream { store_dir: ..., sync_interval: always }` block (ops/nats/single.conf)",
            )
        )
        return out
    out.append(Finding(f"{name}: jetstream", "ok", f"store {js_config.get('store_dir', '?')}"))
    if js_config.get("sync_always"):
        out.append(Finding(f"{name}: sync_interval", "ok", "always: every acknowledged write is fsynced"))
    else:
        every = js_config.get("sync_interval")
        seconds = f"{every / 1e9:g}s" if isinstance(every, int | float) else "the default interval"
        out.append(
            Finding(
                f"{name}: sync_interval",
                "fail",
                f"writes are fsynced every {seconds}, not always: a power loss can lose acknowledged events",
                "set `sync_interval: always` in the server's jetstream block, remove any "
                "`persist_mode: async`, and restart the server (see ops/nats/)",
            )
        )
    payload = int(varz.get("max_payload", 0))
    if payload < MIN_PAYLOAD:
        out.append(
            Finding(
                f"{name}: max_payload",
                "warn",
                f"max_payload is {payload} bytes; Warden's configs use 8MB",
                "set `max_payload: 8MB` (larger proposals still go to the object store)",
            )
        )
    return out


async def check_servers(monitor_urls: Sequence[str], timeout: float = 5.0) -> list[Finding]:
    out: list[Finding] = []
    for url in monitor_urls:
        try:
            varz = await anyio.to_thread.run_sync(_fetch_varz, url, timeout)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            out.append(
                Finding(
                    f"server {url}",
                    "fail",
                    f"monitoring endpoint unreachable: {exc}",
                    "check the server runs with `http: PORT` and that --monitor names it",
                )
            )
            continue
        out.extend(server_findings(url, varz))
    return out


def _retention(config: js_api.StreamConfig) -> tuple[float, int, str]:
    """(max_age seconds, max_bytes, discard policy), unset read as the server's defaults
    (0: no age limit, -1: no size limit, discard old)."""
    discard = config.discard or js_api.DiscardPolicy.OLD
    max_bytes = config.max_bytes if config.max_bytes is not None and config.max_bytes >= 0 else -1
    return (round(config.max_age or 0.0, 3), max_bytes, str(getattr(discard, "value", discard)))


def describe_retention(max_age: float, max_bytes: int, discard: str) -> str:
    age = f"max_age {max_age:g}s" if max_age else "no max_age"
    size = f"max_bytes {max_bytes}" if max_bytes >= 0 else "no max_bytes"
    return f"{age}, {size}, discard {discard}"


def stream_findings(expected: js_api.StreamConfig, info: js_api.StreamInfo, replicas: int) -> list[Finding]:
    config = info.config
    name = f"stream {expected.name}"
    out: list[Finding] = []

    def fix_by_ensure(what: str) -> str:
        return (
            f"restart a Warden service with --replicas {replicas} (WARDEN_REPLICAS): it re-applies "
            f"{what}; or `nats stream edit {expected.name}`"
        )

    have_replicas = config.num_replicas or 1
    if have_replicas != replicas:
        out.append(
            Finding(
                f"{name}: replicas",
                "fail",
                f"{have_replicas} replica(s), expected {replicas}",
                fix_by_ensure("the replica count"),
            )
        )
    else:
        out.append(Finding(f"{name}: replicas", "ok", f"{have_replicas}"))
    for flag, label in (("deny_delete", "delete"), ("deny_purge", "purge")):
        if getattr(config, flag):
            out.append(Finding(f"{name}: {flag}", "ok", f"messages cannot be {label}d"))
        else:
            out.append(
                Finding(
                    f"{name}: {flag}",
                    "fail",
                    f"{flag} is off: stored events can be {label}d, yet projections track their sequences",
                    fix_by_ensure(flag),
                )
            )
    window = config.duplicate_window or 0.0
    want_window = expected.duplicate_window or topology.DUPLICATE_WINDOW_S
    if abs(window - want_window) > 0.001:
        out.append(
            Finding(
                f"{name}: duplicate_window",
                "fail",
                f"{window:g}s, expected {want_window:g}s (Nats-Msg-Id dedup of retried appends)",
                fix_by_ensure("the duplicate window"),
            )
        )
    else:
        out.append(Finding(f"{name}: duplicate_window", "ok", f"{window:g}s"))
    have_retention, want_retention = _retention(config), _retention(expected)
    if have_retention != want_retention:
        out.append(
            Finding(
                f"{name}: retention",
                "fail",
                f"{describe_retention(*have_retention)}, expected {describe_retention(*want_retention)}",
                fix_by_ensure("the retention bounds"),
            )
        )
    else:
        out.append(Finding(f"{name}: retention", "ok", describe_retention(*have_retention)))
    if expected.max_msgs_per_subject and expected.max_msgs_per_subject > 0:
        out.append(per_agent_finding(expected, config))
    if config.storage != js_api.StorageType.FILE:
        out.append(
            Finding(
                f"{name}: storage",
                "fail",
                f"{config.storage} storage does not survive a restart",
                "recreate the stream on file storage (it cannot be changed in place)",
            )
        )
    cluster = info.cluster
    if replicas > 1 and cluster is not None:
        if not cluster.leader:
            out.append(
                Finding(
                    f"{name}: leader",
                    "fail",
                    "no leader: writes are refused",
                    "bring a majority of the stream's servers back",
                )
            )
        lagging = [p.name for p in cluster.replicas or [] if p.offline or not p.current]
        if lagging:
            out.append(
                Finding(
                    f"{name}: peers",
                    "warn",
                    f"replica(s) {', '.join(str(n) for n in lagging)} offline or catching up",
                    "check those servers; a replica catches up by itself once reachable",
                )
            )
    return out


def per_agent_finding(expected: js_api.StreamConfig, config: js_api.StreamConfig) -> Finding:
    """The agent input stream's per-agent bound: its ring (messages kept per subject) times its
    largest message times the subjects one agent's credential may publish on."""
    name = f"stream {expected.name}: per-agent bound"
    have = (config.max_msgs_per_subject or -1, config.max_msg_size or -1)
    want = (expected.max_msgs_per_subject or -1, expected.max_msg_size or -1)
    if have != want:
        return Finding(
            name,
            "fail",
            f"max_msgs_per_subject {have[0]}, max_msg_size {have[1]}; expected {want[0]} and {want[1]}: "
            "one agent's inputs are not bounded as documented",
            "restart a Warden service: it re-applies the stream's limits from shared/topology.py "
            "(WARDEN_AGENT_INPUT_PER_SUBJECT)",
        )
    subjects = topology.agent_subjects_per_credential()
    bound = subjects * have[0] * (have[1] + topology.STORED_MESSAGE_OVERHEAD)
    return Finding(
        name,
        "ok",
        f"{have[0]} messages per subject x {have[1]} bytes x {subjects} subjects per agent credential: "
        f"one agent holds at most {bound / 2**20:.0f} MiB",
    )


async def check_streams(js: JetStreamContext, replicas: int) -> list[Finding]:
    out: list[Finding] = []
    for expected in topology.stream_configs(replicas):
        assert expected.name is not None
        try:
            info = await js.stream_info(expected.name)
        except NotFoundError:
            out.append(
                Finding(
                    f"stream {expected.name}",
                    "fail",
                    "missing",
                    "start a Warden service (`warden run scheduler`): it creates the streams",
                )
            )
            continue
        out.extend(stream_findings(expected, info, replicas))
    return out


def consumer_name(spec: topology.ConsumerSpec, stream: str) -> str:
    """How doctor names a durable: by its service, and by its stream when not the input stream."""
    return f"consumer {spec.durable}" + ("" if stream == topology.INPUT_STREAM else f" on {stream}")


def consumer_findings(
    spec: topology.ConsumerSpec, info: js_api.ConsumerInfo, stream: str = topology.INPUT_STREAM
) -> list[Finding]:
    config = info.config
    name = consumer_name(spec, stream)
    wrong: list[str] = []
    if config.backoff:
        # A backoff list silently replaces ack_wait (DESIGN.md): redelivery timing is not ours.
        wrong.append(f"backoff {config.backoff} overrides ack_wait")
    if abs((config.ack_wait or 0.0) - spec.ack_wait_s) > 0.001:
        wrong.append(f"ack_wait {config.ack_wait:g}s, expected {spec.ack_wait_s:g}s")
    if config.max_ack_pending != spec.max_ack_pending:
        wrong.append(f"max_ack_pending {config.max_ack_pending}, expected {spec.max_ack_pending}")
    if config.max_deliver != spec.max_deliver:
        wrong.append(f"max_deliver {config.max_deliver}, expected {spec.max_deliver}")
    have_filters = set(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))
    want_filters = set(topology.stream_filters(spec, stream))
    if have_filters != want_filters:
        wrong.append(f"filters {sorted(have_filters)}, expected {sorted(want_filters)}")
    if config.ack_policy != js_api.AckPolicy.EXPLICIT:
        wrong.append(f"ack policy {config.ack_policy}, expected explicit")
    if wrong:
        return [
            Finding(
                name,
                "fail",
                "; ".join(wrong),
                f"restart a Warden service: it re-applies consumer settings from shared/topology.py "
                f"(or `nats consumer edit {stream} {spec.durable}`)",
            )
        ]
    out = [
        Finding(
            name,
            "ok",
            f"ack_wait {spec.ack_wait_s:g}s, max_ack_pending {spec.max_ack_pending}, "
            f"{info.num_pending or 0} pending, {info.num_ack_pending or 0} in hand",
        )
    ]
    if (info.num_ack_pending or 0) >= spec.max_ack_pending:
        out.append(
            Finding(
                f"{name}: delivery",
                "warn",
                f"{info.num_ack_pending} unacknowledged messages reach max_ack_pending: delivery is stalled",
                f"look for a stuck {spec.durable} handler (its logs), or run another replica",
            )
        )
    return out


async def check_consumers(js: JetStreamContext) -> list[Finding]:
    out: list[Finding] = []
    for spec in topology.CONSUMERS:
        for stream in topology.consumer_streams(spec):
            try:
                info = await js.consumer_info(stream, spec.durable)
            except NotFoundError:
                out.append(
                    Finding(
                        consumer_name(spec, stream),
                        "fail",
                        "missing",
                        "start a Warden service (`warden run scheduler`): it creates every consumer",
                    )
                )
                continue
            out.extend(consumer_findings(spec, info, stream))
    return out


async def check_services(nc: Client, services: Sequence[str], timeout: float = 2.0) -> list[Finding]:
    answers: dict[str, dict[str, Any] | None] = {}

    async def one(name: str) -> None:
        answers[name] = await liveness.ping(nc, name, timeout)

    async with anyio.create_task_group() as tg:
        for name in services:
            tg.start_soon(one, name)
    out: list[Finding] = []
    for name in services:
        answer = answers.get(name)
        if answer is None:
            out.append(
                Finding(
                    f"service {name}",
                    "fail",
                    f"no replica answered a ping within {timeout:g}s",
                    f"start it (`warden run {name}`, or `warden up`) and check its logs",
                )
            )
        else:
            meta = answer.get("metadata") or {}
            where = f"{meta.get('host', '?')} pid {meta.get('pid', '?')}"
            out.append(Finding(f"service {name}", "ok", f"alive ({where}, version {answer.get('version')})"))
    return out


def connected_server_findings(nc: Client) -> list[Finding]:
    """Without a monitoring URL, the version is all a client connection can see."""
    version = str(nc.connected_server_version)
    found = [
        Finding(
            "server (connected)",
            "ok" if topology.parse_version(version) >= topology.MIN_SERVER_VERSION else "fail",
            f"nats-server {version}",
            "" if topology.parse_version(version) >= topology.MIN_SERVER_VERSION else "upgrade nats-server",
        ),
        Finding(
            "server: sync_interval",
            "warn",
            "not checked: a client connection cannot see it",
            "pass --monitor http://HOST:8222 for every server (WARDEN_MONITOR_URLS)",
        ),
    ]
    return found


async def diagnose(nc: Client | None, monitor_urls: Sequence[str], expect: Expectations) -> list[Finding]:
    """Every check that can run: servers through monitoring, the rest through the connection."""
    out: list[Finding] = []
    if monitor_urls:
        out.extend(await check_servers(monitor_urls, expect.http_timeout_s))
    if nc is None:
        return out
    if not monitor_urls:
        out.extend(connected_server_findings(nc))
    js = nc.jetstream()
    out.extend(await check_streams(js, expect.replicas))
    out.extend(await check_consumers(js))
    if expect.services:
        out.extend(await check_services(nc, expect.services, expect.ping_timeout_s))
    return out


def healthy(findings: Sequence[Finding]) -> bool:
    return all(f.ok for f in findings)
