"""The pure rules at the trust boundary: where a reply may go, and that decoding any bytes at all
ends in a refusal with a reason, never in another exception (which a consumer would retry)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import topology
from shared.messages import Claim, Heartbeat, JobRequest, OperatorCommand, Propose, Register, Release
from shared.validation import InvalidInput, decode

AGENT_CLAIM = topology.agent_subject("mallory", "claim")


@pytest.mark.parametrize(
    "reply_to",
    [
        "_INBOX.mallory.abc",
        "_INBOX.mallory.abc.def",
    ],
)
def test_an_agent_is_answered_under_its_own_inbox(reply_to: str) -> None:
    assert topology.reply_refusal(AGENT_CLAIM, reply_to) is None


@pytest.mark.parametrize(
    ("reply_to", "why"),
    [
        ("warden.evt.0d4c6ad8-3c59-4f8b-9a44-6c9c0f6a8e11", "not under agent mallory's own inbox"),
        ("warden.in.op.reinstate", "not under agent mallory's own inbox"),
        ("$JS.API.STREAM.DELETE.WARDEN_EVENTS", "not under agent mallory's own inbox"),
        ("$O.WARDEN_PAYLOADS.C.x", "not under agent mallory's own inbox"),
        ("$KV.x.y", "not under agent mallory's own inbox"),
        ("$SRV.PING", "not under agent mallory's own inbox"),
        ("_INBOX.alice.abc", "not under agent mallory's own inbox"),
        ("_INBOX.mallory", "not under agent mallory's own inbox"),
        ("_INBOX.abcdef", "not under agent mallory's own inbox"),
        ("a b", "not a subject"),
        ("_INBOX.mallory.>", "not a subject"),
        ("_INBOX.mallory.*", "not a subject"),
        ("_INBOX..mallory", "not a subject"),
        ("_INBOX.mallory.\u00e9", "not a subject"),
        ("_INBOX.mallory.a\r\nPUB x 1", "not a subject"),
        ("_INBOX.mallory." + "x" * 300, "characters; the limit is"),
    ],
)
def test_an_agent_reply_address_anywhere_else_is_refused_with_a_reason(reply_to: str, why: str) -> None:
    refusal = topology.reply_refusal(AGENT_CLAIM, reply_to)
    assert refusal is not None and why in refusal


def test_a_dotted_agent_subject_is_fenced_to_the_publishing_credentials_inbox() -> None:
    subject = "warden.in.agent.mallory.b.register"
    assert topology.input_agent(subject) == "mallory"
    assert topology.reply_refusal(subject, "_INBOX.mallory.x") is None
    assert topology.reply_refusal(subject, "_INBOX.b.x") is not None


@pytest.mark.parametrize("subject", [topology.REQUEST_SUBJECT, topology.operator_subject("cancel")])
def test_clients_and_operators_are_answered_only_under_the_inbox_root(subject: str) -> None:
    assert topology.reply_refusal(subject, "_INBOX.Xy12abc") is None
    assert topology.reply_refusal(subject, "_INBOX.Xy12abc.7") is None
    for bad in ("warden.evt.x", "$JS.API.INFO", "warden.in.request", "_INBOX", "x._INBOX.y"):
        refusal = topology.reply_refusal(subject, bad)
        assert refusal is not None and "not an inbox" in refusal, bad


def test_the_input_streams_store_only_subjects_warden_reads_or_refuses() -> None:
    subjects = [*topology.input_subjects(), *topology.agent_input_subjects()]
    assert f"{topology.INPUT_ROOT}.>" not in subjects
    assert topology.MALFORMED_AGENT_SUBJECTS in subjects
    assert topology.MALFORMED_AGENT_SUBJECTS in topology.SCHEDULER_CONSUMER.filter_subjects
    for verb in (*topology.AGENT_VERBS, topology.PAYLOAD_VERB):
        assert topology.agent_subject_all(verb) in subjects
    # Every stored subject but the payload chunks has a consumer that answers it.
    read = {s for spec in topology.CONSUMERS for s in spec.filter_subjects}
    assert set(subjects) - read == {topology.agent_subject_all(topology.PAYLOAD_VERB)}


INPUT_TYPES = [JobRequest, Register, Claim, Heartbeat, Propose, Release, OperatorCommand]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def _hostile_documents() -> st.SearchStrategy[bytes]:
    deep = st.integers(min_value=1, max_value=60_000).map(lambda n: b"[" * n + b"]" * n)
    deep_object = st.integers(min_value=65, max_value=5_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
    big_numbers = st.sampled_from([b"1e400", b"-1e400", b"1" + b"0" * 400, b"1.5e-400", b"NaN", b"Infinity"])
    numbers_in_fields = st.tuples(
        st.sampled_from(["max_concurrent", "epoch", "progress", "ttl_s"]), big_numbers
    ).map(lambda kv: b'{"%s": %s}' % (kv[0].encode(), kv[1]))
    generated = json_values.map(msgspec.json.encode)
    return st.one_of(st.binary(max_size=200), deep, deep_object, numbers_in_fields, generated)


@settings(max_examples=400, deadline=None)
@given(data=_hostile_documents(), tp=st.sampled_from(INPUT_TYPES))
def test_decoding_any_bytes_ends_in_a_value_or_a_refusal_with_reasons(data: bytes, tp: type) -> None:
    errors = []
    try:
        decode(data, tp, max_bytes=topology.MAX_INPUT_BYTES)
    except InvalidInput as exc:  # anything else fails the test: that is the property
        errors = exc.errors
        assert errors, "a refusal names at least one reason"
    assert all(e.message for e in errors)
