"""What each credential cannot do, tried against a server started from ops/nats/single.conf with
the deployed users file and agents added by `warden creds add-agent`.

Every attempt below is one a hostile agent or a careless (or stolen) operator credential would
make; each is refused by the server itself (a permission violation, or the stream's own
settings), and afterwards the stored payloads, streams and consumers are exactly as before.
tests/test_credentials.py shows the agent's own work and the refusals on the event and input
streams; this file covers payloads, the operator credential, `warden creds list`, the operator's
inbox prefix and the input stream's retention.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner
from nats.aio.client import Client
from nats.js import api as js_api
from nats.js.errors import APIError

from services.cli.creds import creds
from services.cli.doctor import doctor_command
from shared import bus, credentials, proposals, topology
from shared.forensics import log
from shared.sdk import connect_agent
from tests import opsnats
from tests.harness import running
from tests.test_credentials import add_agent

BUCKET = topology.PAYLOAD_BUCKET
PAYLOADS = topology.PAYLOAD_STREAM


def meta_subject(name: str) -> str:
    """Where the object store keeps an object's metadata."""
    return f"$O.{BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


async def refused_request(nc: Client, subject: str, body: Any = None) -> None:
    """A request (a JetStream API call) that the server must refuse to this connection."""
    data = b"" if body is None else json.dumps(body).encode()
    with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="publish"), bus.refused(nc, subject):
        await nc.request(subject, data, timeout=30)


async def refused_publish(
    nc: Client, subject: str, data: bytes, headers: dict[str, str] | None = None
) -> None:
    """A JetStream publish (waiting for the stream's ack) that the server must refuse."""
    with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="publish"), bus.refused(nc, subject):
        await nc.jetstream().publish(subject, data, headers=headers, timeout=30)


async def refused_subscribe(nc: Client, subject: str) -> None:
    """A subscription the server must refuse (the refusal ends the wait)."""
    with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="subscription"):
        await _subscribe_until_refused(nc, subject)


async def _subscribe_until_refused(nc: Client, subject: str) -> None:
    with bus.refused(nc, subject):
        await nc.subscribe(subject)
        await anyio.sleep_forever()  # ended by the refusal, which raises PermissionDenied


async def stream_state(nc: Client, stream: str) -> tuple[int, int, int, int]:
    state = (await nc.jetstream().stream_info(stream)).state
    return (state.messages, state.bytes, state.first_seq, state.last_seq)


@dataclass
class PayloadScene:
    """Alice's and Mallory's payloads, uploaded by each agent and stored as the checker does."""

    service: Client
    mallory: Client
    objects: dict[str, bytes] = field(default_factory=dict)  # object name -> bytes
    chunks: dict[str, list[int]] = field(default_factory=dict)  # agent -> input sequences
    before: dict[str, Any] = field(default_factory=dict)

    def name_of(self, agent: str) -> str:
        return next(n for n in self.objects if n.startswith(f"{agent}/"))

    async def snapshot(self) -> dict[str, Any]:
        js = self.service.jetstream()
        store = await js.object_store(BUCKET)
        chunk_seqs = [s for seqs in self.chunks.values() for s in seqs]
        chunks = await log.get_many(js, topology.AGENT_INPUT_STREAM, chunk_seqs)
        return {
            "objects": {name: (await store.get(name)).data for name in self.objects},
            "chunks": {seq: chunks[seq].data for seq in chunk_seqs},
            "payload stream": await stream_state(self.service, PAYLOADS),
            "input stream": await stream_state(self.service, topology.INPUT_STREAM),
            "agent input stream": await stream_state(self.service, topology.AGENT_INPUT_STREAM),
        }

    async def assert_untouched(self) -> None:
        after = await self.snapshot()
        assert after == self.before
        assert after["objects"] == self.objects, "a stored payload's bytes changed"


