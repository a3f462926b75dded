"""The phase ledger: verify each aggregate's hash chain, in the stream or in a stored copy.

Every event names, in `prev_hash`, the sha256 of its aggregate's previous event as stored. So an
event altered after the fact no longer matches the hash its successor recorded, an event forged
into the stream names a previous hash that is not the real one, and a gap or a duplicate shows as
a version out of order. Verification recomputes all of it from the bytes and reports, per
aggregate, the first place the chain breaks (expected against found), never just "invalid".

A message on an aggregate's subject that Warden did not write (shared/persistence/written.py) is
no link of any chain: verification steps over it and lists it as a finding naming its stream
sequence. Stepping over cannot hide tampering: an event of Warden's passed off as foreign leaves
its successor naming a hash the chain no longer has.

A stored copy (a dossier, or any list of records with `seq`, `subject`, `raw`) is verified the
same way, plus two checks only a copy needs: the hash it recorded for each record, and that its
readable `event` says what its `raw` bytes say. A copy's last event has no successor to vouch for
it, so `compare_with_log` checks a copy against the stream itself when the stream is reachable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import msgspec
from msgspec import Struct, field
from nats.js import JetStreamContext

from shared import topology
from shared.events import AnyEvent
from shared.events import decode as decode_event
from shared.events import encode as encode_event
from shared.forensics import log

BreakKind = Literal["hash", "version", "originator", "undecodable", "digest", "copy", "missing"]


class Break(Struct, frozen=True, kw_only=True):
    """Where one aggregate's chain first fails, and how."""

    aggregate: str
    kind: BreakKind
    seq: int
    version: int | None
    expected: str
    found: str
    detail: str


class Foreign(Struct, frozen=True, kw_only=True):
    """A finding: a message on an aggregate's subject that Warden did not write."""

    aggregate: str
    seq: int
    subject: str
    reason: str


class LedgerReport(Struct, frozen=True, kw_only=True):
    ok: bool  # every chain of Warden's own events is intact
    source: str
    aggregates: int
    events: int
    first_break: Break | None = None
    # The first break of every broken aggregate, in stream order.
    breaks: list[Break] = field(default_factory=list)
    # Messages stepped over, in stream order: not links of any chain, but never expected there.
    foreign: list[Foreign] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Intact, and nothing on the event subjects but Warden's own events."""
        return self.ok and not self.foreign


@dataclass(frozen=True)
class Entry:
    """One event record to verify: its bytes, and what a copy claims about them."""

    seq: int
    subject: str
    data: bytes
    recorded_hash: str | None = None
    readable: Any = None  # a copy's decoded `event`, compared with its bytes
    foreign: str = ""  # why Warden did not write it (read with its headers, or a copy's note)

    @property
    def aggregate(self) -> str:
        return self.subject.rsplit(".", 1)[-1]


def entries_of(events: Iterable[log.LoggedEvent]) -> list[Entry]:
    return [Entry(e.seq, e.subject, e.stored.data, foreign=e.foreign) for e in events]


def _short(text: str) -> str:
    return text[:16] if text else "(none)"


class _Chain:
    def __init__(self) -> None:
        self.version = 0
        self.hash = ""
        self.seq = 0
        # The previous event's hash as re-encoded after decoding: writers hash what they decoded,
        # so a link naming this (and not `hash`) is encoding drift, a Warden bug, not tampering.
        self.reencoded = ""


def verify(entries: Sequence[Entry], source: str) -> LedgerReport:
    """Recompute every chain in `entries` (stream order) and report each aggregate's first break."""
    chains: dict[str, _Chain] = {}
    broken: dict[str, Break] = {}
    foreign: list[Foreign] = []
    for entry in entries:
        agg = entry.aggregate
        if entry.foreign:
            foreign.append(Foreign(aggregate=agg, seq=entry.seq, subject=entry.subject, reason=entry.foreign))
            continue
        chain = chains.setdefault(agg, _Chain())
        if agg in broken:
            continue
        actual = hashlib.sha256(entry.data).hexdigest()
        found = _check(entry, chain, actual)
        if found is not None:
            broken[agg] = found
            continue
        event = decode_event(entry.data)
        chain.version, chain.hash, chain.seq = event.originator_version, actual, entry.seq
        # Re-encoded, not as decoded (`digest` of a decoded event is its stored bytes' hash).
        chain.reencoded = hashlib.sha256(encode_event(event)).hexdigest()
    breaks = sorted(broken.values(), key=lambda b: b.seq)
    return LedgerReport(
        ok=not breaks,
        source=source,
        aggregates=len(chains),
        events=len(entries) - len(foreign),
        first_break=breaks[0] if breaks else None,
        breaks=breaks,
        foreign=foreign,
    )


