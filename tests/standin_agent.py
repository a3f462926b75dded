"""A stand-in for a CLI coding agent (aider, Claude Code, Codex CLI) under `warden agent exec`.

It does what the README's recipes say such an agent does: reads the task file, edits inside its
scope, reports its usage, and on a retry reads why the previous attempt failed and fixes that.
Its first attempt is wrong on purpose (an off-by-one its CI test catches).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def report(**usage: object) -> None:
    with open(os.environ["WARDEN_USAGE_FILE"], "a") as f:
        f.write(json.dumps(usage) + "\n")


def main() -> None:
    task = json.loads(Path(os.environ["WARDEN_TASK_FILE"]).read_text())
    name = task["inputs"]["feature"]
    assert any(p.startswith("src/") for p in task["scope"]["paths"]), task["scope"]
    report(steps=1, tokens=120, cost=0.01, note="read the task")
    failures = [
        v for attempt in task["previous_attempts"] for v in attempt["verdicts"] if v["verdict"] != "pass"
    ]
    off_by = 0 if failures else 1  # the first try is wrong; the retry learns from the verdicts
    Path("src").mkdir(exist_ok=True)
    Path(f"src/{name}.py").write_text(f"def {name}():\n    return {len(name) + off_by}\n")
    for failure in failures:
        print(f"fixing: {failure['invariant']} said {failure['evidence'].get('reason', '')}", flush=True)
    report(steps=2, tokens=300, cost=0.03, progress=1.0, note="wrote the feature")


if __name__ == "__main__":
    main()
