"""Every authoritative event Warden appends: one tagged union, one decoder.

Events are frozen, keyword-only msgspec Structs with an explicit, stable tag (`"lease.granted"`,
never a class name). They are the eventsourcing domain events of the Job, Agent and Rejection
aggregates (see shared/aggregates.py); the tag is the stored topic.

Evolution rule: a new field gets a default; a field's type never changes; a tag never changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import NAMESPACE_URL, UUID, uuid5

import msgspec
from msgspec import Struct, field

from shared.contract import Contract
from shared.validation import FieldError

JOB_NAMESPACE = uuid5(NAMESPACE_URL, "warden:job")
AGENT_NAMESPACE = uuid5(NAMESPACE_URL, "warden:agent")
REJECTION_NAMESPACE = uuid5(NAMESPACE_URL, "warden:rejection")
PROPOSAL_NAMESPACE = uuid5(NAMESPACE_URL, "warden:proposal")


def now() -> datetime:
    return datetime.now(UTC)


def job_id_for(idempotency_key: str) -> UUID:
    """The same idempotency key always names the same job, so it can never make a second one."""
    return uuid5(JOB_NAMESPACE, idempotency_key)


def agent_id_for(name: str) -> UUID:
    return uuid5(AGENT_NAMESPACE, name)


def rejection_id_for(stream: str, seq: int) -> UUID:
    """One rejection per stored input message: a redelivered bad message records nothing new."""
    return uuid5(REJECTION_NAMESPACE, f"{stream}:{seq}")


def reply_refusal_id_for(stream: str, seq: int) -> UUID:
    """One reply refusal per stored input message (apart from its rejection, if any)."""
    return uuid5(REJECTION_NAMESPACE, f"{stream}:{seq}:reply")


def proposal_id_for(stream: str, seq: int) -> UUID:
    """One proposal per stored input message: a redelivered proposal is the same proposal."""
    return uuid5(PROPOSAL_NAMESPACE, f"{stream}:{seq}")


class Usage(Struct, frozen=True, kw_only=True):
    """What an attempt has consumed so far, as the agent reports it."""

    steps: int = 0
    tokens: int = 0
    cost: float = 0.0


class HeartbeatSeen(Struct, frozen=True, kw_only=True):
    """The last heartbeat the reconciler saw on a lease: evidence for an expiry."""

    at: datetime
    input_seq: int
    progress: float | None = None
    usage: Usage = field(default_factory=Usage)
    note: str = ""
    progress_at: datetime | None = None


class Event(Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event: the eventsourcing domain event protocol, plus a trace link."""

    originator_id: UUID
    originator_version: int
    timestamp: datetime = field(default_factory=now)
    # W3C traceparent of the span that appended this event: one job is one trace.
    trace: str = ""
    # Phase ledger: sha256 of the aggregate's previous event as stored; a hash chain per job.
    prev_hash: str = ""


# --- Job aggregate -------------------------------------------------------------------------


class JobRequested(Event, frozen=True, tag="job.requested"):
    idempotency_key: str
    kind: str
    contract: Contract
    submitter: str = ""
    input_seq: int = 0
    # sha256 of the request's canonical body (shared.messages.request_digest): what the key is
    # bound to. "" on events recorded before it was kept.
    request_digest: str = ""


class LeaseGranted(Event, frozen=True, tag="lease.granted"):
    agent: str
    epoch: int
    ttl_s: float
    expires_at: datetime
    claim_seq: int = 0


class LeaseExpired(Event, frozen=True, tag="lease.expired"):
    agent: str
    epoch: int
    deadline: datetime
    detected_at: datetime
    detection_latency_ms: float
    last_heartbeat: HeartbeatSeen | None = None
    # From the work's last sign of progress (its last heartbeat's progress_at) to detection: what
    # a stall cost, when the agent reported progress times.
    since_progress_ms: float | None = None
    detector: str = "reconciler"


class LeaseReleased(Event, frozen=True, tag="lease.released"):
    agent: str
    epoch: int
    reason: str = ""


class LeaseRevoked(Event, frozen=True, tag="lease.revoked"):
    agent: str
    epoch: int
    reason: str
    # budget, deadline, operator, violation or agent-revoked. A str, not a Literal: a stored
    # field's type never changes, and a signal added later must still decode in an older replica.
    signal: str
    by: str = "warden"
    signal_at: datetime | None = None


