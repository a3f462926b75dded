"""The read model's tables, declared once as msgspec Structs.

Each Struct is a row as the HTTP API returns it; its fields become the table's columns (the DDL,
the row codec and the OpenAPI schemas are all derived from it, so they cannot drift). Columns
that only the projection needs (the folded aggregate state) are declared beside the Struct.

Every table has `seq`, the stream sequence of the last event that wrote the row, and a time
column, so `warden replay` can scope a comparison to one job or a time window and skip rows the
live projection has moved past.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

import msgspec
from msgspec import Struct

from shared.aggregates import LeaseEnd

# --- rows -----------------------------------------------------------------------------------


class JobRow(Struct, kw_only=True):
    """A job as dashboards see it: its state, current (or last) lease, and timestamps."""

    job_id: str
    kind: str
    state: str
    attempts: int
    max_attempts: int
    agent: str | None = None  # the agent of the latest lease, live or ended
    epoch: int | None = None
    lease_state: str | None = None  # "live", or how the latest lease ended
    lease_expires_at: str | None = None
    submitter: str = ""
    idempotency_key: str = ""
    reason: str = ""
    created_at: str
    updated_at: str
    finished_at: str | None = None
    version: int
    events: int
    seq: int


class AgentRow(Struct, kw_only=True):
    """An agent: its autonomy level, standing, and what its leases came to."""

    agent_id: str
    name: str
    level: int
    standing: str
    standing_reason: str = ""
    max_concurrent: int
    kinds: list[str]
    registered_at: str
    updated_at: str
    version: int
    leases: int = 0
    completed: int = 0
    expired: int = 0
    revoked: int = 0
    rejected: int = 0
    seq: int


class LevelChangeRow(Struct, kw_only=True):
    """One change of an agent's autonomy level, with the evidence it cites."""

    seq: int
    # Its place in a packed record (events of one aggregate stored as one message), else 0.
    ordinal: int = 0
    agent_id: str
    agent: str
    level: int
    previous: int
    reason: str
    actor: str
    evidence: list[str]
    at: str


class LeaseRow(Struct, kw_only=True):
    job_id: str
    epoch: int
    agent: str
    granted_at: str
    expires_at: str
    ttl_s: float
    ended: LeaseEnd = ""
    ended_at: str | None = None
    seq: int
    updated_at: str


class ProposalRow(Struct, kw_only=True):
    """A proposal and Warden's verdict on it."""

    proposal_id: str
    job_id: str
    agent: str
    epoch: int
    effect: str
    size: int
    content_hash: str
    payload_object: str = ""
    verdict: Literal["pending", "accepted", "rejected"] = "pending"
    violations: list[str] | None = None
    checks_passed: int = 0
    checks_failed: int = 0
    submitted_at: str
    decided_at: str | None = None
    applied_at: str | None = None
    receipt: dict[str, Any] | None = None
    rollback_requested_at: str | None = None
    rolled_back_at: str | None = None
    seq: int
    updated_at: str


class CheckRow(Struct, kw_only=True):
    """One invariant check of a proposal (an `invariant.checked` event)."""

    seq: int
    # Its place in a packed record (events of one aggregate stored as one message), else 0.
    ordinal: int = 0
    proposal_id: str
    job_id: str
    invariant: str
    version: str
    verdict: str
    evidence: dict[str, Any]
    at: str


class FailureRow(Struct, kw_only=True):
    """A failure Warden detected: an expired lease, a fenced or malformed message, a tombstone."""

    seq: int
    # Its place in a packed record (events of one aggregate stored as one message), else 0.
    ordinal: int = 0
    kind: (
        str  # the event type: lease.expired, message.rejected, input.rejected, job.tombstoned,
        # effect.failed, proposal.rejected (an operator's refused command is no failure)
    )
    job_id: str | None = None
    agent: str | None = None
    epoch: int | None = None
    reason: str = ""
    deadline: str | None = None
    detected_at: str | None = None
    latency_ms: float | None = None  # time from the lease's deadline to its detection
    detail: dict[str, Any]
    at: str


class RevocationRow(Struct, kw_only=True):
    """Authority taken away: a lease revoked, an agent revoked, suspended or demoted."""

    seq: int
    # Its place in a packed record (events of one aggregate stored as one message), else 0.
    ordinal: int = 0
    kind: str  # lease.revoked, agent.revoked, agent.suspended, agent.level_changed (demotions)
    job_id: str | None = None
    agent: str
    epoch: int | None = None
    reason: str
    signal: str = ""
    actor: str = ""
    signal_at: str | None = None
    latency_ms: float | None = None  # from the failure signal to the revocation
    evidence: list[str]
    at: str


class TimelineRow(Struct, kw_only=True):
    """Every event, summarised: the live feed and a job's timeline at a glance."""

    seq: int
    # Its place in a packed record (events of one aggregate stored as one message), else 0.
    ordinal: int = 0
    aggregate_id: str
    job_id: str | None = None
    agent: str | None = None
    type: str
    summary: str
    at: str


# --- tables ---------------------------------------------------------------------------------

_SQL_TYPES = {
    msgspec.inspect.StrType: "TEXT",
    msgspec.inspect.IntType: "BIGINT",
    msgspec.inspect.FloatType: "DOUBLE PRECISION",
    msgspec.inspect.BoolType: "INTEGER",
}


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    json: bool = False  # stored as JSON text, returned decoded


