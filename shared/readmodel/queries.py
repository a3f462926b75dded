"""Queries dashboards, the API and `warden replay` run against the read model.

All blocking (database calls): run them in worker threads. Rows come back as the API returns
them: JSON columns decoded, internal columns dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from shared.readmodel.db import Db
from shared.readmodel.store import ReadModel
from shared.readmodel.tables import (
    AGENTS,
    CHECKS,
    FAILURES,
    JOBS,
    LEASES,
    LEVELS,
    PROPOSALS,
    REVOCATIONS,
    TABLES,
    TIMELINE,
    Table,
    decode_json_columns,
)


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for column, value in filters.items():
        if value is None:
            continue
        clauses.append(f"{column} = ?")
        params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _select(db: Db, table: Table, where: str, params: Sequence[Any], tail: str = "") -> list[dict[str, Any]]:
    rows = db.dicts(f"SELECT {', '.join(table.public_names)} FROM {table.name}{where}{tail}", params)
    return [decode_json_columns(table, r) for r in rows]


def page(
    store: ReadModel,
    table: Table,
    filters: dict[str, Any],
    limit: int,
    offset: int,
    *,
    since: tuple[str, str] | None = None,
) -> Page:
    """One page of `table`'s rows matching `filters` (column = value), and `since` (column, ts):
    rows whose timestamp column is at or after a stored-format timestamp."""
    where, params = _where(filters)
    if since is not None:
        column, moment = since
        if column not in table.public_names:
            raise ValueError(f"{table.name} has no column {column}")
        where += (" AND " if where else " WHERE ") + f"{column} >= ?"
        params.append(moment)
    with store.reading() as db:
        total = int(db.scalar(f"SELECT COUNT(*) FROM {table.name}{where}", params))
        items = _select(
            db, table, where, params, f" ORDER BY {table.order} LIMIT {int(limit)} OFFSET {int(offset)}"
        )
    return Page(items=items, total=total, limit=limit, offset=offset)


def job_detail(store: ReadModel, job_id: str) -> dict[str, Any] | None:
    """One job with its leases, proposals (and their checks), failures and revocations."""
    with store.reading() as db:
        rows = _jobs_with_flags(db, " WHERE job_id = ?", (job_id,))
        if not rows:
            return None
        job = rows[0]
        job["leases"] = _select(db, LEASES, " WHERE job_id = ?", (job_id,), " ORDER BY epoch")
        proposals = _select(
            db, PROPOSALS, " WHERE job_id = ?", (job_id,), " ORDER BY submitted_at, proposal_id"
        )
        checks = _select(db, CHECKS, " WHERE job_id = ?", (job_id,), " ORDER BY seq, ordinal")
        for proposal in proposals:
            proposal["checks"] = [c for c in checks if c["proposal_id"] == proposal["proposal_id"]]
        job["proposals"] = proposals
        job["failures"] = _select(db, FAILURES, " WHERE job_id = ?", (job_id,), " ORDER BY seq, ordinal")
        job["revocations"] = _select(
            db, REVOCATIONS, " WHERE job_id = ?", (job_id,), " ORDER BY seq, ordinal"
        )
    return job


def agent_detail(store: ReadModel, name: str) -> dict[str, Any] | None:
    with store.reading() as db:
        rows = _select(db, AGENTS, " WHERE name = ?", (name,))
        if not rows:
            return None
        agent = rows[0]
        agent["level_changes"] = _select(db, LEVELS, " WHERE agent = ?", (name,), " ORDER BY seq, ordinal")
        agent["recent_leases"] = _select(
            db, LEASES, " WHERE agent = ?", (name,), f" ORDER BY {LEASES.order} LIMIT 50"
        )
        agent["revocations"] = _select(
            db, REVOCATIONS, " WHERE agent = ?", (name,), " ORDER BY seq DESC, ordinal DESC LIMIT 50"
        )
    return agent


def _percentile(db: Db, n: int, q: float) -> float | None:
    """Nearest-rank percentile of detection latency, in SQL every backend runs."""
    if n == 0:
        return None
    rank = max(1, -(-int(q * n * 1000) // 1000))  # ceil(q * n) without float surprises
    value = db.scalar(
        f"SELECT latency_ms FROM {FAILURES.name} WHERE kind = 'lease.expired' AND latency_ms IS NOT NULL "
        f"ORDER BY latency_ms LIMIT 1 OFFSET {min(rank, n) - 1}"
    )
    return None if value is None else float(value)


def summary(store: ReadModel) -> dict[str, Any]:
    """Counts by state, detection latency percentiles, failures, revocations and decisions."""
    with store.reading() as db:

        def counts(table: Table, column: str) -> dict[str, int]:
            rows = db.all(f"SELECT {column}, COUNT(*) FROM {table.name} GROUP BY {column} ORDER BY {column}")
            return {str(k): int(v) for k, v in rows}

        latency_n = int(
            db.scalar(
                f"SELECT COUNT(*) FROM {FAILURES.name} WHERE kind = 'lease.expired' AND latency_ms IS NOT NULL"
            )
        )
        stats = db.one(
            f"SELECT MIN(latency_ms), MAX(latency_ms), AVG(latency_ms) FROM {FAILURES.name} "
            "WHERE kind = 'lease.expired' AND latency_ms IS NOT NULL"
        ) or (None, None, None)
        revocation_latency = db.one(
            f"SELECT COUNT(latency_ms), AVG(latency_ms), MAX(latency_ms) FROM {REVOCATIONS.name}"
        ) or (0, None, None)
        return {
            "position": store._tracked(db, lock=False) or 0,
            "jobs": {
                "total": int(db.scalar(f"SELECT COUNT(*) FROM {JOBS.name}")),
                "by_state": counts(JOBS, "state"),
            },
            "agents": {
                "total": int(db.scalar(f"SELECT COUNT(*) FROM {AGENTS.name}")),
                "by_level": counts(AGENTS, "level"),
                "by_standing": counts(AGENTS, "standing"),
            },
            "detection_latency_ms": {
                "count": latency_n,
                "p50": _percentile(db, latency_n, 0.50),
                "p99": _percentile(db, latency_n, 0.99),
                "min": None if stats[0] is None else float(stats[0]),
                "max": None if stats[1] is None else float(stats[1]),
                "mean": None if stats[2] is None else round(float(stats[2]), 3),
            },
            "failures": counts(FAILURES, "kind"),
            "revocations": {
                "by_kind": counts(REVOCATIONS, "kind"),
                "with_signal": int(revocation_latency[0] or 0),
                "mean_latency_ms": None
                if revocation_latency[1] is None
                else round(float(revocation_latency[1]), 3),
                "max_latency_ms": None if revocation_latency[2] is None else float(revocation_latency[2]),
            },
            "decisions": counts(PROPOSALS, "verdict"),
        }


def detection_latencies(store: ReadModel, limit: int) -> list[dict[str, Any]]:
    """The latest lease expiries with their detection latency, oldest first (for a chart)."""
    with store.reading() as db:
        rows = _select(
            db,
            FAILURES,
            " WHERE kind = 'lease.expired' AND latency_ms IS NOT NULL",
            (),
            f" ORDER BY seq DESC, ordinal DESC LIMIT {int(limit)}",
        )
    rows.reverse()
    return [
        {k: r[k] for k in ("seq", "job_id", "agent", "epoch", "deadline", "detected_at", "latency_ms", "at")}
        for r in rows
    ]


def timeline_after(
    store: ReadModel, after: int, limit: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Timeline rows after a position, with the current row of every job they touch. A page
    never ends inside a packed record (its rows share a seq): it may hold a few more than `limit`."""
    with store.reading() as db:
        rows = _select(db, TIMELINE, " WHERE seq > ?", (after,), f" ORDER BY seq, ordinal LIMIT {int(limit)}")
        if len(rows) >= limit:
            last = rows[-1]
            rows += _select(
                db,
                TIMELINE,
                " WHERE seq = ? AND ordinal > ?",
                (last["seq"], last["ordinal"]),
                " ORDER BY ordinal",
            )
        job_ids = sorted({r["job_id"] for r in rows if r["job_id"]})
        jobs: dict[str, dict[str, Any]] = {}
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for job in _jobs_with_flags(db, f" WHERE job_id IN ({marks})", chunk):
                jobs[job["job_id"]] = job
    return rows, jobs


