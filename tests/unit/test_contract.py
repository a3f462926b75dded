"""Contract validation as pure functions (no server): globs, levels, every error at once, request digests."""

from __future__ import annotations

import re
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.aggregates import Job
from shared.contract import Contract, Scope, Stopping, partial_semantic_errors, semantic_errors
from shared.invariants import Subject
from shared.invariants.builtin import Scope as ScopeInvariant
from shared.messages import JobRequest, Propose, request_digest
from shared.paths import GlobError, compile_glob, glob_match, unsafe_path
from shared.policy import PolicyError, load_policy

NOW = datetime(2026, 6, 1, tzinfo=UTC)
MAX = load_policy().top_level  # ops/autonomy.yaml: 2

BAD_GLOBS = {
    "src/[z-a].py": "does not compile: range z-a",
    "../**": "climbs out",
    "src/../../etc/passwd": "climbs out",
    "src\\..\\..\\x": "climbs out",
    "/etc/**": "absolute",
    "C:\\Windows\\**": "absolute",
    "c:/x/*": "absolute",
    "\\\\server\\share\\**": "absolute",
    ".git/**": ".git",
    "src/.git/hooks/*": ".git",
    "**/.GIT/config": ".git",
}


def _errors(**contract: object) -> list[tuple[str, str]]:
    return semantic_errors(Contract(**contract), NOW, max_level=MAX)  # type: ignore[arg-type]


@pytest.mark.parametrize(("glob", "why"), BAD_GLOBS.items())
def test_a_glob_that_cannot_be_enforced_is_refused_naming_it(glob: str, why: str) -> None:
    [(path, message)] = _errors(scope=Scope(paths=["src/**", glob]))
    assert path == "$.contract.scope.paths[1]"
    assert repr(glob) in message
    assert why in message


@pytest.mark.parametrize(
    "glob",
    [
        "**",
        "src/**",
        "**/*.py",
        "app/**/test_*.py",
        "[]]x",
        "[!a-z]?",
        "[",
        "a[",
        ".gitignore",
        ".github/**",
        "a..b/c",
    ],
)
def test_a_glob_with_a_meaning_and_safe_paths_is_accepted(glob: str) -> None:
    assert _errors(scope=Scope(paths=[glob])) == []


def test_a_required_level_above_the_policys_highest_is_refused_naming_the_maximum() -> None:
    assert MAX == 2
    [(path, message)] = _errors(required_level=MAX + 3)
    assert path == "$.contract.required_level"
    assert "level 5" in message and "highest level 2" in message
    assert _errors(required_level=MAX) == []


def test_a_contract_with_several_errors_reports_all_of_them() -> None:
    errors = _errors(
        scope=Scope(paths=["../**", "ok/**", "/etc/**", "src/[z-a].py"]),
        required_level=5,
        stopping=Stopping(lease_ttl_s=5, heartbeat_interval_s=10, deadline=NOW - timedelta(seconds=1)),
    )
    assert [path for path, _ in errors] == [
        "$.contract.scope.paths[0]",
        "$.contract.scope.paths[2]",
        "$.contract.scope.paths[3]",
        "$.contract.required_level",
        "$.contract.stopping.heartbeat_interval_s",
        "$.contract.stopping.deadline",
    ]


def _scope_subject(paths: list[str], touched: str) -> Subject:
    """What the scope invariant judges: a file.write of `touched` under a job scoped to `paths`."""
    job = Job(
        id=uuid4(),
        version=1,
        created_on=NOW,
        modified_on=NOW,
        idempotency_key="k",
        kind="k",
        contract=Contract(scope=Scope(paths=paths, effects=["file.write"])),
        submitter="",
    )
    return Subject(
        proposal_id=uuid4(),
        proposal=Propose(job_id=job.id, epoch=1, effect="file.write", files={touched: ""}),
        job=job,
        agent=None,
        lease=None,
        received_at=NOW,
        branch="",
        policy=load_policy(),
    )


@settings(max_examples=500, deadline=None)
@given(
    glob=st.one_of(
        st.text(alphabet=st.sampled_from("ab/.*?[]!^-\\:zC"), min_size=1, max_size=24),
        st.text(min_size=1, max_size=24),
    ),
    path=st.text(alphabet=st.sampled_from("ab/.z-C[]"), min_size=1, max_size=30),
)
def test_any_glob_that_validation_accepts_is_matched_by_the_scope_check_without_error(
    glob: str, path: str
) -> None:
    errors = _errors(scope=Scope(paths=[glob]))
    try:
        compile_glob(glob)
    except GlobError:
        assert errors and "does not compile" in errors[0][1]  # refused at submission, naming why
        return
    if errors:
        return  # refused for naming unsafe paths
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a regular-expression FutureWarning
        verdict = ScopeInvariant()._check(_scope_subject([glob], path))
    assert verdict.verdict in ("pass", "fail"), verdict.evidence
    expected = "pass" if glob_match(glob, path) and not unsafe_path(path) else "fail"
    assert verdict.verdict == expected


