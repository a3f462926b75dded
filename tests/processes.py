"""Stopping a subprocess a test started: signal, wait, and close its pipes, so none is left for
the garbage collector (an unclosed pipe is a ResourceWarning, and warnings fail the suite)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def ended(proc: subprocess.Popen[Any], signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send `signum` (nothing, if it has exited), wait up to `timeout`, close its pipes; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signum)
    try:
        return proc.wait(timeout=timeout)
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
