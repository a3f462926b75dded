"""Where a proposal's bytes live and how they are read back, verified, every time.

A proposal is an input message on `warden.in.agent.<name>.propose`, stored in the agent input
stream exactly as received. When its payload (a diff of several MB, many files) would make the message
larger than `topology.INLINE_PROPOSAL_BYTES`, the SDK first publishes the payload in chunks on
the agent's own payload subject (`warden.in.agent.<name>.payload`) and the message names the
chunks' sequences, size and sha256 in `payload`. The checker reads those chunks, refuses any
that is not on that agent's payload subject, verifies size and sha256, and stores the payload
in the `topology.PAYLOAD_BUCKET` object store itself, named `<agent>/<job>/<epoch>/<sha256>`.
Agents have no access to the bucket at all (README, "Threat model"). Limits:

- an input message larger than `topology.MAX_INPUT_BYTES` (1 MB) is refused by the checker and
  recorded as `input.rejected` (a raw client that skips the SDK meets this);
- nothing larger than the server's `max_payload` (8 MB in Warden's configs) can be published at
  all: the client library refuses it before anything is stored, so nothing can be recorded;
- a payload larger than `topology.max_proposal_bytes()` (64 MB unless WARDEN_MAX_PROPOSAL_BYTES
  says otherwise) is not read: the proposal is recorded as submitted with its declared size and
  then rejected with a violation naming both sizes.

The agent input stream keeps only each subject's latest `topology.agent_input_per_subject()`
messages, so the proposal message and its chunks may be evicted by the agent's newer ones long
before the applier, an approval, a rollback or forensics read it back. So the checker keeps every
proposal's *record*, the proposal message as decoded and re-encoded (for an upload, the envelope
naming the upload; the payload is the object beside it). A record of at most
`topology.INLINE_RECORD_BYTES` (a proposal without an upload, most are) is kept in
`proposal.submitted` itself (`record`, its sha256 in `payload_hash`): no object, no round trip.
A larger one is a *record object* in the bucket, named `<agent>/<job>/<epoch>/<sha256 of the
record>`, which `proposal.submitted` names with its sha256 (`payload_object`, `payload_hash`).
Readers (`read_stored`, `read_recorded`) take the record (inline, else the object) first, verify
its hash (and the payload's against what the record names), and read the input message only for
proposals recorded before records were kept, verifying its sha256 against `content_hash`. What
is applied is exactly what was checked. Cost of a record object: two stored messages (a chunk
and its metadata), beside an upload's own payload object.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from msgspec.structs import replace
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError, ObjectNotFoundError

from shared import topology
from shared.aggregates import ProposalState
from shared.messages import PayloadUpload, ProposalPayload, Propose, decode_input
from shared.validation import InvalidInput


class PayloadProblem(ValueError):
    """The proposal's payload cannot be used; the message says why (it becomes a violation)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def has_inline_payload(body: Propose) -> bool:
    return bool(body.patch or body.files or body.output is not None or body.evidence)


def split(body: Propose) -> tuple[Propose, bytes]:
    """The message without its payload, and the payload as the bytes to store."""
    payload = msgspec.json.encode(
        ProposalPayload(patch=body.patch, files=body.files, output=body.output, evidence=body.evidence)
    )
    envelope = replace(body, patch="", files={}, output=None, evidence={})
    return envelope, payload


OBJECT_CHUNK_BYTES = 128 * 1024  # nats-py's and the Go client's default object chunk


async def upload(js: JetStreamContext, agent: str, payload: bytes) -> PayloadUpload:
    """Publish a payload in chunks on the agent's own payload subject; what the proposal names.

    The agent's credential may publish there and nowhere in the payload bucket: each chunk is an
    input like any other (stored in the agent input stream, never purged), and only the checker
    turns chunks into a stored object, after checking whose they are and their sha256. The
    subject keeps only its latest `topology.max_upload_chunks()` chunks: the checker refuses a
    proposal naming more, at once and naming the sizes.
    """
    subject = topology.payload_subject(agent)
    seqs: list[int] = []
    for start in range(0, len(payload), topology.PAYLOAD_CHUNK_BYTES):
        ack = await js.publish(subject, payload[start : start + topology.PAYLOAD_CHUNK_BYTES])
        seqs.append(ack.seq)
    return PayloadUpload(sha256=sha256(payload), size=len(payload), chunks=seqs)


