"""Git plumbing for checks and effects, without ever touching a checkout's working tree.

Commits are built in a temporary index (`GIT_INDEX_FILE`) with `git apply --cached`,
`write-tree` and `commit-tree`, then a branch is moved with `git update-ref NEW OLD`, a
compare-and-swap: two appliers racing on one branch can never both land. Works on bare and
non-bare repositories alike; a branch checked out in a non-bare repository moves under its
working tree (production targets should be bare, or never have the target branch checked out).

Everything here is synchronous (subprocesses); async callers run it in a worker thread.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ZERO = "0" * 40
TRAILER_JOB = "Warden-Job"
TRAILER_PROPOSAL = "Warden-Proposal"
TRAILER_AGENT = "Warden-Agent"
TRAILER_ROLLBACK = "Warden-Rollback"

_BASE_ENV = {
    # Deterministic, quiet git regardless of the operator's own configuration.
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
}


class GitError(RuntimeError):
    """A git command failed; the message carries its stderr."""

    def __init__(self, args: list[str], code: int, stderr: str) -> None:
        self.code = code
        self.stderr = stderr
        super().__init__(f"git {' '.join(args)} exited {code}: {stderr.strip()}")


def git(
    repo: Path | str,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, **_BASE_ENV, **(env or {})}
    result = subprocess.run(
        ["git", *args], cwd=repo, input=stdin, capture_output=True, env=full_env, check=False
    )
    if check and result.returncode != 0:
        raise GitError(list(args), result.returncode, result.stderr.decode("utf-8", "replace"))
    return result


def out(repo: Path | str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    return git(repo, *args, stdin=stdin, env=env).stdout.decode("utf-8", "replace").strip()


def branch_head(repo: Path | str, branch: str) -> str | None:
    """The commit `refs/heads/<branch>` names, or None when the branch does not exist."""
    result = git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}", check=False)
    return result.stdout.decode().strip() or None if result.returncode == 0 else None


def resolve_commit(repo: Path | str, rev: str) -> str | None:
    if not rev:
        return None
    result = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    return result.stdout.decode().strip() or None if result.returncode == 0 else None


def is_repo(path: Path | str) -> bool:
    return Path(path).is_dir() and git(path, "rev-parse", "--git-dir", check=False).returncode == 0


# --- what a patch touches ------------------------------------------------------------------


def _unquote(token: str) -> str:
    """Git quotes unusual paths C-style ("a/tab\\there"); undo it."""
    if len(token) >= 2 and token[0] == '"' and token[-1] == '"':
        return (
            token[1:-1]
            .encode("latin-1", "backslashreplace")
            .decode("unicode_escape")
            .encode("latin-1")
            .decode("utf-8", "replace")
        )
    return token


def _strip_prefix(path: str) -> str | None:
    path = _unquote(path.split("\t", 1)[0].rstrip())
    if path == "/dev/null":
        return None
    if path.startswith(("a/", "b/")):
        return path[2:]
    return path


def patch_paths(patch: str) -> list[str]:
    """Every path a unified diff (git or plain) creates, changes, deletes or renames from/to."""
    paths: list[str] = []
    for line in patch.splitlines():
        found: str | None = None
        if line.startswith(("--- ", "+++ ")):
            found = _strip_prefix(line[4:])
        elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
            found = _unquote(line.split(" ", 2)[2])
        elif line.startswith("diff --git "):
            rest = line[len("diff --git ") :]
            half, odd = divmod(len(rest) - 5, 2)
            if not odd and rest.startswith("a/") and rest[2 + half : 5 + half] == " b/":
                left, right = rest[2 : 2 + half], rest[5 + half :]
                if left == right:
                    found = left
        if found and found not in paths:
            paths.append(found)
    return paths


def numstat_paths(patch: str) -> list[str]:
    """The paths git itself reads from the patch; raises GitError when git cannot parse it."""
    with tempfile.TemporaryDirectory(prefix="warden-numstat-") as tmp:
        raw = git(tmp, "apply", "--numstat", "-z", "-", stdin=patch.encode()).stdout.decode(
            "utf-8", "replace"
        )
    paths: list[str] = []
    for field in raw.split("\0"):
        name = field.rsplit("\t", 1)[-1] if "\t" in field else field
        if name and name not in paths:
            paths.append(name)
    return paths


# --- building commits without a working tree ------------------------------------------------


@contextmanager
def temp_index(repo: Path | str, commit: str | None) -> Iterator[dict[str, str]]:
    """An index of its own, loaded with `commit`'s tree: the env to pass to git commands."""
    tmp = Path(tempfile.mkdtemp(prefix="warden-index-"))
    env = {"GIT_INDEX_FILE": str(tmp / "index")}
    try:
        if commit:
            git(repo, "read-tree", commit, env=env)
        else:
            git(repo, "read-tree", "--empty", env=env)
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def apply_check(repo: Path | str, commit: str, patch: str, *, reverse: bool = False) -> str:
    """ "" when the patch applies cleanly on `commit`; else git's complaint."""
    with temp_index(repo, commit) as env:
        args = ["apply", "--cached", "--check"] + (["-R"] if reverse else []) + ["-"]
        result = git(repo, *args, stdin=patch.encode(), env=env, check=False)
        if result.returncode == 0:
            return ""
        return result.stderr.decode("utf-8", "replace").strip() or f"git apply exited {result.returncode}"


@dataclass(frozen=True)
class Identity:
    name: str
    email: str


WARDEN = Identity("warden", "warden@localhost")


