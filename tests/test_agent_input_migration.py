"""Upgrading a deployment whose WARDEN_INPUT still stores agents' subjects (before the agent input
stream existed): `topology.ensure` moves them, real server, as a service's start runs it."""

from __future__ import annotations

import uuid

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared import proposals, topology
from shared.messages import Propose
from shared.server import EmbeddedServer
from tests.harness import client


async def old_layout(js: JetStreamContext) -> None:
    """The single input stream, and the services' durables filtering on agent subjects there."""
    [old] = [c for c in topology.stream_configs() if c.name == topology.INPUT_STREAM]
    old.subjects = [*topology.input_subjects(), *topology.agent_input_subjects()]
    await js.add_stream(old)
    for spec in topology.CONSUMERS:
        config = topology.consumer_config(spec, topology.INPUT_STREAM)
        config.filter_subjects = list(spec.filter_subjects)
        await js.add_consumer(topology.INPUT_STREAM, config)


async def test_ensure_moves_the_agent_subjects_out_of_an_old_input_stream_and_keeps_what_it_stored(
    nats_server: EmbeddedServer,
) -> None:
    async with client(nats_server.url) as nc:
        js = nc.jetstream()
        await old_layout(js)
        body = Propose(job_id=uuid.uuid4(), epoch=1, effect="none", output={"old": True})
        data = msgspec.json.encode(body)
        old = await js.publish(topology.agent_subject("a1", "propose"), data)
        assert old.stream == topology.INPUT_STREAM

        await topology.ensure(js, str(nc.connected_server_version))
        await topology.ensure(js, str(nc.connected_server_version))  # and again: nothing left to move

        subjects = (await js.stream_info(topology.INPUT_STREAM)).config.subjects
        assert subjects == topology.input_subjects()
        for spec in topology.CONSUMERS:
            for stream in (topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM):
                wanted = topology.stream_filters(spec, stream)
                try:
                    info = await js.consumer_info(stream, spec.durable)
                except NotFoundError:
                    assert not wanted, (stream, spec.durable)  # the reconciler's old durable is gone
                    continue
                assert info.config.filter_subjects == list(wanted), (stream, spec.durable)
        # New agent inputs go to the agent stream; the old one stays where it was, readable...
        new = await js.publish(topology.agent_subject("a1", "claim"), b"{}")
        assert new.stream == topology.AGENT_INPUT_STREAM
        assert (await js.get_msg(topology.INPUT_STREAM, old.seq)).data == data
        # ...and a proposal recorded before (no record object) is read back from it, verified.
        read = await proposals.read_recorded(
            js,
            agent="a1",
            input_seq=old.seq,
            content_hash=proposals.sha256(data),
            payload_object="",
            payload_hash="",
        )
        assert read == body
