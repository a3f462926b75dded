"""Processes opening one fresh SQLite read model at the same moment never fail.

A projector and an API started together both create the tables; each trial runs real
processes, released together, against a new file.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPEN = """
import sys, time
from shared.readmodel.store import open_read_model
start = float(sys.argv[2])
while time.time() < start:
    pass
store = open_read_model(sys.argv[1])
print(store.position())
"""


def test_readers_and_writers_opening_a_fresh_sqlite_read_model_together_all_succeed(tmp_path: Path) -> None:
    trials, together = 10, 3
    for trial in range(trials):
        url = f"sqlite:///{tmp_path / f'trial-{trial}' / 'projections.sqlite'}"
        start = time.time() + 1.5  # past every process's import, so they race on the file
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN, url, str(start)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(together)
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"trial {trial}: {err[-2000:]}"
            assert out.strip() == "0"
