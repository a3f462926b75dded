"""Applier: performs the effect of every accepted proposal exactly once, and compensates on request.

`service` is the loop and the record protocol; `effects` holds one module per effect kind.
"""

from services.applier.service import Applier

__all__ = ["Applier"]
