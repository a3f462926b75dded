"""Events as sentences: one line a person reads for each event, and a job's timeline of them.

The one place that turns an event into words for explain, the phase ledger and the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.events import (
    AgentLevelChanged,
    AgentRegistered,
    AgentReinstated,
    AgentRevoked,
    AgentSuspended,
    AnyEvent,
    EffectApplied,
    EffectFailed,
    EffectRolledBack,
    InputRejected,
    InvariantChecked,
    JobCancelled,
    JobCompleted,
    JobRequested,
    JobRequeued,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    ReplyRefused,
    RollbackRequested,
    tag_of,
)
from shared.forensics import log
from shared.forensics.model import Line
from shared.forensics.story import Beats, clip, lost_lease, secs


def describe(
    event: AnyEvent,
    beats: Beats | None = None,
    fenced: set[int] | None = None,
    ttls: dict[int, float] | None = None,
) -> str:
    """One line for `event`: the one sentence the CLI, the read model and explain all print.
    With the job's heartbeats and lease TTLs, expiries say more."""
    beats = beats if beats is not None else {}
    fenced = fenced if fenced is not None else set()
    ttls = ttls if ttls is not None else {}
    match event:
        case JobRequested():
            scope = ", ".join(event.contract.scope.paths)
            stop = event.contract.stopping
            return (
                f"requested by {event.submitter or 'an unnamed client'}: kind {event.kind}, scope [{scope}], "
                f"max {stop.max_attempts} attempts, lease TTL {secs(stop.lease_ttl_s)}"
            )
        case LeaseGranted():
            ttls[event.epoch] = event.ttl_s
            return f"{event.agent} claimed it: lease {event.epoch} granted for {secs(event.ttl_s)}"
        case LeaseExpired():
            hb = beats.get(event.epoch, [])
            count = sum(1 for r, _ in hb if r.seq not in fenced)
            stall = (
                f" ({event.since_progress_ms / 1000:.1f}s after the work's last sign of progress)"
                if event.since_progress_ms is not None
                else ""
            )
            return (
                f"lease {event.epoch} of {event.agent} lost after {count} heartbeats: "
                + lost_lease(event, ttls.get(event.epoch))
                + stall
            )
        case LeaseReleased():
            return f"{event.agent} released lease {event.epoch}: {event.reason or 'no reason given'}"
        case LeaseRevoked():
            return (
                f"lease {event.epoch} of {event.agent} revoked by {event.by} ({event.signal}): {event.reason}"
            )
        case MessageRejected():
            return f"{event.verb} from {event.agent} under lease {event.epoch} fenced: {event.reason}"
        case JobRequeued():
            return f"requeued by {event.by}: {event.reason}"
        case JobTombstoned():
            return f"tombstoned by {event.by} after {event.attempts} attempts: {event.reason}"
        case JobCancelled():
            return f"cancelled by {event.by}: {event.reason}"
        case ProposalSubmitted():
            return f"{event.agent} proposed {event.proposal_id} under lease {event.epoch}: {event.effect}, {event.size} bytes"
        case InvariantChecked():
            return f"invariant {event.invariant}@{event.version}: {event.verdict}"
        case ProposalAccepted():
            return f"proposal {event.proposal_id} accepted" + (
                f" by {event.by}" if getattr(event, "by", "") else ""
            )
        case ProposalRejected():
            return f"proposal {event.proposal_id} rejected: {'; '.join(event.violations)}"
        case EffectApplied():
            reused = " (receipt already present: not applied again)" if event.reused_receipt else ""
            return f"effect {event.kind} applied{reused}: receipt {clip(event.receipt)}"
        case RollbackRequested():
            return f"rollback of {event.proposal_id} requested by {event.by}: {event.reason}"
        case EffectRolledBack():
            return f"effect {event.kind} rolled back: receipt {clip(event.receipt)}"
        case EffectFailed():
            return (
                f"effect {event.kind} ({event.phase}) of proposal {event.proposal_id} failed: {event.reason}"
            )
        case JobCompleted():
            return f"completed by {event.agent} (lease {event.epoch}) with proposal {event.proposal_id}"
        case AgentRegistered():
            return f"agent {event.name} registered at level {event.level}"
        case AgentLevelChanged():
            return f"{event.name} level {event.previous} → {event.level}: {event.reason}"
        case AgentRevoked():
            return f"{event.name} revoked by {event.by}: {event.reason}"
        case AgentSuspended():
            return f"{event.name} suspended by {event.by}: {event.reason}"
        case AgentReinstated():
            return f"{event.name} reinstated by {event.by}: {event.reason}"
        case InputRejected():
            first = event.errors[0].message if event.errors else "invalid"
            return f"input on {event.subject} rejected: {first}"
        case ReplyRefused():
            return f"input on {event.subject} not answered: {event.reason}"
    fields = msgspec.to_builtins(event)
    for key in ("originator_id", "originator_version", "timestamp", "trace", "prev_hash", "type"):
        fields.pop(key, None)
    return f"{tag_of(event)} " + " ".join(
        f"{k}={v}" for k, v in fields.items() if v not in (None, "", [], {})
    )


def timeline(items: Sequence[log.LoggedEvent], beats: Beats, fenced: set[int]) -> list[Line]:
    """One line per event, with runs of fenced messages folded into one line each."""
    lines: list[Line] = []
    ttls: dict[int, float] = {}
    run: list[MessageRejected] = []
    run_seq = 0

    def flush() -> None:
        if not run:
            return
        first = run[0]
        text = describe(first, beats, fenced, ttls)
        if len(run) > 1:
            text = f"{len(run)} messages ({first.verb}) from {first.agent} under lease {first.epoch} fenced: {first.reason}"
        lines.append(Line(at=first.timestamp, seq=run_seq, text=text))
        run.clear()

    for item in items:
        event = item.event
        if event is None:
            flush()
            text = (
                f"stepped over, not written by Warden: {item.foreign}"
                if item.foreign
                else "undecodable record"
            )
            lines.append(Line(at=item.time, seq=item.seq, text=f"{text} (see ledger verify)"))
            continue
        if isinstance(event, MessageRejected):
            if run and (run[0].agent, run[0].epoch, run[0].verb) != (event.agent, event.epoch, event.verb):
                flush()
            if not run:
                run_seq = item.seq
            run.append(event)
            continue
        flush()
        lines.append(Line(at=event.timestamp, seq=item.seq, text=describe(event, beats, fenced, ttls)))
    flush()
    return lines
