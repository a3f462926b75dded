"""schemas/ is generated from the Structs; these tests fail when the two drift apart."""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from jsonschema import FormatChecker
from jsonschema.validators import validator_for

from services.api import spec
from shared import events, messages, schemas
from shared.validation import InvalidInput

ROOT = Path(__file__).resolve().parent.parent / "schemas"


def test_the_committed_schemas_match_the_code() -> None:
    assert schemas.drift(ROOT) == [], "run `warden schemas export` and commit schemas/"


def test_a_field_change_without_re_export_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "schemas"
    shutil.copytree(ROOT, copy)

    class ChangedGrant(events.Event, frozen=True, tag="lease.granted"):
        agent: str
        epoch: int
        colour: str  # a field the exported schema does not know

    groups = dict(schemas.GROUPS)
    groups["events"] = tuple(ChangedGrant if t is events.LeaseGranted else t for t in events.EVENT_TYPES)
    monkeypatch.setattr(schemas, "GROUPS", groups)
    assert schemas.drift(copy) == ["stale events/lease.granted.json"]


def test_every_event_tag_is_explicit_and_unique() -> None:
    tags = [t.__struct_config__.tag for t in events.EVENT_TYPES]
    assert all(isinstance(tag, str) and "." in tag for tag in tags)
    assert len(set(tags)) == len(tags)
    for tp in events.EVENT_TYPES:
        assert tp.__struct_config__.frozen


def test_an_unknown_event_tag_is_refused_by_the_decoder() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value 'job\.teleported'"):
        events.decode(
            b'{"type":"job.teleported","originator_id":"00000000-0000-0000-0000-000000000000","originator_version":1}'
        )


# --- the published schemas and the server's decoders agree --------------------------------

WRONG_TYPES: list[Any] = [None, True, 7, 7.5, "wrong", [], {}]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    names: dict[type[object], str] = {str: "string", list: "array", dict: "object"}
    return names[type(value)]


