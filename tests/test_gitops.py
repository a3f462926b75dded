"""The git helpers: path globs, reading which paths a patch touches, and worktrees under races."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared import gitops
from shared.gitops import patch_paths
from shared.paths import glob_match, unsafe_path
from tests import gitrepo

RENAME_AND_DELETE = """\
diff --git a/src/old name.py b/src/new name.py
similarity index 90%
rename from src/old name.py
rename to src/new name.py
diff --git a/docs/gone.md b/docs/gone.md
deleted file mode 100644
index e69de29..0000000
--- a/docs/gone.md
+++ /dev/null
diff --git a/bin/tool b/bin/tool
new file mode 100755
index 0000000..e69de29
diff --git "a/odd\\tname" "b/odd\\tname"
index 1..2 100644
--- "a/odd\\tname"
+++ "b/odd\\tname"
@@ -1 +1 @@
-a
+b
"""


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("src/**", "src/a.py", True),
        ("src/**", "src/deep/er/a.py", True),
        ("src/*", "src/deep/a.py", False),
        ("**/*.py", "a.py", True),
        ("**/*.py", "x/y/a.py", True),
        ("**/*.py", "x/y/a.pyc", False),
        ("app/**/test_*.py", "app/test_x.py", True),
        ("app/**/test_*.py", "app/a/b/test_x.py", True),
        ("app/?.py", "app/ab.py", False),
        ("app/[ab].py", "app/b.py", True),
        ("src/**", "srcfoo/a.py", False),
        ("/src/**", "src/a.py", False),  # absolute globs are refused at submission, never rewritten
    ],
)
def test_globs_cross_directories_only_with_a_double_star(pattern: str, path: str, matches: bool) -> None:
    assert glob_match(pattern, path) is matches


def test_a_patch_names_every_path_it_renames_deletes_creates_or_changes() -> None:
    assert patch_paths(RENAME_AND_DELETE) == [
        "src/old name.py",
        "src/new name.py",
        "docs/gone.md",
        "bin/tool",
        "odd\tname",
    ]


@pytest.mark.parametrize(
    ("path", "why"),
    [("/etc/passwd", "absolute"), ("a/../../b", "climbs out"), (".git/config", ".git"), ("ok/file.txt", "")],
)
def test_paths_that_could_escape_their_root_are_named_unsafe(path: str, why: str) -> None:
    assert (why in unsafe_path(path)) if why else unsafe_path(path) == ""


def test_checkers_adding_and_removing_worktrees_of_one_repository_at_once_never_fail(
    tmp_path: Path,
) -> None:
    # Found by `warden chaos` (seed 2026, 200 jobs): one checker's `git worktree prune` deleted
    # the admin folder of a worktree another checker was adding, and a valid proposal was
    # rejected ("could not open '.git/worktrees/tree1/locked' for writing"). Processes, as the
    # checker replicas are, each adding and removing as a CI run does.
    repo = gitrepo.make_repo(tmp_path)
    head = gitrepo.head(repo)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from shared import gitops\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    path = gitops.add_worktree(Path(sys.argv[1]), sys.argv[2])\n"
        "    assert (path / 'app').is_dir()\n"
        "    gitops.remove_worktree(Path(sys.argv[1]), path)\n"
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(repo), head, "25"], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    failures = [err for p in racers if (err := p.communicate(timeout=120)[1]) and p.returncode]
    assert not failures, failures[0][-2000:]
    assert len(gitops.out(repo, "worktree", "list").splitlines()) == 1  # only the main one is left
