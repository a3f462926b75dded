"""What the benchmark parts share: the options of a run, the report they fill, Warden's services
in their own process, and the progress callback.

Every part imports these from here, and the runner imports every part, so nothing needs a lazy
or TYPE_CHECKING import to avoid a cycle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from services.bench.stats import Figures

PARTS = ("raw", "governed", "detection", "replay", "memory", "restart", "explain", "fleet")


@dataclass
class Options:
    jobs: int = 2000
    workers: int = 4
    payload: int = 0
    leases: int = 20
    ttl: float = 1.0
    publish: int = 50_000
    replay_events: int = 1_000_000
    parts: tuple[str, ...] = PARTS
    quick: bool = False
    fleet_agents: int = 1000
    fleet_leases: int = 10_000

    @classmethod
    def quick_mode(cls, parts: tuple[str, ...] = PARTS) -> Options:
        return cls(
            jobs=150,
            workers=4,
            leases=6,
            ttl=0.5,
            publish=5_000,
            replay_events=50_000,
            parts=parts,
            quick=True,
            fleet_agents=50,
            fleet_leases=500,
        )


@dataclass
class Report:
    machine: dict[str, Any]
    options: dict[str, Any]
    figures: dict[str, Figures] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratio(self, ours: str, theirs: str) -> float | None:
        a, b = self.figures.get(ours), self.figures.get(theirs)
        if a is None or b is None or not a.rate or not b.rate:
            return None
        return a.rate / b.rate

    def speed_ratio(self, ours: str, theirs: str) -> float | None:
        """How fast `ours` went through the same stream as `theirs`, by time: their seconds over
        ours. Rates would mislead where one counts events and the other messages (a packed
        record holds several events)."""
        a, b = self.figures.get(ours), self.figures.get(theirs)
        if a is None or b is None or not a.seconds or not b.seconds:
            return None
        return b.seconds / a.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "options": self.options,
            "figures": {k: v.as_dict() for k, v in self.figures.items()},
            "ratios": {
                "governed_vs_work_queue": self.ratio("governed", "work_queue"),
                "replay_vs_raw_replay": self.speed_ratio("replay_projections", "replay_raw_events"),
            },
            "notes": self.notes,
        }


class Services:
    """Warden's services in their own process (`warden up --nats URL`), as deployed."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "WARDEN_HTTP": "127.0.0.1:0"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--nats",
                self.url,
                "--data-dir",
                str(self.data_dir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if "warden ready" in line:
                # Keep reading: a chatty run that filled the pipe would block the services.
                self.tail: deque[str] = deque(lines, maxlen=200)
                threading.Thread(
                    target=self._drain, args=(self.proc.stdout,), name="bench-services-log", daemon=True
                ).start()
                return
        raise RuntimeError(f"warden up failed: {''.join(lines)}")

    def _drain(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self.tail.append(line)
        except ValueError:  # closed by stop()
            return

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


Progress = Callable[[str], None]
