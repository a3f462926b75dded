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


def _checker() -> Service:
    from services.checker import Checker

    return Checker()


def _applier() -> Service:
    from services.applier import Applier

    return Applier()


def _projector() -> Service:
    from services.projector import Projector

    return Projector()


def _api() -> Service:
    from services.api import Api

    return Api()


SERVICES: dict[str, Callable[[], Service]] = {
    "scheduler": _scheduler,
    "reconciler": _reconciler,
    # The read side: projections into SQLite/PostgreSQL, and the HTTP API and dashboard over them.
    "projector": _projector,
    "api": _api,
    "checker": _checker,
    "applier": _applier,
    "revoker": _revoker,
}


def build(names: list[str] | None = None) -> list[Service]:
    chosen = names or list(SERVICES)
    unknown = [n for n in chosen if n not in SERVICES]
    if unknown:
        raise KeyError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    return [SERVICES[n]() for n in chosen]
