"""The ASGI application: JSON query API, server-sent live updates, /metrics and the dashboard."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import msgspec
import prometheus_client
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.api import spec
from services.api.auth import Auth, Denied, Need
from services.api.hub import Hub, sse, updates
from shared import bus, events, telemetry, topology
from shared.app import WardenApp
from shared.messages import Accepted, AnyReply, OperatorCommand, Rejected, decode_input
from shared.readmodel import ReadModel, queries
from shared.readmodel.fold import summarize
from shared.readmodel.store import redacted
from shared.readmodel.tables import AGENTS, FAILURES, REVOCATIONS, ts
from shared.tokens import Identity, TokenStore, TokenStoreError
from shared.validation import InvalidInput

log = logging.getLogger("warden.api")

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0
VERSION = "1"
NOT_AN_OBJECT = "the body must be a JSON object"


@dataclass
class Deps:
    store: ReadModel
    hub: Hub
    app: WardenApp
    js: JetStreamContext
    nc: Client | None = None  # for operator commands and job submission; read-only without it
    auth: Auth = field(default_factory=lambda: Auth("operators", TokenStore(None)))
    # Where a job's trace opens, "{trace_id}" standing for its id (Jaeger: .../trace/{trace_id}).
    trace_url: str = field(default_factory=lambda: os.environ.get("WARDEN_TRACE_URL", ""))


def json(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def error(status: int, message: str, details: list[spec.ParamError] | None = None) -> Response:
    return json(spec.ErrorBody(error=message, details=details or []), status)


def authorize(auth: Auth, request: Request, need: Need) -> Identity | Response | None:
    """Who is calling (None: an open read), or the 401/403/503 response to send instead."""
    try:
        outcome = auth.check(request, need)  # one stat (and a small read when it changed)
    except TokenStoreError as exc:
        log.error("%s", exc)
        return error(503, f"{exc}; no request needing a token can be checked until it is fixed")
    if isinstance(outcome, Denied):
        response = error(outcome.status, outcome.message)
        if outcome.challenge:
            response.headers["WWW-Authenticate"] = outcome.challenge
        return response
    return outcome


async def read_body(request: Request, limit: int = topology.MAX_INPUT_BYTES) -> bytes | None:
    """The request body, or None once it passes `limit` (read no further: 413)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def stamped(body: bytes, key: str, name: str) -> bytes | None:
    """`body` with `key` set to the authenticated name: who acts is never the body's claim.

    Every other member is kept byte for byte (msgspec.Raw), so the services validate exactly
    what was sent. None when the body is not a JSON object.
    """
    try:
        members = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    members[key] = msgspec.Raw(msgspec.json.encode(name))
    return msgspec.json.encode(members)


Handler = Callable[[Request, dict[str, Any]], Awaitable[Response]]


def endpoint(path: str, handler: Handler, auth: Auth) -> Route:
    """A GET route: the caller authorized to read, its query and path parameters validated
    against its declaration."""
    declared = spec.ENDPOINTS_BY_PATH[path]

    async def route(request: Request) -> Response:
        who = authorize(auth, request, "read")
        if isinstance(who, Response):
            return who
        try:
            values = spec.parse_query(declared.params, list(request.query_params.multi_items()))
            for param in declared.params:
                if param.location == "path":
                    values[param.name] = param.parse(request.path_params[param.name])
        except spec.BadParameters as exc:
            return error(400, f"bad query parameters for {path}", exc.errors)
        except ValueError as exc:  # a bad path parameter
            name = next(p.name for p in declared.params if p.location == "path")
            return error(400, f"bad {name}", [spec.ParamError(parameter=name, message=str(exc))])
        return await handler(request, values)

    return Route(path, route, methods=["GET"])


