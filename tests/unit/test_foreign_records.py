"""Foreign messages on the event stream, as pure functions: an aggregate's head, and who wrote what."""

from __future__ import annotations

import hashlib
from uuid import uuid4

import msgspec
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from shared import topology
from shared.events import JobCancelled, JobRequested, JobRequeued, decode_all, digest, encode, pack
from shared.persistence.jetstream import (
    ORIGINATOR_HEADER,
    TOPIC_HEADER,
    VERSION_HEADER,
    VERSIONS_HEADER,
    Head,
    Span,
    StoredRecord,
    chain_of,
)
from shared.persistence.written import events_of, written_of
from tests.readside import quick_contract


def record(seq: int, version: int | None) -> StoredRecord:
    """A record at `seq`: one of ours at `version`, or (None) a foreign one."""
    headers = {} if version is None else {VERSION_HEADER: str(version)}
    return StoredRecord(seq, "warden.evt.x", b"", headers)


def value_of(r: StoredRecord) -> Span | None:
    if VERSION_HEADER not in r.headers:
        return None
    last = int(r.headers[VERSION_HEADER])
    return int(r.headers.get(VERSIONS_HEADER, f"{last}-{last}").split("-")[0]), last


def packed(seq: int, first: int, last: int) -> StoredRecord:
    """A packed record of ours at `seq`, holding versions first..last."""
    return StoredRecord(
        seq, "warden.evt.x", b"", {VERSION_HEADER: str(last), VERSIONS_HEADER: f"{first}-{last}"}
    )


def test_the_head_names_the_chains_version_and_the_subjects_last_sequence() -> None:
    records = [record(1, 1), record(2, 2), record(7, None)]
    chain, head = chain_of(records, value_of, contiguous=True)
    # A write expects sequence 7 (what the server holds last) and version 3 (after ours).
    assert head == Head(2, 7)
    assert [r.seq for r in chain] == [1, 2]


def test_a_subject_holding_only_foreign_messages_takes_a_first_version() -> None:
    chain, head = chain_of([record(4, None), record(5, None)], value_of, contiguous=True)
    assert chain == [] and head == Head(0, 5)
    assert chain_of([], value_of, contiguous=True) == ([], None)


def test_a_replayed_copy_of_an_old_version_is_stepped_over() -> None:
    records = [record(1, 1), record(2, 2), record(3, 3), record(9, 2)]
    chain, head = chain_of(records, value_of, contiguous=True)
    assert [r.seq for r in chain] == [1, 2, 3] and head == Head(3, 9)
    # Where values only increase (tracking records), a lower one is stepped over just the same.
    chain, head = chain_of([record(1, 20), record(2, 24), record(3, 22)], value_of, contiguous=False)
    assert [r.seq for r in chain] == [1, 2] and head == Head(24, 3)


@given(st.lists(st.booleans(), max_size=30), st.integers(min_value=0, max_value=3))
def test_foreign_messages_anywhere_change_only_the_heads_sequence(foreign: list[bool], trailing: int) -> None:
    records, version = [], 0
    for seq, is_foreign in enumerate([*foreign, *([True] * trailing)], start=1):
        if is_foreign:
            records.append(record(seq, None))
        else:
            version += 1
            records.append(record(seq, version))
    chain, head = chain_of(records, value_of, contiguous=True)
    assert [value_of(r) for r in chain] == [(v, v) for v in range(1, version + 1)]
    assert head == (Head(version, len(records)) if records else None)


JOB = uuid4()
SUBJECT = topology.event_subject(JOB)
FIRST = JobRequested(
    originator_id=JOB, originator_version=1, idempotency_key="k", kind="noop", contract=quick_contract()
)
HEADERS = {ORIGINATOR_HEADER: str(JOB), VERSION_HEADER: "1", TOPIC_HEADER: "job.requested"}


def test_a_packed_record_continues_the_chain_from_its_first_version_to_its_last() -> None:
    records = [record(1, 1), packed(2, 2, 4), record(3, 5), packed(4, 5, 6), packed(5, 6, 8)]
    chain, head = chain_of(records, value_of, contiguous=True)
    # The copy at seq 4 re-records version 5: stepped over, and the chain goes on after it.
    assert [r.seq for r in chain] == [1, 2, 3, 5] and head == Head(8, 5)