def _reference(pattern: str) -> re.Pattern[str]:
    """The regular-expression translation scope globs had before (brackets of letters only)."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern.startswith(("[ab]", "[!a]"), i):
            out.append("(?!/)[ab]" if pattern[i + 1] == "a" else "(?!/)[^a]")
            i += 4
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


@settings(max_examples=500, deadline=None)
@given(
    glob=st.lists(
        st.sampled_from(["a", "b", "/", "*", "**", "**/", "/**", "?", "[ab]", "[!a]", "."]), max_size=6
    ).map("".join),
    path=st.text(alphabet="ab/.", max_size=10),
)
def test_globs_match_exactly_what_the_earlier_regular_expressions_matched(glob: str, path: str) -> None:
    assert glob_match(glob, path) is (_reference(glob).match(path) is not None)


def test_a_glob_built_to_make_a_backtracking_matcher_stall_is_matched_in_linear_time() -> None:
    # With the earlier regular expression this takes longer than the suite's timeout.
    assert glob_match("**a" * 30 + "**b", "a" * 4000) is False
    assert glob_match("*a" * 30 + "*b", "a" * 4000) is False


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("C:\\x", "absolute"),
        ("\\\\srv\\x", "absolute"),
        ("a\\..\\b", "climbs out"),
        (".GIT/x", ".git"),
        ("", "empty"),
    ],
)
def test_windows_and_case_variants_of_escaping_paths_are_named_unsafe(path: str, why: str) -> None:
    assert why in unsafe_path(path)


def test_a_glob_accepted_before_validation_makes_the_scope_check_error_instead_of_crashing() -> None:
    verdict = ScopeInvariant()._check(_scope_subject(["src/[z-a].py"], "src/a.py"))
    assert verdict.verdict == "error"
    assert "range z-a" in verdict.evidence["reason"]


def _request(**contract: object) -> JobRequest:
    return JobRequest(idempotency_key="k", kind="refactor", contract=Contract(**contract))  # type: ignore[arg-type]


def test_the_request_digest_ignores_spelt_out_defaults_and_key_order() -> None:
    plain = request_digest(_request(inputs={"a": 1, "b": [1, 2]}))
    assert request_digest(_request(inputs={"b": [1, 2], "a": 1}, required_level=0, scope=Scope())) == plain
    assert request_digest(_request(inputs={"a": 1, "b": [2, 1]})) != plain
    assert request_digest(_request(inputs={"a": 1, "b": [1, 2]}, required_level=1)) != plain
    other_kind = JobRequest(
        idempotency_key="k", kind="feature", contract=Contract(inputs={"a": 1, "b": [1, 2]})
    )
    assert request_digest(other_kind) != plain


@pytest.mark.parametrize(
    ("level", "named"),
    [(99, "above the policy's highest level 2"), (-1, "below the policy's lowest level 0"), (1, "")],
)
def test_a_level_the_policy_does_not_declare_is_refused_naming_its_bounds(level: int, named: str) -> None:
    refusal = load_policy().level_refusal(level)
    if named:
        assert refusal is not None and named in refusal
    else:
        assert refusal is None


def test_a_policy_promoting_past_its_highest_level_does_not_load(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("levels: [{level: 0, name: a, effects: [none]}]\npromotion: {max_level: 3}\n")
    with pytest.raises(PolicyError, match=r"promotion\.max_level 3 is above the highest declared level 0"):
        load_policy(path)


def test_the_parts_of_a_contract_that_have_their_types_are_checked_even_when_others_do_not() -> None:
    raw = {
        "scope": {"paths": ["../**", "src/**"]},
        "required_level": 5,
        "stopping": {"max_attempts": 0, "lease_ttl_s": 5, "heartbeat_interval_s": 10},  # a type error
        "colour": "red",
    }
    assert partial_semantic_errors(raw, NOW, max_level=MAX) == [
        ("$.contract.scope.paths[0]", "glob '../**' is refused: path climbs out with '..'"),
        (
            "$.contract.required_level",
            "level 5 is above the policy's highest level 2: no agent can ever hold it",
        ),
    ]
    assert partial_semantic_errors(["not", "a", "contract"], NOW, max_level=MAX) == []
