"""Reading one job's record from the streams: its events, its agents' events, the inputs it cites.

`collect` reads only the job's own subject, the event subjects of the agents that touched it and
those agents' input subjects from the job's request onwards (never the whole stream), so the
cost of a read follows the size of the job, not the size of the log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

import msgspec
from msgspec import Struct
from nats.js import JetStreamContext

from shared import proposals, topology
from shared.aggregates import project_job
from shared.events import (
    AnyEvent,
    InputRejected,
    JobRequested,
    LeaseExpired,
    ProposalSubmitted,
    ReplyRefused,
    agent_id_for,
)
from shared.forensics import log
from shared.messages import Propose, decode_input
from shared.validation import InvalidInput

AGENT_VERBS_NAMING_JOBS = ("heartbeat", "propose", "release")
# Input stored a little after the job's last event can still be about it (a late heartbeat is
# fenced and recorded); past this margin a scan of an agent's subjects stops.
SCAN_MARGIN = timedelta(seconds=5)


class JobNotFound(LookupError):
    """Raised when the event stream holds nothing for the job asked about."""


class _Names(Struct, kw_only=True):
    """The two fields that say which job and lease an agent message is about (all else ignored)."""

    job_id: UUID | None = None
    epoch: int | None = None


_names = msgspec.json.Decoder(_Names)


def _is_proposal(data: bytes) -> bool:
    """A record object, not a payload object recorded before record objects existed."""
    try:
        decode_input(data, Propose)
    except InvalidInput:
        return False
    return True


def _about(data: bytes) -> _Names | None:
    try:
        return _names.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass
class JobLog:
    """Everything the streams hold about one job, as stored."""

    job_id: UUID
    events: list[log.LoggedEvent]
    agent_events: dict[str, list[log.LoggedEvent]] = field(default_factory=dict)
    # Heartbeats, proposals and releases its agents stored naming this job, in stream order
    # (all in the agent input stream).
    agent_inputs: list[log.Stored] = field(default_factory=list)
    # Other input messages the events name, by (stream, sequence): the request, claims, fenced
    # and refused messages.
    referenced: dict[tuple[str, int], log.Stored] = field(default_factory=dict)

    # The record objects (shared/proposals.py) of proposals whose message the agent stream no
    # longer holds, by the message's sequence, verified against `payload_hash`.
    proposal_records: dict[int, bytes] = field(default_factory=dict)

    # Each input stream's first sequence when read: inputs age out, and the agent stream keeps
    # only each subject's latest messages (README, "Threat model"); the events citing them keep
    # their digests, so an older input is reported gone, not missing.
    inputs_from: dict[str, int] = field(default_factory=dict)

    def aged_out(self, seq: int, stream: str) -> bool:
        return 0 < seq < self.inputs_from.get(stream, 1)

    def missing_input(self, seq: int, stream: str = topology.AGENT_INPUT_STREAM) -> str:
        if self.aged_out(seq, stream):
            return (
                f"input message {seq} has aged out of {stream} (it keeps sequences from "
                f"{self.inputs_from[stream]}); the events keep its sha256"
            )
        if stream == topology.AGENT_INPUT_STREAM:
            return (
                f"input message {seq} is not in {stream} (aged out, or evicted by newer messages "
                "on its subject); the events keep its sha256"
            )
        return f"input message {seq} not found in {stream}"

    def input_at(self, seq: int, stream: str = topology.AGENT_INPUT_STREAM) -> log.Stored | None:
        found = self.referenced.get((stream, seq))
        if found is not None:
            return found
        if stream == topology.AGENT_INPUT_STREAM:
            for record in self.agent_inputs:
                if record.seq == seq:
                    return record
        return None


def agents_of(events: Iterable[log.LoggedEvent]) -> list[str]:
    names: list[str] = []
    for item in events:
        name = getattr(item.event, "agent", None)
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return names


def cited_stream(event: AnyEvent | None) -> str:
    """The input stream an event's `input_seq` (or `claim_seq`) counts in: a request's in the
    input stream, a refused input's where its subject is stored, anything else (claims,
    heartbeats, proposals, fenced messages) was an agent's."""
    if isinstance(event, JobRequested):
        return topology.INPUT_STREAM
    if isinstance(event, InputRejected | ReplyRefused):
        return topology.stream_of(event.subject)
    return topology.AGENT_INPUT_STREAM