class MessageRejected(Event, frozen=True, tag="message.rejected"):
    """Fencing: an agent message under a stale, expired or revoked lease, recorded not dropped."""

    agent: str
    epoch: int
    verb: str
    reason: str
    input_seq: int
    current_epoch: int = 0


class JobRequeued(Event, frozen=True, tag="job.requeued"):
    reason: str
    by: str = "reconciler"
    # An operator's requeue of a dead job grants it max_attempts afresh.
    fresh_attempts: bool = False


class JobTombstoned(Event, frozen=True, tag="job.tombstoned"):
    reason: str
    attempts: int
    by: str = "reconciler"


class JobCancelled(Event, frozen=True, tag="job.cancelled"):
    reason: str
    by: str


class ProposalSubmitted(Event, frozen=True, tag="proposal.submitted"):
    """The proposal exactly as received, stored before anything interprets it."""

    proposal_id: UUID
    agent: str
    epoch: int
    content_hash: str
    size: int
    input_seq: int
    effect: str = "none"
    # The proposal's record object, when it is not kept inline in `record` (shared/proposals.py);
    # the message as received is in the agent input stream at `input_seq` until evicted.
    payload_object: str = ""
    # sha256 of the object's bytes as the checker read them (the applier re-verifies it), or of
    # `record` when the proposal is kept here.
    payload_hash: str = ""
    # The proposal's record (JSON text) when small enough to keep in the event itself
    # (topology.INLINE_RECORD_BYTES): then there is no record object.
    record: str = ""


class InvariantChecked(Event, frozen=True, tag="invariant.checked"):
    proposal_id: UUID
    invariant: str
    version: str
    verdict: Literal["pass", "fail", "error"]
    evidence: dict[str, Any] = field(default_factory=dict)


class ProposalAccepted(Event, frozen=True, tag="proposal.accepted"):
    proposal_id: UUID
    checks: list[str] = field(default_factory=list)
    # Who decided ("checker", or the operator who approved) and why.
    by: str = "checker"
    reason: str = ""
    effect: str = ""
    # For git.patch: the branch the effect lands on, fixed by the agent's authority at decision.
    branch: str = ""


class ProposalRejected(Event, frozen=True, tag="proposal.rejected"):
    proposal_id: UUID
    violations: list[str]
    by: str = "checker"
    reason: str = ""


class EffectApplied(Event, frozen=True, tag="effect.applied"):
    proposal_id: UUID
    kind: str
    receipt: dict[str, Any]
    reused_receipt: bool = False


class RollbackRequested(Event, frozen=True, tag="rollback.requested"):
    """Asks the applier to compensate an applied effect (revoker or operator)."""

    proposal_id: UUID
    reason: str
    by: str
    signal_at: datetime | None = None


class EffectRolledBack(Event, frozen=True, tag="effect.rolled_back"):
    proposal_id: UUID
    kind: str
    receipt: dict[str, Any]
    reason: str = ""
    reused_receipt: bool = False


class EffectFailed(Event, frozen=True, tag="effect.failed"):
    """An accepted effect (or its rollback) could not be performed; the world is unchanged."""

    proposal_id: UUID
    kind: str
    reason: str
    phase: Literal["apply", "rollback"] = "apply"
    evidence: dict[str, Any] = field(default_factory=dict)


class JobCompleted(Event, frozen=True, tag="job.completed"):
    proposal_id: UUID
    agent: str
    epoch: int


# --- Agent aggregate -----------------------------------------------------------------------


class AgentRegistered(Event, frozen=True, tag="agent.registered"):
    name: str
    max_concurrent: int = 1
    kinds: list[str] = field(default_factory=list)
    level: int = 0


class AgentLevelChanged(Event, frozen=True, tag="agent.level_changed"):
    name: str
    level: int
    previous: int
    reason: str
    evidence: list[str] = field(default_factory=list)
    by: str = "policy"
    signal_at: datetime | None = None


class AgentRevoked(Event, frozen=True, tag="agent.revoked"):
    name: str
    reason: str
    by: str
    evidence: list[str] = field(default_factory=list)
    # When the failure signal that caused this was recorded: revocation latency is the gap.
    signal_at: datetime | None = None


