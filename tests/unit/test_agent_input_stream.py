"""The agent input stream's rules: which stream stores a subject, which streams a consumer spans,
and the per-agent bound the ring gives, with the payload limit that follows from it."""

from __future__ import annotations

import pytest

from shared import credentials, topology


def test_every_agent_subject_is_stored_in_the_agent_stream_and_nothing_else_is() -> None:
    for verb in topology.AGENT_VERBS:
        assert topology.stream_of(topology.agent_subject("a1", verb)) == topology.AGENT_INPUT_STREAM
    assert topology.stream_of(topology.payload_subject("a1")) == topology.AGENT_INPUT_STREAM
    assert topology.stream_of("warden.in.agent.a.b.register") == topology.AGENT_INPUT_STREAM
    assert topology.stream_of(topology.REQUEST_SUBJECT) == topology.INPUT_STREAM
    for verb in topology.OPERATOR_VERBS:
        assert topology.stream_of(topology.operator_subject(verb)) == topology.INPUT_STREAM
    assert all(topology.stream_of(s) == topology.INPUT_STREAM for s in topology.input_subjects())
    agent_side = topology.agent_input_subjects()
    assert all(topology.stream_of(s) == topology.AGENT_INPUT_STREAM for s in agent_side)


def test_a_consumer_has_a_durable_on_each_stream_holding_any_of_its_filters() -> None:
    scheduler = topology.SCHEDULER_CONSUMER
    assert topology.consumer_streams(scheduler) == (topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM)
    assert topology.REQUEST_SUBJECT in topology.stream_filters(scheduler, topology.INPUT_STREAM)
    assert topology.agent_subject_all("claim") in topology.stream_filters(
        scheduler, topology.AGENT_INPUT_STREAM
    )
    assert topology.consumer_streams(topology.RECONCILER_CONSUMER) == (topology.AGENT_INPUT_STREAM,)
    assert topology.consumer_streams(topology.REVOKER_CONSUMER) == (topology.INPUT_STREAM,)
    for spec in topology.CONSUMERS:
        split = [f for s in topology.consumer_streams(spec) for f in topology.stream_filters(spec, s)]
        assert sorted(split) == sorted(spec.filter_subjects), spec.durable


def test_one_agent_credential_can_hold_at_most_its_subjects_times_the_ring_times_the_largest_message() -> (
    None
):
    published = credentials.agent_permissions("a1").publish_allow
    assert len(published) == topology.agent_subjects_per_credential()
    assert all(">" not in s and "*" not in s for s in published)
    bound = topology.agent_input_bound()
    per_message = topology.INPUT_MAX_MSG_BYTES + topology.STORED_MESSAGE_OVERHEAD
    assert bound == 6 * topology.AGENT_INPUT_PER_SUBJECT * per_message
    assert bound <= 256 * 1024 * 1024


def test_the_largest_upload_fits_in_the_chunks_the_ring_keeps() -> None:
    assert topology.PAYLOAD_CHUNK_BYTES <= topology.MAX_INPUT_BYTES
    assert topology.max_proposal_bytes() == topology.max_upload_chunks() * topology.PAYLOAD_CHUNK_BYTES


def test_a_payload_limit_set_above_the_ring_is_capped_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARDEN_AGENT_INPUT_PER_SUBJECT", "4")
    monkeypatch.setenv("WARDEN_MAX_PROPOSAL_BYTES", str(1024 * 1024 * 1024))
    assert topology.max_proposal_bytes() == 4 * topology.PAYLOAD_CHUNK_BYTES
    monkeypatch.setenv("WARDEN_MAX_PROPOSAL_BYTES", "1000")
    assert topology.max_proposal_bytes() == 1000


def test_the_agent_stream_keeps_each_subjects_latest_messages_and_drops_the_oldest_when_full() -> None:
    configs = {c.name: c for c in topology.stream_configs()}
    agent = configs[topology.AGENT_INPUT_STREAM]
    assert agent.max_msgs_per_subject == topology.AGENT_INPUT_PER_SUBJECT
    assert agent.max_msg_size == topology.INPUT_MAX_MSG_BYTES
    assert agent.deny_delete and agent.deny_purge
    assert not set(agent.subjects or []) & set(configs[topology.INPUT_STREAM].subjects or [])