async def put_object(js: JetStreamContext, name: str, data: bytes) -> None:
    """Store one object the way the object store protocol lays it out (chunks, then metadata),
    with the service credential.

    Not the client library's `put`: it sends its metadata with a `Nats-Rollup` header and purges
    a replaced object's chunks, and the payload bucket allows neither. Names are unique per
    content (and lease), so an object is written once and never replaced.
    """
    bucket = topology.PAYLOAD_BUCKET
    nuid = uuid.uuid4().hex
    chunks = 0
    for start in range(0, len(data), OBJECT_CHUNK_BYTES):
        await js.publish(f"$O.{bucket}.C.{nuid}", data[start : start + OBJECT_CHUNK_BYTES])
        chunks += 1
    info = js_api.ObjectInfo(
        name=name,
        bucket=bucket,
        nuid=nuid,
        size=len(data),
        chunks=chunks,
        mtime=datetime.now(UTC).isoformat(),
        digest="SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode(),
        options=js_api.ObjectMetaOptions(max_chunk_size=OBJECT_CHUNK_BYTES),
    )
    meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    await js.publish(meta_subject, json.dumps(info.as_dict()).encode())


@dataclass(frozen=True)
class Resolved:
    proposal: Propose  # with the payload merged in
    object_name: str  # the record object (see the module's docstring); "" when kept inline
    object_size: int  # bytes received beside the message: an upload's size, 0 for inline
    object_hash: str  # sha256 of the record (object or inline)
    record: str = ""  # the record itself, when small enough to keep in the event


def _too_large(size: int, chunks: int) -> str:
    ring = topology.max_upload_chunks()
    return (
        f"payload is {size} bytes ({chunks} chunks of {topology.PAYLOAD_CHUNK_BYTES}); the limit is "
        f"{topology.max_proposal_bytes()} bytes: the payload subject keeps only its latest {ring} "
        f"chunks (WARDEN_AGENT_INPUT_PER_SUBJECT), and WARDEN_MAX_PROPOSAL_BYTES may lower it"
    )


async def get_object(js: JetStreamContext, name: str) -> bytes | None:
    store = await js.object_store(topology.PAYLOAD_BUCKET)
    try:
        return (await store.get(name)).data or b""
    except ObjectNotFoundError:
        return None


async def _keep(js: JetStreamContext, name: str, data: bytes) -> None:
    """Store `data` as object `name` unless a redelivery's first attempt already did."""
    stored = await get_object(js, name)
    if stored is not None:
        if sha256(stored) != sha256(data):
            raise PayloadProblem(f"stored object {name!r} does not match its name")
        return
    try:
        await put_object(js, name, data)
    except APIError as exc:  # the bucket is full (it discards nothing, refuses new)
        raise PayloadProblem(f"payload bucket refused the object: {exc.description}") from None


async def _keep_record(js: JetStreamContext, agent: str, body: Propose) -> tuple[str, str]:
    """Store the proposal message itself as its record object; its name and sha256."""
    record = msgspec.json.encode(body)
    digest = sha256(record)
    name = topology.payload_object_name(agent, body.job_id, body.epoch, digest)
    await _keep(js, name, record)
    return name, digest


def merge(body: Propose, payload: bytes) -> Propose:
    try:
        part = decode_input(payload, ProposalPayload)
    except InvalidInput as exc:
        raise PayloadProblem(f"payload is not a proposal payload: {exc}") from None
    return replace(body, patch=part.patch, files=part.files, output=part.output, evidence=part.evidence)


async def _assemble(js: JetStreamContext, agent: str, upload: PayloadUpload) -> bytes:
    """The uploaded chunks, in order, each checked to be this agent's payload chunk."""
    subject = topology.payload_subject(agent)
    parts: list[bytes] = []
    total = 0
    for seq in upload.chunks:
        try:
            raw = await js.get_msg(topology.AGENT_INPUT_STREAM, seq=seq, direct=True)
        except NotFoundError:
            raise PayloadProblem(
                f"payload chunk {seq} is not in {topology.AGENT_INPUT_STREAM} (never stored, aged out, "
                f"or evicted by newer chunks: the subject keeps its latest {topology.max_upload_chunks()})"
            ) from None
        if raw.subject != subject:
            # Only this agent's credential can publish on its payload subject: anything else is
            # another agent's or a different kind of input, never part of this payload.
            raise PayloadProblem(f"input message {seq} is on {raw.subject}, not a payload chunk on {subject}")
        data = raw.data or b""
        total += len(data)
        if total > upload.size:
            raise PayloadProblem(f"payload chunks hold more than the declared {upload.size} bytes")
        parts.append(data)
    if total != upload.size:
        raise PayloadProblem(f"payload chunks hold {total} bytes, not the declared {upload.size}")
    return b"".join(parts)


