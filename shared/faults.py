"""Fault injection for crash tests: `WARDEN_FAULT=service:point[,service:point...]`.

A armed point SIGKILLs its own process, the way a power cut or the OOM killer would: no
cleanup, no flush, no finally blocks. Nothing is armed unless the variable names it.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("warden.faults")


def armed(service: str, point: str) -> bool:
    spec = os.environ.get("WARDEN_FAULT", "")
    return f"{service}:{point}" in {s.strip() for s in spec.split(",") if s.strip()}


def crash_if_armed(service: str, point: str) -> None:
    if armed(service, point):
        log.critical("WARDEN_FAULT: %s killing itself at %s", service, point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
