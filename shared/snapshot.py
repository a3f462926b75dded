"""Snapshots of a services' view: its live set and the stream position it reflects.

A process that starts loads the newest snapshot and folds only the tail of the event stream
after it, instead of the whole history: time to serving is bounded by what is live and by how
far the log moved since the last checkpoint, not by the log's length.

Snapshots are disposable. The log stays the truth: a snapshot that does not decode, whose
format is unknown, or whose types have changed shape since it was written (a field added to
`Job`) is ignored, and the process folds the whole stream as before, then writes a new one.
Folding is idempotent by aggregate version, so a snapshot that holds an event past its
position (a service's own save, folded before the stream delivered it) folds the same.

They live in an object store bucket (topology.SNAPSHOT_BUCKET, written by the service
credential only), one object per kind of view: a view with folded states registered (the
revoker's authority record) is a different object from one without, so a process never loads
a snapshot that lacks state it folds.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from functools import cache

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError

from shared import topology
from shared.aggregates import Agent, Job

log = logging.getLogger("warden.snapshot")

# Bumped when the snapshot's own layout changes; a snapshot of any other format is ignored.
FORMAT = 1


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    # A fingerprint of the types it holds: a snapshot of a Job of another shape is ignored.
    shape: str
    # The last stream sequence the view had folded: a restart folds from position + 1.
    position: int
    taken_at: datetime
    jobs: list[Job]
    agents: list[Agent]
    # Registered folded states (Views.register), each encoded by its owner.
    folded: dict[str, bytes] = msgspec.field(default_factory=dict)


@cache
def shape() -> str:
    """The types' JSON Schema, hashed: it changes whenever a field is added, removed or retyped."""
    schema = msgspec.json.encode(msgspec.json.schema_components((Snapshot,)))
    return hashlib.sha256(schema).hexdigest()[:16]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


class _Envelope(msgspec.Struct):
    format: int
    shape: str


_envelope = msgspec.msgpack.Decoder(_Envelope)


def encode(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode(data: bytes) -> Snapshot | None:
    """The snapshot, or None (said why) when it cannot be trusted to mean what the code means."""
    try:
        head = _envelope.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("ignoring a snapshot that does not decode (%s): folding the whole log", exc)
        return None
    if head.format != FORMAT or head.shape != shape():
        log.info(
            "ignoring a snapshot of format %s/%s (this code writes %s/%s): folding the whole log",
            head.format,
            head.shape,
            FORMAT,
            shape(),
        )
        return None
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("ignoring a snapshot that does not decode (%s): folding the whole log", exc)
        return None


def object_name(folded: list[str]) -> str:
    """One object per kind of view: named by the folded states it carries."""
    return "+".join(["view", *sorted(folded)])


async def write(js: JetStreamContext, name: str, data: bytes) -> None:
    store = await js.object_store(topology.SNAPSHOT_BUCKET)
    await store.put(name, data)


async def read(js: JetStreamContext, name: str) -> bytes | None:
    """The stored snapshot's bytes, or None when there is none (or no bucket yet)."""
    try:
        store = await js.object_store(topology.SNAPSHOT_BUCKET)
        result = await store.get(name)
    except (BucketNotFoundError, ObjectNotFoundError, NotFoundError):
        return None
    return result.data
