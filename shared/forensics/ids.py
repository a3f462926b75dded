"""A unique id prefix (8+ characters) resolved to the full id, from the log alone.

Every id-taking command (explain, dossier, ledger show, approve, deny, rollback, requeue, cancel)
resolves its argument here, so a prefix means the same thing everywhere and an ambiguous one
always lists what it matches. A full job id is taken as given, without reading anything.

Jobs are found from the event stream's subject list (one subject per aggregate, which the
server lists without reading messages); proposals have no subject of their own, so a proposal
id, full or a prefix, reads the `proposal.submitted` events: they also say whose job it is,
which an operator's command on a proposal names (the services' views forget ended jobs, the
log does not).
"""

from __future__ import annotations

import json
import string
from typing import Literal, NamedTuple
from uuid import UUID

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared import topology
from shared.aggregates import is_job_event
from shared.events import AnyEvent, ProposalSubmitted
from shared.forensics import log
from shared.persistence import written

MIN_PREFIX = 8
SHOWN = 10
_HEX = frozenset(string.hexdigits.lower() + "-")
Kind = Literal["job", "proposal"]


class FoundProposal(NamedTuple):
    """A proposal in the log, and the job it was made for (its `proposal.submitted` says)."""

    proposal_id: UUID
    job_id: UUID


class IdNotFound(LookupError):
    """The text names no id (too short, not hex, no match, or several matches): the message says which."""


class BadId(IdNotFound):
    """The text cannot be an id or a prefix of one (too short, not hex): a usage error."""


def _prefix(text: str, kind: Kind) -> UUID | str:
    """The full id when `text` is one, else the normalised prefix (checked, never trusted)."""
    try:
        return UUID(text)
    except ValueError:
        pass
    cleaned = text.strip().lower()
    if not cleaned or not set(cleaned) <= _HEX:
        raise BadId(f"{text!r} is not a {kind} id (nor the start of one: ids are hexadecimal)")
    if len(cleaned.replace("-", "")) < MIN_PREFIX:
        raise BadId(f"{text!r} is too short: give at least {MIN_PREFIX} characters of the {kind} id")
    return cleaned


def choose(text: str, kind: Kind, candidates: list[UUID]) -> UUID:
    """The one candidate `text` starts, or IdNotFound naming none or every match."""
    prefix = text.strip().lower()
    matches = sorted({c for c in candidates if str(c).startswith(prefix)}, key=str)
    if not matches:
        raise IdNotFound(f"no {kind} id starts with {text!r}")
    if len(matches) > 1:
        listed = ", ".join(str(m) for m in matches[:SHOWN])
        more = f" and {len(matches) - SHOWN} more" if len(matches) > SHOWN else ""
        raise IdNotFound(f"{text!r} is ambiguous: it starts {len(matches)} {kind} ids: {listed}{more}")
    return matches[0]


async def aggregate_ids(nc: Client, stream: str = topology.EVENT_STREAM, *, prefix: str = "") -> list[UUID]:
    """Every aggregate id with events (only those starting `prefix`), from the stream's subject
    list (paged by the server). Filtering the text first matters: a million-event log has ~90k
    subjects, and parsing each into a UUID cost more than the server took to list them."""
    found: list[UUID] = []
    offset = 0
    root = topology.EVENT_ROOT + "."
    while True:
        request = {"subjects_filter": log.EVENT_SUBJECTS, "offset": offset}
        reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", json.dumps(request).encode(), timeout=30)
        body = msgspec.json.decode(reply.data)  # ~2x json.loads on a 90k-subject listing
        if "error" in body:
            raise log.LogUnavailable(f"cannot list the subjects of {stream}: {body['error']}")
        subjects = (body.get("state") or {}).get("subjects") or {}
        for subject in subjects:
            text = subject.removeprefix(root)
            if not text.lower().startswith(prefix):
                continue
            try:
                found.append(UUID(text))
            except ValueError:
                continue
        offset += len(subjects)
        total = int(body.get("total") or 0)
        if not subjects or offset >= total:
            return found


async def _is_job(js: JetStreamContext, aggregate: UUID) -> bool:
    subject = topology.event_subject(aggregate)
    try:
        raw = await js.get_last_msg(topology.EVENT_STREAM, subject, direct=True)
    except NotFoundError:
        return False
    last = written.events_of(subject, dict(raw.headers or {}), raw.data or b"")
    event: AnyEvent | str = last[0] if not isinstance(last, str) else ""
    if isinstance(last, str):
        # The last message is not Warden's: any of the aggregate's own events says what it is.
        stored = await log.scan(js, topology.EVENT_STREAM, subject)
        found = [e.event for s in stored for e in log.as_events(s)]
        event = next((e for e in found if e is not None), "")
    return not isinstance(event, str) and is_job_event(event)


async def resolve_job(nc: Client, text: str) -> UUID:
    """The job id `text` is, or is the unique start of."""
    given = _prefix(text, "job")
    if isinstance(given, UUID):
        return given
    js = nc.jetstream()
    candidates = [c for c in await aggregate_ids(nc, prefix=given) if str(c).startswith(given)]
    # Agents and rejections have subjects too: only a job's counts as a match.
    jobs = [c for c in candidates if await _is_job(js, c)]
    return choose(given, "job", jobs)


async def resolve_proposal(nc: Client, text: str) -> FoundProposal:
    """The proposal `text` is, or is the unique start of, with its job (reads the proposals'
    events). A full id is looked up too: one the log does not hold is IdNotFound, never sent on."""
    given = _prefix(text, "proposal")
    prefix = str(given) if isinstance(given, UUID) else given
    marker = b'"proposal.submitted"'
    # A full id is in the message's bytes as written: only those messages are decoded.
    wanted = prefix.encode() if isinstance(given, UUID) else b""
    jobs: dict[UUID, UUID] = {}

    def keep(record: log.Stored) -> bool:
        return marker in record.data and wanted in record.data

    for record in await log.scan(nc.jetstream(), topology.EVENT_STREAM, log.EVENT_SUBJECTS, keep=keep):
        for logged in log.as_events(record):
            event = logged.event
            if isinstance(event, ProposalSubmitted) and str(event.proposal_id).startswith(prefix):
                jobs[event.proposal_id] = event.originator_id
    if isinstance(given, UUID) and given not in jobs:
        raise IdNotFound(f"no proposal {given} in the record")
    pid = choose(prefix, "proposal", list(jobs))
    return FoundProposal(proposal_id=pid, job_id=jobs[pid])
