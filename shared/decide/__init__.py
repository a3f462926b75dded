"""Pure decisions: each command's rule is a function of (state, input, clock) that returns the
events to append, or a refusal. No I/O, no clock reads, no version arithmetic by hand.

A handler is five steps: decode → load state → decide → save → reply. The deciding step lives
here (`leases`, `proposals`, `agents`, `operators`), so "given this job and this agent, what
happens?" is answered by a unit test with no server (tests/unit/).

Versions: a rule builds its events with `originator_version=NEXT` and returns them through
`after(state, ...)` (one aggregate) or `numbered(...)` (several): the one place that counts.

Conflicts: a save that loses the race to another replica raises IntegrityError; `retry` re-reads
and decides again, and after `tries` lost races raises `Contended`, which the consumer answers
by nak and redelivery (never a reply that pretends the save happened, never a silent drop).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Protocol, TypeVar
from uuid import UUID

from eventsourcing.persistence import IntegrityError
from msgspec import Struct
from msgspec.structs import replace

from shared.events import Event
from shared.validation import FieldError

# The placeholder version a rule builds its events with; `after` and `numbered` replace it.
NEXT = 0

Clock = Callable[[], datetime]


class Versioned(Protocol):
    @property
    def id(self) -> UUID: ...

    @property
    def version(self) -> int: ...


class Refusal(Struct, frozen=True, kw_only=True):
    """Why a command is not carried out: recorded as the input's rejection and answered."""

    errors: list[FieldError]
    # The job the refusal is about, when the sender needs it (an idempotency conflict).
    job_id: UUID | None = None

    @classmethod
    def of(cls, path: str, message: str, *, job_id: UUID | None = None) -> Refusal:
        return cls(errors=[FieldError(path=path, message=message)], job_id=job_id)

    @property
    def reason(self) -> str:
        return "; ".join(e.message for e in self.errors)


E = TypeVar("E", bound=Event)


def after(state: Versioned | None, *drafts: E) -> list[E]:
    """Number one aggregate's drafts as the versions after `state`'s (1, 2, ... for a new one)."""
    base = state.version if state is not None else 0
    return [replace(d, originator_version=base + i) for i, d in enumerate(drafts, start=1)]


def numbered(drafts: Iterable[E], versions: Mapping[UUID, int]) -> list[E]:
    """Number drafts of several aggregates: each after its aggregate's version in `versions`
    (0 for an aggregate not there: a new one), in the order given."""
    last = dict(versions)
    out: list[E] = []
    for draft in drafts:
        version = last.get(draft.originator_id, 0) + 1
        last[draft.originator_id] = version
        out.append(replace(draft, originator_version=version))
    return out


class Contended(Exception):
    """A save lost the race to other writers on every try: redeliver the input later."""


T = TypeVar("T")

DEFAULT_TRIES = 5


async def retry(
    step: Callable[[], Awaitable[T]],
    reload: Callable[[], Awaitable[object]],
    *,
    tries: int = DEFAULT_TRIES,
    what: str = "save",
) -> T:
    """The one optimistic-concurrency policy: run `step` (load, decide, save); on a lost race
    run `reload` (re-read what moved) and step again; after `tries` races raise `Contended`.

    `step` decides afresh each time from what it loads, so a step that finds its change already
    made (a redelivery, a replica that won) decides nothing and returns normally.
    """
    for _ in range(tries):
        try:
            return await step()
        except IntegrityError:
            await reload()
    raise Contended(f"{what} lost the race {tries} times; the input will be delivered again")
