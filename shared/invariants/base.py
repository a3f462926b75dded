"""What an invariant is: the Protocol every one implements, the Subject it judges and the
Verdict it returns, with the helpers that build verdicts.

The built-ins (`builtin.py`) and the registry (`__init__.py`) both import this module; it
imports neither, so the two no longer import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable
from uuid import UUID

from shared.aggregates import Agent, Job, Lease
from shared.messages import Propose
from shared.policy import Policy

VerdictKind = Literal["pass", "fail", "error"]


@dataclass(frozen=True)
class Verdict:
    verdict: VerdictKind
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def passed(**evidence: Any) -> Verdict:
    return Verdict("pass", evidence)


def failed(reason: str, **evidence: Any) -> Verdict:
    return Verdict("fail", {"reason": reason, **evidence})


def errored(reason: str, **evidence: Any) -> Verdict:
    return Verdict("error", {"reason": reason, **evidence})


def not_applicable(reason: str) -> Verdict:
    return Verdict("pass", {"applicable": False, "reason": f"not applicable: {reason}"})


@dataclass(frozen=True)
class Subject:
    """What an invariant judges: the whole proposal and the state it would change."""

    proposal_id: UUID
    proposal: Propose  # payload already read from the object store when it was large
    job: Job
    agent: Agent | None
    lease: Lease | None  # the lease the proposal was made under
    received_at: datetime  # when the input stream stored it
    branch: str  # for git.patch: where the change would land (the agent's authority decides)
    policy: Policy


@runtime_checkable
class Invariant(Protocol):
    name: str
    version: str

    async def check(self, subject: Subject) -> Verdict: ...
