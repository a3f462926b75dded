"""The invariant map: named, versioned checks every proposal must pass before any effect.

An invariant is an object with `name`, `version` and `async check(subject) -> Verdict`. The
built-ins (scope, output_shape, base_drift, ci_gate, budget; see `builtin.py`) are always
registered. Users add their own, as Python callables, through:

- the entry point group `warden.invariants` of any installed package, or
- `WARDEN_INVARIANTS="package.module:callable,other.module:Class"`.

A callable may be an Invariant object, a class (instantiated with no arguments), or a plain
function `(Subject) -> Verdict | bool` (sync or async) named by the `@invariant(name, version)`
decorator or, failing that, by its `__name__`. A name registered twice is a configuration error
raised at start, never a silent override.

Which invariants a proposal needs: the policy's for the agent's level, then the contract's own
(`contract.invariants`), in that order, each once. An invariant that does not apply to a
proposal (ci_gate without `contract.ci`, output_shape without a schema, base_drift for a
non-git effect) records verdict "pass" with evidence `{"applicable": false, "reason": ...}`,
so every required name has a recorded verdict and the record shows why it passed.

An invariant with `expensive = True` (or an `is_expensive(subject)` saying so, as ci_gate does when
it really runs a command) is not run once a cheaper one has failed; the
rejection lists it as "not run". A required name that nobody registered records verdict
"error" (fail closed), and so does an invariant that raises.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

import anyio

from shared.aggregates import Job
from shared.invariants.base import (
    Invariant,
    Subject,
    Verdict,
    VerdictKind,
    errored,
    failed,
    not_applicable,
    passed,
)
from shared.invariants.builtin import BUILTINS
from shared.policy import Policy

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV",
    "FunctionInvariant",
    "Invariant",
    "InvariantConfigError",
    "Registry",
    "Subject",
    "Verdict",
    "VerdictKind",
    "coerce",
    "errored",
    "failed",
    "invariant",
    "load",
    "not_applicable",
    "passed",
    "required",
]

ENTRY_POINT_GROUP = "warden.invariants"
ENV = "WARDEN_INVARIANTS"


class InvariantConfigError(RuntimeError):
    """A configured invariant cannot be loaded, or two share a name."""


class FunctionInvariant:
    """A plain function as an invariant; a sync one runs in a worker thread (it may block)."""

    def __init__(
        self, fn: Callable[[Subject], Any], name: str, version: str, expensive: bool = False
    ) -> None:
        self.fn = fn
        self.name = name
        self.version = version
        self.expensive = expensive

    async def check(self, subject: Subject) -> Verdict:
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(subject)
        else:
            result = await anyio.to_thread.run_sync(self.fn, subject)
        if isinstance(result, Verdict):
            return result
        if isinstance(result, bool):
            return Verdict("pass" if result else "fail", {"reason": "" if result else f"{self.name} said no"})
        return errored(f"{self.name} returned {type(result).__name__}, not a Verdict or bool")


def invariant(
    name: str, version: str = "1", *, expensive: bool = False
) -> Callable[[Callable[[Subject], Any]], Callable[[Subject], Any]]:
    """Name and version a plain function for registration. `expensive` (slow, or running
    outside code) makes the checker record earlier verdicts before running it."""

    def mark(fn: Callable[[Subject], Any]) -> Callable[[Subject], Any]:
        fn.invariant_name = name  # type: ignore[attr-defined]
        fn.invariant_version = version  # type: ignore[attr-defined]
        fn.invariant_expensive = expensive  # type: ignore[attr-defined]
        return fn

    return mark


def coerce(obj: Any, source: str) -> Invariant:
    """Turn whatever a configuration names into an Invariant, or say why it cannot be one."""
    if inspect.isclass(obj):
        obj = obj()
    if isinstance(obj, Invariant) and inspect.iscoroutinefunction(obj.check):
        return obj
    if callable(obj):
        name = getattr(obj, "invariant_name", None) or getattr(obj, "__name__", "")
        if not name:
            raise InvariantConfigError(f"{source}: an invariant needs a name (use @invariant)")
        return FunctionInvariant(
            obj,
            str(name),
            str(getattr(obj, "invariant_version", "1")),
            bool(getattr(obj, "invariant_expensive", False)),
        )
    raise InvariantConfigError(f"{source} is neither an invariant nor a callable")


def _import(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvariantConfigError(f"{ENV} entry {spec!r} must be module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvariantConfigError(f"{ENV} entry {spec!r}: cannot import {module_name}: {exc}") from exc
    try:
        target: Any = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise InvariantConfigError(f"{ENV} entry {spec!r}: {module_name} has no {attr}") from None
    return target


class Registry:
    def __init__(self, invariants: Iterable[Invariant] = ()) -> None:
        self._by_name: dict[str, Invariant] = {}
        for inv in invariants:
            self.add(inv)

    def add(self, inv: Invariant, source: str = "") -> None:
        if inv.name in self._by_name:
            raise InvariantConfigError(
                f"invariant {inv.name!r} is registered twice" + (f" (again by {source})" if source else "")
            )
        self._by_name[inv.name] = inv

    def get(self, name: str) -> Invariant | None:
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)


def load(env: str | None = None) -> Registry:
    """Built-ins, then installed entry points, then WARDEN_INVARIANTS (or `env`)."""
    registry = Registry(BUILTINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise InvariantConfigError(f"entry point {ep.name} ({ep.value}) failed to load: {exc}") from exc
        registry.add(coerce(obj, f"entry point {ep.value}"), ep.value)
    spec = os.environ.get(ENV, "") if env is None else env
    for item in (s.strip() for s in spec.split(",")):
        if item:
            registry.add(coerce(_import(item), item), item)
    return registry


def required(policy: Policy, level: int, job: Job) -> list[str]:
    """The policy's invariants for this level, then the contract's own, each once."""
    names: list[str] = []
    for name in (*policy.required_invariants(level), *job.contract.invariants):
        if name not in names:
            names.append(name)
    return names
