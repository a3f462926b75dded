"""Queries dashboards, the API and `warden replay` run against the read model.

All blocking (database calls): run them in worker threads. Rows come back as the API returns
them: JSON columns decoded, internal columns dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
        rows = _select(db, JOBS, " WHERE job_id = ?", (job_id,))
        if not rows:
            return None
        job = rows[0]
        job["leases"] = _select(db, LEASES, " WHERE job_id = ?", (job_id,), " ORDER BY epoch")
        proposals = _select(
            db, PROPOSALS, " WHERE job_id = ?", (job_id,), " ORDER BY submitted_at, proposal_id"
        )
        checks = _select(db, CHECKS, " WHERE job_id = ?", (job_id,), " ORDER BY seq")
        for proposal in proposals:
            proposal["checks"] = [c for c in checks if c["proposal_id"] == proposal["proposal_id"]]
        job["proposals"] = proposals
        job["failures"] = _select(db, FAILURES, " WHERE job_id = ?", (job_id,), " ORDER BY seq")
        job["revocations"] = _select(db, REVOCATIONS, " WHERE job_id = ?", (job_id,), " ORDER BY seq")
    return job


def agent_detail(store: ReadModel, name: str) -> dict[str, Any] | None:
    with store.reading() as db:
        rows = _select(db, AGENTS, " WHERE name = ?", (name,))
        if not rows:
            return None
        agent = rows[0]
        agent["level_changes"] = _select(db, LEVELS, " WHERE agent = ?", (name,), " ORDER BY seq")
        agent["recent_leases"] = _select(
            db, LEASES, " WHERE agent = ?", (name,), f" ORDER BY {LEASES.order} LIMIT 50"
        )
        agent["revocations"] = _select(
            db, REVOCATIONS, " WHERE agent = ?", (name,), " ORDER BY seq DESC LIMIT 50"
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
            f" ORDER BY seq DESC LIMIT {int(limit)}",
        )
    rows.reverse()
    return [
        {k: r[k] for k in ("seq", "job_id", "agent", "epoch", "deadline", "detected_at", "latency_ms", "at")}
        for r in rows
    ]


def timeline_after(
    store: ReadModel, after: int, limit: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Timeline rows after a position, with the current row of every job they touch."""
    with store.reading() as db:
        rows = _select(db, TIMELINE, " WHERE seq > ?", (after,), f" ORDER BY seq LIMIT {int(limit)}")
        job_ids = sorted({r["job_id"] for r in rows if r["job_id"]})
        jobs: dict[str, dict[str, Any]] = {}
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for job in _select(db, JOBS, f" WHERE job_id IN ({marks})", chunk):
                jobs[job["job_id"]] = job
    return rows, jobs


def job_timeline(store: ReadModel, job_id: str) -> list[dict[str, Any]]:
    with store.reading() as db:
        return _select(db, TIMELINE, " WHERE job_id = ?", (job_id,), " ORDER BY seq")


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
