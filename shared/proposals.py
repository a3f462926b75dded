"""Where a proposal's bytes live and how they are read back, verified, every time.

A proposal is an input message on `warden.in.agent.<name>.propose`, stored in the input stream
exactly as received. When its payload (a diff of several MB, many files) would make the message
larger than `topology.INLINE_PROPOSAL_BYTES`, the SDK first puts the payload into the
`topology.PAYLOAD_BUCKET` object store, named `<agent>/<job>/<epoch>/<sha256>`, and the message
names it in `payload_object`. Limits:

- an input message larger than `topology.MAX_INPUT_BYTES` (1 MB) is refused by the checker and
  recorded as `input.rejected` (a raw client that skips the SDK meets this);
- nothing larger than the server's `max_payload` (8 MB in Warden's configs) can be published at
  all: the client library refuses it before anything is stored, so nothing can be recorded;
- a payload object larger than `topology.max_proposal_bytes()` (64 MB unless
  WARDEN_MAX_PROPOSAL_BYTES says otherwise) is not read: the proposal is recorded as submitted
  with its size and then rejected with a violation naming both sizes.

The checker records the object's sha256 in `proposal.submitted`; the applier reads the message
back from the input stream and the object from the bucket, and refuses both unless their hashes
match the record, so what is applied is exactly what was checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import msgspec
from msgspec.structs import replace
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import ObjectNotFoundError

from shared import topology
from shared.aggregates import ProposalState
from shared.messages import ProposalPayload, Propose, decode_input
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


CHUNK_BYTES = 128 * 1024  # nats-py's and the Go client's default object chunk


async def put_payload(js: JetStreamContext, agent: str, job_id: UUID, epoch: int, payload: bytes) -> str:
    """Store a payload object named by its sender, lease and sha256; returns the name.

    Written the way the object store protocol lays objects out (chunks, then one metadata
    message rolling up its subject), but without the client library's `put`, which first
    reads the bucket: an agent's credentials may write payloads, never read anyone's. The
    name is unique per content and lease, so nothing older needs purging.
    """
    digest = hashlib.sha256(payload).digest()
    name = topology.payload_object_name(agent, job_id, epoch, digest.hex())
    bucket = topology.PAYLOAD_BUCKET
    nuid = uuid.uuid4().hex
    chunks = 0
    for start in range(0, len(payload), CHUNK_BYTES):
        await js.publish(f"$O.{bucket}.C.{nuid}", payload[start : start + CHUNK_BYTES])
        chunks += 1
    info = js_api.ObjectInfo(
        name=name,
        bucket=bucket,
        nuid=nuid,
        size=len(payload),
        chunks=chunks,
        mtime=datetime.now(UTC).isoformat(),
        digest="SHA-256=" + base64.urlsafe_b64encode(digest).decode(),
        options=js_api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES),
    )
    meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    await js.publish(meta_subject, json.dumps(info.as_dict()).encode(), headers={"Nats-Rollup": "sub"})
    return name


@dataclass(frozen=True)
class Resolved:
    proposal: Propose  # with the payload merged in
    object_size: int
    object_hash: str


def merge(body: Propose, payload: bytes) -> Propose:
    try:
        part = decode_input(payload, ProposalPayload)
    except InvalidInput as exc:
        raise PayloadProblem(f"payload object is not a proposal payload: {exc}") from None
    return replace(body, patch=part.patch, files=part.files, output=part.output, evidence=part.evidence)


async def resolve(js: JetStreamContext, agent: str, body: Propose, *, limit: int | None = None) -> Resolved:
    """The whole proposal: inline, or with its object read, size-checked and hash-verified."""
    name = body.payload_object
    if not name:
        return Resolved(body, 0, "")
    if has_inline_payload(body):
        raise PayloadProblem("a proposal names a payload_object or carries its payload inline, not both")
    prefix = topology.payload_object_name(agent, body.job_id, body.epoch, "")
    if not name.startswith(prefix) or len(name) != len(prefix) + 64:
        raise PayloadProblem(f"payload object {name!r} is not named {prefix}<sha256> for this lease")
    store = await js.object_store(topology.PAYLOAD_BUCKET)
    try:
        info = await store.get_info(name)
    except ObjectNotFoundError:
        raise PayloadProblem(f"payload object {name!r} does not exist") from None
    size = int(info.size or 0)
    limit = topology.max_proposal_bytes() if limit is None else limit
    if size > limit:
        raise PayloadProblem(
            f"payload object is {size} bytes; the limit is {limit} bytes (WARDEN_MAX_PROPOSAL_BYTES)",
        )
    data = (await store.get(name)).data or b""
    digest = sha256(data)
    if digest != name[len(prefix) :]:
        raise PayloadProblem(f"payload object {name!r} holds bytes whose sha256 is {digest}")
    return Resolved(merge(body, data), size, digest)


async def object_size(js: JetStreamContext, name: str) -> int:
    """Size of a stored payload object, 0 when it is missing (for the record of a refusal)."""
    store = await js.object_store(topology.PAYLOAD_BUCKET)
    try:
        return int((await store.get_info(name)).size or 0)
    except ObjectNotFoundError:
        return 0


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
