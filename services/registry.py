"""The services `warden run NAME` and `warden up` know, each a thin task group over `shared`."""

from __future__ import annotations

from collections.abc import Callable

from shared.runtime import Service


def _scheduler() -> Service:
    from services.scheduler import Scheduler

    return Scheduler()


def _reconciler() -> Service:
    from services.reconciler import Reconciler

    return Reconciler()


def _revoker() -> Service:
    from services.revoker import Revoker

    return Revoker()


SERVICES: dict[str, Callable[[], Service]] = {
    "scheduler": _scheduler,
    "reconciler": _reconciler,
    "revoker": _revoker,
}


def build(names: list[str] | None = None) -> list[Service]:
    chosen = names or list(SERVICES)
    unknown = [n for n in chosen if n not in SERVICES]
    if unknown:
        raise KeyError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    return [SERVICES[n]() for n in chosen]
