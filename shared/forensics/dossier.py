"""`warden dossier JOB`: one JSON bundle with everything the log holds about a job.

It carries every event of the job (and of the agents that touched it) exactly as stored, with
stream sequence, stored time and ledger hash; the raw input messages those events cite (the
request, claims, heartbeats, proposals, releases, fenced messages); the job and agents as folded
from those events; the explanation; and the ledger verification. `raw` is the stored JSON text
byte for byte, so `warden ledger verify --file` can re-check a copy years later.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
from msgspec import Struct, field
from nats.js import JetStreamContext

from shared import topology
from shared.aggregates import Agent, Job, project_agent, project_job
from shared.events import Event, now
from shared.forensics import collect, explain, ledger, log

FORMAT = "warden.dossier/1"


class EventRecord(Struct, frozen=True, kw_only=True):
    seq: int
    subject: str
    stored_at: datetime
    hash: str
    raw: str  # the stored bytes, as text (events are UTF-8 JSON)
    event: Any  # the same, parsed, for reading
    foreign: str = ""  # why Warden did not write it, for a message stepped over (no chain link)


class InputRecord(Struct, frozen=True, kw_only=True):
    seq: int
    subject: str
    stored_at: datetime
    sha256: str
    raw: str | None = None  # the stored bytes as text, when they are UTF-8
    raw_base64: str | None = None  # otherwise (untrusted input may be anything)
    stream: str = ""  # which input stream `seq` counts in (requests and agents' inputs differ)


class AgentFile(Struct, frozen=True, kw_only=True):
    state: Agent | None
    events: list[EventRecord]


class Dossier(Struct, frozen=True, kw_only=True):
    format: str
    generated_at: datetime
    job_id: UUID
    stream: str
    state: Job | None
    explain: explain.Explanation
    ledger: ledger.LedgerReport
    events: list[EventRecord]
    agents: dict[str, AgentFile]
    inputs: dict[str, list[InputRecord]] = field(default_factory=dict)
    # Inputs the events cite that the bounded input stream no longer holds (their sha256 and
    # what was decided about them stay in the events).
    inputs_aged_out: list[int] = field(default_factory=list)
    # The same for the agent input stream (aged out, or evicted by newer inputs on its subject).
    agent_inputs_aged_out: list[int] = field(default_factory=list)


def _event_record(item: log.LoggedEvent) -> EventRecord:
    text = item.stored.data.decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(item.stored.data)
    except ValueError:
        parsed = None
    return EventRecord(
        seq=item.seq,
        subject=item.subject,
        stored_at=item.time,
        hash=item.hash,
        raw=text,
        event=parsed,
        foreign=item.foreign,
    )


def _input_record(record: log.Stored) -> InputRecord:
    try:
        text: str | None = record.data.decode("utf-8")
        encoded = None
    except UnicodeDecodeError:
        text, encoded = None, base64.b64encode(record.data).decode()
    return InputRecord(
        seq=record.seq,
        subject=record.subject,
        stored_at=record.time,
        sha256=record.sha256,
        raw=text,
        raw_base64=encoded,
        stream=record.stream,
    )


def _kind(subject: str) -> str:
    if subject == topology.REQUEST_SUBJECT:
        return "request"
    parsed = topology.parse_agent_subject(subject)
    if parsed is not None:
        return {
            "heartbeat": "heartbeats",
            "propose": "proposals",
            "release": "releases",
            "claim": "claims",
        }.get(parsed[1], "other")
    return "other"


def _aged_out(job_log: explain.JobLog, stream: str) -> list[int]:
    return sorted(
        seq
        for s, seq in collect.cited_inputs(job_log.events)
        if s == stream and job_log.aged_out(seq, s) and job_log.input_at(seq, s) is None
    )


def build(job_log: explain.JobLog) -> Dossier:
    events = [e.event for e in job_log.events if e.event is not None]
    state = project_job(None, events)
    agents: dict[str, AgentFile] = {}
    everything = list(job_log.events)
    for name, items in job_log.agent_events.items():
        folded: list[Event] = [i.event for i in items if i.event is not None]
        agents[name] = AgentFile(state=project_agent(None, folded), events=[_event_record(i) for i in items])
        everything.extend(items)
    everything.sort(key=lambda e: e.seq)
    inputs: dict[str, list[InputRecord]] = {}
    seen: set[tuple[str, int]] = set()
    for record in sorted(
        [*job_log.agent_inputs, *job_log.referenced.values()], key=lambda r: (r.stream, r.seq)
    ):
        if (record.stream, record.seq) in seen:
            continue
        seen.add((record.stream, record.seq))
        inputs.setdefault(_kind(record.subject), []).append(_input_record(record))
    return Dossier(
        format=FORMAT,
        generated_at=now(),
        job_id=job_log.job_id,
        stream=topology.EVENT_STREAM,
        state=state,
        explain=explain.explain(job_log),
        ledger=ledger.verify(ledger.entries_of(everything), f"job {job_log.job_id} and its agents"),
        events=[_event_record(e) for e in job_log.events],
        agents=agents,
        inputs=inputs,
        inputs_aged_out=_aged_out(job_log, topology.INPUT_STREAM),
        agent_inputs_aged_out=_aged_out(job_log, topology.AGENT_INPUT_STREAM),
    )


async def dossier(js: JetStreamContext, job_id: UUID) -> Dossier:
    return build(await explain.collect(js, job_id, all_inputs=True))


def encode(d: Dossier) -> bytes:
    return msgspec.json.format(msgspec.json.encode(d), indent=2)