@asynccontextmanager
async def payload_scene(node: opsnats.OpsServer) -> AsyncIterator[PayloadScene]:
    url = node.server.url
    passwords = {name: add_agent(node, name) for name in ("alice", "mallory")}
    async with opsnats.connected(url, **opsnats.service_credentials()) as service:
        js = service.jetstream()
        await topology.ensure(js, str(service.connected_server_version))
        scene_objects: dict[str, bytes] = {}
        scene_chunks: dict[str, list[int]] = {}
        for agent, password in passwords.items():
            data = f"{agent}'s payload, ".encode() * 160_000  # several chunks of each kind
            nc = await connect_agent(url, agent, user=credentials.agent_user(agent), password=password)
            try:
                upload = await proposals.upload(nc.jetstream(), agent, data)
            finally:
                await nc.close()
            assert len(upload.chunks) > 1
            name = topology.payload_object_name(agent, uuid.uuid4(), 1, upload.sha256)
            await proposals.put_object(js, name, data)  # what the checker does with the chunks
            scene_objects[name] = data
            scene_chunks[agent] = upload.chunks
        mallory = await connect_agent(
            url, "mallory", user=credentials.agent_user("mallory"), password=passwords["mallory"]
        )
        try:
            scene = PayloadScene(service, mallory, scene_objects, scene_chunks)
            scene.before = await scene.snapshot()
            yield scene
        finally:
            await mallory.close()


# --- 1. payloads: an agent can neither read, list, alter, roll up nor delete any -------------


async def test_an_agent_cannot_list_the_stored_payloads_or_another_agents_chunks(
    ops_server: opsnats.OpsServer,
) -> None:
    async with payload_scene(ops_server) as scene:
        nc = scene.mallory
        for subject, body in (
            (f"$JS.API.STREAM.INFO.{PAYLOADS}", {"subjects_filter": f"$O.{BUCKET}.M.>"}),
            (
                f"$JS.API.STREAM.INFO.{topology.AGENT_INPUT_STREAM}",
                {"subjects_filter": "warden.in.agent.*.payload"},
            ),
            ("$JS.API.STREAM.NAMES", {}),
            ("$JS.API.STREAM.LIST", {}),
            (
                f"$JS.API.CONSUMER.CREATE.{PAYLOADS}",
                {
                    "stream_name": PAYLOADS,
                    "config": {
                        "filter_subject": f"$O.{BUCKET}.M.>",
                        "deliver_policy": "last_per_subject",
                        "ack_policy": "none",
                    },
                },
            ),
            (f"$JS.API.CONSUMER.CREATE.{PAYLOADS}.peek.$O.{BUCKET}.M.>", {"stream_name": PAYLOADS}),
            (f"$JS.API.CONSUMER.LIST.{PAYLOADS}", {}),
        ):
            await refused_request(nc, subject, body)
        # Nor by listening: neither the bucket's subjects nor another agent's uploads in flight.
        for subject in (f"$O.{BUCKET}.>", topology.payload_subject("alice"), f"{topology.INPUT_ROOT}.>"):
            await refused_subscribe(nc, subject)
        await scene.assert_untouched()


async def test_an_agent_cannot_read_any_stored_payload_nor_another_agents_chunks(
    ops_server: opsnats.OpsServer,
) -> None:
    async with payload_scene(ops_server) as scene:
        nc = scene.mallory
        alice, own = meta_subject(scene.name_of("alice")), meta_subject(scene.name_of("mallory"))
        for subject, body in (
            (f"$JS.API.DIRECT.GET.{PAYLOADS}.{alice}", None),  # the object store's get-by-name
            (f"$JS.API.DIRECT.GET.{PAYLOADS}.{own}", None),  # not even its own, once stored
            (f"$JS.API.DIRECT.GET.{PAYLOADS}", {"seq": 1}),
            (f"$JS.API.DIRECT.GET.{PAYLOADS}", {"seq": 1, "next_by_subj": ">", "batch": 100}),
            (f"$JS.API.STREAM.MSG.GET.{PAYLOADS}", {"last_by_subj": alice}),
            (f"$JS.API.DIRECT.GET.{topology.AGENT_INPUT_STREAM}", {"seq": scene.chunks["alice"][0]}),
            (f"$JS.API.DIRECT.GET.{topology.AGENT_INPUT_STREAM}.{topology.payload_subject('alice')}", None),
        ):
            await refused_request(nc, subject, body)
        # The client library's object store refuses at its first call (the bucket's info).
        info = f"$JS.API.STREAM.INFO.{PAYLOADS}"
        with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="publish"), bus.refused(nc, info):
            await nc.jetstream().object_store(BUCKET)
        await scene.assert_untouched()


