"""Pure logic of the git helpers: path globs and reading which paths a patch touches."""

from __future__ import annotations

import pytest

from shared.gitops import patch_paths
from shared.paths import glob_match, unsafe_path

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
