"""What each event means for the read model: one batch of events folded into rows.

Job and agent rows are folded with the domain's own evolve functions (shared/aggregates.py), so
the read model can never disagree with the services about what a job's state is; the folded
state is kept beside the row. Within a batch, rows are cached and written once at the end, so a
catch-up batch of a thousand events costs a handful of statements per aggregate, not per event.

Event types this module does not know (added later by other services) still land in the
timeline and still advance their aggregate's version; they change nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any
from uuid import UUID

import msgspec

from shared.aggregates import Agent, Job, evolve_agent, evolve_job, is_agent_event
from shared.events import (
    AgentLevelChanged,
    AgentRevoked,
    AgentSuspended,
    AnyEvent,
    EffectApplied,
    EffectRolledBack,
    Event,
    InputRejected,
    InvariantChecked,
    JobCompleted,
    JobTombstoned,
    LeaseExpired,
    LeaseGranted,
    LeaseRevoked,
    MessageRejected,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    ReplyRefused,
    RollbackRequested,
    agent_id_for,
    tag_of,
)
from shared.forensics import sentences
from shared.readmodel.db import Db
from shared.readmodel.tables import (
    AGENTS,
    CHECKS,
    FAILURES,
    JOBS,
    LEASES,
    LEVELS,
    PROPOSALS,
    REVOCATIONS,
    TIMELINE,
    Table,
    to_json,
    ts,
)
from shared.topology import INPUT_ROOT

log = logging.getLogger("warden.readmodel")

# Inputs on these subjects are an operator's commands: a refused one is a person's typo.
OPERATOR_INPUTS = f"{INPUT_ROOT}.op."

_job_decoder = msgspec.json.Decoder(Job)
_agent_decoder = msgspec.json.Decoder(Agent)
_encoder = msgspec.json.Encoder()

Row = dict[str, Any]

# A UUID's text, cached: a rebuild formats each aggregate's id for every row it writes, and
# UUID.__str__ is Python code (a tenth of the folding, measured).
_text = lru_cache(maxsize=16_384)(UUID.__str__)


def _ms_between(start: datetime | None, end: datetime) -> float | None:
    return None if start is None else round((end - start).total_seconds() * 1000, 3)


def summarize(event: Event) -> str:
    """One line a person reads in a feed: the sentence explain and the CLI print too."""
    return sentences.describe(event)  # type: ignore[arg-type]


class BatchFold:
    """Folds one batch of (stream sequence, event) into the tables, inside the caller's transaction."""

    def __init__(self, db: Db) -> None:
        self.db = db
        # Keyed by the UUID's int: UUID's own hash and equality are Python code, and a rebuild
        # looks aggregates up several times per event (an eighth of the folding, measured).
        self.jobs: dict[int, tuple[Job | None, Row | None]] = {}
        self.agents: dict[int, tuple[Agent | None, Row | None]] = {}
        self.leases: dict[tuple[str, int], Row] = {}
        self.proposals: dict[str, Row | None] = {}
        self.dirty_jobs: set[int] = set()
        self.agent_ids: dict[str, UUID] = {}
        self.dirty_agents: set[int] = set()
        self.dirty_proposals: set[str] = set()
        self.ordinal = 0
        self.inserts: dict[str, list[Row]] = {
            t.name: [] for t in (LEVELS, CHECKS, FAILURES, REVOCATIONS, TIMELINE)
        }

    # -- loading ------------------------------------------------------------------------

    def _load(self, table: Table, key: str) -> Row | None:
        rows = self.db.dicts(
            f"SELECT {', '.join(table.column_names)} FROM {table.name} WHERE {table.key[0]} = ?", (key,)
        )
        return rows[0] if rows else None

    def prefetch(self, batch: Sequence[tuple[int, AnyEvent | None]]) -> None:
        """Load every job and agent a batch touches in a few queries, not one per aggregate."""
        ids = {e.originator_id.int: e.originator_id for _, e in batch if e is not None}
        jobs = self._rows(JOBS, [u for i, u in ids.items() if i not in self.jobs])
        for job_id, row in jobs.items():
            self.jobs[job_id] = (_job_decoder.decode(row["state_json"]) if row else None, row)
        agents = self._rows(AGENTS, [u for i, u in ids.items() if i not in self.agents])
        for agent_id, row in agents.items():
            self.agents[agent_id] = (_agent_decoder.decode(row["state_json"]) if row else None, row)

    def _rows(self, table: Table, wanted: list[UUID]) -> dict[int, Row | None]:
        found: dict[int, Row | None] = {u.int: None for u in wanted}
        for start in range(0, len(wanted), 500):
            chunk = [_text(i) for i in wanted[start : start + 500]]
            marks = ", ".join("?" * len(chunk))
            sql = (
                f"SELECT {', '.join(table.column_names)} FROM {table.name} WHERE {table.key[0]} IN ({marks})"
            )
            for row in self.db.dicts(sql, chunk):
                found[UUID(row[table.key[0]]).int] = row
        return found

    def job(self, job_id: UUID) -> tuple[Job | None, Row | None]:
        found = self.jobs.get(job_id.int)
        if found is None:
            row = self._load(JOBS, _text(job_id))
            state = _job_decoder.decode(row["state_json"]) if row else None
            found = self.jobs[job_id.int] = (state, row)
        return found

    def agent(self, agent_id: UUID) -> tuple[Agent | None, Row | None]:
        found = self.agents.get(agent_id.int)
        if found is None:
            row = self._load(AGENTS, _text(agent_id))
            state = _agent_decoder.decode(row["state_json"]) if row else None
            found = self.agents[agent_id.int] = (state, row)
        return found

    def proposal(self, proposal_id: UUID) -> Row | None:
        key = _text(proposal_id)
        if key not in self.proposals:
            self.proposals[key] = self._load(PROPOSALS, key)
        return self.proposals[key]

    # -- folding ------------------------------------------------------------------------

    def _event_row(self, table: Table, row: Row) -> None:
        """A row of an event table: keyed by the event's place in the stream (its stored
        message's sequence, and its ordinal within a packed record)."""
        row["ordinal"] = self.ordinal
        self.inserts[table.name].append(row)

    def apply(self, seq: int, event: AnyEvent, ordinal: int = 0) -> None:
        """Fold the event at `seq` (the `ordinal`th of its stored message: see
        shared/persistence/jetstream.py on packed records)."""
        self.ordinal = ordinal
        at = ts(event.timestamp)
        if isinstance(event, InputRejected):
            self._timeline(seq, event, at, job_id=None, agent=event.sender or None)
            if event.subject.startswith(OPERATOR_INPUTS):
                return  # a person's mistyped command, answered at once: no failure of the system
            self._event_row(
                FAILURES,
                {
                    "seq": seq,
                    "kind": "input.rejected",
                    "job_id": None,
                    "agent": event.sender or None,
                    "epoch": None,
                    "reason": "; ".join(f"{e.path}: {e.message}" for e in event.errors),
                    "deadline": None,
                    "detected_at": at,
                    "latency_ms": None,
                    "detail": to_json(
                        {"subject": event.subject, "input_seq": event.input_seq, "excerpt": event.excerpt}
                    ),
                    "at": at,
                },
            )
            return
        if isinstance(event, ReplyRefused):
            self._timeline(seq, event, at, job_id=None, agent=event.sender or None)
            self._event_row(
                FAILURES,
                {
                    "seq": seq,
                    "kind": "input.reply_refused",
                    "job_id": None,
                    "agent": event.sender or None,
                    "epoch": None,
                    "reason": event.reason,
                    "deadline": None,
                    "detected_at": at,
                    "latency_ms": None,
                    "detail": to_json(
                        {"subject": event.subject, "input_seq": event.input_seq, "reply_to": event.reply_to}
                    ),
                    "at": at,
                },
            )
            return
        agent_state, _ = self.agent(event.originator_id)
        if agent_state is not None or is_agent_event(event):
            self._apply_agent(seq, event, at)
        else:
            self._apply_job(seq, event, at)

    def _timeline(self, seq: int, event: Event, at: str, *, job_id: str | None, agent: str | None) -> None:
        self._event_row(
            TIMELINE,
            {
                "seq": seq,
                # A job's events name their job: its id's text is already at hand.
                "aggregate_id": job_id if job_id is not None else _text(event.originator_id),
                "job_id": job_id,
                "agent": agent,
                "type": tag_of(event),
                "summary": summarize(event)[:500],
                "at": at,
            },
        )

    def _apply_agent(self, seq: int, event: AnyEvent, at: str) -> None:
        state, row = self.agent(event.originator_id)
        if state is not None and event.originator_version <= state.version:
            return  # already folded: a redelivery changes nothing
        after = evolve_agent(state, event)
        name = after.name if after else getattr(event, "name", None)
        self._timeline(seq, event, at, job_id=None, agent=name)
        if after is None:
            return
        counters = {
            k: (row or {}).get(k, 0) for k in ("leases", "completed", "expired", "revoked", "rejected")
        }
        new_row: Row = {
            "agent_id": _text(after.id),
            "name": after.name,
            "level": after.level,
            "standing": after.standing,
            "standing_reason": after.standing_reason,
            "max_concurrent": after.max_concurrent,
            "kinds": to_json(list(after.kinds)),
            "registered_at": ts(after.created_on),
            "updated_at": at,
            "version": after.version,
            **counters,
            "seq": seq,
            "state_json": _encoder.encode(after).decode(),
        }
        self.agents[after.id.int] = (after, new_row)
        self.dirty_agents.add(after.id.int)
        match event:
            case AgentLevelChanged():
                self._event_row(
                    LEVELS,
                    {
                        "seq": seq,
                        "agent_id": _text(after.id),
                        "agent": after.name,
                        "level": event.level,
                        "previous": event.previous,
                        "reason": event.reason,
                        "actor": event.by,
                        "evidence": to_json(event.evidence),
                        "at": at,
                    },
                )
                if event.level < event.previous:  # a demotion takes authority away
                    self._revocation(seq, "agent.level_changed", event, at, agent=after.name, actor=event.by)
            case AgentRevoked():
                self._revocation(seq, "agent.revoked", event, at, agent=after.name, actor=event.by)
            case AgentSuspended():
                self._revocation(seq, "agent.suspended", event, at, agent=after.name, actor=event.by)

    def _revocation(
        self,
        seq: int,
        kind: str,
        event: Event,
        at: str,
        *,
        agent: str,
        actor: str,
        job_id: str | None = None,
        epoch: int | None = None,
        signal: str = "",
    ) -> None:
        signal_at: datetime | None = getattr(event, "signal_at", None)
        self._event_row(
            REVOCATIONS,
            {
                "seq": seq,
                "kind": kind,
                "job_id": job_id,
                "agent": agent,
                "epoch": epoch,
                "reason": str(getattr(event, "reason", "")),
                "signal": signal,
                "actor": actor,
                "signal_at": ts(signal_at) if signal_at else None,
                "latency_ms": _ms_between(signal_at, event.timestamp),
                "evidence": to_json(list(getattr(event, "evidence", []))),
                "at": at,
            },
        )

    def _count(self, agent_name: str, counter: str) -> None:
        """Bump an agent's tally; events about agents Warden never registered count nowhere."""
        agent_id = self.agent_ids.get(agent_name)
        if agent_id is None:
            agent_id = self.agent_ids[agent_name] = agent_id_for(agent_name)
        state, row = self.agent(agent_id)
        if row is None:
            return
        row = {**row, counter: row[counter] + 1}
        self.agents[agent_id.int] = (state, row)
        self.dirty_agents.add(agent_id.int)

    def _apply_job(self, seq: int, event: AnyEvent, at: str) -> None:
        before, row = self.job(event.originator_id)
        if before is not None and event.originator_version <= before.version:
            return  # already folded: a redelivery changes nothing
        after = evolve_job(before, event)
        job_id = _text(event.originator_id)
        agent: str | None = getattr(event, "agent", None)
        if agent is None and after is not None and after.lease is not None:
            agent = after.lease.agent
        self._timeline(seq, event, at, job_id=job_id, agent=agent)
        if after is not None:
            self._job_row(seq, at, before, after, row)
            self._lease_row(seq, at, before, after)
        self._job_event_rows(seq, event, at, job_id, after)

    def _job_row(self, seq: int, at: str, before: Job | None, after: Job, row: Row | None) -> None:
        """Track what the row needs beyond the folded state; the row is built once, at flush."""
        finished = (row or {}).get("finished_at")
        if after.terminal and not (before is not None and before.terminal):
            finished = at
        elif not after.terminal:
            finished = None
        meta: Row = {
            "finished_at": finished,
            "events": (row or {}).get("events", 0) + 1,
            "seq": seq,
            "updated_at": at,
        }
        self.jobs[after.id.int] = (after, meta)
        self.dirty_jobs.add(after.id.int)

    @staticmethod
    def _full_job_row(job: Job, meta: Row) -> Row:
        lease = job.lease
        return {
            "job_id": _text(job.id),
            "kind": job.kind,
            "state": job.status,
            "attempts": job.attempts,
            "max_attempts": job.contract.stopping.max_attempts,
            "agent": lease.agent if lease else None,
            "epoch": lease.epoch if lease else None,
            "lease_state": (lease.ended or "live") if lease else None,
            "lease_expires_at": ts(lease.expires_at) if lease else None,
            "submitter": job.submitter,
            "idempotency_key": job.idempotency_key,
            "reason": job.reason,
            "created_at": ts(job.created_on),
            "updated_at": meta["updated_at"],
            "finished_at": meta["finished_at"],
            "version": job.version,
            "events": meta["events"],
            "seq": meta["seq"],
            "state_json": _encoder.encode(job).decode(),
        }

    def _lease_row(self, seq: int, at: str, before: Job | None, after: Job) -> None:
        lease = after.lease
        if lease is None or (before is not None and before.lease == lease):
            return
        key = (_text(after.id), lease.epoch)
        ended_at = at if lease.ended else None
        was = before.lease if before is not None else None
        if lease.ended and was is not None and was.epoch == lease.epoch and was.ended:
            # Ended before (and now ended differently): it ended when it first ended, whichever
            # batch that was in.
            cached = self.leases.get(key)
            ended_at = (
                cached["ended_at"]
                if cached
                else self.db.scalar(f"SELECT ended_at FROM {LEASES.name} WHERE job_id = ? AND epoch = ?", key)
            )
        self.leases[key] = {
            "job_id": key[0],
            "epoch": lease.epoch,
            "agent": lease.agent,
            "granted_at": ts(lease.granted_at),
            "expires_at": ts(lease.expires_at),
            "ttl_s": lease.ttl_s,
            "ended": lease.ended,
            "ended_at": ended_at,
            "seq": seq,
            "updated_at": at,
        }

    def _failure(self, seq: int, kind: str, at: str, job_id: str, **fields: Any) -> None:
        row: Row = {
            "seq": seq,
            "kind": kind,
            "job_id": job_id,
            "agent": None,
            "epoch": None,
            "reason": "",
            "deadline": None,
            "detected_at": at,
            "latency_ms": None,
            "at": at,
        }
        detail = fields.pop("detail", {})
        row.update(fields)
        row["detail"] = to_json(detail)
        self._event_row(FAILURES, row)

    def _update_proposal(self, seq: int, at: str, proposal_id: UUID, **changes: Any) -> Row | None:
        row = self.proposal(proposal_id)
        if row is None:
            return None
        row = {**row, **changes, "seq": seq, "updated_at": at}
        self.proposals[_text(proposal_id)] = row
        self.dirty_proposals.add(_text(proposal_id))
        return row

    def _job_event_rows(self, seq: int, event: AnyEvent, at: str, job_id: str, job: Job | None) -> None:
        match event:
            case LeaseGranted():
                self._count(event.agent, "leases")
            case LeaseExpired():
                self._failure(
                    seq,
                    "lease.expired",
                    at,
                    job_id,
                    agent=event.agent,
                    epoch=event.epoch,
                    reason=f"no heartbeat before the lease's deadline (detector: {event.detector})",
                    deadline=ts(event.deadline),
                    detected_at=ts(event.detected_at),
                    latency_ms=event.detection_latency_ms,
                    detail={"last_heartbeat": msgspec.to_builtins(event.last_heartbeat)},
                )
                self._count(event.agent, "expired")
            case LeaseRevoked():
                self._revocation(
                    seq,
                    "lease.revoked",
                    event,
                    at,
                    agent=event.agent,
                    actor=event.by,
                    job_id=job_id,
                    epoch=event.epoch,
                    signal=event.signal,
                )
                self._count(event.agent, "revoked")
            case MessageRejected():
                self._failure(
                    seq,
                    "message.rejected",
                    at,
                    job_id,
                    agent=event.agent,
                    epoch=event.epoch,
                    reason=event.reason,
                    detail={
                        "verb": event.verb,
                        "input_seq": event.input_seq,
                        "current_epoch": event.current_epoch,
                    },
                )
            case JobTombstoned():
                self._failure(
                    seq,
                    "job.tombstoned",
                    at,
                    job_id,
                    agent=job.lease.agent if job and job.lease else None,
                    epoch=job.lease.epoch if job and job.lease else None,
                    reason=event.reason,
                    detail={"attempts": event.attempts, "by": event.by},
                )
            case ProposalSubmitted():
                key = _text(event.proposal_id)
                self.proposals[key] = {
                    "proposal_id": key,
                    "job_id": job_id,
                    "agent": event.agent,
                    "epoch": event.epoch,
                    "effect": event.effect,
                    "size": event.size,
                    "content_hash": event.content_hash,
                    "payload_object": event.payload_object,
                    "verdict": "pending",
                    "violations": None,
                    "checks_passed": 0,
                    "checks_failed": 0,
                    "submitted_at": at,
                    "decided_at": None,
                    "applied_at": None,
                    "receipt": None,
                    "rollback_requested_at": None,
                    "rolled_back_at": None,
                    "seq": seq,
                    "updated_at": at,
                }
                self.dirty_proposals.add(key)
            case InvariantChecked():
                self._event_row(
                    CHECKS,
                    {
                        "seq": seq,
                        "proposal_id": _text(event.proposal_id),
                        "job_id": job_id,
                        "invariant": event.invariant,
                        "version": event.version,
                        "verdict": event.verdict,
                        "evidence": to_json(event.evidence),
                        "at": at,
                    },
                )
                row = self.proposal(event.proposal_id)
                if row is not None:
                    counter = "checks_passed" if event.verdict == "pass" else "checks_failed"
                    self._update_proposal(seq, at, event.proposal_id, **{counter: row[counter] + 1})
            case ProposalAccepted():
                self._update_proposal(seq, at, event.proposal_id, verdict="accepted", decided_at=at)
            case ProposalRejected():
                row = self._update_proposal(
                    seq,
                    at,
                    event.proposal_id,
                    verdict="rejected",
                    decided_at=at,
                    violations=to_json(event.violations),
                )
                if row is not None:
                    self._count(row["agent"], "rejected")
                    self._failure(
                        seq,
                        "proposal.rejected",
                        at,
                        job_id,
                        agent=row["agent"],
                        epoch=row["epoch"],
                        reason="; ".join(event.violations) or event.reason,
                        detail={"proposal_id": _text(event.proposal_id), "by": event.by},
                    )
            case EffectApplied():
                self._update_proposal(
                    seq, at, event.proposal_id, applied_at=at, receipt=to_json(event.receipt)
                )
            case RollbackRequested():
                self._update_proposal(seq, at, event.proposal_id, rollback_requested_at=at)
            case EffectRolledBack():
                self._update_proposal(seq, at, event.proposal_id, rolled_back_at=at)
            case JobCompleted():
                self._count(event.agent, "completed")
            case _ if tag_of(event) == "effect.failed":
                # Matched by tag: the applier's event type is newer than this module.
                self._failure(
                    seq,
                    "effect.failed",
                    at,
                    job_id,
                    agent=job.lease.agent if job and job.lease else None,
                    epoch=job.lease.epoch if job and job.lease else None,
                    reason=str(getattr(event, "reason", "")),
                    detail={
                        "proposal_id": str(getattr(event, "proposal_id", "")),
                        "phase": getattr(event, "phase", ""),
                        "kind": getattr(event, "kind", ""),
                        "evidence": msgspec.to_builtins(getattr(event, "evidence", {})),
                    },
                )

    # -- writing ------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every changed row: upserts for state tables, inserts for event tables."""
        job_rows = []
        for job_id in self.dirty_jobs:
            state, meta = self.jobs[job_id]
            if state is not None and meta is not None:
                job_rows.append(self._full_job_row(state, meta))
        self._upsert(JOBS, job_rows)
        self._upsert(AGENTS, [self.agents[i][1] for i in self.dirty_agents])
        self._upsert(LEASES, list(self.leases.values()))
        self._upsert(PROPOSALS, [self.proposals[p] for p in self.dirty_proposals])
        for table in (LEVELS, CHECKS, FAILURES, REVOCATIONS, TIMELINE):
            self._insert(table, self.inserts[table.name])

    def _upsert(self, table: Table, rows: Sequence[Row | None]) -> None:
        names = table.column_names
        updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in table.key)
        sql = (
            f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT ({', '.join(table.key)}) DO UPDATE SET {updates}"
        )
        values = itemgetter(*names)
        self.db.executemany(sql, [values(r) for r in rows if r is not None])

    def _insert(self, table: Table, rows: Sequence[Row]) -> None:
        names = table.column_names
        sql = (
            f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT ({', '.join(table.key)}) DO NOTHING"
        )
        self.db.executemany(sql, list(map(itemgetter(*names), rows)))
