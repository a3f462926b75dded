"""The API's endpoints, declared once: query parameters are validated from the same declarations
the OpenAPI document is built from, and response schemas come from the read model's Structs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from msgspec import Struct

from shared.aggregates import RollbackState
from shared.messages import AnyReply, JobRequest, OperatorCommand
from shared.readmodel.tables import (
    FAILURE_KINDS,
    JOB_STATES,
    REVOCATION_KINDS,
    STANDINGS,
    AgentRow,
    CheckRow,
    FailureRow,
    JobRow,
    LeaseRow,
    LevelChangeRow,
    ProposalRow,
    RevocationRow,
    TimelineRow,
)
from shared.schemas import tag_optional
from shared.topology import OPERATOR_VERBS

# --- responses ------------------------------------------------------------------------------


class ParamError(Struct, kw_only=True):
    parameter: str
    message: str


class ErrorBody(Struct, kw_only=True):
    error: str
    details: list[ParamError] = msgspec.field(default_factory=list)


class JobView(JobRow, kw_only=True):
    """A job row with what its folded state says beyond the row (queries.job_flags)."""

    approval_required: bool = False
    awaiting_approval: bool = False  # its pending proposal waits for `approve` or `deny`
    pending_proposal: str | None = None  # that proposal, while it waits
    rollback: RollbackState = ""  # how far a rollback of it went


class JobPage(Struct, kw_only=True):
    items: list[JobView]
    total: int
    limit: int
    offset: int


class AgentPage(Struct, kw_only=True):
    items: list[AgentRow]
    total: int
    limit: int
    offset: int


class FailurePage(Struct, kw_only=True):
    items: list[FailureRow]
    total: int
    limit: int
    offset: int


class RevocationPage(Struct, kw_only=True):
    items: list[RevocationRow]
    total: int
    limit: int
    offset: int


class ProposalWithChecks(ProposalRow, kw_only=True):
    checks: list[CheckRow]


class StoredEventEntry(Struct, kw_only=True):
    """One event of the job exactly as the stream holds it: the evidence."""

    version: int
    type: str
    at: str
    summary: str
    event: dict[str, Any]


class JobDetail(JobView, kw_only=True):
    leases: list[LeaseRow]
    proposals: list[ProposalWithChecks]
    failures: list[FailureRow]
    revocations: list[RevocationRow]
    timeline: list[StoredEventEntry]
    # The job's one trace (its request's), and where a browser opens it when WARDEN_TRACE_URL
    # names a template ("" otherwise).
    trace_id: str = ""
    trace_url: str = ""


class AgentDetail(AgentRow, kw_only=True):
    level_changes: list[LevelChangeRow]
    recent_leases: list[LeaseRow]
    revocations: list[RevocationRow]


class Approval(ProposalWithChecks, kw_only=True):
    """A proposal waiting for a person's approval, with its job's kind."""

    kind: str


class ApprovalPage(Struct, kw_only=True):
    items: list[Approval]
    total: int
    limit: int
    offset: int


class LatencyStats(Struct, kw_only=True):
    count: int
    p50: float | None
    p99: float | None
    min: float | None
    max: float | None
    mean: float | None


class JobCounts(Struct, kw_only=True):
    total: int
    by_state: dict[str, int]


class AgentCounts(Struct, kw_only=True):
    total: int
    by_level: dict[str, int]
    by_standing: dict[str, int]


class RevocationCounts(Struct, kw_only=True):
    by_kind: dict[str, int]
    with_signal: int
    mean_latency_ms: float | None
    max_latency_ms: float | None


class Summary(Struct, kw_only=True):
    position: int
    jobs: JobCounts
    agents: AgentCounts
    detection_latency_ms: LatencyStats
    failures: dict[str, int]
    revocations: RevocationCounts
    decisions: dict[str, int]


class LatencyPoint(Struct, kw_only=True):
    seq: int
    job_id: str | None
    agent: str | None
    epoch: int | None
    deadline: str | None
    detected_at: str | None
    latency_ms: float
    at: str


class Status(Struct, kw_only=True):
    """How far the read model has folded the stream."""

    position: int
    stream_last_event: int
    behind: int
    store: str


class LiveUpdate(Struct, kw_only=True):
    """The data of one server-sent `timeline` event: what happened, and the job as it is now."""

    entry: TimelineRow
    job: JobView | None


# --- parameters -----------------------------------------------------------------------------

Kind = Literal["string", "integer", "enum", "uuid", "timestamp"]


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    description: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None
    location: Literal["query", "path"] = "query"

    def parse(self, raw: str) -> Any:
        """The typed value, or ValueError with a message a person can act on."""
        if self.kind == "integer":
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"must be an integer, got {raw!r}") from None
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be at least {self.minimum}, got {value}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be at most {self.maximum}, got {value}")
            return value
        if self.kind == "enum":
            if raw not in self.choices:
                raise ValueError(f"must be one of {', '.join(self.choices)}; got {raw!r}")
            return raw
        if self.kind == "uuid":
            try:
                return str(uuid.UUID(raw))
            except ValueError:
                raise ValueError(f"must be a UUID, got {raw!r}") from None
        if self.kind == "timestamp":
            try:
                moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(
                    f"must be an ISO 8601 time such as 2026-01-31T12:00:00Z, got {raw!r}"
                ) from None
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        if not raw or len(raw) > 200:
            raise ValueError("must be 1-200 characters")
        return raw

    def schema(self) -> dict[str, Any]:
        if self.kind == "integer":
            out: dict[str, Any] = {"type": "integer"}
            if self.minimum is not None:
                out["minimum"] = self.minimum
            if self.maximum is not None:
                out["maximum"] = self.maximum
        elif self.kind == "enum":
            out = {"type": "string", "enum": list(self.choices)}
        elif self.kind == "uuid":
            out = {"type": "string", "format": "uuid"}
        elif self.kind == "timestamp":
            out = {"type": "string", "format": "date-time"}
        else:
            out = {"type": "string", "minLength": 1, "maxLength": 200}
        if self.default is not None:
            out["default"] = self.default
        return out


class BadParameters(ValueError):
    def __init__(self, errors: list[ParamError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.parameter}: {e.message}" for e in errors))


def parse_query(params: tuple[Param, ...], items: list[tuple[str, str]]) -> dict[str, Any]:
    """Validate every query parameter, reporting all problems at once (unknown ones too)."""
    known = {p.name: p for p in params if p.location == "query"}
    errors: list[ParamError] = []
    seen: dict[str, str] = {}
    for name, raw in items:
        if name not in known:
            hint = f"; known: {', '.join(sorted(known))}" if known else "; this endpoint takes none"
            errors.append(ParamError(parameter=name, message=f"unknown query parameter{hint}"))
        elif name in seen:
            errors.append(ParamError(parameter=name, message="given more than once"))
        else:
            seen[name] = raw
    values: dict[str, Any] = {}
    for name, param in known.items():
        if name not in seen:
            values[name] = param.default
            continue
        try:
            values[name] = param.parse(seen[name])
        except ValueError as exc:
            errors.append(ParamError(parameter=name, message=str(exc)))
    if errors:
        raise BadParameters(errors)
    return values


LIMIT = Param("limit", "integer", "Items per page.", minimum=1, maximum=500, default=50)
OFFSET = Param("offset", "integer", "Items to skip (for paging).", minimum=0, maximum=10_000_000, default=0)
AGENT = Param("agent", "string", "Only rows about this agent.")
JOB = Param("job", "uuid", "Only rows about this job.")


@dataclass(frozen=True)
class Endpoint:
    path: str
    summary: str
    response: type | None
    params: tuple[Param, ...] = ()
    description: str = ""
    media_type: str = "application/json"


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "/api/jobs",
        "List jobs, newest first, filtered and paged",
        JobPage,
        (
            Param("state", "enum", "Only jobs in this state.", choices=JOB_STATES),
            Param("kind", "string", "Only jobs of this kind."),
            Param("agent", "string", "Only jobs whose latest lease is (or was) held by this agent."),
            Param(
                "q",
                "string",
                "Search: a prefix of the job id, or text in its kind, agent, reason, submitter or "
                "idempotency key (any case).",
            ),
            Param("since", "timestamp", "Only jobs that changed at or after this time."),
            Param("until", "timestamp", "Only jobs that changed at or before this time."),
            LIMIT,
            OFFSET,
        ),
    ),
    Endpoint(
        "/api/approvals",
        "Proposals waiting for a person's approval (`approval_required` contracts), oldest first",
        ApprovalPage,
        (LIMIT, OFFSET),
        "Approve or deny one with POST /api/operator/approve or /deny and its proposal_id.",
    ),
    Endpoint(
        "/api/jobs/{job_id}",
        "One job with its leases, proposals and verdicts, failures, revocations and timeline",
        JobDetail,
        (Param("job_id", "uuid", "The job's id.", location="path"),),
        "The timeline holds every event of the job as the stream stores it (its evidence).",
    ),
    Endpoint(
        "/api/agents",
        "List agents with their autonomy levels and standing",
        AgentPage,
        (
            Param("level", "integer", "Only agents at this level.", minimum=0, maximum=100),
            Param("standing", "enum", "Only agents with this standing.", choices=STANDINGS),
            LIMIT,
            OFFSET,
        ),
    ),
    Endpoint(
        "/api/agents/{name}",
        "One agent with the history of its level changes",
        AgentDetail,
        (Param("name", "string", "The agent's name.", location="path"),),
    ),
    Endpoint(
        "/api/failures",
        "Detected failures, newest first: expired leases, fenced and malformed messages, tombstones",
        FailurePage,
        (
            Param("kind", "enum", "Only failures of this kind.", choices=FAILURE_KINDS),
            JOB,
            AGENT,
            LIMIT,
            OFFSET,
        ),
    ),
    Endpoint(
        "/api/revocations",
        "Revocations, newest first: leases and agents revoked, agents suspended or demoted",
        RevocationPage,
        (
            Param("kind", "enum", "Only revocations of this kind.", choices=REVOCATION_KINDS),
            JOB,
            AGENT,
            LIMIT,
            OFFSET,
        ),
    ),
    Endpoint(
        "/api/metrics/summary",
        "Counts by state, time-to-failure-detection p50/p99, failures, revocations and decisions",
        Summary,
    ),
    Endpoint(
        "/api/metrics/detection-latency",
        "The latest lease expiries with their detection latency, oldest first (for charts)",
        list[LatencyPoint],
        (Param("limit", "integer", "How many points.", minimum=1, maximum=5000, default=500),),
    ),
    Endpoint(
        "/api/status",
        "How far the read model has folded the event stream",
        Status,
        (
            Param(
                "at_least",
                "integer",
                "Wait (up to `timeout` seconds) until the read model has folded this stream sequence.",
                minimum=0,
                maximum=2**62,
            ),
            Param("timeout", "integer", "Seconds to wait for `at_least`.", minimum=0, maximum=60, default=10),
        ),
    ),
    Endpoint(
        "/api/events/stream",
        "Live updates as server-sent events, one `timeline` event per folded event",
        LiveUpdate,
        (
            Param(
                "after",
                "integer",
                "Replay events after this stream sequence first (the Last-Event-ID header does the same).",
                minimum=0,
                maximum=2**62,
            ),
        ),
        "Each event's `id` is its stream sequence, so a reconnecting EventSource resumes where it left off.",
        media_type="text/event-stream",
    ),
)
ENDPOINTS_BY_PATH = {e.path: e for e in ENDPOINTS}


BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "A token from `warden creds add-operator NAME` (operator commands, jobs, reads) or "
    "`warden creds add-client NAME` (jobs and reads). Which endpoints need one follows the API's "
    "`--auth` setting: operators (writes only), all (reads too), off (none; loopback only).",
}


def _unauthorized(error: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "No token, a malformed Authorization header, or an unknown or removed token",
        "headers": {
            "WWW-Authenticate": {
                "description": 'Bearer realm="warden" (with error="invalid_token" for a bad one)',
                "schema": {"type": "string"},
            }
        },
        "content": error,
    }


def _security(needed: bool, auth: str) -> list[dict[str, list[str]]]:
    if auth == "off":
        return [{}, {"bearer": []}]  # optional: a valid token names who acted
    return [{"bearer": []}] if needed else []


def openapi(version: str, auth: str = "operators") -> dict[str, Any]:
    """The OpenAPI 3.1 document for every endpoint above, as this API's `--auth` setting serves them."""
    types: list[Any] = [ErrorBody]
    for endpoint in ENDPOINTS:
        if endpoint.response is not None:
            types.append(endpoint.response)
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    response_schema = dict(zip([ErrorBody, *[e.response for e in ENDPOINTS]], schemas, strict=True))
    paths: dict[str, Any] = {}
    error = {"application/json": {"schema": response_schema[ErrorBody]}}
    for endpoint in ENDPOINTS:
        responses: dict[str, Any] = {
            "200": {
                "description": "OK",
                "content": {endpoint.media_type: {"schema": response_schema[endpoint.response]}},
            },
            "400": {"description": "A bad parameter: every problem is listed", "content": error},
        }
        if "{" in endpoint.path:
            responses["404"] = {"description": "Not found", "content": error}
        if auth == "all":
            responses["401"] = _unauthorized(error)
        paths[endpoint.path] = {
            "get": {
                "summary": endpoint.summary,
                "description": endpoint.description or endpoint.summary,
                "security": _security(auth == "all", auth),
                "operationId": endpoint.path.strip("/")
                .replace("/", "_")
                .replace("{", "")
                .replace("}", "")
                .replace("-", "_"),
                "parameters": [
                    {
                        "name": p.name,
                        "in": p.location,
                        "required": p.location == "path",
                        "description": p.description,
                        "schema": p.schema(),
                    }
                    for p in endpoint.params
                ],
                "responses": responses,
            }
        }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus scrape endpoint",
            "description": "Always open: aggregate counts and latencies only (no ids or names).",
            "operationId": "metrics",
            "security": [],
            "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}},
        }
    }
    (command_schema, reply_schema, request_schema), extra = msgspec.json.schema_components(
        [OperatorCommand, AnyReply, JobRequest], ref_template="#/components/schemas/{name}"
    )
    components.update(extra)
    for tp in (OperatorCommand, JobRequest):
        tag_optional(components, tp)
    reply = {"application/json": {"schema": reply_schema}}
    too_large = {"description": "The body is over 1 MB (MAX_INPUT_BYTES)", "content": error}
    paths["/api/jobs"]["post"] = {
        "summary": "Submit a job request (as one on warden.in.request, decided by the scheduler)",
        "description": "The body is a job request (schemas/inputs/job.request.json). It is validated "
        "and deduplicated by `idempotency_key` exactly as on NATS, and a rejection is recorded "
        "(`input.rejected`). `submitter` is the token's name: a body `submitter` is overwritten.",
        "operationId": "submit_job",
        "security": _security(True, auth),
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {
            "201": {
                "description": "Accepted: a new job (Location: /api/jobs/{job_id})",
                "headers": {"Location": {"schema": {"type": "string"}}},
                "content": reply,
            },
            "200": {
                "description": "Already submitted under this idempotency key: the first job's id, "
                "`duplicate: true`",
                "content": reply,
            },
            "401": _unauthorized(error),
            "413": too_large,
            "422": {
                "description": "Rejected: the reply lists every error (and is recorded); an "
                "idempotency key already used for another body names the first job in `job_id`",
                "content": reply,
            },
            "503": {"description": "No service answered, or nothing could be stored", "content": error},
        },
    }
    paths["/api/operator/{verb}"] = {
        "post": {
            "summary": "Give an operator command (recorded as an event naming who and why)",
            "description": "Stored on warden.in.op.<verb> and answered by the service that owns the verb: "
            + ", ".join(OPERATOR_VERBS)
            + ". Who gives it is the token's name: a body `operator` may be omitted and is overwritten.",
            "operationId": "operator_command",
            "security": _security(True, auth),
            "parameters": [
                {"name": "verb", "in": "path", "required": True, "schema": {"enum": list(OPERATOR_VERBS)}}
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": command_schema}}},
            "responses": {
                "200": {"description": "Recorded", "content": reply},
                "400": {"description": "Malformed body or unknown verb", "content": error},
                "401": _unauthorized(error),
                "403": {
                    "description": "A valid token that may not give operator commands (a client's)",
                    "content": error,
                },
                "413": too_large,
                "422": {
                    "description": "Refused: the reply lists why",
                    "content": {"application/json": {"schema": reply_schema}},
                },
                "503": {"description": "No service answered", "content": error},
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Warden API",
            "version": version,
            "description": "Projections of Warden's event stream, for dashboards, and operator commands.",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": BEARER}},
    }