def _identity_env(author: Identity, committer: Identity = WARDEN) -> dict[str, str]:
    return {
        "GIT_AUTHOR_NAME": author.name,
        "GIT_AUTHOR_EMAIL": author.email,
        "GIT_COMMITTER_NAME": committer.name,
        "GIT_COMMITTER_EMAIL": committer.email,
    }


def commit_patch(
    repo: Path | str,
    parent: str,
    patch: str | bytes,
    message: str,
    author: Identity,
    *,
    reverse: bool = False,
) -> str:
    """A new commit (not on any branch yet): `parent` with the patch applied. Raises GitError."""
    data = patch if isinstance(patch, bytes) else patch.encode()
    with temp_index(repo, parent) as env:
        args = ["apply", "--cached", "--whitespace=nowarn"] + (["-R"] if reverse else []) + ["-"]
        git(repo, *args, stdin=data, env=env)
        tree = out(repo, "write-tree", env=env)
    return out(
        repo,
        "commit-tree",
        tree,
        "-p",
        parent,
        "-F",
        "-",
        stdin=message.encode(),
        env=_identity_env(author),
    )


def diff_of(repo: Path | str, commit: str) -> bytes:
    """The change one commit made, as a binary-safe patch (for reverting it)."""
    return git(repo, "diff-tree", "-p", "--binary", "--no-renames", f"{commit}^", commit).stdout


def cas_branch(repo: Path | str, branch: str, new: str, old: str | None) -> bool:
    """Move `branch` to `new` only if it still points at `old` (None: only if it does not exist)."""
    result = git(repo, "update-ref", f"refs/heads/{branch}", new, old or ZERO, check=False)
    return result.returncode == 0


def commits_with_trailer(repo: Path | str, branch: str, key: str, value: str) -> list[str]:
    """Commits reachable from `branch` whose trailer `key` is exactly `value`, newest first."""
    if branch_head(repo, branch) is None:
        return []
    return [sha for sha, _ in _trailer_log(repo, key, value, f"refs/heads/{branch}")]


def branches_with_trailer(repo: Path | str, key: str, value: str) -> list[tuple[str, str]]:
    """(commit, branch) for every commit on any local branch whose trailer `key` is `value`."""
    return [
        (sha, ref.removeprefix("refs/heads/")) for sha, ref in _trailer_log(repo, key, value, "--branches")
    ]


def _trailer_log(repo: Path | str, key: str, value: str, revs: str) -> list[tuple[str, str]]:
    raw = out(
        repo,
        "log",
        "--source",
        "--fixed-strings",
        f"--grep={key}: {value}",
        f"--format=%H%x00%S%x00%(trailers:key={key},valueonly,separator=%x01)%x1e",
        revs,
        "--",
    )
    found: list[tuple[str, str]] = []
    for record in raw.split("\x1e"):
        record = record.strip()
        if not record:
            continue
        sha, _, rest = record.partition("\x00")
        ref, _, values = rest.partition("\x00")
        if value in [v.strip() for v in values.split("\x01")]:
            found.append((sha.strip(), ref.strip()))
    return found


def trailers(**pairs: str) -> str:
    names = {"job": TRAILER_JOB, "proposal": TRAILER_PROPOSAL, "agent": TRAILER_AGENT}
    names["rollback"] = TRAILER_ROLLBACK
    return "\n".join(f"{names[k]}: {v}" for k, v in pairs.items())


def drift_evidence(repo: Path | str, base: str, head: str, limit: int = 20) -> dict[str, object]:
    """What changed between a proposal's base and the branch head, for a drift verdict."""
    evidence: dict[str, object] = {}
    if resolve_commit(repo, base) is None:
        evidence["base_known"] = False
        return evidence
    evidence["base_known"] = True
    ancestor = git(repo, "merge-base", "--is-ancestor", base, head, check=False).returncode == 0
    evidence["base_is_ancestor_of_head"] = ancestor
    log = out(repo, "log", f"--max-count={limit}", "--format=%h %s", f"{base}..{head}")
    evidence["commits_since_base"] = log.splitlines()
    evidence["files_changed_since_base"] = out(repo, "diff", "--name-only", base, head).splitlines()[:200]
    return evidence


@contextmanager
def _worktrees_locked(repo: Path | str) -> Iterator[None]:
    """One process at a time adds, removes or prunes a repository's worktrees: git creates a
    worktree's admin folder before the lock file that keeps `prune` off it, so another
    checker's prune in between deleted it and the add failed (found by `warden chaos`)."""
    common = Path(repo) / out(repo, "rev-parse", "--git-common-dir").strip()
    with open(common / "warden-worktrees.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def add_worktree(repo: Path | str, commit: str) -> Path:
    """A detached temporary worktree at `commit` (remove it with `remove_worktree`)."""
    tmp = Path(tempfile.mkdtemp(prefix="warden-wt-"))
    path = tmp / "tree"
    try:
        with _worktrees_locked(repo):
            git(repo, "worktree", "add", "--detach", "--quiet", str(path), commit)
    except GitError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_worktree(repo: Path | str, path: Path) -> None:
    with _worktrees_locked(repo):
        git(repo, "worktree", "remove", "--force", str(path), check=False)
        shutil.rmtree(path.parent, ignore_errors=True)
        # A worktree whose remover died (a crash mid-check) is forgotten here.
        git(repo, "worktree", "prune", check=False)


def landing_head(repo: Path | str, branch: str, target_branch: str) -> str | None:
    """The commit a change for `branch` builds on: its head, or the target's for a new sandbox."""
    return branch_head(repo, branch) or branch_head(repo, target_branch)
