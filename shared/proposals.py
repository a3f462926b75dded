"""Where a proposal's bytes live and how they are read back, verified, every time.

A proposal is an input message on `warden.in.agent.<name>.propose`, stored in the input stream
exactly as received. When its payload (a diff of several MB, many files) would make the message
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

The checker records the object's name and sha256 in `proposal.submitted`; the applier reads the
message back from the input stream and the object from the bucket, and refuses both unless their
hashes match the record, so what is applied is exactly what was checked.
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
    input like any other (stored, bounded with the input stream, never purged), and only the
    checker turns chunks into a stored object, after checking whose they are and their sha256.
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
    object_name: str
    object_size: int
    object_hash: str


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
            raw = await js.get_msg(topology.INPUT_STREAM, seq=seq, direct=True)
        except NotFoundError:
            raise PayloadProblem(
                f"payload chunk {seq} is not in the input stream (never stored, or aged out)"
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
    """The whole proposal: inline, or with its uploaded payload verified and stored as an object
    named `<agent>/<job>/<epoch>/<sha256>` (already stored on a redelivery: read back, verified)."""
    upload = body.payload
    if upload is None:
        return Resolved(body, "", 0, "")
    if has_inline_payload(body):
        raise PayloadProblem("a proposal uploads its payload or carries it inline, not both")
    limit = topology.max_proposal_bytes() if limit is None else limit
    if upload.size > limit:
        raise PayloadProblem(
            f"payload is {upload.size} bytes; the limit is {limit} bytes (WARDEN_MAX_PROPOSAL_BYTES)",
        )
    name = topology.payload_object_name(agent, body.job_id, body.epoch, upload.sha256)
    store = await js.object_store(topology.PAYLOAD_BUCKET)
    stored: bytes | None
    try:
        stored = (await store.get(name)).data or b""
    except ObjectNotFoundError:
        stored = None
    if stored is not None:  # a redelivery: stored by the first attempt, read back and checked
        if sha256(stored) != upload.sha256:
            raise PayloadProblem(f"stored payload object {name!r} does not match its name")
        return Resolved(merge(body, stored), name, len(stored), upload.sha256)
    data = await _assemble(js, agent, upload)
    if sha256(data) != upload.sha256:
        raise PayloadProblem(f"payload chunks hold bytes whose sha256 is {sha256(data)}, not {upload.sha256}")
    merged = merge(body, data)  # before storing: an undecodable payload is not kept
    try:
        await put_object(js, name, data)
    except APIError as exc:  # the bucket is full (it discards nothing, refuses new)
        raise PayloadProblem(f"payload bucket refused the object: {exc.description}") from None
    return Resolved(merged, name, len(data), upload.sha256)


async def read_stored(js: JetStreamContext, state: ProposalState) -> Propose:
    """The proposal as recorded: read back from the input stream (and object store), verified."""
    raw = await js.get_msg(topology.INPUT_STREAM, seq=state.input_seq, direct=True)
    data = raw.data or b""
    if sha256(data) != state.content_hash:
        raise PayloadProblem(f"input message {state.input_seq} no longer matches the recorded hash")
    body = decode_input(data, Propose)
    if not state.payload_object:
        return body
    store = await js.object_store(topology.PAYLOAD_BUCKET)
    try:
        payload = (await store.get(state.payload_object)).data or b""
    except ObjectNotFoundError:
        raise PayloadProblem(f"payload object {state.payload_object!r} is gone") from None
    if sha256(payload) != state.payload_hash:
        raise PayloadProblem(f"payload object {state.payload_object!r} no longer matches its recorded hash")
    return merge(body, payload)
