"""The phase ledger of one job (`warden ledger show`): each transition, its hash link, its evidence."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from msgspec import Struct

from shared import topology
from shared.events import (
    AnyEvent,
    EffectApplied,
    InvariantChecked,
    JobRequested,
    LeaseExpired,
    LeaseGranted,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    tag_of,
)
from shared.forensics.collect import JobLog
from shared.forensics.sentences import describe
from shared.forensics.story import clip, fenced_seqs, heartbeats, proposal_evidence


class Phase(Struct, frozen=True, kw_only=True):
    """One phase transition of the job as the ledger holds it, with the evidence behind it."""

    version: int | None
    seq: int
    stored_at: datetime
    type: str
    hash: str
    prev_hash: str
    linked: bool  # prev_hash names the previous event as stored
    text: str
    evidence: dict[str, Any]


def _phase_evidence(job_log: JobLog, event: AnyEvent) -> dict[str, Any]:
    """What the transition rests on: the agent's own words where it gave any."""
    match event:
        case JobRequested():
            return {
                "request_input_seq": event.input_seq,
                "request_input_stream": topology.INPUT_STREAM,
                "submitter": event.submitter,
            }
        case LeaseGranted():
            return {
                "claim_input_seq": event.claim_seq,
                "claim_input_stream": topology.AGENT_INPUT_STREAM,
                "expires_at": event.expires_at.isoformat(),
            }
        case LeaseExpired():
            out: dict[str, Any] = {
                "deadline": event.deadline.isoformat(),
                "detected_at": event.detected_at.isoformat(),
                "detection_latency_ms": event.detection_latency_ms,
            }
            if event.last_heartbeat is not None:
                out["last_heartbeat"] = msgspec.to_builtins(event.last_heartbeat)
            return out
        case ProposalSubmitted():
            return {
                "proposal_input_seq": event.input_seq,
                "agent_evidence": proposal_evidence(job_log, event),
            }
        case InvariantChecked():
            return {"verdict": event.verdict, **clip(event.evidence)}
        case ProposalAccepted():
            return {"checks": list(event.checks), "by": getattr(event, "by", "")}
        case ProposalRejected():
            return {"violations": list(event.violations)}
        case EffectApplied():
            return {"receipt": clip(event.receipt), "reused_receipt": event.reused_receipt}
        case MessageRejected():
            return {"input_seq": event.input_seq, "reason": event.reason}
        case LeaseRevoked():
            return {"signal": event.signal, "by": event.by}
    return {}


def phases(job_log: JobLog) -> list[Phase]:
    """The job's phase ledger: each transition, its link in the hash chain, and its evidence."""
    beats = heartbeats(job_log)
    fenced = fenced_seqs(job_log.events)
    ttls: dict[int, float] = {}
    out: list[Phase] = []
    previous = ""
    for item in job_log.events:
        event = item.event
        prev_hash = event.prev_hash if event is not None else ""
        out.append(
            Phase(
                version=event.originator_version if event is not None else None,
                seq=item.seq,
                stored_at=item.time,
                type=tag_of(event) if event is not None else "(undecodable)",
                hash=item.hash,
                prev_hash=prev_hash,
                linked=event is not None and prev_hash == previous,
                text=describe(event, beats, fenced, ttls) if event is not None else "undecodable record",
                evidence=_phase_evidence(job_log, event) if event is not None else {},
            )
        )
        previous = item.hash
    return out


def render_phases(items: Sequence[Phase]) -> str:
    lines = []
    for p in items:
        link = "linked" if p.linked else "BROKEN LINK"
        lines.append(
            f"v{p.version} #{p.seq} {p.type:<18} {p.hash[:12]} <- {p.prev_hash[:12] or '(first)':<12} {link}"
        )
        lines.append(f"    {p.text}")
        for key, value in p.evidence.items():
            lines.append(f"    {key}: {value}")
    return "\n".join(lines)