class AgentSuspended(Event, frozen=True, tag="agent.suspended"):
    """No new leases until reinstated; live leases run on (revoke ends those)."""

    name: str
    reason: str
    by: str


class AgentReinstated(Event, frozen=True, tag="agent.reinstated"):
    name: str
    reason: str
    by: str


# --- Rejection aggregate: one per bad input message ----------------------------------------


class InputRejected(Event, frozen=True, tag="input.rejected"):
    subject: str
    input_seq: int
    errors: list[FieldError]
    sender: str = ""
    excerpt: str = ""
    # A throttle window (shared/throttle.py): this one record also stands for every later input
    # of `sender` that consumer `throttled_by` read, stored before `throttled_until`.
    throttled_until: datetime | None = None
    throttled_by: str = ""


class ReplyRefused(Event, frozen=True, tag="input.reply_refused"):
    """An input named a reply address its sender may not receive on (topology.reply_refusal):
    the input was decided as usual, and no answer was published there."""

    subject: str
    input_seq: int
    reply_to: str  # as named, cut to 256 characters
    reason: str
    sender: str = ""


AnyEvent = (
    JobRequested
    | LeaseGranted
    | LeaseExpired
    | LeaseReleased
    | LeaseRevoked
    | MessageRejected
    | JobRequeued
    | JobTombstoned
    | JobCancelled
    | ProposalSubmitted
    | InvariantChecked
    | ProposalAccepted
    | ProposalRejected
    | EffectApplied
    | RollbackRequested
    | EffectRolledBack
    | JobCompleted
    | AgentRegistered
    | AgentLevelChanged
    | AgentRevoked
    | AgentSuspended
    | AgentReinstated
    | InputRejected
    | ReplyRefused
    | EffectFailed
)

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__
TAGS: dict[type[Event], str] = {t: t.__struct_config__.tag for t in EVENT_TYPES}  # type: ignore[misc]

_decoder = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


# The digests of events lately decoded, taken of the bytes they were decoded from: every fold
# takes each event's digest (its aggregate's last_hash), and hashing the stored bytes costs a
# third of encoding the event again to hash that (3 of a rebuild's 30 µs per event, profiled).
# Keyed by identity, each entry holding its event (so an id is never reused while kept);
# bounded by emptying it when full.
_DIGESTS_KEPT = 2_048
_digests: dict[int, tuple[Event, str]] = {}


def digest(event: Event) -> str:
    """The ledger hash of an event: sha256 of its stored bytes (msgspec encodes deterministically,
    so an event built here hashes as it will be stored)."""
    kept = _digests.get(id(event))
    if kept is not None and kept[0] is event:
        return kept[1]
    return hashlib.sha256(_encoder.encode(event)).hexdigest()


def decode(data: bytes) -> AnyEvent:
    """One event's encoding (`encode`) decoded: an element of `unpack`, not a stored message."""
    event: AnyEvent = _decoder.decode(data)
    if len(_digests) >= _DIGESTS_KEPT:
        _digests.clear()
    _digests[id(event)] = (event, hashlib.sha256(data).hexdigest())
    return event


# A stored message holds one event's encoding, or (a save of several events of one aggregate,
# written as one message because an atomic batch costs 3-4 ms against 0.5 ms) a JSON array of
# them, each element byte for byte that event's own encoding: its digest, and so the hash chain,
# are the same either way.
_elements = msgspec.json.Decoder(list[msgspec.Raw])


def pack(encoded: Sequence[bytes]) -> bytes:
    """The stored body of several events' encodings, in order (one event's is its own)."""
    return encoded[0] if len(encoded) == 1 else b"[" + b",".join(encoded) + b"]"


def unpack(data: bytes) -> list[bytes]:
    """The events' encodings a stored body holds, in order, each exactly as stored (what its
    digest is taken of). Raises msgspec.DecodeError when a packed body is not a JSON array."""
    if data[:1] != b"[":
        return [data]
    return [bytes(raw) for raw in _elements.decode(data)]


def decode_all(data: bytes) -> list[AnyEvent]:
    """The one decoder of a stored message: every event it holds, in order."""
    return [decode(element) for element in unpack(data)]


def ref(event: Event) -> str:
    """How events cite each other as evidence: aggregate id and version, e.g. `<uuid>@3`."""
    return f"{event.originator_id}@{event.originator_version}"


def tag_of(event: Event) -> str:
    return TAGS[type(event)]
