"""The autonomy policy: what each level may do and what moves an agent between levels.

Declared in `ops/autonomy.yaml` (override with WARDEN_POLICY). Decisions consult it at the
moment of deciding, so a demotion takes effect on the very next proposal or claim.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Literal
from uuid import UUID

import msgspec
import yaml
from msgspec import Struct, field

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "ops" / "autonomy.yaml"


class PolicyError(ValueError):
    """Raised when the policy file is missing, unreadable or invalid (the message says where)."""


class Level(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: int
    name: str
    effects: list[str]
    branches: Literal["sandbox", "target"] = "sandbox"
    # Leases an agent works at once; one whose proposal awaits its decision no longer counts.
    max_leases: int = 1
    invariants: list[str] = field(default_factory=list)


class Promotion(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    clean_completions: int = 3
    max_level: int = 2


class Demotion(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    on_failed_invariants: list[str] = field(default_factory=list)


class Revocation(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    on_failed_invariants: list[str] = field(default_factory=lambda: ["scope"])
    repeated_lease_expiries: int = 3
    budget_breaches: int = 2


class Rollback(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    on_revoke: Literal["none", "offending", "since_level_change"] = "offending"


class Policy(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    levels: list[Level]
    promotion: Promotion = field(default_factory=Promotion)
    demotion: Demotion = field(default_factory=Demotion)
    revocation: Revocation = field(default_factory=Revocation)
    rollback: Rollback = field(default_factory=Rollback)

    @property
    def top_level(self) -> int:
        """The highest declared level: no agent can hold more, so no job may require more."""
        return max(lv.level for lv in self.levels)

    @property
    def bottom_level(self) -> int:
        return min(lv.level for lv in self.levels)

    def level_refusal(self, level: int) -> str | None:
        """Why an agent may not be put at `level` (it is not one the policy declares), or None."""
        declared = sorted(lv.level for lv in self.levels)
        if level in declared:
            return None
        listed = ", ".join(map(str, declared))
        if level > self.top_level:
            return f"level {level} is above the policy's highest level {self.top_level} (levels {listed})"
        if level < self.bottom_level:
            return f"level {level} is below the policy's lowest level {self.bottom_level} (levels {listed})"
        return f"level {level} is not a level of the policy (levels {listed})"

    def at(self, level: int) -> Level:
        """The rules of `level` (levels above the highest declared use the highest)."""
        ordered = sorted(self.levels, key=lambda lv: lv.level)
        chosen = ordered[0]
        for lv in ordered:
            if lv.level <= level:
                chosen = lv
        return chosen

    def effect_refusal(self, level: int, effect: str) -> str | None:
        """Why an agent at `level` may not perform `effect`, or None when it may."""
        rules = self.at(level)
        if effect not in rules.effects:
            return (
                f"level {level} ({rules.name}) may not perform {effect}; allowed: {', '.join(rules.effects)}"
            )
        return None

    def branch_for(self, level: int, agent: str, job_id: UUID, target_branch: str) -> str:
        """Where a git change lands: a sandbox branch per agent and job, or the target."""
        if self.at(level).branches == "target":
            return target_branch
        return f"warden/{agent}/{job_id}"

    def required_invariants(self, level: int) -> list[str]:
        return list(self.at(level).invariants)


def load_policy(path: Path | None = None) -> Policy:
    """The policy from `path`, WARDEN_POLICY, or ops/autonomy.yaml, in that order."""
    chosen = path or Path(os.environ.get("WARDEN_POLICY") or DEFAULT_POLICY)
    return _load(chosen)


@cache
def _load(path: Path) -> Policy:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read autonomy policy {path}: {exc}") from exc
    try:
        policy = msgspec.convert(raw, Policy)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"invalid autonomy policy {path}: {exc}") from exc
    if not policy.levels:
        raise PolicyError(f"autonomy policy {path} declares no levels")
    if policy.promotion.max_level > policy.top_level:
        raise PolicyError(
            f"autonomy policy {path}: promotion.max_level {policy.promotion.max_level} is above "
            f"the highest declared level {policy.top_level}"
        )
    return policy