def test_warden_reads_its_own_event_when_headers_subject_and_payload_agree() -> None:
    assert events_of(SUBJECT, HEADERS, encode(FIRST)) == [FIRST]


SECOND = JobCancelled(originator_id=JOB, originator_version=2, reason="r", by="op")
THIRD = JobRequeued(originator_id=JOB, originator_version=3, reason="again", by="op")
PACKED = {
    ORIGINATOR_HEADER: str(JOB),
    VERSION_HEADER: "3",
    VERSIONS_HEADER: "2-3",
    TOPIC_HEADER: "job.cancelled,job.requeued",
}


def test_a_packed_record_holds_each_event_with_the_bytes_its_digest_is_taken_of() -> None:
    data = pack([encode(SECOND), encode(THIRD)])
    found = written_of(SUBJECT, PACKED, data)
    assert not isinstance(found, str)
    assert [w.event for w in found] == [SECOND, THIRD]
    assert [w.data for w in found] == [encode(SECOND), encode(THIRD)]
    assert [digest(w.event) for w in found] == [hashlib.sha256(w.data).hexdigest() for w in found]
    assert decode_all(data) == [SECOND, THIRD] and decode_all(encode(FIRST)) == [FIRST]


def test_every_way_a_packed_record_is_not_wardens_is_named() -> None:
    data = pack([encode(SECOND), encode(THIRD)])
    cases = {
        "headers that do not parse": (SUBJECT, {**PACKED, VERSIONS_HEADER: "2-x"}, data),
        "Warden-Version: '4', Warden-Topic": (SUBJECT, {**PACKED, VERSION_HEADER: "4"}, data),
        "a packed record of 2 event(s) under Warden-Versions '2-4'": (
            SUBJECT,
            {**PACKED, VERSIONS_HEADER: "2-4", VERSION_HEADER: "4"},
            data,
        ),
        "not a list of Warden events": (SUBJECT, PACKED, data[:-2]),
        "element 1 of a packed record: Warden-Topic 'job.cancelled' on a 'job.requeued' payload": (
            SUBJECT,
            {**PACKED, TOPIC_HEADER: "job.cancelled,job.cancelled"},
            data,
        ),
        "element 0 of a packed record: a payload of version 2 under Warden-Version 3": (
            SUBJECT,
            {**PACKED, VERSIONS_HEADER: "3-4", VERSION_HEADER: "4"},
            data,
        ),
        "on another subject": (topology.event_subject(uuid4()), PACKED, data),
        # One event is no packed record, and an array is no single event.
        "a packed record of 1 event(s)": (SUBJECT, {**PACKED, VERSIONS_HEADER: "3-3"}, pack([encode(THIRD)])),
        "not a Warden event": (SUBJECT, HEADERS, data),
    }
    for expected, (subject, headers, payload) in cases.items():
        found = events_of(subject, headers, payload)
        assert isinstance(found, str) and expected in found, (expected, found)


def test_every_way_a_message_is_not_wardens_is_named() -> None:
    data = encode(FIRST)
    other = uuid4()
    unknown = msgspec.json.encode(
        {"type": "job.exploded", "originator_id": str(JOB), "originator_version": 1}
    )
    cases = {
        "no Warden writer header (Warden-Originator, Warden-Version, Warden-Topic missing)": (
            SUBJECT,
            {},
            data,
        ),
        "headers that do not parse": (SUBJECT, {**HEADERS, VERSION_HEADER: "one"}, data),
        "on another subject": (topology.event_subject(other), HEADERS, data),
        "not a Warden event (Input data was truncated)": (SUBJECT, HEADERS, data[:-3]),
        "not a Warden event (Invalid value 'job.exploded'": (SUBJECT, HEADERS, unknown),
        "Warden-Topic 'job.cancelled' on a 'job.requested' payload": (
            SUBJECT,
            {**HEADERS, TOPIC_HEADER: "job.cancelled"},
            data,
        ),
        "a payload of version 1 under Warden-Version 2": (SUBJECT, {**HEADERS, VERSION_HEADER: "2"}, data),
        f"a payload of aggregate {other}": (SUBJECT, HEADERS, encode(replace(FIRST, originator_id=other))),
    }
    for expected, (subject, headers, payload) in cases.items():
        found = events_of(subject, headers, payload)
        assert isinstance(found, str) and expected in found, (expected, found)
