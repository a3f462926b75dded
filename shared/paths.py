"""Warden's path globs and what makes a path unsafe: the one definition both submission and checks use.

A contract's `scope.paths` are validated at submission with `glob_problem` and matched in the
scope invariant with `glob_match`; both go through `compile_glob`, so a glob that was accepted
can always be matched, and one that cannot be matched is refused before any job exists.

Glob language, on `/`-separated relative paths:
- `**/` matches zero or more whole directories (`**/*.py`, `app/**/test_*.py`);
- a trailing `/**` matches the directory itself and everything under it (`src/**`);
- any other `**` matches any characters, `/` included;
- `*` matches any characters within one segment, `?` exactly one;
- `[abc]`, `[a-z]`, `[!a-z]` (or `[^a-z]`) one character of a set, never `/`; a `]` right after
  the opening `[` (or `[!`) is part of the set; a `[` that is never closed is a literal `[`;
- every other character, `\\` included, stands for itself (there are no escapes).

Matching simulates the glob as a small automaton (Thompson's construction), so it takes time in
proportion to the path's length times the glob's: a glob like `**a**a**a**b` cannot stall the
checker the way a backtracking regular expression does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_DRIVE = re.compile(r"[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")


class GlobError(ValueError):
    """A glob that has no meaning (a reversed range such as `[z-a]`); the message says where."""


def unsafe_path(path: str) -> str:
    """Why `path` may not be written relative to a root (absolute, `..`, .git), or "".

    `\\` counts as a separator too: a path that would climb out on Windows is refused everywhere.
    """
    if not path:
        return "empty path"
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        return "absolute path"
    parts = _SEPARATORS.split(path)
    if ".." in parts:
        return "path climbs out with '..'"
    # Case-insensitive file systems treat .GIT as .git.
    if any(part.lower() == ".git" for part in parts):
        return "path inside .git"
    return ""


@dataclass(frozen=True, slots=True)
class _CharSet:
    """One path character: the separator `/`, or one that is not `/`: any (`?`), a literal, a set."""

    chars: frozenset[str] = frozenset()
    ranges: tuple[tuple[str, str], ...] = ()
    negate: bool = False
    any: bool = False
    slash: bool = False

    def accepts(self, c: str) -> bool:
        if self.slash or c == "/":
            return self.slash and c == "/"
        if self.any:
            return True
        inside = c in self.chars or any(lo <= c <= hi for lo, hi in self.ranges)
        return inside != self.negate


_SLASH = _CharSet(slash=True)
_ANY_BUT_SLASH = _CharSet(any=True)


@dataclass(frozen=True, slots=True)
class _State:
    """Either consumes one character (`char`, then goes to `out`) or splits to `out` and `alt`."""

    out: int
    char: _CharSet | None = None  # None: a split (epsilon edges to out and alt)
    alt: int = -1
    anything: bool = False  # consumes any character, `/` included


@dataclass(frozen=True, slots=True)
class Glob:
    """A compiled glob: match with `matches(path)`."""

    pattern: str
    states: tuple[_State, ...]

    def matches(self, path: str) -> bool:
        accept = len(self.states)
        current = self._closure({0})
        for c in path:
            following: set[int] = set()
            for i in current:
                if i == accept:
                    continue
                state = self.states[i]
                if state.anything or (state.char is not None and state.char.accepts(c)):
                    following.add(state.out)
            if not following:
                return False
            current = self._closure(following)
        return accept in current

    def _closure(self, start: set[int]) -> set[int]:
        seen: set[int] = set()
        stack = list(start)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if i < len(self.states):
                state = self.states[i]
                if state.char is None and not state.anything:
                    stack.extend((state.out, state.alt))
        return seen


def _bracket(pattern: str, i: int) -> tuple[_CharSet, int] | None:
    """The set opened by the `[` at `i` and the index after its `]`, or None if it never closes."""
    j = i + 1
    negate = j < len(pattern) and pattern[j] in "!^"
    if negate:
        j += 1
    start = j
    chars: set[str] = set()
    ranges: list[tuple[str, str]] = []
    while j < len(pattern):
        c = pattern[j]
        if c == "]" and j > start:
            return _CharSet(chars=frozenset(chars), ranges=tuple(ranges), negate=negate), j + 1
        if j + 2 < len(pattern) and pattern[j + 1] == "-" and pattern[j + 2] != "]":
            lo, hi = c, pattern[j + 2]
            if lo > hi:
                raise GlobError(f"range {lo}-{hi} at position {j} is reversed")
            ranges.append((lo, hi))
            j += 3
        else:
            chars.add(c)
            j += 1
    return None


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> Glob:
    """The glob's automaton; raises GlobError when the glob has no meaning."""
    states: list[_State] = []

    def add(state: _State) -> None:
        states.append(state)

    i, n = 0, len(pattern)
    while i < n:
        k = len(states)
        if pattern.startswith("**/", i):
            # (?:.*/)? : skip, or any characters then a `/`
            add(_State(out=k + 1, alt=k + 4))
            add(_State(out=k + 2, alt=k + 3))
            add(_State(out=k + 1, anything=True))
            add(_State(out=k + 4, char=_SLASH))
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            # (?:/.*)? : nothing, or a `/` then any characters
            add(_State(out=k + 1, alt=k + 4))
            add(_State(out=k + 2, char=_SLASH))
            add(_State(out=k + 3, alt=k + 4))
            add(_State(out=k + 2, anything=True))
            i += 3
        elif pattern.startswith("**", i):
            add(_State(out=k + 1, alt=k + 2))
            add(_State(out=k, anything=True))
            i += 2
        elif pattern[i] == "*":
            add(_State(out=k + 1, alt=k + 2))
            add(_State(out=k, char=_ANY_BUT_SLASH))
            i += 1
        elif pattern[i] == "?":
            add(_State(out=k + 1, char=_ANY_BUT_SLASH))
            i += 1
        elif pattern[i] == "[" and (found := _bracket(pattern, i)) is not None:
            charset, i = found
            add(_State(out=k + 1, char=charset))
        else:
            c = pattern[i]
            add(_State(out=k + 1, char=_SLASH if c == "/" else _CharSet(chars=frozenset(c))))
            i += 1
    return Glob(pattern=pattern, states=tuple(states))


def glob_match(pattern: str, path: str) -> bool:
    return compile_glob(pattern).matches(path)


def glob_problem(pattern: str) -> str:
    """Why `pattern` cannot be a scope glob, or "": it must compile and name only safe paths."""
    try:
        compile_glob(pattern)
    except GlobError as exc:
        return f"does not compile: {exc}"
    why = unsafe_path(pattern)
    return f"is refused: {why}" if why else ""
