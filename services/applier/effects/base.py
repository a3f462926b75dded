"""What every effect is: the protocol, its result and its one failure."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple, Protocol

from nats.js import JetStreamContext

from shared.aggregates import Job, ProposalState
from shared.messages import Propose

Receipt = dict[str, Any]


class EffectError(Exception):
    """The effect cannot be performed and the world is unchanged: recorded as `effect.failed`."""

    def __init__(self, reason: str, **evidence: Any) -> None:
        self.reason = reason
        self.evidence = evidence
        super().__init__(reason)


class Performed(NamedTuple):
    receipt: Receipt
    # True when the effect was found already made (by a replica, or before a crash).
    reused: bool


class Effect(Protocol):
    def exclusive(self, job: Job, state: ProposalState) -> Hashable | None:
        """What this effect must have to itself while it looks for its receipt and acts (one
        branch of a repository, one directory), so the applier's concurrent drivers never
        interleave two effects there; None when effects of this kind never collide."""
        ...

    async def find_receipt(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose | None
    ) -> Receipt | None:
        """The proof that this proposal's effect already happened, or None."""
        ...

    async def perform(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose
    ) -> Performed:
        """Make the effect, once `find_receipt` found none; raises EffectError when it cannot."""
        ...

    async def compensate(self, js: JetStreamContext, job: Job, state: ProposalState) -> Performed:
        """Undo the applied effect named by `state.receipt`; raises EffectError when it cannot."""
        ...


class NoEffect:
    """`none`: a receipt only."""

    def exclusive(self, job: Job, state: ProposalState) -> Hashable | None:
        return None

    async def find_receipt(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose | None
    ) -> Receipt | None:
        return None

    async def perform(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose
    ) -> Performed:
        return Performed({"kind": "none"}, False)

    async def compensate(self, js: JetStreamContext, job: Job, state: ProposalState) -> Performed:
        return Performed({"kind": "none"}, False)


class UnknownEffect:
    """A kind no module performs (a record older or newer than this applier): it fails, recorded."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def exclusive(self, job: Job, state: ProposalState) -> Hashable | None:
        return None

    async def find_receipt(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose | None
    ) -> Receipt | None:
        return None

    async def perform(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose
    ) -> Performed:
        raise EffectError(f"unknown effect kind {self.kind}")

    async def compensate(self, js: JetStreamContext, job: Job, state: ProposalState) -> Performed:
        raise EffectError(f"unknown effect kind {self.kind}")
