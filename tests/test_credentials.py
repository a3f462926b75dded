"""Per-agent credentials on a server started from ops/nats/single.conf: an agent can do its own
job on the wire and nothing else, and every refusal comes from the server, not from convention."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import anyio
import bcrypt
import msgspec
import pytest
from click.testing import CliRunner
from nats.aio.client import Client

from services.cli.creds import creds
from shared import bus, credentials, topology
from shared.contract import Contract, Stopping
from shared.messages import Accepted, Claim, JobRequest, OperatorCommand
from shared.sdk import AgentClient, JobContext, connect_agent
from tests import opsnats
from tests.harness import running, submit


def add_agent(node: opsnats.OpsServer, name: str) -> str:
    """`warden creds add-agent NAME --reload-pid PID`, as an operator runs it; its password."""
    assert node.server.process is not None
    before = node.server.log_path.read_text().count(opsnats.RELOADED)
    result = CliRunner().invoke(
        creds,
        [
            "add-agent",
            name,
            "--users-file",
            str(node.users_file),
            "--reload-pid",
            str(node.server.process.pid),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    opsnats.wait_for_log(node.server, opsnats.RELOADED, 10, after=before)
    out = json.loads(result.output)
    assert out["user"] == credentials.agent_user(name)
    return str(out["password"])


async def api_request(nc: Client, subject: str) -> None:
    """A JetStream API call; PermissionDenied as soon as the server refuses it."""
    with bus.refused(nc, subject):
        await nc.request(subject, b'{"seq": 1}', timeout=30)


async def subscribe(nc: Client, subject: str) -> None:
    """Subscribe and wait for the server's refusal (the caller's deadline bounds the wait).

    No flush: the server may send a subscription's refusal after a later PONG, and nats-py
    leaves a cancelled flush's PONG waiter queued (the next PONG then breaks its read loop)."""
    with bus.refused(nc, subject):
        await nc.subscribe(subject)
        await anyio.sleep_forever()  # ended by the refusal, which raises PermissionDenied


async def message_counts(nc: Client) -> dict[str, tuple[int, int, int]]:
    """Per stream: (messages, first sequence, last sequence); a purge or delete changes them."""
    js = nc.jetstream()
    out = {}
    for name in (topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM, topology.EVENT_STREAM):
        state = (await js.stream_info(name)).state
        out[name] = (state.messages, state.first_seq, state.last_seq)
    return out


def test_the_committed_users_file_is_what_warden_creds_renders_from_the_topology() -> None:
    path = opsnats.OPS_NATS / "users.conf"
    text = path.read_text()
    users = credentials.UsersFile.parse(text)
    assert users.agents == {}, "the committed users file must hold no agent"
    assert users.render() == text, (
        "ops/nats/users.conf is out of date with shared/topology.py: run "
        "`warden creds sync --users-file ops/nats/users.conf`"
    )


def test_an_agents_password_is_stored_only_as_a_bcrypt_hash(tmp_path: Path) -> None:
    path = tmp_path / "users.conf"
    password = credentials.add_agent(path, "hasher", rounds=4)
    text = path.read_text()
    assert password not in text
    stored = credentials.UsersFile.load(path).agents["hasher"]
    assert stored.startswith("$2a$04$")
    assert bcrypt.checkpw(password.encode(), stored.encode())
    # A second add issues a new password; the old one no longer verifies.
    again = credentials.add_agent(path, "hasher", rounds=4)
    assert not bcrypt.checkpw(password.encode(), credentials.UsersFile.load(path).agents["hasher"].encode())
    assert again != password


def test_an_agents_permissions_name_only_its_own_subjects() -> None:
    perms = credentials.agent_permissions("fixer")
    inputs = [s for s in perms.publish_allow if s.startswith(topology.INPUT_ROOT)]
    own = [topology.agent_subject("fixer", v) for v in topology.AGENT_VERBS]
    assert inputs == [*own, topology.payload_subject("fixer")]
    assert inputs == list(perms.publish_allow), "an agent may publish nothing but its own inputs"
    assert perms.subscribe_allow == ("_INBOX.fixer.>", topology.notice_subject("fixer"))


