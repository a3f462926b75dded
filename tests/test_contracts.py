"""Contracts that Warden could not enforce are refused at submission, against a real nats-server.

Globs the scope check could not match or that name unsafe paths, levels no agent can hold,
operator promotions past the policy, and an idempotency key reused for another body: each is
answered with every reason, recorded as `input.rejected`, and leaves no job or level behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import anyio

from shared import bus, topology
from shared.contract import Contract, Scope, Stopping
from shared.events import AgentLevelChanged, InputRejected, JobRequested
from shared.messages import Accepted, JobRequest, OperatorCommand, Rejected, request_digest
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import client, events_of, running, submit, wait_for_event

BAD_GLOBS = [
    "src/[z-a].py",
    "../**",
    "/etc/**",
    "C:\\Windows\\**",
    "\\\\server\\share\\**",
    "src/.git/hooks/*",
]


async def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`warden ARGS` in its own process (in a thread, so the services on this loop can answer)."""
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "services.cli", *args, "--nats", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    )


async def test_every_unenforceable_part_of_a_contract_is_refused_at_once_and_recorded(
    nats_server: EmbeddedServer,
) -> None:
    request = JobRequest(
        idempotency_key=str(uuid.uuid4()),
        kind="refactor",
        contract=Contract(
            scope=Scope(paths=["src/**", *BAD_GLOBS]),
            required_level=5,
            stopping=Stopping(lease_ttl_s=5, heartbeat_interval_s=10),
        ),
    )
    async with running(nats_server.url), client(nats_server.url) as nc:
        reply = await bus.request(nc, topology.REQUEST_SUBJECT, request)
        assert isinstance(reply, Rejected)
        by_path = {e.path: e.message for e in reply.errors}
        for i, glob in enumerate(BAD_GLOBS, start=1):
            assert repr(glob) in by_path.pop(f"$.contract.scope.paths[{i}]")
        assert "highest level 2" in by_path.pop("$.contract.required_level")
        assert set(by_path) == {"$.contract.stopping.heartbeat_interval_s"}

        rejection = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(rejection, InputRejected)
        assert rejection.errors == reply.errors
        assert not [e for e in await events_of(nc) if isinstance(e, JobRequested)]


async def test_a_request_with_type_errors_is_also_refused_for_every_rule_its_typed_parts_break(
    nats_server: EmbeddedServer,
) -> None:
    body = json.dumps(
        {
            "kind": 5,
            "contract": {
                "scope": {"paths": ["../**", "/etc/**"]},
                "required_level": 5,
                "stopping": {"max_attempts": 0},
                "colour": "red",
            },
        }
    ).encode()
    async with running(nats_server.url), client(nats_server.url) as nc:
        reply = await bus.request(nc, topology.REQUEST_SUBJECT, body)
        assert isinstance(reply, Rejected)
        assert [e.path for e in reply.errors] == [
            "$.idempotency_key",
            "$.kind",
            "$.contract.colour",
            "$.contract.stopping.max_attempts",
            "$.contract.scope.paths[0]",
            "$.contract.scope.paths[1]",
            "$.contract.required_level",
        ]
        rejection = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(rejection, InputRejected) and rejection.errors == reply.errors


async def test_warden_submit_prints_every_reason_a_contract_is_refused(nats_server: EmbeddedServer) -> None:
    async with running(nats_server.url):
        result = await _cli(
            nats_server.url, "submit", "--kind", "k", "--level", "5", "--path", "../**", "--path", "/etc/**"
        )
    assert result.returncode == 1
    assert "rejected (3 problem(s))" in result.stderr
    assert "$.contract.required_level: level 5 is above the policy's highest level 2" in result.stderr
    assert "glob '../**' is refused: path climbs out with '..'" in result.stderr
    assert "glob '/etc/**' is refused: absolute path" in result.stderr


async def test_promotions_and_demotions_past_the_policys_levels_are_refused_recorded_and_change_nothing(
    nats_server: EmbeddedServer,
) -> None:
    async with running(nats_server.url), client(nats_server.url) as nc:
        await AgentClient(nc, "pat").register()

        async def operate(verb: str, level: int | None = None) -> object:
            command = OperatorCommand(operator="alice", reason=f"try {verb}", agent="pat", level=level)
            return await bus.request(nc, topology.operator_subject(verb), command)

        too_high = await operate("promote", 99)
        assert isinstance(too_high, Rejected)
        [error] = too_high.errors
        assert error.path == "$.level"
        assert "from level 0 to 99: level 99 is above the policy's highest level 2" in error.message
        recorded = await wait_for_event(
            nc, lambda e: isinstance(e, InputRejected) and e.originator_id == too_high.rejection_id
        )
        assert isinstance(recorded, InputRejected)
        assert recorded.sender == "alice" and recorded.errors == too_high.errors

        too_low = await operate("demote")
        assert isinstance(too_low, Rejected)
        assert "level -1 is below the policy's lowest level 0" in too_low.errors[0].message

        cli = await _cli(
            nats_server.url, "promote", "pat", "--level", "3", "--reason", "r", "--operator", "bob"
        )
        assert cli.returncode == 1
        assert "level 3 is above the policy's highest level 2" in cli.stderr

        # The refusals changed nothing: the next promotion is the agent's first change of level.
        assert isinstance(await operate("promote"), Accepted)
        changed = await wait_for_event(nc, lambda e: isinstance(e, AgentLevelChanged))
        assert isinstance(changed, AgentLevelChanged)
        assert (changed.previous, changed.level, changed.originator_version) == (0, 1, 2)


async def test_an_idempotency_key_reused_for_another_body_is_refused_naming_the_first_job(
    nats_server: EmbeddedServer,
) -> None:
    first = JobRequest(
        idempotency_key="nightly-42", kind="refactor", contract=Contract(inputs={"a": 1, "b": 2})
    )
    other = JobRequest(
        idempotency_key="nightly-42", kind="refactor", contract=Contract(inputs={"a": 1, "b": 3})
    )
    # The first body again, spelt differently: defaults written out, keys in another order.
    same = json.dumps(
        {
            "kind": "refactor",
            "contract": {"inputs": {"b": 2, "a": 1}, "required_level": 0},
            "idempotency_key": "nightly-42",
        }
    ).encode()
    async with running(nats_server.url), client(nats_server.url) as nc:
        job_id = await submit(nc, first)

        conflict = await bus.request(nc, topology.REQUEST_SUBJECT, other)
        assert isinstance(conflict, Rejected)
        assert conflict.job_id == job_id
        [error] = conflict.errors
        assert error.path == "$.idempotency_key"
        assert f"idempotency key 'nightly-42' already names job {job_id}" in error.message
        recorded = await wait_for_event(nc, lambda e: isinstance(e, InputRejected))
        assert isinstance(recorded, InputRejected) and recorded.errors == conflict.errors

        again = await bus.request(nc, topology.REQUEST_SUBJECT, same)
        assert isinstance(again, Accepted)
        assert again.job_id == job_id and again.duplicate

        [requested] = [e for e in await events_of(nc) if isinstance(e, JobRequested)]
        assert requested.request_digest == request_digest(first)
