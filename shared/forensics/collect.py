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

from shared import topology
from shared.aggregates import project_job
from shared.events import JobRequested, LeaseExpired, ProposalSubmitted, agent_id_for
from shared.forensics import log

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
    # Heartbeats, proposals and releases its agents stored naming this job, in stream order.
    agent_inputs: list[log.Stored] = field(default_factory=list)
    # Other input messages the events name by sequence (the request, claims, fenced messages).
    referenced: dict[int, log.Stored] = field(default_factory=dict)

    # The input stream's first sequence when read: inputs age out (README, "Threat model"), the
    # events citing them keep their digests, so an older input is reported gone, not missing.
    inputs_from: int = 1

    def aged_out(self, seq: int) -> bool:
        return 0 < seq < self.inputs_from

    def missing_input(self, seq: int) -> str:
        if self.aged_out(seq):
            return (
                f"input message {seq} has aged out of the input stream (it keeps sequences from "
                f"{self.inputs_from}); the events keep its sha256"
            )
        return f"input message {seq} not found"

    def input_at(self, seq: int) -> log.Stored | None:
        found = self.referenced.get(seq)
        if found is not None:
            return found
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


def referenced_seqs(events: Iterable[log.LoggedEvent]) -> set[int]:
    """Input stream sequences the job's events cite as evidence."""
    seqs: set[int] = set()
    for item in events:
        event = item.event
        for name in ("input_seq", "claim_seq"):
            value = getattr(event, name, 0)
            if isinstance(value, int) and value > 0:
                seqs.add(value)
        if isinstance(event, LeaseExpired) and event.last_heartbeat is not None:
            seqs.add(event.last_heartbeat.input_seq)
    return seqs


async def collect(js: JetStreamContext, job_id: UUID, *, all_inputs: bool = False) -> JobLog:
    """Read one job's record; `all_inputs` also fetches every input message its events cite."""
    events = await log.job_events(js, job_id)
    if not events:
        raise JobNotFound(f"no events for job {job_id} in stream {topology.EVENT_STREAM}")
    job_log = JobLog(job_id=job_id, events=events)
    requested = next((e.event for e in events if isinstance(e.event, JobRequested)), None)
    start = requested.input_seq if requested is not None and requested.input_seq > 0 else 1
    cited = referenced_seqs(events)
    last_time = events[-1].time + SCAN_MARGIN
    last_cited = max(cited, default=0)

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
                topology.INPUT_STREAM,
                topology.agent_input_root(name).replace(">", "*"),
                start_seq=start,
                keep=names_this_job,
                stop=after_the_job,
            )
        )
    job_log.agent_inputs.sort(key=lambda r: r.seq)
    have = {r.seq for r in job_log.agent_inputs}
    if all_inputs:
        wanted = cited - have
    else:  # explain needs only the request and proposals' evidence
        wanted = {start} if requested is not None and requested.input_seq > 0 else set()
        wanted |= {e.event.input_seq for e in events if isinstance(e.event, ProposalSubmitted)} - have
    job_log.referenced = await log.get_many(js, topology.INPUT_STREAM, wanted)
    job_log.inputs_from = (await js.stream_info(topology.INPUT_STREAM)).state.first_seq or 1
    return job_log
