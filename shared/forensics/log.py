"""Reading the record straight from the streams, read-only: no application, no view, no projection.

Forensics must answer from the log alone, so everything here reads stored messages exactly as
the server holds them (bytes, stream sequence, stored time) and never writes. Reads use ordered
push consumers with a callback (4-5x faster than fetch) bounded by the last matching sequence,
found first with a direct get, so a read of a quiet subject ends at once instead of waiting.
The input stream is read by batched direct gets instead: no consumer (see `_scan_direct`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any
from uuid import UUID

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError

from shared import topology
from shared.events import AnyEvent, unpack
from shared.events import decode as decode_event
from shared.persistence import written

# Event subjects have exactly one token after the root (`warden.evt.<aggregate id>`); tracking
# records and snapshots have more, so this filter reads events only.
EVENT_SUBJECTS = f"{topology.EVENT_ROOT}.*"
READ_TIMEOUT_S = 60.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class LogUnavailable(RuntimeError):
    """Raised when the server holds no Warden streams (wrong server, or never started)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One message as the stream stores it."""

    stream: str
    seq: int
    subject: str
    time_ns: int
    data: bytes
    # As stored; None when not known (a record built from a copy, which keeps no headers).
    headers: Mapping[str, str] | None = None

    @property
    def time(self) -> datetime:
        """Stored time at microsecond precision (exact from the integer, never via a float)."""
        return _EPOCH + timedelta(microseconds=self.time_ns // 1000)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class LoggedEvent:
    """A stored message on an aggregate's subject, and the Warden event it is: None when it is
    not one, and then `foreign` says why (see shared/persistence/written.py).

    One event of a packed record (several events of one aggregate in one message) is logged
    with the record's sequence, subject and time, and its own bytes as `data` (what its hash
    is taken of); `ordinal` is its place in the record."""

    stored: Stored
    event: AnyEvent | None
    foreign: str = ""
    ordinal: int = 0

    @property
    def seq(self) -> int:
        return self.stored.seq

    @property
    def subject(self) -> str:
        return self.stored.subject

    @property
    def time(self) -> datetime:
        return self.stored.time

    @property
    def aggregate(self) -> str:
        return self.stored.subject.rsplit(".", 1)[-1]

    @cached_property
    def hash(self) -> str:
        """The ledger hash: sha256 of the bytes as stored (what the next event's prev_hash names)."""
        return self.stored.sha256


def as_events(stored: Stored) -> list[LoggedEvent]:
    """The events a stored message holds (a packed record's several), or one LoggedEvent
    naming why it is foreign. A message without headers (from a copy) is read by its bytes."""
    if stored.headers is not None:
        found = written.written_of(stored.subject, stored.headers, stored.data)
        if isinstance(found, str):
            return [LoggedEvent(stored, None, found)]
        if len(found) == 1:
            return [LoggedEvent(stored, found[0].event)]
        return [LoggedEvent(replace(stored, data=w.data), w.event, ordinal=i) for i, w in enumerate(found)]
    try:
        elements = unpack(stored.data)
        decoded = [(element, decode_event(element)) for element in elements]
    except msgspec.DecodeError as exc:
        return [LoggedEvent(stored, None, f"a payload that is not a Warden event ({exc})")]
    if len(decoded) == 1:
        return [LoggedEvent(stored, decoded[0][1])]
    return [LoggedEvent(replace(stored, data=d), e, ordinal=i) for i, (d, e) in enumerate(decoded)]


def is_aggregate_subject(subject: str) -> bool:
    """True for `warden.evt.<uuid>`: one aggregate's events (not tracking or snapshots)."""
    prefix = topology.EVENT_ROOT + "."
    if not subject.startswith(prefix) or "." in subject[len(prefix) :]:
        return False
    try:
        UUID(subject[len(prefix) :])
    except ValueError:
        return False
    return True


def _position(msg: Msg) -> tuple[int, int]:
    """(stream sequence, stored time in ns) from the delivery's reply subject, without floats."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>
        return int(tokens[5]), int(tokens[7])
    return int(tokens[Msg.Ack.StreamSeq]), int(tokens[Msg.Ack.Timestamp])


async def last_seq(js: JetStreamContext, stream: str, subject: str) -> int:
    """The stream sequence of the last message on `subject` (wildcards allowed), 0 when none."""
    try:
        raw = await js.get_last_msg(stream, subject, direct=True)
    except NotFoundError:
        return 0
    except APIError as exc:
        raise LogUnavailable(f"cannot read stream {stream}: {exc}") from exc
    except NatsTimeout as exc:
        raise LogUnavailable(
            f"no answer from stream {stream} (does this server hold Warden's streams?)"
        ) from exc
    return int(raw.seq or 0)


async def check_streams(js: JetStreamContext) -> None:
    """Fail with a plain message when this server has no Warden streams; never create them."""
    for stream in (topology.EVENT_STREAM, topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM):
        try:
            await js.stream_info(stream)
        except NotFoundError:
            raise LogUnavailable(
                f"this server has no stream {stream}: it does not hold a Warden log "
                "(point --nats at the right server)"
            ) from None


async def scan(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    start_seq: int = 1,
    keep: Callable[[Stored], bool] | None = None,
    stop: Callable[[Stored], bool] | None = None,
    timeout: float = READ_TIMEOUT_S,
) -> list[Stored]:
    """Messages on `subject` from `start_seq`, in stream order, as they stand now.

    `keep` filters; `stop` ends the read at the first message it is true for (that message
    excluded). The read ends at the last matching message that existed when it began.
    """
    target = await last_seq(js, stream, subject)
    found: list[Stored] = []
    if target < max(start_seq, 1):
        return found
    if stream in (topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM):
        return await _scan_direct(js, stream, subject, start_seq, target, keep, stop, timeout)
    done = anyio.Event()

    async def cb(msg: Msg) -> None:
        if done.is_set():
            return
        seq, ns = _position(msg)
        record = Stored(stream, seq, msg.subject, ns, msg.data, dict(msg.headers or {}))
        if stop is not None and stop(record):
            done.set()
            return
        if keep is None or keep(record):
            found.append(record)
        if seq >= target:
            done.set()

    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        cb=cb,
        deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
        config=js_api.ConsumerConfig(opt_start_seq=max(start_seq, 1)),
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    try:
        with anyio.fail_after(timeout):
            await done.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
    return found


# One batched direct get asks for this many messages (and at most this many bytes) at a time.
DIRECT_BATCH = 256
DIRECT_BATCH_BYTES = 8 * 1024 * 1024


async def _scan_direct(
    js: JetStreamContext,
    stream: str,
    subject: str,
    start_seq: int,
    target: int,
    keep: Callable[[Stored], bool] | None,
    stop: Callable[[Stored], bool] | None,
    timeout: float,
) -> list[Stored]:
    """`scan` by batched direct gets: no consumer. The input streams are read this way because the
    operator credential may create no consumer on them (a create request names its consumer in
    its body, so it could name a service's durable and rewrite it: see shared/credentials.py)."""
    nc = js._nc
    api = f"{js._prefix}.DIRECT.GET.{stream}"
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: list[Stored] = []
    seq = max(start_seq, 1)
    try:
        with anyio.fail_after(timeout):
            while seq <= target:
                request = {
                    "seq": seq,
                    "next_by_subj": subject,
                    "batch": DIRECT_BATCH,
                    "max_bytes": DIRECT_BATCH_BYTES,
                }
                await nc.publish(api, msgspec.json.encode(request), reply=inbox)
                while True:
                    msg = await sub.next_msg(timeout=timeout)
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status == "404":  # nothing on the subject from `seq` on
                        return found
                    if status == "204":  # end of this batch
                        break
                    if status:
                        raise LogUnavailable(f"direct get on {stream} answered {status}: {msg.data!r}")
                    record = Stored(
                        stream,
                        int(headers["Nats-Sequence"]),
                        str(headers["Nats-Subject"]),
                        _parse_ns(str(headers.get("Nats-Time-Stamp", ""))),
                        msg.data,
                    )
                    if record.seq > target or (stop is not None and stop(record)):
                        return found
                    if keep is None or keep(record):
                        found.append(record)
                    seq = record.seq + 1
    except NatsTimeout as exc:
        raise LogUnavailable(f"no answer from stream {stream} within {timeout}s") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
    return found


async def get(js: JetStreamContext, stream: str, seq: int) -> Stored | None:
    """One stored message by sequence (a direct get), None when there is none."""
    if seq <= 0:
        return None
    try:
        raw = await js.get_msg(stream, seq, direct=True)
    except NotFoundError:
        return None
    headers: dict[str, Any] = dict(raw.headers or {})
    stamp = headers.get("Nats-Time-Stamp", "")
    return Stored(stream, int(raw.seq or seq), str(raw.subject), _parse_ns(stamp), raw.data or b"", headers)


async def get_many(
    js: JetStreamContext, stream: str, seqs: Iterable[int], *, width: int = 32
) -> dict[int, Stored]:
    """Several messages by sequence, `width` direct gets in flight at a time."""
    wanted = sorted({s for s in seqs if s > 0})
    out: dict[int, Stored] = {}
    limiter = anyio.CapacityLimiter(width)

    async def one(seq: int) -> None:
        async with limiter:
            record = await get(js, stream, seq)
        if record is not None:
            out[seq] = record

    async with anyio.create_task_group() as tg:
        for seq in wanted:
            tg.start_soon(one, seq)
    return out


def _parse_ns(stamp: str) -> int:
    """RFC 3339 with up to nanoseconds (the Nats-Time-Stamp header) as integer nanoseconds."""
    if not stamp:
        return 0
    text = stamp.replace("Z", "+00:00")
    frac_ns = 0
    if "." in text:
        head, rest = text.split(".", 1)
        digits = ""
        for ch in rest:
            if not ch.isdigit():
                break
            digits += ch
        tz = rest[len(digits) :]
        frac_ns = int(digits[:9].ljust(9, "0"))
        text = head + tz
    whole = datetime.fromisoformat(text).astimezone(UTC)
    return int((whole - _EPOCH).total_seconds()) * 1_000_000_000 + frac_ns


async def read_events(
    js: JetStreamContext,
    subject: str = EVENT_SUBJECTS,
    *,
    until_seq: int | None = None,
    until: datetime | None = None,
    start_seq: int = 1,
) -> list[LoggedEvent]:
    """Every event on `subject` (default: every aggregate), stored up to a sequence or a time."""

    def beyond(record: Stored) -> bool:
        if until_seq is not None and record.seq > until_seq:
            return True
        return until is not None and record.time > until

    stored = await scan(js, topology.EVENT_STREAM, subject, start_seq=start_seq, stop=beyond)
    return [e for s in stored if is_aggregate_subject(s.subject) for e in as_events(s)]


async def job_events(js: JetStreamContext, job_id: UUID) -> list[LoggedEvent]:
    return await read_events(js, topology.event_subject(job_id))