async def test_an_agent_cannot_alter_a_stored_payloads_metadata_or_chunks(
    ops_server: opsnats.OpsServer,
) -> None:
    async with payload_scene(ops_server) as scene:
        nc = scene.mallory
        for agent in ("alice", "mallory"):
            name = scene.name_of(agent)
            # What the client library's delete writes: the metadata marked deleted, no chunks.
            deleted = {"name": name, "bucket": BUCKET, "nuid": "x", "size": 0, "chunks": 0, "deleted": True}
            await refused_publish(nc, meta_subject(name), json.dumps(deleted).encode())
        await refused_publish(nc, f"$O.{BUCKET}.C.{uuid.uuid4().hex}", b"forged chunk")
        await scene.assert_untouched()


async def test_a_rollup_is_refused_to_an_agent_by_its_permissions_and_to_anyone_by_the_streams(
    ops_server: opsnats.OpsServer,
) -> None:
    async with payload_scene(ops_server) as scene:
        nc = scene.mallory
        for rollup in ("all", "sub"):
            await refused_publish(nc, f"$O.{BUCKET}.C.{uuid.uuid4().hex}", b"", {"Nats-Rollup": rollup})
            await refused_publish(nc, meta_subject(scene.name_of("alice")), b"{}", {"Nats-Rollup": rollup})
            # On its own payload subject the agent may publish, but the input stream takes no
            # rollup: stored inputs (other agents' chunks among them) are never wiped.
            with anyio.fail_after(5), pytest.raises(APIError, match="rollup"):
                await nc.jetstream().publish(
                    topology.payload_subject("mallory"), b"", headers={"Nats-Rollup": rollup}, timeout=30
                )
        # The service credential (the checker's) may write the bucket, but the bucket takes none.
        for subject in (f"$O.{BUCKET}.C.{uuid.uuid4().hex}", meta_subject(scene.name_of("alice"))):
            with anyio.fail_after(5), pytest.raises(APIError, match="rollup"):
                await scene.service.jetstream().publish(subject, b"{}", headers={"Nats-Rollup": "all"})
        await scene.assert_untouched()


async def test_an_agent_cannot_delete_purge_or_shrink_the_payload_bucket_or_its_chunks(
    ops_server: opsnats.OpsServer,
) -> None:
    async with payload_scene(ops_server) as scene:
        nc = scene.mallory
        config = (await scene.service.jetstream().stream_info(PAYLOADS)).config.as_dict()
        for subject, body in (
            (f"$JS.API.STREAM.MSG.DELETE.{PAYLOADS}", {"seq": 1}),
            (f"$JS.API.STREAM.PURGE.{PAYLOADS}", {"filter": meta_subject(scene.name_of("alice"))}),
            (f"$JS.API.STREAM.PURGE.{PAYLOADS}", {}),
            (f"$JS.API.STREAM.DELETE.{PAYLOADS}", None),
            (f"$JS.API.STREAM.UPDATE.{PAYLOADS}", {**config, "max_msgs": 1, "discard": "old"}),
            (f"$JS.API.STREAM.MSG.DELETE.{topology.AGENT_INPUT_STREAM}", {"seq": scene.chunks["alice"][0]}),
        ):
            await refused_request(nc, subject, body)
        await scene.assert_untouched()


# --- 2. the operator credential: submit, command, read; and nothing that changes the topology --


def _cli_env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            credentials.USER_ENV: credentials.OPERATOR_USER,
            credentials.PASSWORD_ENV: opsnats.OPERATOR_PASSWORD,
            "WARDEN_NATS_URL": url,
        }
    )
    return env


async def warden(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`warden ARGS` in its own process with the operator credential (in a thread, so the
    services on this loop keep answering)."""
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=_cli_env(url),
        )
    )


@pytest.fixture
def as_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Services started in this process connect as warden-service, as deployed."""
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)


