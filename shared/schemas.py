"""JSON Schema for every message on the wire, generated from the Structs (the code is the truth).

`warden schemas export` writes them under `schemas/`; a test fails when the files and the code
disagree, so a field change cannot ship without its schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from shared import events, messages

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
}


def render() -> dict[str, str]:
    """Relative path -> file text for every schema."""
    files: dict[str, str] = {}
    for group, types in GROUPS.items():
        for tp in types:
            tag = tp.__struct_config__.tag
            schema: dict[str, Any] = msgspec.json.schema(tp)
            schema["$id"] = f"https://warden.dev/schemas/{group}/{tag}.json"
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
