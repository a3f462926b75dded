"""A restart starts from the view's snapshot and folds only the tail; the log stays the truth."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import cast

import msgspec
import pytest
from nats.aio.client import Client

from services.bench.history import write_history
from services.revoker import Revoker
from shared import snapshot, topology
from shared.contract import Contract, Stopping
from shared.messages import JobRequest, LeaseGrant
from shared.runtime import Context
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from shared.views import Views
from tests import opsnats
from tests.harness import client, events_of, running, submit
from tests.test_credential_fences import refused_publish, refused_request


async def full_fold(nc: Client) -> Views:
    """The services' view as folding the whole log builds it."""
    views = Views(forget_ended=True)
    for event in await events_of(nc):
        views.apply(event)
    return views


async def last_seq(nc: Client) -> int:
    return (await nc.jetstream().stream_info(topology.EVENT_STREAM)).state.last_seq


def assert_same_view(started: Context, folded: Views) -> None:
    assert started.views.jobs == folded.jobs
    assert started.views.agents == folded.agents


async def live_work(nc: Client, tag: str) -> None:
    """Queued jobs, one leased to a registered agent: what a snapshot must carry."""
    agent = AgentClient(nc, f"keeper-{tag}")
    await agent.register()
    for i in range(3):
        contract = Contract(stopping=Stopping(lease_ttl_s=300))
        await submit(
            nc, JobRequest(idempotency_key=f"{tag}-{i}-{uuid.uuid4()}", kind="noop", contract=contract)
        )
    assert isinstance(await agent.claim(), LeaseGrant)


async def test_a_restart_folds_only_the_tail_after_the_snapshot_into_the_view_a_full_fold_builds(
    nats_server: EmbeddedServer,
) -> None:
    async with client(nats_server.url) as nc:
        async with running(nats_server.url, ["scheduler"]) as ctx:
            await write_history(nc, 2_200, packed=False)  # 200 completed jobs: the view forgets them
            await live_work(nc, "before")
            await ctx.view_current()
            taken = await ctx.write_snapshot()
            assert taken == await last_seq(nc)
            # The tail: more history and more live work after the checkpoint.
            await write_history(nc, 110, packed=False)
            await live_work(nc, "after")
        tail = await last_seq(nc) - taken

        async with running(nats_server.url, ["scheduler"]) as restarted:
            assert restarted.restored_at == taken
            assert restarted.views.stream_events == tail
            assert_same_view(restarted, await full_fold(nc))
            # It serves: a new job is granted to an agent that asks.
            await live_work(nc, "restarted")


async def test_the_revokers_record_restarts_from_the_snapshot_as_folding_the_whole_log_builds_it(
    nats_server: EmbeddedServer,
) -> None:
    names = ["scheduler", "revoker"]
    async with client(nats_server.url) as nc:
        async with running(nats_server.url, names) as ctx:
            await write_history(nc, 550, packed=False)  # completed jobs: clean evidence for their agents
            await live_work(nc, "before")
            await ctx.view_current()
            taken = await ctx.write_snapshot()
            await write_history(nc, 110, packed=False)
            await live_work(nc, "after")
        async with running(nats_server.url, names) as restarted:
            assert restarted.restored_at == taken
            started = restarted.views.folded["authority"]
            assert isinstance(started, Revoker)
            # The record a revoker builds beside a view that folds the whole log.
            whole = Revoker()
            views = Views(forget_ended=True)
            whole.attach(cast(Context, SimpleNamespace(views=views)))
            for event in await events_of(nc):
                views.apply(event)
            assert started.authority == whole.authority
            assert started.authority.agents  # it holds something to compare


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(b"\x93not a snapshot", id="bytes-that-do-not-decode"),
        pytest.param("format", id="an-unknown-format"),
        pytest.param("shape", id="types-of-another-shape"),
    ],
)
async def test_a_snapshot_that_cannot_be_trusted_is_ignored_and_the_whole_log_folded(
    nats_server: EmbeddedServer, stored: bytes | str
) -> None:
    async with client(nats_server.url) as nc:
        async with running(nats_server.url, ["scheduler"]) as ctx:
            await write_history(nc, 550, packed=False)
            await live_work(nc, "only")
            await ctx.view_current()
            snap = ctx.views.capture(ctx.clock())
            if stored == "format":
                data = snapshot.encode(msgspec.structs.replace(snap, format=snapshot.FORMAT + 1))
            elif stored == "shape":
                data = snapshot.encode(msgspec.structs.replace(snap, shape="an-older-job"))
            else:
                assert isinstance(stored, bytes)
                data = stored
            await snapshot.write(nc.jetstream(), snapshot.object_name([]), data)

        async with running(nats_server.url, ["scheduler"]) as restarted:
            assert restarted.restored_at == 0
            assert restarted.views.stream_events == await last_seq(nc)
            assert_same_view(restarted, await full_fold(nc))


async def test_only_the_service_credential_writes_or_removes_a_snapshot(
    ops_server: opsnats.OpsServer,
) -> None:
    url = ops_server.server.url
    async with (
        opsnats.connected(url, **opsnats.service_credentials()) as service,
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
    ):
        js = service.jetstream()
        await topology.ensure(js, str(service.connected_server_version))
        await snapshot.write(js, snapshot.object_name([]), b"the services' checkpoint")
        before = (await js.stream_info(topology.SNAPSHOT_STREAM)).state
        # An operator could otherwise make every restart fold from a forged live set.
        await refused_publish(operator, f"$O.{topology.SNAPSHOT_BUCKET}.C.{uuid.uuid4().hex}", b"forged")
        for verb in ("PURGE", "DELETE", "MSG.DELETE"):
            await refused_request(operator, f"$JS.API.STREAM.{verb}.{topology.SNAPSHOT_STREAM}", {"seq": 1})
        after = (await js.stream_info(topology.SNAPSHOT_STREAM)).state
        assert (after.messages, after.last_seq) == (before.messages, before.last_seq)
        assert await snapshot.read(js, snapshot.object_name([])) == b"the services' checkpoint"
