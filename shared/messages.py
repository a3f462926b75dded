"""Untrusted input on the wire (job requests, agent messages, operator commands) and Warden's replies.

Inputs are tagged Structs like events, but they are claims, not facts: services validate them
and append events. Each input subject has one typed decoder (`decode_input`).
"""

from __future__ import annotations

import functools
import hashlib
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import msgspec
from msgspec import Meta, Struct, field

from shared.contract import Contract
from shared.events import Usage
from shared.task import PreviousAttempt
from shared.validation import FieldError, decode

Key = Annotated[str, Meta(min_length=1, max_length=256)]
Text = Annotated[str, Meta(max_length=4096)]
Name = Annotated[str, Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]


class Input(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class JobRequest(Input, frozen=True, tag="job.request"):
    """Published by any client service on `warden.in.request`."""

    idempotency_key: Key
    kind: Annotated[str, Meta(min_length=1, max_length=128)]
    contract: Contract = field(default_factory=Contract)
    submitter: Annotated[str, Meta(max_length=256)] = ""


@functools.cache
def _fields(kind: type[Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    # msgspec.structs.fields resolves the type hints on every call (3% of the services' CPU
    # in a governed run, profiled): once per type is enough.
    return msgspec.structs.fields(kind)


def _canonical(value: Any) -> Any:
    """A Struct as builtins without the fields at their default, recursively."""
    if isinstance(value, Struct):
        out: dict[str, Any] = {}
        for f in _fields(type(value)):
            item = getattr(value, f.name)
            if f.default is not msgspec.NODEFAULT:
                default = f.default
            elif f.default_factory is not msgspec.NODEFAULT:
                default = f.default_factory()
            else:
                default = msgspec.NODEFAULT
            if item != default:
                out[f.encode_name] = _canonical(item)
        return out
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def request_digest(request: JobRequest) -> str:
    """sha256 of the request's canonical body: what "the same request" means for one idempotency key.

    Canonical: the decoded request (so `1` and `1.0` for a float agree), without the fields at
    their default (so an explicit default equals an omitted one, and a field added later with a
    default changes no earlier digest), keys sorted. The `type` tag, like any transport detail
    (headers, reply address), is not part of the body.
    """
    encoded = msgspec.json.encode(_canonical(request), order="sorted")
    return hashlib.sha256(encoded).hexdigest()


class Register(Input, frozen=True, tag="agent.register"):
    max_concurrent: Annotated[int, Meta(ge=1, le=1000)] = 1
    kinds: list[str] = field(default_factory=list)


class Claim(Input, frozen=True, tag="agent.claim"):
    kinds: list[str] = field(default_factory=list)
    # How long the sender waits for the answer: a claim that finds no work waits at the
    # scheduler until work turns up or (just before) this ends; one nobody answered within it
    # is stale: never grant on it.
    wait_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    sent_at: datetime | None = None
    # The jobs whose leases the sender knows it holds. A live lease of the sender missing here
    # was granted on a claim whose answer never reached it (a broker restart, a wait that ran
    # out): it is handed back as this claim's answer instead of left to expire. None (older
    # clients): nothing is handed back.
    holding: Annotated[list[UUID], Meta(max_length=1000)] | None = None


class Heartbeat(Input, frozen=True, tag="agent.heartbeat"):
    job_id: UUID
    epoch: Annotated[int, Meta(ge=1)]
    progress: Annotated[float, Meta(ge=0, le=1)] | None = None
    usage: Usage = field(default_factory=Usage)
    note: Text = ""
    # When the work last showed a sign of progress (output, a change in its workspace, a usage
    # report), as the agent saw it: a stall's detection latency is measured from here.
    progress_at: datetime | None = None


class PayloadUpload(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A proposal payload uploaded in chunks on `warden.in.agent.<name>.payload`: the chunks'
    stream sequences in order, and the whole payload's size and sha256. The checker reads those
    sequences, refuses any chunk that is not on this agent's payload subject, and stores the
    verified payload in the payload bucket itself."""

    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    size: Annotated[int, Meta(ge=1)]
    # 4096 chunks of topology.PAYLOAD_CHUNK_BYTES is 1 GiB, past any payload limit.
    chunks: Annotated[list[Annotated[int, Meta(ge=1)]], Meta(min_length=1, max_length=4096)]


class Propose(Input, frozen=True, tag="agent.propose"):
    job_id: UUID
    epoch: Annotated[int, Meta(ge=1)]
    effect: Literal["git.patch", "file.write", "webhook", "none"] = "git.patch"
    # A unified diff for git.patch; {path: content} for file.write; a body for webhook.
    patch: str = ""
    files: dict[str, str] = field(default_factory=dict)
    base: str = ""
    output: Any = None
    usage: Usage = field(default_factory=Usage)
    evidence: dict[str, Any] = field(default_factory=dict)
    # A large payload is uploaded in chunks on the agent's payload subject first and named here.
    payload: PayloadUpload | None = None


class ProposalPayload(Input, frozen=True, tag="agent.proposal_payload"):
    """The bulky part of a proposal, stored as one object when the message would be too large."""

    patch: str = ""
    files: dict[str, str] = field(default_factory=dict)
    output: Any = None
    evidence: dict[str, Any] = field(default_factory=dict)


class Release(Input, frozen=True, tag="agent.release"):
    job_id: UUID
    epoch: Annotated[int, Meta(ge=1)]
    reason: Text = ""


class OperatorCommand(Input, frozen=True, tag="operator.command"):
    """Every operator command names who gives it and why; the verb is the subject's last token."""

    operator: Annotated[str, Meta(min_length=1, max_length=128)]
    reason: Annotated[str, Meta(min_length=1, max_length=4096)]
    job_id: UUID | None = None
    agent: Name | None = None
    proposal_id: UUID | None = None
    # promote/demote: a level of the policy's (checked there); bounded here like every number.
    level: Annotated[int, Meta(ge=0, le=1000)] | None = None


InputT = TypeVar("InputT", bound=Input)


def decode_input(data: bytes, tp: type[InputT], max_bytes: int | None = None) -> InputT:
    """Decode one input of the subject's declared type; the `type` tag may be omitted.

    The subject already says which type it is, so `type` is optional in the published schemas
    too (shared/schemas.py); when present it must name the subject's type.
    """
    return decode(data, tp, max_bytes=max_bytes)


# --- Replies -------------------------------------------------------------------------------


class Reply(Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class Accepted(Reply, frozen=True, tag="accepted"):
    job_id: UUID | None = None
    duplicate: bool = False
    detail: str = ""
    # For a proposal: the id its checks and decision are recorded under (what `warden approve` takes).
    proposal_id: UUID | None = None


class Rejected(Reply, frozen=True, tag="rejected"):
    errors: list[FieldError]
    rejection_id: UUID | None = None
    # A request refused because its idempotency key already names a job: that job.
    job_id: UUID | None = None


class LeaseGrant(Reply, frozen=True, tag="lease.grant"):
    job_id: UUID
    kind: str
    epoch: int
    expires_at: datetime
    ttl_s: float
    heartbeat_interval_s: float
    contract: Contract
    # On a retry: how the earlier attempts ended and why (their verdicts and evidence, clipped),
    # so an agent can do better; agents' credentials cannot read the log themselves.
    previous_attempts: list[PreviousAttempt] = field(default_factory=list)


class NoWork(Reply, frozen=True, tag="no.work"):
    detail: str = ""


Standing = Literal["extended", "revoked", "expired", "budget_exceeded", "ended", "unknown"]


class HeartbeatAck(Reply, frozen=True, tag="heartbeat.ack"):
    standing: Standing
    expires_at: datetime | None = None
    reason: str = ""


AnyReply = Accepted | Rejected | LeaseGrant | NoWork | HeartbeatAck
reply_decoder = msgspec.json.Decoder(AnyReply)