async def test_an_agent_with_its_own_credentials_registers_claims_and_releases(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ops_server.server.url
    password = add_agent(ops_server, "fixer")  # added while the server runs: a reload, no restart
    contract = Contract(stopping=Stopping(lease_ttl_s=30, heartbeat_interval_s=5))
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    async with (
        running(url, ["scheduler", "reconciler"]),
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        job_id = await submit(
            operator, JobRequest(idempotency_key=str(uuid.uuid4()), kind="k", contract=contract)
        )
        nc = await connect_agent(url, "fixer", user=credentials.agent_user("fixer"), password=password)
        try:
            agent = AgentClient(nc, "fixer")
            await agent.register()
            grant = await agent.claim()
            assert grant is not None and grant.job_id == job_id
            reply = await agent.release(JobContext(grant=grant), "checking permissions")
            assert isinstance(reply, Accepted)
        finally:
            await nc.close()


async def test_an_agent_cannot_append_events_command_or_speak_as_another_agent(
    ops_server: opsnats.OpsServer,
) -> None:
    url = ops_server.server.url
    password = add_agent(ops_server, "mallory")
    add_agent(ops_server, "alice")
    async with opsnats.connected(url, **opsnats.service_credentials()) as service:
        await topology.ensure(service.jetstream(), str(service.connected_server_version))
        before = await message_counts(service)
        nc = await connect_agent(url, "mallory", user=credentials.agent_user("mallory"), password=password)
        try:
            forged = msgspec.json.encode({"type": "job.completed", "originator_id": str(uuid.uuid4())})
            command = OperatorCommand(operator="mallory", reason="let me in", agent="mallory")
            attempts: list[tuple[str, bytes | msgspec.Struct]] = [
                (topology.event_subject(uuid.uuid4()), forged),  # an authoritative event
                (topology.operator_subject("reinstate"), command),  # an operator command
                (topology.REQUEST_SUBJECT, b"{}"),  # a job request (a client's, not an agent's)
                (topology.agent_subject("alice", "claim"), Claim()),  # another agent's message
            ]
            for subject, body in attempts:
                with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="publish"):
                    await bus.request(nc, subject, body, timeout=30)
            # The JetStream API: no deleting, purging, or reading any stream.
            for api in (
                f"$JS.API.STREAM.DELETE.{topology.EVENT_STREAM}",
                f"$JS.API.STREAM.PURGE.{topology.INPUT_STREAM}",
                f"$JS.API.STREAM.MSG.DELETE.{topology.EVENT_STREAM}",
                f"$JS.API.STREAM.MSG.GET.{topology.EVENT_STREAM}",
                f"$JS.API.DIRECT.GET.{topology.EVENT_STREAM}",
                f"$JS.API.CONSUMER.CREATE.{topology.EVENT_STREAM}",
                f"$JS.API.STREAM.UPDATE.{topology.EVENT_STREAM}",
            ):
                with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="publish"):
                    await api_request(nc, api)
            # Nor listening to the record or to another agent's replies.
            for subject in (f"{topology.EVENT_ROOT}.>", "_INBOX.alice.>", topology.notice_subject("alice")):
                with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="subscription"):
                    await subscribe(nc, subject)
        finally:
            await nc.close()
        # Every refusal came from the server, and nothing was stored, deleted or purged.
        assert await message_counts(service) == before
        assert before[topology.EVENT_STREAM][0] == 0 and before[topology.INPUT_STREAM][0] == 0
        assert before[topology.AGENT_INPUT_STREAM][0] == 0


