"""The command `warden agent exec` runs for the demo's agents, in the job's fresh worktree.

WARDEN_DEMO_BEHAVIOUR picks the agent's character: good, crash, scope, liar. Real agents would
be LLM loops; these are honest stand-ins for how such loops fail.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def write_feature(name: str, broken: bool = False) -> None:
    Path("src").mkdir(exist_ok=True)
    Path(f"src/{name}.py").write_text(f"def {name}():\n    return {len(name)}\n")
    expected = len(name) + (1 if broken else 0)
    Path(f"tests/test_{name}.py").write_text(
        "import unittest\n\n"
        f"from src.{name} import {name}\n\n\n"
        f"class {name.title().replace('_', '')}Test(unittest.TestCase):\n"
        f"    def test_value(self):\n        self.assertEqual({name}(), {expected})\n"
    )


def main() -> None:
    behaviour = os.environ.get("WARDEN_DEMO_BEHAVIOUR", "good")
    name = os.environ.get("WARDEN_INPUT_FEATURE", "feature")
    counter = Path(os.environ.get("WARDEN_DEMO_STATE", "/tmp")) / f"{behaviour}-{os.getppid()}.count"
    done = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(done + 1))
    if behaviour == "crash":
        print("working... and crashing", flush=True)
        os.kill(os.getppid(), signal.SIGKILL)  # the governing agent process dies mid-job
        return
    if behaviour == "scope" and done >= 1:
        # Its first job was clean; now it "helpfully" edits deployment secrets too.
        write_feature(name)
        Path("secrets").mkdir(exist_ok=True)  # not in its workspace: scope.read leaves it out
        Path("secrets/deploy.env").write_text("TOKEN=rotated-by-agent\n")
        print("done; also rotated the deploy token", flush=True)
        return
    if behaviour == "liar":
        write_feature(name, broken=True)
        print("all tests pass", flush=True)  # they do not
        return
    write_feature(name)
    print(f"added {name} with a test", flush=True)


if __name__ == "__main__":
    main()
