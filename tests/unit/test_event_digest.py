"""An event's digest (the hash chain's link) is the hash of its bytes as stored."""

from __future__ import annotations

import hashlib
import uuid

from shared import events
from shared.aggregates import evolve_job
from shared.contract import Contract
from shared.events import JobRequested


def requested() -> JobRequested:
    job_id = uuid.uuid4()
    return JobRequested(
        originator_id=job_id, originator_version=1, idempotency_key=str(job_id), kind="k", contract=Contract()
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_event_built_here_hashes_as_it_will_be_stored() -> None:
    event = requested()
    assert events.digest(event) == sha(events.encode(event))


def test_a_decoded_event_hashes_as_stored_even_when_a_newer_writer_added_a_field_unknown_here() -> None:
    stored = events.encode(requested())[:-1] + b',"added_later":{"x":1}}'
    event = events.decode(stored)
    assert events.encode(event) != stored  # re-encoded, the unknown field is gone
    job = evolve_job(None, event)
    assert job is not None and job.last_hash == events.digest(event) == sha(stored)


def test_the_digests_kept_are_bounded_and_a_forgotten_one_is_recomputed() -> None:
    first = events.decode(events.encode(requested()))
    for _ in range(events._DIGESTS_KEPT):
        events.decode(events.encode(requested()))
    assert len(events._digests) <= events._DIGESTS_KEPT
    assert events.digest(first) == sha(events.encode(first))
