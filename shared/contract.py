"""The execution contract: what a job may touch, what it must produce, and when it must stop.

Every job request carries one. It is validated when the request arrives; a breach later (a path
outside scope, a budget exceeded, a deadline passed) is a failure signal, never a surprise.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from shared.paths import glob_problem

PositiveSeconds = Annotated[float, Meta(gt=0, le=86_400 * 7)]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Glob = Annotated[str, Meta(min_length=1, max_length=512)]
EffectKind = Annotated[str, Meta(pattern="^(git\\.patch|file\\.write|webhook|none)$")]


class Scope(Struct, frozen=True, kw_only=True):
    """Where a change may land: path globs (`**` crosses directories) and effect kinds."""

    paths: list[Glob] = field(default_factory=lambda: ["**"])
    effects: list[EffectKind] = field(default_factory=lambda: ["git.patch"])
    # What the agent's sandbox holds: tracked files matching these globs (`warden agent exec`
    # leaves every other file out of the job's workspace, history included).
    read: list[Glob] = field(default_factory=lambda: ["**"])


class Budgets(Struct, frozen=True, kw_only=True):
    """Upper bounds on what one attempt may consume; None means unbounded."""

    steps: NonNegInt | None = None
    tokens: NonNegInt | None = None
    cost: NonNegFloat | None = None
    wall_clock_s: PositiveSeconds | None = None


class Stopping(Struct, frozen=True, kw_only=True):
    """When Warden stops a job: deadline, attempts, lease liveness and budgets."""

    deadline: datetime | None = None
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    lease_ttl_s: PositiveSeconds = 30.0
    heartbeat_interval_s: PositiveSeconds = 10.0
    budgets: Budgets = field(default_factory=Budgets)
    # A wrapped command that shows no sign of progress (no output, no change in its workspace,
    # no usage report) for this long is stalled: `warden agent exec` stops heartbeating for it.
    stall_s: PositiveSeconds | None = None


class CiGate(Struct, frozen=True, kw_only=True):
    """A command run in an isolated worktree with the proposal applied."""

    command: Annotated[list[str], Meta(min_length=1)]
    timeout_s: PositiveSeconds = 300.0


class Target(Struct, frozen=True, kw_only=True):
    """Where effects land: a git repository and branch, or a directory, or a URL."""

    repo: str | None = None
    branch: str = "main"
    directory: str | None = None
    url: str | None = None


class Contract(Struct, frozen=True, kw_only=True):
    scope: Scope = field(default_factory=Scope)
    authorities: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    # JSON Schema the proposal's `output` must satisfy (checked by the output-shape invariant).
    output_schema: dict[str, Any] | None = None
    required_level: Annotated[int, Meta(ge=0, le=10)] = 0
    stopping: Stopping = field(default_factory=Stopping)
    target: Target = field(default_factory=Target)
    ci: CiGate | None = None
    invariants: list[str] = field(default_factory=list)
    approval_required: bool = False
    # An attempt that changes nothing (effect "none") is a result when "accept", a failed
    # attempt when "fail" (the empty_change invariant decides); never a scope breach.
    on_empty: Literal["accept", "fail"] = "accept"


def scope_errors(scope: Scope) -> list[tuple[str, str]]:
    """Every glob that the scope invariant could not match, or that names unsafe paths."""
    return [
        (f"$.contract.scope.paths[{i}]", f"glob {glob!r} {problem}")
        for i, glob in enumerate(scope.paths)
        if (problem := glob_problem(glob))
    ] + [
        (f"$.contract.scope.read[{i}]", f"glob {glob!r} {problem}")
        for i, glob in enumerate(scope.read)
        if (problem := glob_problem(glob))
    ]


def semantic_errors(contract: Contract, now: datetime, *, max_level: int) -> list[tuple[str, str]]:
    """Rules a type cannot express, all of them: (field path, message) pairs.

    `max_level` is the policy's highest level: a job requiring more could never be granted.
    """
    errors = scope_errors(contract.scope)
    if contract.required_level > max_level:
        errors.append(
            (
                "$.contract.required_level",
                f"level {contract.required_level} is above the policy's highest level {max_level}: "
                "no agent can ever hold it",
            )
        )
    stop = contract.stopping
    if stop.heartbeat_interval_s >= stop.lease_ttl_s:
        errors.append(
            (
                "$.contract.stopping.heartbeat_interval_s",
                f"must be shorter than lease_ttl_s ({stop.lease_ttl_s}s), "
                "or a healthy agent's lease expires between heartbeats",
            )
        )
    if stop.deadline is not None:
        if stop.deadline.tzinfo is None:
            errors.append(("$.contract.stopping.deadline", "must carry a timezone"))
        elif stop.deadline <= now:
            errors.append(("$.contract.stopping.deadline", "is already in the past"))
    if "git.patch" in contract.scope.effects and contract.target.repo is None:
        pass  # a git effect without a repo is allowed until an effect is proposed
    return errors


def partial_semantic_errors(raw: object, now: datetime, *, max_level: int) -> list[tuple[str, str]]:
    """`semantic_errors` for a contract whose fields do not all have their types.

    Each top-level part that has its type on its own (scope, required_level, stopping, ...) is
    checked; a part with a type error is left to that error. So a submitter sees every problem
    in one answer, not the type errors first and the rest on the next round trip.
    """
    if not isinstance(raw, dict):
        return []
    typed: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            msgspec.convert({name: value}, Contract)
        except msgspec.ValidationError:
            continue
        typed[name] = value
    return semantic_errors(msgspec.convert(typed, Contract), now, max_level=max_level)