def _check(entry: Entry, chain: _Chain, actual: str) -> Break | None:
    agg, seq = entry.aggregate, entry.seq

    def broke(kind: BreakKind, version: int | None, expected: str, found: str, detail: str) -> Break:
        return Break(
            aggregate=agg, kind=kind, seq=seq, version=version, expected=expected, found=found, detail=detail
        )

    if entry.recorded_hash is not None and entry.recorded_hash != actual:
        return broke(
            "digest",
            None,
            entry.recorded_hash,
            actual,
            f"seq {seq}: the copy records hash {_short(entry.recorded_hash)} but its bytes hash to "
            f"{_short(actual)}: the record was edited after it was copied",
        )
    try:
        event: AnyEvent = decode_event(entry.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return broke(
            "undecodable",
            None,
            "a Warden event",
            entry.data[:80].decode("utf-8", "replace"),
            f"seq {seq}: not a Warden event ({exc})",
        )
    version = event.originator_version
    if entry.readable is not None and entry.readable != json.loads(entry.data):
        return broke(
            "copy",
            version,
            "the readable event equal to its raw bytes",
            "a readable event that says something else",
            f"v{version} (seq {seq}): the copy's readable event differs from its stored bytes",
        )
    if str(event.originator_id) != agg:
        return broke(
            "originator",
            version,
            agg,
            str(event.originator_id),
            f"seq {seq}: an event of {event.originator_id} stored on the subject of {agg}",
        )
    if version != chain.version + 1:
        missing = version > chain.version + 1
        return broke(
            "version",
            version,
            f"v{chain.version + 1}",
            f"v{version}",
            f"seq {seq}: expected v{chain.version + 1} after v{chain.version}, found v{version}"
            + (": events are missing" if missing else ": a version was written twice"),
        )
    if event.prev_hash != chain.hash:
        if chain.version == 0:
            detail = f"v1 (seq {seq}) names a previous hash {_short(event.prev_hash)}; a first event has none"
        elif event.prev_hash == chain.reencoded:
            detail = (
                f"v{version} (seq {seq}) names the hash of v{chain.version} as re-encoded, not as "
                "stored: the event encoding drifted (a Warden bug, not tampering)"
            )
        elif not event.prev_hash:
            detail = f"v{version} (seq {seq}) names no previous hash; v{chain.version} hashes to {_short(chain.hash)}"
        else:
            detail = (
                f"v{version} (seq {seq}) names previous hash {_short(event.prev_hash)}, but "
                f"v{chain.version} (seq {chain.seq}) as stored hashes to {_short(chain.hash)}: "
                f"v{chain.version} was altered or v{version} forged"
            )
        return broke("hash", version, chain.hash, event.prev_hash, detail)
    return None


async def verify_log(js: JetStreamContext, aggregate: UUID | None = None) -> LedgerReport:
    """Verify every aggregate's chain in the event stream, or one aggregate's."""
    subject = topology.event_subject(aggregate) if aggregate is not None else log.EVENT_SUBJECTS
    events = await log.read_events(js, subject)
    return verify(entries_of(events), f"stream {topology.EVENT_STREAM}")


# --- stored copies ---------------------------------------------------------------------------


class CopyError(ValueError):
    """Raised when a file is not a stored copy Warden can verify (the message says why)."""


def _entry_from(item: Any, where: str) -> Entry:
    if not isinstance(item, dict):
        raise CopyError(f"{where}: expected an object with seq, subject and raw")
    try:
        seq, subject, raw = int(item["seq"]), str(item["subject"]), item["raw"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CopyError(f"{where}: needs seq, subject and raw ({exc})") from exc
    if not isinstance(raw, str):
        raise CopyError(f"{where}: raw must be the stored event's JSON text")
    recorded = item.get("hash")
    return Entry(
        seq=seq,
        subject=subject,
        data=raw.encode(),
        recorded_hash=str(recorded) if recorded is not None else None,
        readable=item.get("event"),
        foreign=str(item.get("foreign") or ""),
    )


def entries_from_copy(document: Any) -> list[Entry]:
    """The event records of a dossier (its job's and its agents'), or of a plain list of records."""
    items: list[tuple[Any, str]] = []
    if isinstance(document, list):
        items = [(item, f"record {i}") for i, item in enumerate(document)]
    elif isinstance(document, dict) and isinstance(document.get("events"), list):
        items = [(item, f"events[{i}]") for i, item in enumerate(document["events"])]
        agents = document.get("agents") or {}
        if isinstance(agents, dict):
            for name, agent in agents.items():
                for i, item in enumerate((agent or {}).get("events") or []):
                    items.append((item, f"agents.{name}.events[{i}]"))
    else:
        raise CopyError("not a dossier or a list of event records")
    entries = [_entry_from(item, where) for item, where in items]
    entries.sort(key=lambda e: e.seq)
    return entries


def verify_copy(document: Any, source: str) -> LedgerReport:
    return verify(entries_from_copy(document), source)


async def compare_with_log(js: JetStreamContext, entries: Sequence[Entry], source: str) -> LedgerReport:
    """A copy checked record by record against the stream (catches an edited last event too)."""
    stored = await log.get_many(js, topology.EVENT_STREAM, (e.seq for e in entries))
    breaks: list[Break] = []
    seen: set[str] = set()
    for entry in entries:
        if entry.aggregate in seen:
            continue
        original = stored.get(entry.seq)
        if original is None or original.subject != entry.subject:
            problem: Break | None = Break(
                aggregate=entry.aggregate,
                kind="missing",
                seq=entry.seq,
                version=None,
                expected=f"an event on {entry.subject}",
                found=original.subject if original else "nothing",
                detail=f"seq {entry.seq}: the stream holds no such event on {entry.subject}",
            )
        elif entry.foreign and any(e.event is not None for e in log.as_events(original)):
            problem = Break(
                aggregate=entry.aggregate,
                kind="copy",
                seq=entry.seq,
                version=None,
                expected="a message Warden did not write, as the copy says",
                found="a Warden event",
                detail=f"seq {entry.seq}: the copy calls foreign an event the stream holds as Warden's",
            )
        elif entry.data not in (held := _held(original)):
            problem = Break(
                aggregate=entry.aggregate,
                kind="copy",
                seq=entry.seq,
                version=None,
                expected=" or ".join(hashlib.sha256(data).hexdigest() for data in held),
                found=hashlib.sha256(entry.data).hexdigest(),
                detail=f"seq {entry.seq}: the copy differs from the event the stream holds",
            )
        else:
            problem = None
        if problem is not None:
            breaks.append(problem)
            seen.add(entry.aggregate)
    chain = verify(entries, source)
    merged: dict[str, Break] = {b.aggregate: b for b in chain.breaks}
    for b in breaks:
        if b.aggregate not in merged or b.seq < merged[b.aggregate].seq:
            merged[b.aggregate] = b
    ordered = sorted(merged.values(), key=lambda b: b.seq)
    return LedgerReport(
        ok=not ordered,
        source=f"{source} against stream {topology.EVENT_STREAM}",
        aggregates=chain.aggregates,
        events=chain.events,
        first_break=ordered[0] if ordered else None,
        breaks=ordered,
        foreign=chain.foreign,
    )


def _held(stored: log.Stored) -> list[bytes]:
    """The bytes of each event a stored message holds (a packed record's several), as a copy
    records them; the whole message when it is foreign."""
    return [e.stored.data for e in log.as_events(stored)]


def render(report: LedgerReport) -> str:
    if report.ok:
        lines = [
            f"ledger intact: {report.events} events in {report.aggregates} aggregate chains ({report.source})"
        ]
    else:
        lines = [
            f"ledger BROKEN in {len(report.breaks)} of {report.aggregates} aggregate chains "
            f"({report.events} events, {report.source})"
        ]
    for b in report.breaks:
        lines.append(f"  {b.aggregate} [{b.kind}] {b.detail}")
        lines.append(f"    expected {b.expected}")
        lines.append(f"    found    {b.found}")
    if report.foreign:
        lines.append(
            f"FINDING: {len(report.foreign)} message(s) on event subjects that Warden did not write "
            "(stepped over, no part of any chain):"
        )
        lines.extend(f"  seq {f.seq} on {f.subject}: {f.reason}" for f in report.foreign)
    return "\n".join(lines)