def _columns(row: type[Struct]) -> tuple[Column, ...]:
    info = msgspec.inspect.type_info(row)
    assert isinstance(info, msgspec.inspect.StructType)
    out = []
    for f in info.fields:
        t = f.type
        if isinstance(t, msgspec.inspect.UnionType):
            (t,) = [a for a in t.types if not isinstance(a, msgspec.inspect.NoneType)]
        if isinstance(t, msgspec.inspect.LiteralType) and all(isinstance(v, str) for v in t.values):
            t = msgspec.inspect.StrType()
        sql = _SQL_TYPES.get(type(t))
        out.append(Column(f.name, sql or "TEXT", json=sql is None))
    return tuple(out)


@dataclass(frozen=True)
class Table:
    name: str
    row: type[Struct]
    key: tuple[str, ...]
    time: str  # the column a time window filters on
    job_column: str | None  # the column naming the job a row belongs to (for --job scopes)
    order: str  # default ordering for listings
    internal: tuple[Column, ...] = ()  # columns only the projection reads
    indexes: tuple[str, ...] = ()
    columns: tuple[Column, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", _columns(self.row) + self.internal)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def public_names(self) -> tuple[str, ...]:
        internal = {c.name for c in self.internal}
        return tuple(c.name for c in self.columns if c.name not in internal)

    @property
    def json_columns(self) -> frozenset[str]:
        return frozenset(c.name for c in self.columns if c.json)

    def ddl(self) -> list[str]:
        cols = ", ".join(f"{c.name} {c.sql_type}" for c in self.columns)
        table = f"CREATE TABLE IF NOT EXISTS {self.name} ({cols}, PRIMARY KEY ({', '.join(self.key)}))"
        return [table, *self.index_ddl()]

    @property
    def index_names(self) -> tuple[str, ...]:
        """The secondary indexes (the primary key is the table's own)."""
        return tuple(f"{self.name}_{column}" for column in self.indexes)

    def index_ddl(self) -> list[str]:
        return [
            f"CREATE INDEX IF NOT EXISTS {name} ON {self.name} ({column})"
            for name, column in zip(self.index_names, self.indexes, strict=True)
        ]


JOBS = Table(
    "warden_jobs",
    JobRow,
    key=("job_id",),
    time="updated_at",
    job_column="job_id",
    order="created_at DESC, job_id",
    internal=(Column("state_json", "TEXT"),),
    indexes=("state", "kind", "agent", "created_at"),
)
AGENTS = Table(
    "warden_agents",
    AgentRow,
    key=("agent_id",),
    time="updated_at",
    job_column=None,
    order="name",
    internal=(Column("state_json", "TEXT"),),
    indexes=("name", "level"),
)
LEVELS = Table(
    "warden_agent_levels",
    LevelChangeRow,
    key=("seq", "ordinal"),
    time="at",
    job_column=None,
    order="seq DESC, ordinal DESC",
    indexes=("agent",),
)
LEASES = Table(
    "warden_leases",
    LeaseRow,
    key=("job_id", "epoch"),
    time="updated_at",
    job_column="job_id",
    order="granted_at DESC, job_id, epoch",
    indexes=("agent",),
)
PROPOSALS = Table(
    "warden_proposals",
    ProposalRow,
    key=("proposal_id",),
    time="updated_at",
    job_column="job_id",
    order="submitted_at DESC, proposal_id",
    indexes=("job_id", "verdict"),
)
CHECKS = Table(
    "warden_checks",
    CheckRow,
    key=("seq", "ordinal"),
    time="at",
    job_column="job_id",
    order="seq, ordinal",
    indexes=("proposal_id", "job_id"),
)
FAILURES = Table(
    "warden_failures",
    FailureRow,
    key=("seq", "ordinal"),
    time="at",
    job_column="job_id",
    order="seq DESC, ordinal DESC",
    indexes=("kind", "job_id", "agent", "latency_ms"),
)
REVOCATIONS = Table(
    "warden_revocations",
    RevocationRow,
    key=("seq", "ordinal"),
    time="at",
    job_column="job_id",
    order="seq DESC, ordinal DESC",
    indexes=("kind", "job_id", "agent"),
)
TIMELINE = Table(
    "warden_timeline",
    TimelineRow,
    key=("seq", "ordinal"),
    time="at",
    job_column="job_id",
    order="seq, ordinal",
    indexes=("job_id",),
)

TABLES: tuple[Table, ...] = (JOBS, AGENTS, LEVELS, LEASES, PROPOSALS, CHECKS, FAILURES, REVOCATIONS, TIMELINE)

JOB_STATES = ("queued", "leased", "proposed", "accepted", "completed", "tombstoned", "cancelled")
FAILURE_KINDS = (
    "lease.expired",
    "message.rejected",
    "input.rejected",
    "input.reply_refused",
    "job.tombstoned",
    "effect.failed",
    "proposal.rejected",
)
REVOCATION_KINDS = ("lease.revoked", "agent.revoked", "agent.suspended", "agent.level_changed")
STANDINGS = ("active", "suspended", "revoked")


@lru_cache(maxsize=4096)
def ts(moment: datetime) -> str:
    """A timestamp as stored: UTC, fixed width, so text order is time order in any backend.

    Cached: an event's timestamps recur in the rows it writes and in its neighbours' (a packed
    record's events share one), and formatting is a fifth of a rebuild's folding."""
    # isoformat is several times faster than strftime, and this runs for every event.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_json = msgspec.json.Encoder(order="deterministic")


def to_json(value: Any) -> str:
    return _json.encode(value).decode()


def decode_json_columns(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the API returns it: JSON columns decoded, internal columns dropped."""
    out: dict[str, Any] = {}
    json_columns = table.json_columns
    for name in table.public_names:
        value = row.get(name)
        out[name] = msgspec.json.decode(value) if name in json_columns and value is not None else value
    return out
