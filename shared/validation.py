"""Decode untrusted input and report *every* invalid field, not just the first.

msgspec stops at the first error; a submitter fixing a request one field per round trip is a bad
experience. So a failed typed decode falls back to walking the Struct's fields one by one.
"""

from __future__ import annotations

import functools
import types
from typing import Any, TypeVar, Union, get_args, get_origin

import msgspec
from msgspec import Struct

T = TypeVar("T")


class FieldError(Struct, frozen=True, kw_only=True):
    """One thing wrong with an input, located by a JSON path such as `$.contract.scope`."""

    path: str
    message: str


MISSING_SUFFIX = " in the record"


def missing(path: str, what: str) -> FieldError:
    """The answer to an input naming a job, agent or proposal Warden has no record of (so a
    client can tell "no such thing", exit 3 in the CLI, from "refused")."""
    return FieldError(path=path, message=f"no {what}{MISSING_SUFFIX}")


def names_missing(errors: list[FieldError]) -> bool:
    return any(e.message.startswith("no ") and e.message.endswith(MISSING_SUFFIX) for e in errors)


class InvalidInput(ValueError):
    """Raised when input cannot be decoded into its declared type; carries every field error."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.path}: {e.message}" for e in errors))


def _struct_of(tp: Any) -> type[Struct] | None:
    if isinstance(tp, type) and issubclass(tp, Struct):
        return tp
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        structs = [a for a in get_args(tp) if isinstance(a, type) and issubclass(a, Struct)]
        if len(structs) == 1:
            return structs[0]
    return None


@functools.cache
def _fields_of(struct: type[Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    """A Struct's fields by their encoded name. Cached: `msgspec.structs.fields` evaluates the
    class's annotations on every call, which took a fifth of the reconciler's time per input."""
    return {f.encode_name: f for f in msgspec.structs.fields(struct)}


def _collect(value: Any, tp: Any, path: str, errors: list[FieldError]) -> None:
    struct = _struct_of(tp)
    if struct is None or (value is None and struct is not tp):
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as exc:
            text = str(exc)
            sub = ""
            if " - at `$" in text:
                text, _, sub = text.partition(" - at `$")
                sub = sub.rstrip("`")
            errors.append(FieldError(path=path + sub, message=text))
        return
    if not isinstance(value, dict):
        errors.append(FieldError(path=path, message=f"Expected `object`, got `{type(value).__name__}`"))
        return
    info = _fields_of(struct).values()
    known = {f.encode_name for f in info}
    config = struct.__struct_config__
    if config.tag_field:
        known.add(config.tag_field)
    for key in value:  # inputs are strict at every depth, whatever the type's own setting
        if key not in known:
            errors.append(FieldError(path=f"{path}.{key}", message="unknown field"))
    for f in info:
        if f.encode_name in value:
            _collect(value[f.encode_name], f.type, f"{path}.{f.encode_name}", errors)
        elif f.required:
            errors.append(FieldError(path=f"{path}.{f.encode_name}", message="missing required field"))


def _unknown_fields(value: Any, tp: Any, path: str, errors: list[FieldError]) -> None:
    """Every key of `value` that no Struct field of `tp` names, at any depth."""
    origin = get_origin(tp)
    if origin is list and isinstance(value, list):
        (item,) = get_args(tp) or (Any,)
        for i, v in enumerate(value):
            _unknown_fields(v, item, f"{path}[{i}]", errors)
        return
    struct = _struct_of(tp)
    if struct is None or not isinstance(value, dict):
        return
    fields = _fields_of(struct)
    tag_field = struct.__struct_config__.tag_field
    for key, item in value.items():
        if key in fields:
            _unknown_fields(item, fields[key].type, f"{path}.{key}", errors)
        elif key != tag_field:
            errors.append(FieldError(path=f"{path}.{key}", message="unknown field"))


MAX_DEPTH = 64  # deeper JSON is refused before the field walk, which recurses per level


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def decode(data: bytes, tp: type[T], *, max_bytes: int | None = None) -> T:
    """Decode JSON bytes into `tp`, or raise InvalidInput listing every problem found.

    Whatever the bytes (any depth, any number, invalid UTF-8), the only exception is
    InvalidInput: a bad input is a refusal with a reason, never a handler failure.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidInput(
            [FieldError(path="$", message=f"input is {len(data)} bytes, the limit is {max_bytes}")]
        )
    try:
        value = msgspec.json.decode(data, type=tp)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise InvalidInput([FieldError(path="$", message=f"not valid JSON: {exc}")]) from None
    except RecursionError:
        raise InvalidInput([FieldError(path="$", message="JSON nested too deeply")]) from None
    else:
        # Stored and replied types accept unknown fields (so they can grow); an input may not
        # carry one anywhere: a typo in a contract is an error, not a silent default.
        unknown: list[FieldError] = []
        _unknown_fields(msgspec.json.decode(data), tp, "$", unknown)
        if not unknown:
            return value
        raise InvalidInput(unknown)
    try:
        raw = msgspec.json.decode(data)
    except RecursionError:
        raise InvalidInput([FieldError(path="$", message="JSON nested too deeply")]) from None
    except msgspec.MsgspecError as exc:  # e.g. a number out of range: 1e400
        raise InvalidInput([FieldError(path="$", message=f"not usable JSON: {exc}")]) from None
    if _too_deep(raw):
        raise InvalidInput([FieldError(path="$", message=f"JSON nested deeper than {MAX_DEPTH} levels")])
    errors: list[FieldError] = []
    try:
        _collect(raw, tp, "$", errors)
    except (msgspec.MsgspecError, RecursionError, ValueError, TypeError) as exc:
        errors.append(FieldError(path="$", message=f"invalid: {exc}"))
    if not errors:  # a rule only the whole-value decode sees (e.g. an unknown tag)
        try:
            msgspec.json.decode(data, type=tp)
        except msgspec.ValidationError as exc:
            errors.append(FieldError(path="$", message=str(exc)))
    if not errors:  # cannot happen: the typed decode failed, so something is wrong
        errors.append(FieldError(path="$", message="invalid input"))
    raise InvalidInput(errors)