def cited_inputs(events: Iterable[log.LoggedEvent]) -> set[tuple[str, int]]:
    """(stream, sequence) of every input the job's events cite as evidence."""
    cited: set[tuple[str, int]] = set()
    for item in events:
        event = item.event
        stream = cited_stream(event)
        for name in ("input_seq", "claim_seq"):
            value = getattr(event, name, 0)
            if isinstance(value, int) and value > 0:
                cited.add((stream, value))
        if isinstance(event, LeaseExpired) and event.last_heartbeat is not None:
            cited.add((topology.AGENT_INPUT_STREAM, event.last_heartbeat.input_seq))
    return cited


async def collect(js: JetStreamContext, job_id: UUID, *, all_inputs: bool = False) -> JobLog:
    """Read one job's record; `all_inputs` also fetches every input message its events cite."""
    events = await log.job_events(js, job_id)
    if not events:
        raise JobNotFound(f"no events for job {job_id} in stream {topology.EVENT_STREAM}")
    job_log = JobLog(job_id=job_id, events=events)
    requested = next((e.event for e in events if isinstance(e.event, JobRequested)), None)
    cited = cited_inputs(events)
    last_time = events[-1].time + SCAN_MARGIN
    last_cited = max((seq for stream, seq in cited if stream == topology.AGENT_INPUT_STREAM), default=0)

    folded = project_job(None, [e.event for e in events if e.event is not None])
    finished = folded is not None and folded.terminal

    def after_the_job(record: log.Stored) -> bool:
        # Whatever an agent sent about a finished job after its last event was either fenced
        # (and so cited) or not yet processed: past both bounds there is nothing more to find.
        # A live job's accepted heartbeats append nothing, so its scan runs to the end.
        return finished and record.time > last_time and record.seq > last_cited

    def names_this_job(record: log.Stored) -> bool:
        if record.subject.rsplit(".", 1)[-1] not in AGENT_VERBS_NAMING_JOBS:
            return False
        about = _about(record.data)
        return about is not None and about.job_id == job_id

    for name in agents_of(events):
        try:
            topology.check_agent_name(name)
        except topology.BadAgentName:
            continue
        job_log.agent_events[name] = await log.read_events(js, topology.event_subject(agent_id_for(name)))
        job_log.agent_inputs.extend(
            await log.scan(
                js,
                topology.AGENT_INPUT_STREAM,
                topology.agent_input_root(name).replace(">", "*"),
                # From the agent's oldest input: the stream keeps only each subject's latest
                # few (topology.AGENT_INPUT_PER_SUBJECT), so this read is bounded whatever the log.
                start_seq=1,
                keep=names_this_job,
                stop=after_the_job,
            )
        )
    job_log.agent_inputs.sort(key=lambda r: r.seq)
    have = {(topology.AGENT_INPUT_STREAM, r.seq) for r in job_log.agent_inputs}
    if all_inputs:
        wanted = cited - have
    else:  # explain needs only the request and proposals' evidence
        wanted = (
            {(topology.INPUT_STREAM, requested.input_seq)} if requested and requested.input_seq > 0 else set()
        )
        wanted |= {
            (topology.AGENT_INPUT_STREAM, e.event.input_seq)
            for e in events
            if isinstance(e.event, ProposalSubmitted)
        } - have
    for stream in (topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM):
        found = await log.get_many(js, stream, {seq for s, seq in wanted if s == stream})
        job_log.referenced.update({(stream, seq): record for seq, record in found.items()})
        job_log.inputs_from[stream] = (await js.stream_info(stream)).state.first_seq or 1
    for item in events:
        sub = item.event
        if not isinstance(sub, ProposalSubmitted) or job_log.input_at(sub.input_seq) is not None:
            continue
        # Evicted by the agent's newer inputs, or aged out: the checker kept its record, in the
        # event itself or as an object.
        data: bytes | None = None
        if sub.record:
            data = sub.record.encode()
        elif sub.payload_object:
            data = await proposals.get_object(js, sub.payload_object)
        if data is not None and proposals.sha256(data) == sub.payload_hash and _is_proposal(data):
            job_log.proposal_records[sub.input_seq] = data
    return job_log