def _branches(node: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    while "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in node:
        return [b for branch in node["anyOf"] for b in _branches(branch, root)]
    return [node]


def _child(node: dict[str, Any], key: Any, root: dict[str, Any]) -> dict[str, Any]:
    for branch in _branches(node, root):
        if isinstance(key, str) and key in branch.get("properties", {}):
            return dict(branch["properties"][key])
        if isinstance(key, str) and isinstance(branch.get("additionalProperties"), dict):
            return dict(branch["additionalProperties"])
        if isinstance(key, int) and "items" in branch:
            return dict(branch["items"])
    return {}


def _allowed_types(node: dict[str, Any], root: dict[str, Any]) -> set[str] | None:
    """The JSON types the schema allows at `node`; None when it allows any."""
    allowed: set[str] = set()
    for branch in _branches(node, root):
        if "type" in branch:
            allowed.add(branch["type"])
        elif "enum" in branch or "const" in branch:
            allowed.update(_json_type(v) for v in branch.get("enum", [branch.get("const")]))
        else:
            return None
    if "number" in allowed:
        allowed.add("integer")
    return allowed


# A valid string for each pattern a field declares (a new pattern needs its entry here).
PATTERN_VALUES = {
    "^(git\\.patch|file\\.write|webhook|none)$": "file.write",
    "^[A-Za-z0-9_-]{1,64}$": "agent-1",
}


def _generated(t: msgspec.inspect.Type) -> Any:
    """A valid value of `t`, every optional field filled: for schemas that publish no examples."""
    i = msgspec.inspect
    if isinstance(t, i.StructType):
        out = {f.encode_name: _generated(f.type) for f in t.fields}
        if t.tag_field:
            out[t.tag_field] = t.tag
        return out
    if isinstance(t, i.UnionType):
        return _generated(next(x for x in t.types if not isinstance(x, i.NoneType)))
    if isinstance(t, i.LiteralType):
        return t.values[0]
    if isinstance(t, i.StrType):
        if t.pattern is not None:
            return PATTERN_VALUES[t.pattern]
        return "x" * max(t.min_length or 1, 1)
    if isinstance(t, i.BoolType):
        return True
    if isinstance(t, i.IntType):
        return max(t.ge or 0, (t.gt or 0) + 1)
    if isinstance(t, i.FloatType):
        return 0.5
    if isinstance(t, i.UUIDType):
        return str(uuid.uuid4())
    if isinstance(t, i.DateTimeType):
        return "2099-01-01T00:00:00Z"
    if isinstance(t, i.ListType | i.VarTupleType):
        return [_generated(t.item_type)]
    if isinstance(t, i.DictType):
        return {"k": _generated(t.value_type)}
    if isinstance(t, i.AnyType):
        return {"anything": [1, "two"]}
    raise AssertionError(f"no generated value for {t}")


def _locations(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*at, key)
            yield from _locations(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*at, index)
            yield from _locations(item, (*at, index))


def _at(value: Any, where: tuple[Any, ...]) -> Any:
    for key in where:
        value = value[key]
    return value


def _variants(example: dict[str, Any], schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The example, then: each field removed, each given a value of a JSON type its schema does not
    allow, and an unknown field added to each object."""
    yield "as published", example
    for where in _locations(example):
        *parents, last = where
        holder = _at(example, tuple(parents))
        if isinstance(holder, dict):
            removed = copy.deepcopy(example)
            del _at(removed, tuple(parents))[last]
            yield f"without {where}", removed
        node: dict[str, Any] = schema
        for key in where:
            node = _child(node, key, schema)
        allowed = _allowed_types(node, schema)
        for wrong in WRONG_TYPES:
            if allowed is None or _json_type(wrong) in allowed:
                continue
            changed = copy.deepcopy(example)
            _at(changed, tuple(parents))[last] = wrong
            yield f"{where} = {wrong!r}", changed
    for where in [(), *_locations(example)]:
        if isinstance(_at(example, where), dict):
            added = copy.deepcopy(example)
            _at(added, where)["colour"] = "red"
            yield f"unknown field at {where}", added


def _server_accepts(group: str, tp: type[msgspec.Struct], data: bytes) -> bool:
    try:
        if group == "inputs":
            messages.decode_input(data, tp)  # type: ignore[type-var]
        elif group == "events":
            assert type(events.decode(data)) is tp
        elif group == "agent":  # files exec and its command exchange: each read as its own type
            msgspec.json.decode(data, type=tp)
        else:
            assert type(messages.reply_decoder.decode(data)) is tp
    except (InvalidInput, msgspec.ValidationError):
        return False
    return True


SCHEMA_CASES = [(group, tp) for group, types in schemas.GROUPS.items() for tp in types]


@pytest.mark.parametrize(
    ("group", "tp"), SCHEMA_CASES, ids=[f"{g}/{schemas.schema_name(t)}" for g, t in SCHEMA_CASES]
)
def test_the_server_and_the_published_schema_accept_and_refuse_the_same_messages(
    group: str, tp: type[msgspec.Struct]
) -> None:
    schema = json.loads((ROOT / group / f"{schemas.schema_name(tp)}.json").read_text())
    validator = validator_for(schema)(schema, format_checker=FormatChecker())
    examples = schema.get("examples") or [_generated(msgspec.inspect.type_info(tp))]
    disagreements = []
    refused = 0
    for example in examples:
        for what, instance in _variants(example, schema):
            by_schema = validator.is_valid(instance)
            by_server = _server_accepts(group, tp, json.dumps(instance).encode())
            refused += not by_server
            if by_schema != by_server:
                disagreements.append(
                    f"{what}: schema {'accepts' if by_schema else 'refuses'}, server does not"
                )
        assert _server_accepts(group, tp, json.dumps(example).encode()), f"example {example} is refused"
    assert refused > 0  # the negations did reach the decoder
    assert disagreements == []


def test_inputs_may_omit_their_type_since_the_subject_names_it_but_may_not_name_another() -> None:
    schema = json.loads((ROOT / "inputs" / "job.request.json").read_text())
    validator = validator_for(schema)(schema)
    body = {"idempotency_key": "k", "kind": "refactor"}
    assert validator.is_valid(body) and _server_accepts(
        "inputs", messages.JobRequest, json.dumps(body).encode()
    )
    wrong = {**body, "type": "agent.claim"}
    assert not validator.is_valid(wrong)
    assert not _server_accepts("inputs", messages.JobRequest, json.dumps(wrong).encode())


def test_the_openapi_document_requires_what_the_published_input_schemas_require() -> None:
    components = spec.openapi("test")["components"]["schemas"]
    for tp in (messages.JobRequest, messages.OperatorCommand):
        published = json.loads((ROOT / "inputs" / f"{tp.__struct_config__.tag}.json").read_text())
        assert components[tp.__name__]["required"] == published["$defs"][tp.__name__]["required"]
        assert "type" not in components[tp.__name__]["required"]
