"""The demo's target: a small real git repository with code, tests and a folder out of scope."""

from __future__ import annotations

import subprocess
from pathlib import Path

FILES = {
    "src/calc.py": "def add(a, b):\n    return a + b\n\n\ndef total(values):\n    result = 0\n    for v in values:\n        result = add(result, v)\n    return result\n",
    "src/__init__.py": "",
    "tests/__init__.py": "",
    "tests/test_calc.py": (
        "import unittest\n\nfrom src.calc import add, total\n\n\n"
        "class CalcTest(unittest.TestCase):\n"
        "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n"
        "    def test_total(self):\n        self.assertEqual(total([1, 2, 3]), 6)\n"
    ),
    "secrets/deploy.env": "TOKEN=do-not-touch\n",
    "README.md": "A small project that Warden's demo agents work on.\n",
}

# What every demo job may touch, and the gate its change must pass.
SCOPE = ["src/**", "tests/**"]
# What an agent's workspace holds: everything but secrets/ (top-level files, code and tests).
READABLE = ["*", "src/**", "tests/**"]
CI_COMMAND = ["python", "-m", "unittest", "discover", "-s", "tests", "-t", ".", "-q"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for rel, text in FILES.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "demo")
    git(path, "config", "user.email", "demo@localhost")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial project")
    return path


def commits_with_trailer(repo: Path, trailer: str) -> dict[str, int]:
    """How many commits on any branch carry each value of `trailer` (reverts excluded)."""
    log = git(repo, "log", "--all", "--format=%H%x00%B%x1e")
    counts: dict[str, int] = {}
    for entry in log.split("\x1e"):
        if not entry.strip():
            continue
        _sha, _, body = entry.partition("\x00")
        if "Warden-Rollback:" in body:
            continue
        for line in body.splitlines():
            if line.startswith(f"{trailer}:"):
                value = line.split(":", 1)[1].strip()
                counts[value] = counts.get(value, 0) + 1
    return counts
