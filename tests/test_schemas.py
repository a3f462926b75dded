"""schemas/ is generated from the Structs; these tests fail when the two drift apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest

from shared import events, schemas

ROOT = Path(__file__).resolve().parent.parent / "schemas"


def test_the_committed_schemas_match_the_code() -> None:
    assert schemas.drift(ROOT) == [], "run `warden schemas export` and commit schemas/"


def test_a_field_change_without_re_export_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "schemas"
    shutil.copytree(ROOT, copy)

    class ChangedGrant(events.Event, frozen=True, tag="lease.granted"):
        agent: str
        epoch: int
        colour: str  # a field the exported schema does not know

    groups = dict(schemas.GROUPS)
    groups["events"] = tuple(ChangedGrant if t is events.LeaseGranted else t for t in events.EVENT_TYPES)
    monkeypatch.setattr(schemas, "GROUPS", groups)
    assert schemas.drift(copy) == ["stale events/lease.granted.json"]


def test_every_event_tag_is_explicit_and_unique() -> None:
    tags = [t.__struct_config__.tag for t in events.EVENT_TYPES]
    assert all(isinstance(tag, str) and "." in tag for tag in tags)
    assert len(set(tags)) == len(tags)
    for tp in events.EVENT_TYPES:
        assert tp.__struct_config__.frozen


def test_an_unknown_event_tag_is_refused_by_the_decoder() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value 'job\.teleported'"):
        events.decode(
            b'{"type":"job.teleported","originator_id":"00000000-0000-0000-0000-000000000000","originator_version":1}'
        )