def job_timeline(store: ReadModel, job_id: str) -> list[dict[str, Any]]:
    with store.reading() as db:
        return _select(db, TIMELINE, " WHERE job_id = ?", (job_id,), " ORDER BY seq, ordinal")


def dump(
    store: ReadModel,
    table: Table,
    *,
    job_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every stored row of a table (internal columns too) in a scope, keyed by primary key."""
    clauses, params = [], []
    if job_id is not None:
        assert table.job_column is not None
        clauses.append(f"{table.job_column} = ?")
        params.append(job_id)
    if since is not None:
        clauses.append(f"{table.time} >= ?")
        params.append(since)
    if until is not None:
        clauses.append(f"{table.time} <= ?")
        params.append(until)
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    with store.reading() as db:
        rows = db.dicts(f"SELECT {', '.join(table.column_names)} FROM {table.name}{where}", params)
    return {tuple(r[k] for k in table.key): r for r in rows}


__all__ = [
    "TABLES",
    "Page",
    "agent_detail",
    "detection_latencies",
    "dump",
    "job_detail",
    "job_timeline",
    "page",
    "summary",
    "timeline_after",
]


def operations(store: ReadModel) -> dict[str, Any]:
    """What `warden status` reports from the read model: its position, live leases (and the
    soonest to expire), queued jobs and the oldest of them."""
    with store.reading() as db:
        live = db.one(f"SELECT COUNT(*), MIN(expires_at) FROM {LEASES.name} WHERE ended = ''") or (0, None)
        queued = int(db.scalar(f"SELECT COUNT(*) FROM {JOBS.name} WHERE state = 'queued'"))
        oldest = _select(db, JOBS, " WHERE state = 'queued'", (), " ORDER BY created_at, job_id LIMIT 1")
        return {
            "position": store._tracked(db, lock=False) or 0,
            "live_leases": int(live[0] or 0),
            "next_lease_expiry": live[1],
            "queued_jobs": queued,
            "oldest_queued": oldest[0] if oldest else None,
        }


def job_ids_starting(store: ReadModel, prefix: str, limit: int = 50) -> list[str]:
    """Job ids beginning with `prefix` (shell completion), newest first."""
    with store.reading() as db:
        rows = db.all(
            f"SELECT job_id FROM {JOBS.name} WHERE job_id LIKE ? ORDER BY created_at DESC LIMIT {int(limit)}",
            (prefix.replace("%", "").replace("_", "") + "%",),
        )
    return [str(r[0]) for r in rows]


def job_of_proposal(store: ReadModel, proposal_id: str) -> str | None:
    """The job a proposal was submitted under, as the read model has folded it (None: not yet)."""
    with store.reading() as db:
        job = db.scalar(f"SELECT job_id FROM {PROPOSALS.name} WHERE proposal_id = ?", (proposal_id,))
    return None if job is None else str(job)


# --- the dashboard's views: job search, what a job's folded state says, the approvals queue ----


class _ContractFlags(msgspec.Struct):
    approval_required: bool = False


class _ProposalFlags(msgspec.Struct):
    id: str
    status: str = "submitted"
    rollback: str = ""


class _JobFlags(msgspec.Struct):
    """The few members of a folded Job (state_json) the dashboard needs; the rest is skipped."""

    contract: _ContractFlags
    status: str = "queued"
    pending_proposal: str | None = None
    proposal_log: list[_ProposalFlags] = msgspec.field(default_factory=list)


_flags_decoder = msgspec.json.Decoder(_JobFlags)
TERMINAL_STATES = frozenset({"completed", "tombstoned", "cancelled"})


def job_flags(state_json: str) -> dict[str, Any]:
    """What a job's folded state says beyond its row: does it wait for a person's approval
    (its pending proposal passed nothing yet decided), and how far a rollback of it went
    ("" none, "requested", "done", "failed": the furthest any of its proposals reached)."""
    flags = _flags_decoder.decode(state_json)
    pending = next((p for p in flags.proposal_log if p.id == flags.pending_proposal), None)
    awaiting = (
        flags.contract.approval_required
        and flags.status not in TERMINAL_STATES
        and pending is not None
        and pending.status == "submitted"
    )
    rank = {"": 0, "requested": 1, "failed": 2, "done": 3}
    rollback = max((p.rollback for p in flags.proposal_log), key=lambda r: rank.get(r, 0), default="")
    return {
        "approval_required": flags.contract.approval_required,
        "awaiting_approval": awaiting,
        "pending_proposal": pending.id if awaiting and pending else None,
        "rollback": rollback,
    }


def _jobs_with_flags(db: Db, where: str, params: Sequence[Any], tail: str = "") -> list[dict[str, Any]]:
    columns = ", ".join((*JOBS.public_names, "state_json"))
    out = []
    for row in db.dicts(f"SELECT {columns} FROM {JOBS.name}{where}{tail}", params):
        flags = job_flags(row.pop("state_json"))
        out.append({**decode_json_columns(JOBS, row), **flags})
    return out


def _like(text: str) -> str:
    """`text` as a LIKE pattern matching it anywhere, its own % and _ taken literally."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


SEARCHED = ("kind", "agent", "reason", "submitter", "idempotency_key")


def search_jobs(
    store: ReadModel,
    filters: dict[str, Any],
    *,
    text: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    offset: int,
) -> Page:
    """Jobs matching `filters` (column = value), changed within [since, until] (stored-format
    timestamps), and containing `text`: a prefix of the id, or a part of its kind, agent,
    reason, submitter or idempotency key (any case). Newest first; each with its flags."""
    where, params = _where(filters)
    clauses = [where.removeprefix(" WHERE ")] if where else []
    if since is not None:
        clauses.append(f"{JOBS.time} >= ?")
        params.append(since)
    if until is not None:
        clauses.append(f"{JOBS.time} <= ?")
        params.append(until)
    if text:
        pattern = _like(text)
        matches = ["job_id LIKE ? ESCAPE '\\'"] + [f"LOWER({c}) LIKE ? ESCAPE '\\'" for c in SEARCHED]
        clauses.append("(" + " OR ".join(matches) + ")")
        params.extend([pattern[1:], *[pattern] * len(SEARCHED)])
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    with store.reading() as db:
        total = int(db.scalar(f"SELECT COUNT(*) FROM {JOBS.name}{where}", params))
        items = _jobs_with_flags(
            db, where, params, f" ORDER BY {JOBS.order} LIMIT {int(limit)} OFFSET {int(offset)}"
        )
    return Page(items=items, total=total, limit=limit, offset=offset)


def approvals(store: ReadModel, limit: int, offset: int) -> Page:
    """Proposals waiting for a person's approval, oldest first, each with its checks so far
    and its job's kind."""
    with store.reading() as db:
        # A pending proposal keeps its job `proposed`: only those jobs can be waiting.
        waiting = [j for j in _jobs_with_flags(db, " WHERE state = 'proposed'", ()) if j["awaiting_approval"]]
        items: list[dict[str, Any]] = []
        for job in waiting:
            found = _select(db, PROPOSALS, " WHERE proposal_id = ?", (job["pending_proposal"],))
            if not found:
                continue  # the proposal's row is folded in the same batch as its job's
            proposal = found[0]
            proposal["checks"] = _select(
                db, CHECKS, " WHERE proposal_id = ?", (proposal["proposal_id"],), " ORDER BY seq, ordinal"
            )
            proposal["kind"] = job["kind"]
            items.append(proposal)
    items.sort(key=lambda p: (p["submitted_at"], p["proposal_id"]))
    return Page(items=items[offset : offset + limit], total=len(items), limit=limit, offset=offset)
