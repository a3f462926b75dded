"""`warden explain JOB`: the causal chain from request to outcome, from the log alone.

This module only puts the parts together, each in its own module with one reason to change:

- `collect`: reading the job's record from the streams (its subjects only);
- `story`: attempts and proposals built from the typed `Job` state and the events;
- `causes`: the rules naming each failure's class and evidence (pure, unit-tested);
- `sentences`: one line per event, and the timeline;
- `render`: text for a terminal; `phases`: the phase ledger (`warden ledger show`).

Nothing is re-run and no live state is read: an explanation of yesterday's job reads the same
today.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from nats.js import JetStreamContext

from shared.events import (
    JobCancelled,
    JobCompleted,
    JobRequested,
    JobRequeued,
    JobTombstoned,
    MessageRejected,
)
from shared.forensics import causes, ledger, story
from shared.forensics.collect import JobLog, JobNotFound, collect
from shared.forensics.model import Attempt, Cause, Explanation, Line
from shared.forensics.phases import Phase, phases, render_phases
from shared.forensics.render import render
from shared.forensics.sentences import timeline

__all__ = [
    "Cause",
    "Explanation",
    "JobLog",
    "JobNotFound",
    "Phase",
    "collect",
    "explain",
    "explain_job",
    "phases",
    "render",
    "render_phases",
]


def _outcome(status: str, reason: str, by: str, ended_at: datetime | None, attempts: list[Attempt]) -> str:
    when = f" at {ended_at.isoformat()}" if ended_at else ""
    if status == "completed":
        last = attempts[-1] if attempts else None
        holder = f" by agent {last.agent} (lease {last.epoch})" if last else ""
        return f"completed{when}{holder}"
    if status in ("tombstoned", "cancelled"):
        return f"{status}{when} by {by}: {reason}"
    return f"{status} (not finished)"


def explain(job_log: JobLog) -> Explanation:
    """The story of one job, from its record (pure: the same record always says the same)."""
    items = story.typed(job_log)
    job, endings = story.fold(items)
    requested = next((e.event for e in items if isinstance(e.event, JobRequested)), None)

    # How the job last ended: an operator's requeue of a dead job revives it, so the ending
    # before a requeue is history (its attempts still carry their causes).
    reason, by, ended_at = "", "", None
    requeues: list[Line] = []
    for item in items:
        event = item.event
        match event:
            case JobRequeued():
                requeues.append(
                    Line(at=event.timestamp, seq=item.seq, text=f"requeued by {event.by}: {event.reason}")
                )
                reason, by, ended_at = "", "", None
            case JobTombstoned() | JobCancelled():
                reason, by, ended_at = event.reason, event.by, event.timestamp
            case JobCompleted():
                by, ended_at = event.agent, event.timestamp

    proposals = story.proposals(job, job_log)
    fenced = story.fenced_groups(job_log.events)
    registered, revoked = causes.Facts.of_agent_events(
        {
            name: [i.event for i in events if i.event is not None]
            for name, events in job_log.agent_events.items()
        }
    )
    facts = causes.Facts(
        job=job,
        proposals=proposals,
        fenced=fenced,
        late=[e.event for e in items if isinstance(e.event, MessageRejected)],
        registered=registered,
        agent_revocations=revoked,
    )
    bare = story.attempts(job, endings, job_log)
    attempts = story.with_causes(bare, [causes.attempt_cause(a, facts) for a in bare])

    status = job.status if job is not None else "unknown"
    max_attempts = requested.contract.stopping.max_attempts if requested else 0
    ending = causes.job_ending(status, reason, by, attempts, max_attempts)
    incidents = [
        *causes.late_messages(facts, {a.epoch: (a.ended, a.ended_at) for a in attempts}),
        *causes.effect_incidents(proposals),
    ]
    survived = causes.contained(attempts, incidents, ending)
    cause_class: str
    if ending is not None:
        cause, cause_class = ending.text, ending.cls
    elif survived:
        cause = "contained: " + "; ".join(c.text for c in survived)
        cause_class = survived[0].cls
    else:
        cause, cause_class = "", ""

    beats = story.heartbeats(job_log)
    return Explanation(
        job_id=job_log.job_id,
        kind=requested.kind if requested else "",
        submitter=requested.submitter if requested else "",
        status=status,
        requested_at=requested.timestamp if requested else None,
        ended_at=ended_at,
        outcome=_outcome(status, reason, by, ended_at, attempts),
        cause=cause,
        cause_class=cause_class,
        ended_by=ending,
        contained=survived,
        summary=causes.summary(status, ending, survived),
        attempts_used=len(attempts),
        max_attempts=max_attempts,
        events=sum(1 for e in job_log.events if e.event is not None),
        attempts=attempts,
        proposals=proposals,
        fenced=fenced,
        revocations=story.revocations(
            job_log, attempts, proposals, requested.timestamp if requested else None, ended_at
        ),
        requeues=requeues,
        timeline=timeline(job_log.events, beats, story.fenced_seqs(job_log.events)),
        ledger=ledger.verify(ledger.entries_of(job_log.events), f"job {job_log.job_id}"),
    )


async def explain_job(js: JetStreamContext, job_id: UUID) -> Explanation:
    return explain(await collect(js, job_id))