async def test_an_operator_cannot_append_events_speak_as_an_agent_or_delete_a_stream(
    ops_server: opsnats.OpsServer,
) -> None:
    url = ops_server.server.url
    async with (
        opsnats.connected(url, **opsnats.service_credentials()) as service,
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        await topology.ensure(service.jetstream(), str(service.connected_server_version))
        before = await message_counts(service)
        for subject in (topology.event_subject(uuid.uuid4()), topology.agent_subject("alice", "claim")):
            with anyio.fail_after(5), pytest.raises(bus.PermissionDenied):
                await bus.request(operator, subject, b"{}", timeout=30)
        for api in (
            f"$JS.API.STREAM.DELETE.{topology.EVENT_STREAM}",
            f"$JS.API.STREAM.PURGE.{topology.INPUT_STREAM}",
            f"$JS.API.STREAM.PURGE.{topology.AGENT_INPUT_STREAM}",
            f"$JS.API.CONSUMER.DELETE.{topology.INPUT_STREAM}.scheduler",
            f"$JS.API.CONSUMER.DELETE.{topology.AGENT_INPUT_STREAM}.reconciler",
        ):
            with anyio.fail_after(5), pytest.raises(bus.PermissionDenied):
                await api_request(operator, api)
        # What operators are for still works: reading the record.
        info = await operator.jetstream().stream_info(topology.EVENT_STREAM)
        assert info.config.deny_delete
        assert await message_counts(service) == before


async def test_an_agent_connected_without_its_inbox_prefix_is_told_why_it_hears_nothing(
    ops_server: opsnats.OpsServer,
) -> None:
    url = ops_server.server.url
    password = add_agent(ops_server, "lost")
    # bus.connect gives an agent's user its own prefix; a client that overrides it hears nothing.
    async with opsnats.connected(
        url, user=credentials.agent_user("lost"), password=password, inbox_prefix="_INBOX"
    ) as nc:
        with anyio.fail_after(5), pytest.raises(bus.PermissionDenied, match="subscription"):
            await bus.request(nc, topology.agent_subject("lost", "register"), b"{}", timeout=30)


async def test_a_removed_agent_can_no_longer_connect(ops_server: opsnats.OpsServer) -> None:
    url = ops_server.server.url
    password = add_agent(ops_server, "gone")
    nc = await connect_agent(url, "gone", user=credentials.agent_user("gone"), password=password)
    await nc.close()
    assert ops_server.server.process is not None
    result = CliRunner().invoke(
        creds,
        [
            "remove-agent",
            "gone",
            "--users-file",
            str(ops_server.users_file),
        ],
    )
    assert result.exit_code == 0, result.output
    ops_server.reload()
    with pytest.raises(Exception, match="Authorization Violation"):
        await connect_agent(
            url,
            "gone",
            user=credentials.agent_user("gone"),
            password=password,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )


async def test_a_retry_grant_tells_an_agent_with_its_own_credentials_why_earlier_attempts_ended(
    ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents may not read the log, so the scheduler tells a retry what became of the earlier
    attempts (here: a release with its reason) in the lease grant itself."""
    url = ops_server.server.url
    passwords = {name: add_agent(ops_server, name) for name in ("first", "second")}
    contract = Contract(stopping=Stopping(lease_ttl_s=30, heartbeat_interval_s=5, max_attempts=3))
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    async with (
        running(url, ["scheduler", "reconciler"]),
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        job_id = await submit(
            operator, JobRequest(idempotency_key=str(uuid.uuid4()), kind="k", contract=contract)
        )
        grants = []
        for name in ("first", "second"):
            nc = await connect_agent(url, name, user=credentials.agent_user(name), password=passwords[name])
            try:
                agent = AgentClient(nc, name)
                await agent.register()
                grant = await agent.claim()
                assert grant is not None and grant.job_id == job_id
                grants.append(grant)
                reply = await agent.release(JobContext(grant=grant), f"{name} could not build it")
                assert isinstance(reply, Accepted)
            finally:
                await nc.close()
    first, second = grants
    assert first.epoch == 1 and first.previous_attempts == []
    assert second.epoch == 2
    [told] = second.previous_attempts
    assert (told.epoch, told.agent, told.outcome, told.reason) == (
        1,
        "first",
        "released",
        "first could not build it",
    )
