"""JSON Schema for every message on the wire, generated from the Structs (the code is the truth).

`warden schemas export` writes them under `schemas/`; a test fails when the files and the code
disagree, so a field change cannot ship without its schema.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec

from shared import events, messages, task
from shared.contract import Budgets, CiGate, Contract, Scope, Stopping, Target
from shared.validation import FieldError

GROUPS: dict[str, tuple[type[msgspec.Struct], ...]] = {
    "events": events.EVENT_TYPES,
    "inputs": (
        messages.JobRequest,
        messages.Register,
        messages.Claim,
        messages.Heartbeat,
        messages.Propose,
        messages.ProposalPayload,
        messages.Release,
        messages.OperatorCommand,
    ),
    "replies": messages.AnyReply.__args__,
    # What `warden agent exec` writes for the command it runs, and what the command writes back.
    "agent": (task.TaskFile, task.UsageLine),
}


_JOB = UUID("4f7b7c1e-2a0d-5c3e-9d8b-1a2b3c4d5e6f")
_AT = datetime(2099, 1, 1, 12, 0, tzinfo=UTC)
_PATCH = "diff --git a/src/a.py b/src/a.py\n--- a/src/a.py\n+++ b/src/a.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n"

# What a client writes and reads, published in each schema's `examples` (tests decode every one,
# and variations of it, through the server's decoder and through the schema).
EXAMPLES: dict[str, list[msgspec.Struct]] = {
    "job.request": [
        messages.JobRequest(idempotency_key="issue-42", kind="refactor"),
        messages.JobRequest(
            idempotency_key="issue-43",
            kind="feature",
            submitter="ci-bot",
            contract=Contract(
                scope=Scope(paths=["src/**", "tests/**/test_*.py"], effects=["git.patch"]),
                authorities=["repo:write"],
                inputs={"issue": 43, "title": "add a feature with a test"},
                output_schema={"type": "object", "required": ["summary"]},
                required_level=1,
                stopping=Stopping(
                    deadline=_AT,
                    max_attempts=3,
                    lease_ttl_s=60.0,
                    heartbeat_interval_s=15.0,
                    budgets=Budgets(steps=50, tokens=200_000, cost=2.5, wall_clock_s=1800.0),
                ),
                target=Target(repo="/srv/git/app.git", branch="main"),
                ci=CiGate(command=["python", "-m", "unittest"], timeout_s=300.0),
                invariants=["no_secrets"],
                approval_required=True,
            ),
        ),
    ],
    "agent.register": [messages.Register(max_concurrent=2, kinds=["refactor", "feature"])],
    "agent.claim": [messages.Claim(), messages.Claim(kinds=["refactor"], wait_s=10.0, sent_at=_AT)],
    "agent.heartbeat": [
        messages.Heartbeat(
            job_id=_JOB,
            epoch=1,
            progress=0.5,
            usage=events.Usage(steps=3, tokens=1200, cost=0.02),
            note="tests written",
        )
    ],
    "agent.propose": [
        messages.Propose(
            job_id=_JOB,
            epoch=1,
            effect="git.patch",
            patch=_PATCH,
            base="0" * 40,
            output={"summary": "x is 2 now"},
            usage=events.Usage(steps=9, tokens=5000, cost=0.1),
            evidence={"tests": "ok"},
        ),
        messages.Propose(job_id=_JOB, epoch=2, effect="file.write", files={"docs/x.md": "# x\n"}),
    ],
    "agent.proposal_payload": [messages.ProposalPayload(patch=_PATCH, output={"summary": "x is 2 now"})],
    "agent.release": [messages.Release(job_id=_JOB, epoch=1, reason="cannot reproduce")],
    "operator.command": [
        messages.OperatorCommand(operator="alice", reason="reviewed the history", agent="fixer", level=1),
        messages.OperatorCommand(operator="alice", reason="network fixed", job_id=_JOB),
    ],
    "accepted": [messages.Accepted(job_id=_JOB), messages.Accepted(job_id=_JOB, duplicate=True)],
    "rejected": [
        messages.Rejected(
            errors=[
                FieldError(
                    path="$.contract.scope.paths[0]",
                    message="glob '../**' is refused: path climbs out with '..'",
                ),
                FieldError(
                    path="$.contract.required_level",
                    message="level 5 is above the policy's highest level 2: no agent can ever hold it",
                ),
            ],
            rejection_id=UUID("0b9d3a4c-5e6f-5a1b-8c2d-3e4f5a6b7c8d"),
        ),
        messages.Rejected(
            errors=[
                FieldError(path="$.idempotency_key", message="idempotency key 'issue-42' already names ...")
            ],
            job_id=_JOB,
        ),
    ],
    "lease.grant": [
        messages.LeaseGrant(
            job_id=_JOB,
            kind="refactor",
            epoch=1,
            expires_at=_AT,
            ttl_s=30.0,
            heartbeat_interval_s=10.0,
            contract=Contract(),
        )
    ],
    "no.work": [messages.NoWork(detail="no runnable job for this agent")],
    "heartbeat.ack": [messages.HeartbeatAck(standing="extended", expires_at=_AT)],
}


def tag_optional(defs: dict[str, Any], tp: type[msgspec.Struct]) -> None:
    """Make an input's `type` optional in its schema definitions, as the server has it.

    An input subject (or HTTP endpoint) has one decoder that knows the type, so a body without
    `type` is taken (and one naming another type refused): the published schema says the same.
    """
    required = defs[tp.__name__]["required"]
    if "type" in required:
        required.remove("type")


def strict_objects(defs: dict[str, Any]) -> None:
    """Inputs refuse unknown fields at every depth (shared/validation.py), though the stored
    types they carry (a contract) accept them so they can grow: the input schemas say so."""
    for definition in defs.values():
        if definition.get("type") == "object" and "properties" in definition:
            definition["additionalProperties"] = False


def schema_name(tp: type[msgspec.Struct]) -> str:
    """A type's schema file name: its tag, or `__schema_name__` for an untagged one (usage lines)."""
    name = tp.__struct_config__.tag or getattr(tp, "__schema_name__", tp.__name__)
    assert isinstance(name, str)
    return name


def render() -> dict[str, str]:
    """Relative path -> file text for every schema."""
    files: dict[str, str] = {}
    for group, types in GROUPS.items():
        for tp in types:
            tag = schema_name(tp)
            schema: dict[str, Any] = msgspec.json.schema(tp)
            schema["$id"] = f"https://warden.dev/schemas/{group}/{tag}.json"
            if group in ("inputs", "agent"):  # read as one known type: "type" may be left out
                tag_optional(schema["$defs"], tp)
            if group == "inputs":
                strict_objects(schema["$defs"])
            if tag in EXAMPLES:
                schema["examples"] = [msgspec.to_builtins(e) for e in EXAMPLES[tag]]
            files[f"{group}/{tag}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def export(root: Path) -> list[Path]:
    written = []
    for rel, text in render().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    for stale in root.glob("*/*.json"):
        if str(stale.relative_to(root)) not in render():
            stale.unlink()
    return written


def drift(root: Path) -> list[str]:
    """Files that are missing, stale or extra compared with the code."""
    problems = []
    expected = render()
    for rel, text in expected.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing {rel}")
        elif path.read_text() != text:
            problems.append(f"stale {rel}")
    for path in root.glob("*/*.json"):
        rel = str(path.relative_to(root))
        if rel not in expected:
            problems.append(f"extra {rel}")
    return problems