async def test_the_operator_credential_submits_cancels_and_reads_with_the_warden_cli(
    ops_server: opsnats.OpsServer, as_service: None
) -> None:
    url = ops_server.server.url
    async with running(url, ["scheduler", "reconciler"]):
        submitted = await warden(url, "submit", "--kind", "nightly", "--json")
        assert submitted.returncode == 0, submitted.stderr
        job_id = json.loads(submitted.stdout)["job_id"]
        cancelled = await warden(url, "cancel", job_id, "--reason", "fence test", "--operator", "olga")
        assert cancelled.returncode == 0, cancelled.stderr
        # Reading: the job's story from both streams (the request is read from the input
        # stream by direct gets), and the revocation figures (every agent's inputs).
        explained = await warden(url, "explain", job_id, "--json")
        assert explained.returncode == 0, explained.stderr
        assert job_id in explained.stdout and "olga" in explained.stdout
        revocations = await warden(url, "revocations", "--json")
        assert revocations.returncode == 0, revocations.stderr


async def test_the_operator_credential_cannot_pause_resume_delete_or_pull_from_any_services_consumer(
    ops_server: opsnats.OpsServer,
) -> None:
    url = ops_server.server.url
    async with (
        opsnats.connected(url, **opsnats.service_credentials()) as service,
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        await topology.ensure(service.jetstream(), str(service.connected_server_version))
        before = await consumer_states(service)
        for spec, stream in durables():
            name = spec.durable
            for subject, body in (
                (f"$JS.API.CONSUMER.PAUSE.{stream}.{name}", {"pause_until": "2099-01-01T00:00:00Z"}),
                (f"$JS.API.CONSUMER.PAUSE.{stream}.{name}", {}),  # resume
                (f"$JS.API.CONSUMER.DELETE.{stream}.{name}", None),
                (f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", {"batch": 1, "expires": 1_000_000_000}),
                (f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{name}", None),
                (f"$JS.API.CONSUMER.UNPIN.{stream}.{name}", {"group": "g"}),
                (f"$JS.API.CONSUMER.LIST.{stream}", {}),
                (f"$JS.API.CONSUMER.NAMES.{stream}", {}),
            ):
                await refused_request(operator, subject, body)
        # What operators are for: the consumers' state, for `warden status`.
        scheduler = topology.SCHEDULER_CONSUMER
        for stream in topology.consumer_streams(scheduler):
            info = await operator.jetstream().consumer_info(stream, scheduler.durable)
            assert info.config.filter_subjects == list(topology.stream_filters(scheduler, stream))
        assert await consumer_states(service) == before


def durables() -> list[tuple[topology.ConsumerSpec, str]]:
    """Every service durable and the input stream it is on (a spec may have one on each)."""
    return [(spec, stream) for spec in topology.CONSUMERS for stream in topology.consumer_streams(spec)]


async def consumer_states(nc: Client) -> dict[tuple[str, str], dict[str, Any]]:
    """Every service durable as the server reports it: its whole configuration and pause state."""
    out = {}
    for spec, stream in durables():
        reply = await nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{spec.durable}", b"", timeout=5)
        info = json.loads(reply.data)
        assert "error" not in info, info
        out[(stream, spec.durable)] = {
            "config": info["config"],
            "paused": info.get("paused", False),
            "created": info["created"],
        }
    return out


async def test_the_operator_credential_cannot_create_a_consumer_on_the_input_stream_named_or_not(
    ops_server: opsnats.OpsServer,
) -> None:
    """A create request names its consumer in its body: `{"name": "scheduler"}` on the legacy
    subject rewrote the scheduler's durable (its filters gone, its limits reset) until the
    operator's permission refused every consumer create on the input stream."""
    url = ops_server.server.url
    async with (
        opsnats.connected(url, **opsnats.service_credentials()) as service,
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        await topology.ensure(service.jetstream(), str(service.connected_server_version))
        before = await consumer_states(service)
        for spec, stream in durables():
            rewrite = {"name": spec.durable, "ack_policy": "explicit", "max_ack_pending": 1}
            for subject, body in (
                (f"$JS.API.CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": rewrite}),
                (
                    f"$JS.API.CONSUMER.CREATE.{stream}.{spec.durable}",
                    {"stream_name": stream, "config": rewrite},
                ),
                (
                    f"$JS.API.CONSUMER.CREATE.{stream}.{spec.durable}.{topology.REQUEST_SUBJECT}",
                    {"stream_name": stream, "config": rewrite},
                ),
                (
                    f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{spec.durable}",
                    {"stream_name": stream, "config": {**rewrite, "durable_name": spec.durable}},
                ),
            ):
                await refused_request(operator, subject, body)
        # Not even an ephemeral reader: the client library's ordered consumer is refused too.
        for stream, subject in (
            (topology.INPUT_STREAM, topology.REQUEST_SUBJECT),
            (topology.AGENT_INPUT_STREAM, topology.agent_subject_all("claim")),
        ):
            create = f"$JS.API.CONSUMER.CREATE.{stream}"
            with (
                anyio.fail_after(5),
                pytest.raises(bus.PermissionDenied, match="publish"),
                bus.refused(operator, create),
            ):
                await operator.jetstream().subscribe(subject, stream=stream, ordered_consumer=True)
        assert await consumer_states(service) == before
        # Operators still read the input streams, by direct gets.
        stream = topology.INPUT_STREAM
        ack = await operator.jetstream().publish(topology.REQUEST_SUBJECT, b'{"kind": "k"}')
        [request] = await log.scan(operator.jetstream(), stream, topology.REQUEST_SUBJECT)
        assert (request.seq, request.data) == (ack.seq, b'{"kind": "k"}')


async def test_the_operator_credential_cannot_update_delete_or_purge_a_stream_nor_change_a_bucket(
    ops_server: opsnats.OpsServer,
) -> None:
    url = ops_server.server.url
    streams = (topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM, topology.EVENT_STREAM, PAYLOADS)
    async with (
        opsnats.connected(url, **opsnats.service_credentials()) as service,
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        js = service.jetstream()
        await topology.ensure(js, str(service.connected_server_version))
        await proposals.put_object(js, "alice/x/1/y", b"a payload")

        async def record() -> dict[str, Any]:
            out = {}
            for name in streams:
                info = await js.stream_info(name)
                out[name] = (info.config.as_dict(), await stream_state(service, name))
            return out

        before = await record()
        for name in streams:
            config = before[name][0]
            for subject, body in (
                (f"$JS.API.STREAM.UPDATE.{name}", {**config, "deny_delete": False, "deny_purge": False}),
                (f"$JS.API.STREAM.UPDATE.{name}", {**config, "max_msgs": 1, "discard": "old"}),
                (f"$JS.API.STREAM.DELETE.{name}", None),
                (f"$JS.API.STREAM.PURGE.{name}", {}),
                (f"$JS.API.STREAM.MSG.DELETE.{name}", {"seq": 1}),
                (f"$JS.API.STREAM.SNAPSHOT.{name}", {"deliver_subject": "_INBOX.~operator.snap"}),
                (f"$JS.API.STREAM.LEADER.STEPDOWN.{name}", None),
            ):
                await refused_request(operator, subject, body)
        # No new streams or buckets, and no writing into a bucket.
        for subject, body in (
            ("$JS.API.STREAM.CREATE.KV_EVIL", {"name": "KV_EVIL", "subjects": ["$KV.EVIL.>"]}),
            ("$JS.API.STREAM.CREATE.OBJ_EVIL", {"name": "OBJ_EVIL", "subjects": ["$O.EVIL.>"]}),
            (f"$JS.API.STREAM.RESTORE.{PAYLOADS}", {"config": before[PAYLOADS][0]}),
        ):
            await refused_request(operator, subject, body)
        await refused_publish(operator, meta_subject("alice/x/1/y"), b'{"deleted": true}')
        await refused_publish(operator, f"$O.{BUCKET}.C.{uuid.uuid4().hex}", b"forged")
        await refused_publish(operator, "$KV.EVIL.key", b"value")
        assert await record() == before


# --- 3. `warden creds list` --------------------------------------------------------------------


def test_warden_creds_list_says_what_each_kind_of_credential_may_and_may_not_do(tmp_path: Path) -> None:
    users = tmp_path / "users.conf"
    credentials.add_agent(users, "fixer", rounds=4)
    args = ["list", "--users-file", str(users), "--data-dir", str(tmp_path / "data")]
    listed = CliRunner().invoke(creds, [*args, "--json"])
    assert listed.exit_code == 0, listed.output
    by_user = {e["user"]: e for e in json.loads(listed.output) if "user" in e}
    assert {u: e["kind"] for u, e in by_user.items()} == {
        credentials.SERVICE_USER: "service",
        credentials.OPERATOR_USER: "operator",
        credentials.agent_user("fixer"): "agent",
    }
    operator = by_user[credentials.OPERATOR_USER]
    assert operator["permissions"] == credentials.operator_permissions().to_conf()
    may, may_not = " / ".join(operator["may"]), " / ".join(operator["may_not"])
    assert "submit jobs" in may and "operator commands" in may and "read every stream" in may
    assert "pause, resume, delete, pull from" in may_not
    assert "create, change, delete or purge streams or buckets" in may_not
    assert f"create a consumer on {topology.INPUT_STREAM}" in may_not
    agent = by_user[credentials.agent_user("fixer")]
    assert agent["permissions"] == credentials.agent_permissions("fixer").to_conf()
    assert any("read, list, alter, roll up or delete" in line for line in agent["may_not"])
    assert all(e["may"] and e["may_not"] for e in by_user.values())

    text = CliRunner().invoke(creds, args)
    assert text.exit_code == 0, text.output
    block = text.output.split(f"{credentials.OPERATOR_USER}  (operator")[1].split("\n\n")[0]
    assert "may:       give operator commands" in block
    assert f"may not:   create a consumer on {topology.INPUT_STREAM}" in block


# --- 5. the operator hears only its own replies --------------------------------------------------


async def test_the_operator_hears_replies_only_under_its_own_prefix_never_an_agents_lease_grant(
    ops_server: opsnats.OpsServer,
) -> None:
    url = ops_server.server.url
    password = add_agent(ops_server, "mallory")
    async with (
        opsnats.connected(url, **opsnats.service_credentials()) as service,
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        await topology.ensure(service.jetstream(), str(service.connected_server_version))
        # bus.connect gives the operator's user its prefix, so a request is answered there.
        assert bytes(operator._inbox_prefix).decode() == topology.OPERATOR_INBOX_PREFIX
        assert operator.new_inbox().startswith(f"{topology.OPERATOR_INBOX_PREFIX}.")
        await refused_subscribe(operator, "_INBOX.>")  # every connection's replies
        await refused_subscribe(operator, f"{topology.reply_inbox_prefix('alice')}.>")  # an agent's grants
        await refused_subscribe(operator, "_INBOX.abcdefgh")  # a service's consumer deliveries
        # And no agent hears the operator's replies.
        agent = await connect_agent(url, "mallory", user=credentials.agent_user("mallory"), password=password)
        try:
            await refused_subscribe(agent, f"{topology.OPERATOR_INBOX_PREFIX}.>")
        finally:
            await agent.close()
    with pytest.raises(topology.BadAgentName):  # no agent can ever own the operator's prefix
        topology.check_agent_name(topology.OPERATOR_INBOX_PREFIX.split(".", 1)[1])


# --- 4. the input stream's retention -------------------------------------------------------------


def test_the_duplicate_window_is_never_longer_than_what_a_stream_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WARDEN_INPUT_MAX_AGE_S", "45")
    configs = {c.name: c for c in topology.stream_configs()}
    assert configs[topology.INPUT_STREAM].duplicate_window == 45
    assert configs[topology.EVENT_STREAM].duplicate_window == topology.DUPLICATE_WINDOW_S
    monkeypatch.setenv("WARDEN_INPUT_MAX_AGE_S", str(7 * 24 * 3600))
    configs = {c.name: c for c in topology.stream_configs()}
    assert configs[topology.INPUT_STREAM].duplicate_window == topology.DUPLICATE_WINDOW_S


def run_doctor(node: opsnats.OpsServer) -> dict[str, dict[str, str]]:
    result = CliRunner().invoke(
        doctor_command,
        [
            "--nats",
            node.server.url,
            "--monitor",
            node.server.monitor_url,
            "--user",
            credentials.OPERATOR_USER,
            "--password",
            opsnats.OPERATOR_PASSWORD,
            "--json",
        ],
    )
    report = json.loads(result.output)
    return {f["check"]: f for f in report["findings"]}


async def test_the_input_streams_bounds_are_as_configured_and_warden_doctor_reports_and_checks_them(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_INPUT_MAX_AGE_S", "60")  # shorter than the 120 s dedup window
    monkeypatch.setenv("WARDEN_INPUT_MAX_BYTES", str(8 * 1024 * 1024))
    url = ops_server.server.url
    async with opsnats.connected(url, **opsnats.service_credentials()) as service:
        js = service.jetstream()
        await topology.ensure(js, str(service.connected_server_version))  # the server takes it
        config = (await js.stream_info(topology.INPUT_STREAM)).config
        assert (config.max_age, config.max_bytes, config.discard) == (
            60,
            8 * 1024 * 1024,
            js_api.DiscardPolicy.NEW,
        )
        assert config.duplicate_window == 60

        checks = await anyio.to_thread.run_sync(run_doctor, ops_server)
        retention = checks[f"stream {topology.INPUT_STREAM}: retention"]
        assert retention["status"] == "ok"
        assert retention["detail"] == f"max_age 60s, max_bytes {8 * 1024 * 1024}, discard new"
        window = checks[f"stream {topology.INPUT_STREAM}: duplicate_window"]
        assert (window["status"], window["detail"]) == ("ok", "60s")
        events = checks[f"stream {topology.EVENT_STREAM}: retention"]
        assert (events["status"], events["detail"]) == ("ok", "no max_age, no max_bytes, discard old")
        per_agent = checks[f"stream {topology.AGENT_INPUT_STREAM}: per-agent bound"]
        assert per_agent["status"] == "ok"
        assert per_agent["detail"].endswith(
            f"one agent holds at most {topology.agent_input_bound() / 2**20:.0f} MiB"
        )
        assert checks[f"consumer scheduler on {topology.AGENT_INPUT_STREAM}"]["status"] == "ok"

        # Someone loosens the bounds by hand: doctor names what it found and what it expects.
        config.max_age, config.discard, config.duplicate_window = 3600, js_api.DiscardPolicy.OLD, 120
        await js.update_stream(config)
        checks = await anyio.to_thread.run_sync(run_doctor, ops_server)
        retention = checks[f"stream {topology.INPUT_STREAM}: retention"]
        assert retention["status"] == "fail"
        assert retention["detail"] == (
            f"max_age 3600s, max_bytes {8 * 1024 * 1024}, discard old, "
            f"expected max_age 60s, max_bytes {8 * 1024 * 1024}, discard new"
        )
        assert checks[f"stream {topology.INPUT_STREAM}: duplicate_window"]["detail"].startswith(
            "120s, expected 60s"
        )
        # And someone widens the agent stream's ring: the per-agent bound no longer holds.
        agent = (await js.stream_info(topology.AGENT_INPUT_STREAM)).config
        agent.max_msgs_per_subject = 10_000
        await js.update_stream(agent)
        checks = await anyio.to_thread.run_sync(run_doctor, ops_server)
        widened = checks[f"stream {topology.AGENT_INPUT_STREAM}: per-agent bound"]
        assert widened["status"] == "fail" and "max_msgs_per_subject 10000" in widened["detail"]


async def test_a_full_input_stream_refuses_new_inputs_and_keeps_every_stored_one(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARDEN_INPUT_MAX_BYTES", str(64 * 1024))
    url = ops_server.server.url
    async with opsnats.connected(url, **opsnats.service_credentials()) as service:
        js = service.jetstream()
        await topology.ensure(js, str(service.connected_server_version))
        stored: dict[int, bytes] = {}

        async def fill() -> None:
            for i in range(1000):  # far more than 64 KiB
                body = f"{i:04d}".encode() * 256
                stored[(await js.publish(topology.REQUEST_SUBJECT, body)).seq] = body

        with anyio.fail_after(30), pytest.raises(APIError, match="maximum bytes"):
            await fill()
        assert 10 < len(stored) < 1000
        # Discard new: nothing stored before was dropped to make room.
        kept = await log.get_many(js, topology.INPUT_STREAM, stored)
        assert {seq: r.data for seq, r in kept.items()} == stored
        assert (await js.stream_info(topology.INPUT_STREAM)).state.first_seq == 1
