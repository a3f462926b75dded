"""The bench's CPU split reads what a process class really spent, per job."""

from __future__ import annotations

import os
import time

from services.bench.runner import CpuSplit


def test_cpu_spent_by_this_process_is_counted_per_job() -> None:
    split = CpuSplit({"here": os.getpid(), "gone": 2**22 + 12345})
    until = time.process_time() + 0.2
    while time.process_time() < until:  # burn 200 ms of CPU: the figure must show it
        pass
    per_job = split.per_job(jobs=2)
    assert "gone" not in per_job  # a process that does not exist is left out, not read as zero
    assert 50 <= per_job["here"] <= 1000  # about 100 ms per job, ticks are 10 ms
    assert per_job["total"] == per_job["here"]