def build(deps: Deps) -> Starlette:
    store, hub = deps.store, deps.hub

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    def paged(result: queries.Page) -> dict[str, Any]:
        return {"items": result.items, "total": result.total, "limit": result.limit, "offset": result.offset}

    async def list_jobs(_r: Request, q: dict[str, Any]) -> Response:
        filters = {"state": q["state"], "kind": q["kind"], "agent": q["agent"]}
        found = await in_thread(
            lambda: queries.search_jobs(
                store,
                filters,
                text=q["q"],
                since=None if q["since"] is None else ts(q["since"]),
                until=None if q["until"] is None else ts(q["until"]),
                limit=q["limit"],
                offset=q["offset"],
            )
        )
        return json(paged(found))

    async def list_approvals(_r: Request, q: dict[str, Any]) -> Response:
        return json(paged(await in_thread(queries.approvals, store, q["limit"], q["offset"])))

    async def one_job(_r: Request, q: dict[str, Any]) -> Response:
        job = await in_thread(queries.job_detail, store, q["job_id"])
        if job is None:
            return error(404, f"no job {q['job_id']} in the read model (yet)")
        job["timeline"] = await in_thread(_stored_timeline, deps.app, q["job_id"])
        traced = next((e["event"]["trace"] for e in job["timeline"] if e["event"].get("trace")), "")
        job["trace_id"] = telemetry.trace_id_of(traced)
        template = deps.trace_url
        job["trace_url"] = (
            template.replace("{trace_id}", job["trace_id"]) if template and job["trace_id"] else ""
        )
        return json(job)

    async def list_agents(_r: Request, q: dict[str, Any]) -> Response:
        filters = {"level": q["level"], "standing": q["standing"]}
        return json(paged(await in_thread(queries.page, store, AGENTS, filters, q["limit"], q["offset"])))

    async def one_agent(_r: Request, q: dict[str, Any]) -> Response:
        agent = await in_thread(queries.agent_detail, store, q["name"])
        if agent is None:
            return error(404, f"no agent {q['name']!r} in the read model (yet)")
        return json(agent)

    async def failures(_r: Request, q: dict[str, Any]) -> Response:
        filters = {"kind": q["kind"], "job_id": q["job"], "agent": q["agent"]}
        return json(paged(await in_thread(queries.page, store, FAILURES, filters, q["limit"], q["offset"])))

    async def revocations(_r: Request, q: dict[str, Any]) -> Response:
        filters = {"kind": q["kind"], "job_id": q["job"], "agent": q["agent"]}
        return json(
            paged(await in_thread(queries.page, store, REVOCATIONS, filters, q["limit"], q["offset"]))
        )

    async def summary(_r: Request, _q: dict[str, Any]) -> Response:
        return json(await in_thread(queries.summary, store))

    async def latency(_r: Request, q: dict[str, Any]) -> Response:
        return json(await in_thread(queries.detection_latencies, store, q["limit"]))

    async def status(_r: Request, q: dict[str, Any]) -> Response:
        if q["at_least"] is not None:
            await hub.wait_for(q["at_least"], q["timeout"])
        last = await _last_event_seq(deps.js)
        position = hub.position
        return json(
            {
                "position": position,
                "stream_last_event": last,
                "behind": max(0, last - position),
                "store": redacted(store.url),
            }
        )

    async def stream(request: Request, q: dict[str, Any]) -> Response:
        after = q["after"]
        header = request.headers.get("last-event-id")
        if header is not None:
            try:
                after = max(0, int(header))
            except ValueError:
                return error(
                    400,
                    "bad Last-Event-ID",
                    [spec.ParamError(parameter="Last-Event-ID", message="must be an integer")],
                )
        return StreamingResponse(
            _live(store, hub, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def operator(request: Request) -> Response:
        """An operator command over HTTP: the same input, stored and answered as from the CLI,
        given by the authenticated operator (a body `operator` is overwritten)."""
        who = authorize(deps.auth, request, "operate")
        if isinstance(who, Response):
            return who
        assert who is not None  # "operate" is never an open read
        verb = request.path_params["verb"]
        if verb not in topology.OPERATOR_VERBS:
            return error(
                400, f"unknown operator command {verb!r}; known: {', '.join(topology.OPERATOR_VERBS)}"
            )
        if deps.nc is None:
            return error(503, "this API process has no NATS connection for commands")
        body = await read_body(request)
        if body is None:
            return error(413, f"a command is at most {topology.MAX_INPUT_BYTES} bytes")
        data = stamped(body, "operator", who.name)
        if data is None:
            return error(400, f"bad {verb} command", [spec.ParamError(parameter="$", message=NOT_AN_OBJECT)])
        try:
            command = decode_input(data, OperatorCommand, topology.MAX_INPUT_BYTES)
        except InvalidInput as exc:
            details = [spec.ParamError(parameter=e.path, message=e.message) for e in exc.errors]
            return error(400, f"bad {verb} command", details)
        if command.proposal_id is not None and command.job_id is None:
            # Named, the proposal's job is loaded from the store: one that ended long ago has
            # left the services' bounded memory (the service checks the job holds it).
            job = await in_thread(queries.job_of_proposal, store, str(command.proposal_id))
            if job is not None:
                command = msgspec.structs.replace(command, job_id=UUID(job))
        reply = await forward(topology.operator_subject(verb), command)
        if isinstance(reply, Response):
            return reply
        return json(reply, 422 if isinstance(reply, Rejected) else 200)

    async def submit_job(request: Request) -> Response:
        """A job request over HTTP, decided by the scheduler exactly as one on warden.in.request
        (validation, idempotency, the recorded rejection); the submitter is the caller."""
        who = authorize(deps.auth, request, "submit")
        if isinstance(who, Response):
            return who
        assert who is not None  # "submit" is never an open read
        if deps.nc is None:
            return error(503, "this API process has no NATS connection for job requests")
        body = await read_body(request)
        if body is None:
            return error(413, f"a job request is at most {topology.MAX_INPUT_BYTES} bytes")
        # Not an object: sent as it came, so the scheduler records and answers its rejection.
        reply = await forward(topology.REQUEST_SUBJECT, stamped(body, "submitter", who.name) or body)
        if isinstance(reply, Response):
            return reply
        if isinstance(reply, Accepted) and reply.job_id is not None:
            created = json(reply, 200 if reply.duplicate else 201)
            created.headers["Location"] = f"/api/jobs/{reply.job_id}"
            return created
        return json(reply, 422)

    async def forward(subject: str, payload: msgspec.Struct | bytes) -> AnyReply | Response:
        """Store the input and wait for the service's verdict (a 503 when none comes)."""
        assert deps.nc is not None
        try:
            return await bus.request(deps.nc, subject, payload, timeout=10)
        except (bus.ReplyTimeout, bus.NotStored, bus.PermissionDenied) as exc:
            return error(503, str(exc))

    async def openapi(_request: Request) -> Response:
        return json(spec.openapi(VERSION, deps.auth.mode))

    async def metrics(_request: Request) -> Response:
        await hub.current_summary()  # the read-model gauges report the latest position
        body = await in_thread(prometheus_client.generate_latest, prometheus_client.REGISTRY)
        return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    routes = [
        endpoint("/api/jobs", list_jobs, deps.auth),
        endpoint("/api/jobs/{job_id}", one_job, deps.auth),
        endpoint("/api/approvals", list_approvals, deps.auth),
        endpoint("/api/agents", list_agents, deps.auth),
        endpoint("/api/agents/{name}", one_agent, deps.auth),
        endpoint("/api/failures", failures, deps.auth),
        endpoint("/api/revocations", revocations, deps.auth),
        endpoint("/api/metrics/summary", summary, deps.auth),
        endpoint("/api/metrics/detection-latency", latency, deps.auth),
        endpoint("/api/status", status, deps.auth),
        endpoint("/api/events/stream", stream, deps.auth),
        Route("/api/jobs", submit_job, methods=["POST"]),
        Route("/api/operator/{verb}", operator, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        # The dashboard's own addresses (deep links): the page reads them when it loads.
        Route("/jobs/{job_id}", index, methods=["GET"]),
        Route("/agents/{name}", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


async def _live(store: ReadModel, hub: Hub, after: int | None) -> AsyncIterator[bytes]:
    """The SSE body: what the client missed (after `after`), then every update as it is folded."""
    receive = hub.subscribe()
    # (seq, ordinal): the events of a packed record share its seq. `after` is a whole record.
    sent = (-1, 0) if after is None else (after, sys.maxsize)
    with receive:
        yield b"retry: 1000\n\n"
        if after is not None:
            while True:
                rows, jobs = await anyio.to_thread.run_sync(queries.timeline_after, store, sent[0], 500)
                for update in updates(rows, jobs):
                    yield sse(update)
                    sent = (update["entry"]["seq"], update["entry"]["ordinal"])
                if len(rows) < 500:
                    break
        while True:
            with anyio.move_on_after(KEEPALIVE_S) as idle:
                try:
                    update = await receive.receive()
                except anyio.EndOfStream:
                    return
            if idle.cancelled_caught:
                yield b": keep-alive\n\n"
                continue
            place = (update["entry"]["seq"], update["entry"]["ordinal"])
            if place > sent:
                sent = place
                yield sse(update)


def _stored_timeline(app: WardenApp, job_id: str) -> list[dict[str, Any]]:
    """The job's events exactly as the stream stores them (read in a worker thread)."""
    out = []
    for stored in app.recorder.select_events(UUID(job_id)):
        try:
            event = events.decode(stored.state)
        except msgspec.DecodeError:
            out.append(
                {
                    "version": stored.originator_version,
                    "type": stored.topic,
                    "at": "",
                    "summary": "an event this version of Warden cannot read",
                    "event": {},
                }
            )
            continue
        out.append(
            {
                "version": stored.originator_version,
                "type": events.tag_of(event),
                "at": ts(event.timestamp),
                "summary": summarize(event),
                "event": msgspec.to_builtins(event),
            }
        )
    return out


async def _last_event_seq(js: JetStreamContext) -> int:
    """The stream sequence of the newest event (tracking records and other messages excluded)."""
    try:
        msg = await js.get_last_msg(topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.*")
    except NotFoundError:
        return 0
    return int(msg.seq or 0)
