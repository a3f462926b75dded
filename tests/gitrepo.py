"""A small real git repository for proposal tests, and helpers to build patches against it.

The repository has a function `compute_total` in app/calc.py, a call site in app/report.py and
a check script (`python check.py`) that fails when the call sites and the function disagree.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from shared import gitops
from shared.contract import CiGate, Contract, Scope, Stopping, Target

FILES = {
    "app/__init__.py": "",
    "app/calc.py": "def compute_total(items):\n    return sum(items)\n",
    "app/report.py": (
        "from app.calc import compute_total\n\n\n"
        "def report(items):\n    return f'total={compute_total(items)}'\n"
    ),
    "check.py": (
        "from app.report import report\n\n"
        "result = report([1, 2, 3])\n"
        "print('report says', result)\n"
        "assert result == 'total=6', result\n"
        "print('ok')\n"
    ),
    "README.md": "# demo\n",
}

RENAMED = {
    "app/calc.py": "def total_of(items):\n    return sum(items)\n",
    "app/report.py": (
        "from app.calc import total_of\n\n\ndef report(items):\n    return f'total={total_of(items)}'\n"
    ),
}

BROKEN = {"app/calc.py": "def compute_total(items):\n    return sum(items) + 1\n"}


def make_repo(root: Path) -> Path:
    """A non-bare repository on branch main with one commit of FILES."""
    repo = root / "repo"
    repo.mkdir()
    gitops.git(repo, "init", "-q", "-b", "main")
    for rel, text in FILES.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    commit(repo, "initial")
    return repo


def commit(repo: Path, message: str) -> str:
    gitops.git(repo, "add", "-A")
    gitops.git(repo, "-c", "user.name=dev", "-c", "user.email=dev@example.com", "commit", "-q", "-m", message)
    return head(repo)


def head(repo: Path, branch: str = "main") -> str:
    sha = gitops.branch_head(repo, branch)
    assert sha is not None, f"no branch {branch}"
    return sha


def patch_for(repo: Path, changes: Mapping[str, str | None], base: str | None = None) -> tuple[str, str]:
    """(unified diff, base commit) for `changes` (path -> new text, None deletes) made on `base`."""
    base = base or head(repo)
    tree = gitops.add_worktree(repo, base)
    try:
        for rel, text in changes.items():
            path = tree / rel
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        gitops.git(tree, "add", "-A")
        diff = gitops.git(tree, "diff", "--cached", "--binary", base).stdout.decode()
    finally:
        gitops.remove_worktree(repo, tree)
    return diff, base


def commits_carrying(repo: Path, key: str, value: str) -> list[str]:
    """Every commit on any branch whose trailer `key` names `value`."""
    raw = gitops.out(
        repo, "log", "--all", f"--format=%H%x00%(trailers:key={key},valueonly,separator=%x01)%x1e"
    )
    found = []
    for record in raw.split("\x1e"):
        sha, _, values = record.strip().partition("\x00")
        if sha and value in [v.strip() for v in values.split("\x01")]:
            found.append(sha)
    return found


def show(repo: Path, rev: str, path: str) -> str:
    return gitops.out(repo, "show", f"{rev}:{path}")


def git_contract(
    repo: Path,
    *,
    paths: list[str] | None = None,
    ci: bool = True,
    ttl: float = 5.0,
    attempts: int = 3,
    **kw: object,
) -> Contract:
    return Contract(
        scope=Scope(paths=paths or ["app/**"], effects=["git.patch"]),
        target=Target(repo=str(repo), branch="main"),
        ci=CiGate(command=[sys.executable, "check.py"], timeout_s=60) if ci else None,
        stopping=Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=attempts),
        **kw,  # type: ignore[arg-type]
    )
