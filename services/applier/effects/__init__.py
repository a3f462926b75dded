"""The applier's effects, one module per kind behind one protocol, chosen by the proposal's kind.

Every effect answers three questions: has this proposal's effect already happened (its
receipt, found by whoever made it: us, a replica, a run that crashed before recording)? do it;
undo it. The service asks `find_receipt` before `perform`, so a crash between an effect and its
record is re-driven into a record, never into a second effect.
"""

from __future__ import annotations

from services.applier.effects.base import (
    Effect,
    EffectError,
    NoEffect,
    Performed,
    Receipt,
    UnknownEffect,
)
from services.applier.effects.files import FileWrite
from services.applier.effects.git import GitPatch
from services.applier.effects.webhook import Webhook

__all__ = ["EFFECTS", "Effect", "EffectError", "Performed", "Receipt", "effect_for"]

# The proposal's effect kind (fixed at acceptance) selects the module that carries it out.
EFFECTS: dict[str, Effect] = {
    "none": NoEffect(),
    "git.patch": GitPatch(),
    "file.write": FileWrite(),
    "webhook": Webhook(),
}


def effect_for(kind: str) -> Effect:
    return EFFECTS.get(kind) or UnknownEffect(kind)
