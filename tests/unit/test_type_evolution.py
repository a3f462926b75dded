"""Stored and replied types may grow: a newer writer's extra fields (at any depth of a contract)
never break an older reader. Inputs stay strict: an unknown field anywhere is refused by path."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from shared import events
from shared.contract import Contract, Scope
from shared.messages import JobRequest, LeaseGrant, reply_decoder
from shared.validation import InvalidInput, decode


def _with_extras(encoded: bytes) -> bytes:
    raw = msgspec.json.decode(encoded)
    raw["added_later"] = {"anything": [1, 2]}
    raw["contract"]["added_later"] = True
    raw["contract"]["scope"]["added_later"] = "x"
    raw["contract"]["stopping"]["budgets"]["added_later"] = 3
    return msgspec.json.encode(raw)


CONTRACT = Contract(scope=Scope(paths=["src/**"]))


def test_an_event_written_with_fields_this_version_lacks_still_decodes() -> None:
    event = events.JobRequested(
        originator_id=uuid.uuid4(), originator_version=1, idempotency_key="k", kind="k", contract=CONTRACT
    )
    decoded = events.decode(_with_extras(events.encode(event)))
    assert isinstance(decoded, events.JobRequested) and decoded.contract == CONTRACT


def test_a_lease_grant_with_fields_this_sdk_lacks_still_decodes() -> None:
    grant = LeaseGrant(
        job_id=uuid.uuid4(),
        kind="k",
        epoch=1,
        expires_at=datetime(2026, 12, 3, tzinfo=UTC),
        ttl_s=30,
        heartbeat_interval_s=5,
        contract=CONTRACT,
    )
    decoded = reply_decoder.decode(_with_extras(msgspec.json.encode(grant)))
    assert isinstance(decoded, LeaseGrant) and decoded.contract == CONTRACT


@pytest.mark.parametrize(
    "path",
    [
        "$.added_later",
        "$.contract.added_later",
        "$.contract.scope.added_later",
        "$.contract.stopping.budgets.added_later",
    ],
)
def test_an_input_with_an_unknown_field_at_any_depth_is_refused_naming_it(path: str) -> None:
    raw = msgspec.to_builtins(JobRequest(idempotency_key="k", kind="k", contract=CONTRACT))
    raw["contract"].setdefault("stopping", {}).setdefault("budgets", {})
    node = raw
    *parents, leaf = path.removeprefix("$.").split(".")
    for key in parents:
        node = node[key]
    node[leaf] = 1
    with pytest.raises(InvalidInput) as refused:
        decode(msgspec.json.encode(raw), JobRequest)
    assert [(e.path, e.message) for e in refused.value.errors] == [(path, "unknown field")]
