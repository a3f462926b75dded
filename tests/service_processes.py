"""`warden run SERVICE` as real processes, for fault and start-up tests.

Each process is the CLI itself (`python -m services.cli run ...`); a launcher lets several be
released at one instant (after their imports), so they race on a fresh store as an operator's
processes would. Output goes to a log file per process; readiness is its "warden ready" line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "warden ready"

# Imports what `warden run` imports, then waits for the release instant, then runs the CLI.
LAUNCHER = """
import sys, time
import services.cli.serve, services.registry, shared.runtime  # imported before the release
release = float(sys.argv[1])
time.sleep(max(0.0, release - time.time()))
from services.cli.main import main
sys.argv = ["warden", *sys.argv[2:]]
main()
"""


@dataclass
class ServiceProcess:
    service: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        return READY_LINE in self.output()

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until its ready line; AssertionError naming its output when it exits or times out."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.service} exited {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.service} not ready in {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.05)  # polling a log file the process writes, with a deadline

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM (drains), SIGKILL after 20 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def start(
    url: str,
    service: str,
    workdir: Path,
    *,
    label: str = "",
    release_at: float | None = None,
    env: dict[str, str] | None = None,
    verbose: bool = False,
) -> ServiceProcess:
    """`warden run SERVICE --nats URL`, its data dir and log under `workdir` (`verbose`: with its
    INFO lines, `warden -v`)."""
    label = label or service
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{label}.log"
    args = [
        *(["-v"] if verbose else []),
        "run",
        service,
        "--nats",
        url,
        "--data-dir",
        str(workdir / "data"),
        "--http",
        "127.0.0.1:0",
    ]
    base = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    with log.open("wb") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(release_at or 0.0), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**base, "PYTHONUNBUFFERED": "1", "WARDEN_API_AUTH": "off", **(env or {})},
            start_new_session=True,
        )
    return ServiceProcess(service, proc, log)
