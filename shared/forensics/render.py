"""An explanation as plain text for an operator's terminal."""

from __future__ import annotations

from shared.forensics.model import Explanation
from shared.forensics.story import clock


def render(expl: Explanation) -> str:
    """The explanation as plain text for an operator's terminal."""
    out = [f"job {expl.job_id} ({expl.kind}): {expl.outcome}"]
    if expl.ended_by is not None:
        out.append(f"cause [{expl.ended_by.cls}]: {expl.ended_by.text}")
    for survived in expl.contained:
        out.append(f"contained [{survived.cls}]: {survived.text}")
    if expl.summary:
        out.append(f"summary: {expl.summary}")
    out.append(
        f"{expl.attempts_used} of {expl.max_attempts} attempts, {expl.events} events; "
        + ("ledger intact" if expl.ledger.ok else f"LEDGER BROKEN: {expl.ledger.breaks[0].detail}")
    )
    for found in expl.ledger.foreign:
        out.append(f"FINDING: seq {found.seq} on {found.subject} was not written by Warden: {found.reason}")
    for a in expl.attempts:
        hb = a.heartbeats
        beats = f"{hb.count} heartbeats"
        if hb.last_at is not None:
            beats += f", last {clock(hb.last_at)}"
        if hb.last_note:
            beats += f" ({hb.last_note!r})"
        if hb.fenced:
            beats += f", {hb.fenced} more fenced after the lease ended"
        end = a.ended or "live"
        out.append(f"  lease {a.epoch} to {a.agent} at {clock(a.granted_at)}: {beats}; {end}")
        if a.cause is not None:
            out.append(f"      [{a.cause.cls}] {a.cause.text}")
        elif a.end_detail and a.ended != "completed":
            out.append(f"      {a.end_detail}")
    for p in expl.proposals:
        out.append(f"  proposal {p.proposal_id} by {p.agent} (lease {p.epoch}, {p.effect}): {p.decision}")
        if p.evidence:
            shown = {k: v for k, v in p.evidence.items() if k not in ("stdout", "stderr")}
            out.append(f"      evidence: {shown}")
        for c in p.checks:
            out.append(
                f"      {c.invariant}@{c.version}: {c.verdict} {c.evidence if c.verdict != 'pass' else ''}".rstrip()
            )
        for v in p.violations:
            out.append(f"      violation: {v}")
        for e in p.effects:
            out.append(f"      effect {e.kind} {e.what}: {e.receipt or e.reason}")
    for f in expl.fenced:
        out.append(f"  fenced: {f.count} {f.verb} from {f.agent} under lease {f.epoch}: {f.reason}")
    for r in expl.revocations:
        out.append(f"  revocation ({r.what}) of {r.agent} by {r.by}: {r.reason}")
    out.append("timeline:")
    for line in expl.timeline:
        out.append(f"  {line.at:%H:%M:%S.%f}"[:-3] + f" #{line.seq} {line.text}")
    return "\n".join(out)