async def resolve(js: JetStreamContext, agent: str, body: Propose, *, limit: int | None = None) -> Resolved:
    """The whole proposal, kept: its record object stored (see the module's docstring), and an
    uploaded payload verified and stored as the object `<agent>/<job>/<epoch>/<sha256>` (on a
    redelivery both are already stored: read back, verified). Service credential only."""
    upload = body.payload
    if upload is None:
        record = msgspec.json.encode(body)
        if len(record) <= topology.INLINE_RECORD_BYTES:
            return Resolved(body, "", 0, sha256(record), record.decode())
        name, digest = await _keep_record(js, agent, body)
        return Resolved(body, name, 0, digest)
    if has_inline_payload(body):
        raise PayloadProblem("a proposal uploads its payload or carries it inline, not both")
    limit = topology.max_proposal_bytes() if limit is None else limit
    if upload.size > limit or len(upload.chunks) > topology.max_upload_chunks():
        raise PayloadProblem(_too_large(upload.size, len(upload.chunks)))
    payload_name = topology.payload_object_name(agent, body.job_id, body.epoch, upload.sha256)
    stored = await get_object(js, payload_name)
    if stored is not None:  # a redelivery: stored by the first attempt (its chunks may be gone)
        if sha256(stored) != upload.sha256:
            raise PayloadProblem(f"stored payload object {payload_name!r} does not match its name")
        merged = merge(body, stored)
    else:
        data = await _assemble(js, agent, upload)
        if sha256(data) != upload.sha256:
            raise PayloadProblem(
                f"payload chunks hold bytes whose sha256 is {sha256(data)}, not {upload.sha256}"
            )
        merged = merge(body, data)  # before storing: an undecodable payload is not kept
        await _keep(js, payload_name, data)
    name, digest = await _keep_record(js, agent, body)
    return Resolved(merged, name, upload.size, digest)


async def read_stored(js: JetStreamContext, state: ProposalState) -> Propose:
    """The proposal as recorded, verified: from its record object, or its input message."""
    return await read_recorded(
        js,
        agent=state.agent,
        input_seq=state.input_seq,
        content_hash=state.content_hash,
        payload_object=state.payload_object,
        payload_hash=state.payload_hash,
        record=state.record,
    )


async def _input_message(js: JetStreamContext, seq: int, content_hash: str) -> bytes:
    """A proposal message recorded before record objects existed: in the agent input stream, or,
    recorded before that stream existed, in WARDEN_INPUT; the recorded sha256 says which."""
    for stream in (topology.AGENT_INPUT_STREAM, topology.INPUT_STREAM):
        try:
            raw = await js.get_msg(stream, seq=seq, direct=True)
        except NotFoundError:
            continue
        if sha256(raw.data or b"") == content_hash:
            return raw.data or b""
    raise PayloadProblem(f"input message {seq} is gone or no longer matches the recorded hash")


async def read_recorded(
    js: JetStreamContext,
    *,
    agent: str,
    input_seq: int,
    content_hash: str,
    payload_object: str,
    payload_hash: str,
    message: bytes | None = None,
    record: str = "",
) -> Propose:
    """The proposal a `proposal.submitted` names, verified against its hashes. `message`: its input
    message when the caller already read it (only used without a record object); `record`: the
    record the event keeps inline, if it does."""
    if record:
        if sha256(record.encode()) != payload_hash:
            raise PayloadProblem("the proposal's inline record no longer matches its recorded hash")
        return decode_input(record.encode(), Propose)
    legacy_payload: bytes | None = None
    if payload_object:
        data = await get_object(js, payload_object)
        if data is None:
            raise PayloadProblem(f"payload object {payload_object!r} is gone")
        if sha256(data) != payload_hash:
            raise PayloadProblem(f"payload object {payload_object!r} no longer matches its recorded hash")
        try:
            body = decode_input(data, Propose)
        except InvalidInput:
            legacy_payload = data  # recorded before record objects: the uploaded payload itself
        else:
            return await _with_payload(js, agent, body)
    if message is None or sha256(message) != content_hash:
        message = await _input_message(js, input_seq, content_hash)
    body = decode_input(message, Propose)
    return body if legacy_payload is None else merge(body, legacy_payload)


async def _with_payload(js: JetStreamContext, agent: str, body: Propose) -> Propose:
    upload = body.payload
    if upload is None:
        return body
    name = topology.payload_object_name(agent, body.job_id, body.epoch, upload.sha256)
    payload = await get_object(js, name)
    if payload is None:
        raise PayloadProblem(f"payload object {name!r} is gone")
    if sha256(payload) != upload.sha256 or len(payload) != upload.size:
        raise PayloadProblem(f"payload object {name!r} no longer matches the proposal's sha256 and size")
    return merge(body, payload)
