"""Foreign messages on the event stream, as pure functions: an aggregate's head, and who wrote what."""

from __future__ import annotations

from uuid import uuid4

import msgspec
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import replace

from shared import topology
from shared.events import JobRequested, encode
from shared.persistence.jetstream import (
    ORIGINATOR_HEADER,
    TOPIC_HEADER,
    VERSION_HEADER,
    Head,
    StoredRecord,
    chain_of,
)
from shared.persistence.written import event_of
from tests.readside import quick_contract


def record(seq: int, version: int | None) -> StoredRecord:
    """A record at `seq`: one of ours at `version`, or (None) a foreign one."""
    headers = {} if version is None else {VERSION_HEADER: str(version)}
    return StoredRecord(seq, "warden.evt.x", b"", headers)


def value_of(r: StoredRecord) -> int | None:
    return int(r.headers[VERSION_HEADER]) if VERSION_HEADER in r.headers else None


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
    assert [value_of(r) for r in chain] == list(range(1, version + 1))
    assert head == (Head(version, len(records)) if records else None)


JOB = uuid4()
SUBJECT = topology.event_subject(JOB)
FIRST = JobRequested(
    originator_id=JOB, originator_version=1, idempotency_key="k", kind="noop", contract=quick_contract()
)
HEADERS = {ORIGINATOR_HEADER: str(JOB), VERSION_HEADER: "1", TOPIC_HEADER: "job.requested"}


def test_warden_reads_its_own_event_when_headers_subject_and_payload_agree() -> None:
    assert event_of(SUBJECT, HEADERS, encode(FIRST)) == FIRST


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
        found = event_of(subject, headers, payload)
        assert isinstance(found, str) and expected in found, (expected, found)
