"""eventsourcing 9.5 persistence in JetStream: `PERSISTENCE_MODULE=shared.persistence.jetstream`.

Layout (all in one stream, `WARDEN_EVENTS` unless `WARDEN_EVENTS_STREAM` says otherwise):

- `<root>.<originator id>`: the events of one aggregate, one message each. The payload is
  `StoredEvent.state` unchanged; `Warden-Originator`, `Warden-Version` and `Warden-Topic`
  headers carry the rest. Notification ids are stream sequences (gaps are fine).
  A packed record (`write(..., packed=True)`, Warden's own saves) holds several consecutive
  events of one aggregate in one message: its payload the JSON array of their states
  (`shared.events.pack`), `Warden-Versions: <first>-<last>`, `Warden-Version` the last and
  `Warden-Topic` every topic in order, comma-separated. Its events share its stream sequence
  as notification id (`RecordNotification` tells them apart). Both forms are read everywhere.
- `<root>.<purpose>.<originator id>`: other aggregate sequences, e.g. snapshots.
- `<root>.tracking.<application name>`: tracking records (payload: the notification id).

A message on these subjects that this recorder did not write (no writer headers, headers that
name another aggregate, or a payload the `WARDEN_EVENT_CHECK` function refuses) is foreign: reads
step over it, and an aggregate's head is the last of *its own* records that continue its chain
(see `chain_of`), while the write still expects the subject's real last sequence, whatever
message holds it. So a foreign message never wedges an aggregate.

Concurrency control is the server's, not ours: a write expects the subject's last stream
sequence (`Nats-Expected-Last-Subject-Sequence`, 0 for an empty subject), so two writers of the
same aggregate version cannot both succeed, whatever their caches believed. Several messages in one call go in one atomic batch
(ADR-50), so events and their tracking record land together or not at all. Only the first
message per subject in a batch carries the expectation: nats-server 2.15 rejects the header on
any later message to a subject already written in the batch (error 10164, whatever the value),
and the batch is applied as a whole, so the first check covers the rest.

Reads use direct gets (batched, through the server's per-subject index). The recorders are
synchronous and run in worker threads; every NATS call goes through the process's `NatsBridge`
(see bridge.py), never from the loop thread.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import threading
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import nats.errors
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DataError,
    InfrastructureFactory,
    InfrastructureFactoryError,
    IntegrityError,
    Notification,
    OperationalError,
    ProcessRecorder,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT
from nats.js.errors import NotFoundError

from shared import topology
from shared.events import pack, unpack
from shared.persistence.bridge import BRIDGE_ENV, URL_ENV, NatsBridge, lookup

T = TypeVar("T")
R = TypeVar("R", bound="JetStreamRecorder")
log = logging.getLogger(__name__)

ORIGINATOR_HEADER = "Warden-Originator"
VERSION_HEADER = "Warden-Version"
TOPIC_HEADER = "Warden-Topic"
# On a packed record (several events of one aggregate in one message, see `write`): the versions
# it holds, "<first>-<last>"; VERSION_HEADER then names the last and TOPIC_HEADER every event's
# topic, in order, separated by TOPIC_SEPARATOR.
VERSIONS_HEADER = "Warden-Versions"
TOPIC_SEPARATOR = ","
TRACKING_HEADER = "Warden-Tracking"  # the application name, on tracking records
WRITE_HEADER = "Warden-Write"  # one id per insert call, to recognise our own write after a timeout
EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_STREAM = "Nats-Expected-Stream"
MSG_ID = "Nats-Msg-Id"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQ = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"

TRACKING = "tracking"
MAX_ATOMIC_BATCH = 1000  # nats-server's limit on one atomic batch (error 10199 above it)
READ_PAGE = 1000  # messages per batched direct get
MAX_ATTEMPTS = 5  # conflicts re-read and re-check; timeouts retry with the same expectations
DEFAULT_TIMEOUT_S = 5.0
# Server error code meaning "someone else wrote to this subject first".
WRONG_LAST_SEQUENCE = 10071
DUPLICATE_IN_BATCH = 10201
# A subscription stops taking messages from the consumer while this many wait to be iterated.
HIGH_WATER, LOW_WATER = 10_000, 1_000

_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def subject_token(text: str) -> str:
    """`text` as one subject token: kept if plain, else percent-encoded (so it stays unique)."""
    if _SAFE_TOKEN.fullmatch(text):
        return text
    encoded = "".join(
        c if _SAFE_TOKEN.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in text
    )
    return encoded or "%"


def _check_root(root: str) -> str:
    if not root or any(not _SAFE_TOKEN.fullmatch(part) for part in root.split(".")):
        raise InfrastructureFactoryError(f"subject root {root!r} must be plain dot-separated tokens")
    return root


@dataclass(frozen=True)
class StoredRecord:
    """One stored message as a read returns it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


def _raw_record(raw: js_api.RawStreamMsg) -> StoredRecord:
    assert raw.seq is not None
    return StoredRecord(raw.seq, str(raw.subject), raw.data or b"", dict(raw.headers or {}))


@dataclass(frozen=True)
class _Out:
    """One message to publish."""

    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class _Ack:
    seq: int = 0
    count: int = 1
    duplicate: bool = False
    error_code: int = 0
    description: str = ""

    @classmethod
    def parse(cls, data: bytes) -> _Ack:
        reply = json.loads(data)
        if error := reply.get("error"):
            return cls(error_code=int(error.get("err_code", 0)), description=error.get("description", ""))
        return cls(
            seq=int(reply["seq"]),
            count=int(reply.get("count", 1)),
            duplicate=bool(reply.get("duplicate", False)),
        )

    @property
    def ok(self) -> bool:
        return not self.error_code and not self.duplicate


@dataclass(frozen=True)
class Head:
    """A subject's head: the version (or tracked notification id) of the last record of ours
    that continues its chain, and the sequence of the subject's last message, whoever wrote it
    (what the server expects a write to name)."""

    value: int
    seq: int


# The values a record holds, first and last (its versions: several for a packed record; or a
# tracking record's notification id), when ours, else None.
Span = tuple[int, int]
ValueOf = Callable[[StoredRecord], Span | None]
# Why a stored event read back is not one this application wrote (None: it is).
EventCheck = Callable[[StoredEvent], str | None]


def chain_of(
    records: Sequence[StoredRecord], value_of: ValueOf, *, contiguous: bool
) -> tuple[list[StoredRecord], Head | None]:
    """The records of one subject (in stream order) that form its chain, and the subject's head.

    A record belongs to the chain when it is ours and continues it: its first value the next
    version for aggregate events (`contiguous`), a greater value otherwise. Everything else (a foreign
    message, a replayed copy of an old version) is stepped over. The head names the chain's
    last value but the subject's last sequence, so the next write lands after the foreign
    message instead of being refused for ever. None when the subject holds nothing.
    """
    chain: list[StoredRecord] = []
    last: int | None = None
    for record in records:
        span = value_of(record)
        if span is None:
            continue
        first, value = span
        if last is None or (first == last + 1 if contiguous else first > last):
            chain.append(record)
            last = value
    if not records:
        return chain, None
    return chain, Head(last or 0, records[-1].seq)


async def _io(awaitable: Awaitable[T]) -> T:
    """Await NATS I/O on the loop; its failures become eventsourcing's OperationalError (as
    `JetStreamIO.run` makes them for a worker thread)."""
    try:
        return await awaitable
    except (TimeoutError, nats.errors.Error) as exc:
        raise OperationalError(f"NATS request failed: {exc!r}") from exc


class JetStreamIO:
    """The recorders' NATS I/O. Every coroutine here runs on the bridge's loop."""

    def __init__(self, bridge: NatsBridge, stream: str, timeout: float) -> None:
        self.bridge = bridge
        self.stream = stream
        self.timeout = timeout
        # Direct-get replies share one wildcard inbox subscription, routed by token.
        self._inbox: str | None = None
        self._inbox_lock: asyncio.Lock | None = None
        self._pending: dict[str, tuple[asyncio.Future[list[StoredRecord]], list[StoredRecord], bool]] = {}
        self._tokens = itertools.count()
        # Live subscriptions, stopped when the factory closes (a reader blocked on one would
        # otherwise wait forever on a connection that is gone).
        self.subscriptions: weakref.WeakSet[JetStreamSubscription] = weakref.WeakSet()

    def run(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run on the loop from a worker thread; NATS failures become eventsourcing errors."""
        try:
            return self.bridge.call(factory, timeout=self.timeout * 2 + 1)
        except (TimeoutError, nats.errors.Error) as exc:
            raise OperationalError(f"NATS request failed: {exc!r}") from exc

    async def _reply_prefix(self) -> str:
        if self._inbox is None:
            self._inbox_lock = self._inbox_lock or asyncio.Lock()
            async with self._inbox_lock:
                if self._inbox is None:
                    prefix = self.bridge.nc.new_inbox() + "."
                    await self.bridge.nc.subscribe(prefix + "*", cb=self._on_reply)
                    self._inbox = prefix
        return self._inbox

    async def _on_reply(self, msg: Msg) -> None:
        assert self._inbox is not None
        pending = self._pending.get(msg.subject[len(self._inbox) :])
        if pending is None:
            return  # the caller gave up
        future, records, batched = pending
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            records.append(
                StoredRecord(int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data, headers)
            )
            if batched:
                return  # more until the end-of-batch status
        elif status not in ("204", "404"):  # 204: end of batch, 404: nothing (more) to read
            if not future.done():
                detail = headers.get("Description", "")
                future.set_exception(OperationalError(f"direct get failed: {status} {detail}"))
            return
        if not future.done():
            future.set_result(records)

    async def direct(self, request: dict[str, Any], *, batched: bool) -> list[StoredRecord]:
        """A direct get (served from the stream's store, bypassing the JetStream API)."""
        prefix = await self._reply_prefix()
        token = str(next(self._tokens))
        future: asyncio.Future[list[StoredRecord]] = asyncio.get_running_loop().create_future()
        self._pending[token] = (future, [], batched)
        try:
            await self.bridge.nc.publish(
                f"$JS.API.DIRECT.GET.{self.stream}", json.dumps(request).encode(), reply=prefix + token
            )
            return await asyncio.wait_for(future, self.timeout)
        finally:
            del self._pending[token]

    async def last(self, subject: str, *, consistent: bool = False) -> StoredRecord | None:
        """The last message on `subject` (wildcards allowed), or None.

        `consistent` reads through the stream leader: in a cluster a direct get may be answered
        by a replica that has not applied the latest write yet.
        """
        if not consistent:
            found = await self.direct({"last_by_subj": subject}, batched=False)
            return found[0] if found else None
        try:
            raw = await self.bridge.js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return None
        return _raw_record(raw)

    async def next_after(self, subject: str, seq: int) -> StoredRecord | None:
        """The first message on `subject` after stream sequence `seq`, read through the leader."""
        try:
            raw = await self.bridge.js.get_msg(self.stream, seq=seq + 1, subject=subject, next=True)
        except NotFoundError:
            return None
        return _raw_record(raw)

    async def scan_leader(self, subject: str, stop: int) -> list[StoredRecord]:
        """Every message on `subject` up to sequence `stop`, one get at a time through the leader
        (slow, but never behind: for a subject whose direct reads lag)."""
        found: list[StoredRecord] = []
        seq = 0
        while seq < stop and (record := await self.next_after(subject, seq)) is not None:
            if record.seq > stop:
                break
            found.append(record)
            seq = record.seq
        return found

    async def scan(
        self,
        subjects: str,
        start: int,
        *,
        limit: int | None = None,
        stop: int | None = None,
        keep: Callable[[StoredRecord], bool] | None = None,
    ) -> list[StoredRecord]:
        """Messages on `subjects` from sequence `start` (up to `stop`), in pages of direct gets."""
        found: list[StoredRecord] = []
        seq = max(start, 1)
        while limit is None or len(found) < limit:
            size = READ_PAGE if limit is None or keep else min(READ_PAGE, limit - len(found))
            if stop is not None:
                size = min(size, stop - seq + 1)
                if size <= 0:
                    break
            page = await self.direct({"seq": seq, "next_by_subj": subjects, "batch": size}, batched=True)
            for record in page:
                if stop is not None and record.seq > stop:
                    return found
                if keep is None or keep(record):
                    found.append(record)
                    if limit is not None and len(found) >= limit:
                        return found
            if not page or int(page[-1].headers.get("Nats-Num-Pending", "0")) == 0:
                break
            seq = page[-1].seq + 1
        return found

    async def ordered(
        self,
        subject: str,
        start: int,
        cb: Callable[[Msg], Awaitable[None]],
        *,
        pending_bytes_limit: int = DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
    ) -> Any:
        """An ordered consumer pushing the stream's messages on `subject` from sequence `start`
        to `cb`; its subscription, to unsubscribe. Flow control stalls the server only briefly:
        a consumer stalled for a heartbeat's interval is answered anyway, so a reader that must
        bound what it buffers stops the consumer (see readmodel.replay.OrderedPages).
        `pending_bytes_limit`: what the subscription may buffer (the client's default)."""
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
        )
        return await self.bridge.js.subscribe(
            subject,
            stream=self.stream,
            cb=cb,
            ordered_consumer=True,
            config=config,
            pending_bytes_limit=pending_bytes_limit,
        )

    async def publish(self, messages: Sequence[_Out]) -> _Ack:
        """One message as a normal publish; several as one atomic batch (ADR-50)."""
        nc = self.bridge.nc
        if len(messages) == 1:
            (only,) = messages
            reply = await nc.request(only.subject, only.data, timeout=self.timeout, headers=only.headers)
            return _Ack.parse(reply.data)
        batch_id = uuid.uuid4().hex
        for number, message in enumerate(messages[:-1], start=1):
            headers = {**message.headers, BATCH_ID: batch_id, BATCH_SEQ: str(number)}
            # No reply subject: the server reports any problem on the commit's reply.
            await nc.publish(message.subject, message.data, headers=headers)
        commit = messages[-1]
        headers = {
            **commit.headers,
            BATCH_ID: batch_id,
            BATCH_SEQ: str(len(messages)),
            BATCH_COMMIT: "1",
        }
        reply = await nc.request(commit.subject, commit.data, timeout=self.timeout, headers=headers)
        return _Ack.parse(reply.data)


@dataclass
class _Plan:
    """The messages of one insert call, and per subject the versions (or tracking ids) written."""

    write_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[_Out] = field(default_factory=list)
    values: dict[str, list[int]] = field(default_factory=dict)
    positions: dict[str, list[int]] = field(default_factory=dict)  # indexes into messages
    # Per event, in the order given, the index of the message holding it.
    holders: list[int] = field(default_factory=list)
    tracking_subject: str | None = None

    def add(self, message: _Out, values: Sequence[int]) -> None:
        self.values.setdefault(message.subject, []).extend(values)
        self.positions.setdefault(message.subject, []).append(len(self.messages))
        self.messages.append(message)


class JetStreamRecorder:
    """What every recorder here shares: subjects, the head cache and the write protocol."""

    def __init__(
        self,
        io: JetStreamIO,
        *,
        root: str,
        purpose: str = "events",
        uuid_ids: bool = True,
        check: EventCheck | None = None,
    ) -> None:
        self.io = io
        self.root = root
        self.purpose = purpose
        self.uuid_ids = uuid_ids
        # Aggregate events must be contiguous; snapshots (and other purposes) only increase.
        self.contiguous = purpose == "events"
        # The application's test of an event's payload against its headers (events only).
        self.check = check if purpose == "events" else None
        self.events_filter = f"{root}.*"  # event subjects only: other kinds have more tokens
        self._subject_prefix = f"{root}." if purpose == "events" else f"{root}.{purpose}."
        # originator subject -> last (version, stream sequence): saves a read before each write.
        self._heads: OrderedDict[str, Head] = OrderedDict()
        self._heads_lock = threading.Lock()
        self._heads_max = 10_000

    # -- subjects and messages ------------------------------------------------------------

    def _id_text(self, originator_id: UUID | str) -> str:
        if not self.uuid_ids:
            return str(originator_id)
        try:
            return str(originator_id if isinstance(originator_id, UUID) else UUID(originator_id))
        except ValueError:
            raise DataError(f"originator id {originator_id!r} is not a UUID") from None

    def _id_value(self, text: str) -> UUID | str:
        return UUID(text) if self.uuid_ids else text

    def subject(self, originator_id: UUID | str) -> str:
        return self._subject_prefix + subject_token(self._id_text(originator_id))

    def tracking_subject(self, application_name: str) -> str:
        return f"{self.root}.{TRACKING}.{subject_token(application_name)}"

    def _plan(self, events: Sequence[StoredEvent], tracking: Tracking | None, *, packed: bool) -> _Plan:
        plan = _Plan()
        # Packed: one message per aggregate, at the place of its first event.
        held: dict[str, int] = {}  # subject -> index of its message, when packed
        messages: list[tuple[str, list[StoredEvent]]] = []
        for event in events:
            subject = self.subject(event.originator_id)
            at = held.get(subject) if packed else None
            if at is None:
                at = held[subject] = len(messages)
                messages.append((subject, []))
            messages[at][1].append(event)
            plan.holders.append(at)
        for subject, group in messages:
            plan.add(self._message(subject, group), [e.originator_version for e in group])
        if tracking is not None:
            subject, number = self.tracking_subject(tracking.application_name), tracking.notification_id
            headers = {TRACKING_HEADER: tracking.application_name, MSG_ID: f"{subject}:{number}"}
            plan.add(_Out(subject, str(number).encode(), headers), [number])
            plan.tracking_subject = subject
        for subject, values in plan.values.items():
            steps = itertools.pairwise(values)
            if self.contiguous and subject != plan.tracking_subject:
                ok = all(b == a + 1 for a, b in steps)
            else:
                ok = all(b > a for a, b in steps)
            if not ok:
                raise IntegrityError(f"versions {values} for {subject} are not unique and in order")
        return plan

    def _message(self, subject: str, group: Sequence[StoredEvent]) -> _Out:
        """One aggregate's events as one message: packed when several (see `write`)."""
        first, last = group[0], group[-1]
        headers = {
            ORIGINATOR_HEADER: self._id_text(first.originator_id),
            VERSION_HEADER: str(last.originator_version),
            TOPIC_HEADER: TOPIC_SEPARATOR.join(e.topic for e in group),
            # Per stream, within the duplicate window: a retried write is not stored twice, and
            # a packed record takes its first version's id (that version is what it records).
            MSG_ID: f"{subject}:{first.originator_version}",
        }
        if len(group) == 1:
            return _Out(subject, first.state, headers)
        if any(TOPIC_SEPARATOR in e.topic for e in group):
            raise DataError(f"a topic naming {TOPIC_SEPARATOR!r} cannot be packed")
        headers[VERSIONS_HEADER] = f"{first.originator_version}-{last.originator_version}"
        body = pack([e.state for e in group])
        try:
            # Read back as every reader will (microseconds): a state that is not one JSON value
            # would make the whole record unreadable, so it is refused before it is stored.
            readable = unpack(body) == [e.state for e in group]
        except ValueError:
            readable = False
        if not readable:
            raise DataError(f"states packed into one record must each be one JSON value ({subject})")
        return _Out(subject, body, headers)

    def _with_expectations(self, plan: _Plan, heads: dict[str, Head | None]) -> list[_Out]:
        messages = list(plan.messages)
        for subject, positions in plan.positions.items():
            head = heads[subject]
            first = messages[positions[0]]
            expected = {EXPECTED_SUBJECT_SEQ: str(head.seq if head else 0)}
            messages[positions[0]] = _Out(first.subject, first.data, first.headers | expected)
        first = messages[0]
        extra = {EXPECTED_STREAM: self.io.stream, WRITE_HEADER: plan.write_id}
        messages[0] = _Out(first.subject, first.data, first.headers | extra)
        return messages

    def _problem(self, plan: _Plan, heads: dict[str, Head | None]) -> str | None:
        for subject, values in plan.values.items():
            head = heads[subject]
            if head is None:
                continue
            first = values[0]
            if self.contiguous and subject != plan.tracking_subject:
                if first != head.value + 1:
                    state = "already recorded" if first <= head.value else "not the next version"
                    return f"{subject}: version {first} is {state} (last is {head.value})"
            elif first <= head.value:
                return f"{subject}: {first} is not after the last recorded {head.value}"
        return None

    # -- heads ----------------------------------------------------------------------------

    def _value_of(self, record: StoredRecord) -> Span | None:
        """The versions (or tracked id) a record holds when this recorder wrote it, else None."""
        if TRACKING_HEADER in record.headers:
            try:
                number = int(record.data)
            except ValueError:
                return None
            return number, number
        events = self._stored_events(record)
        if not events:
            return None
        return events[0].originator_version, events[-1].originator_version

    def _chain(self, subject: str, records: Sequence[StoredRecord]) -> tuple[list[StoredRecord], Head | None]:
        # Tracking records only increase (a process may skip notifications of no interest).
        tracking = subject.startswith(f"{self.root}.{TRACKING}.")
        return chain_of(records, self._value_of, contiguous=self.contiguous and not tracking)

    def _remember(self, subject: str, head: Head) -> None:
        with self._heads_lock:
            known = self._heads.get(subject)
            if known is None or known.seq < head.seq:  # never move a head backwards
                self._heads[subject] = head
            self._heads.move_to_end(subject)
            while len(self._heads) > self._heads_max:
                self._heads.popitem(last=False)

    def _forget(self, subjects: Iterable[str]) -> None:
        with self._heads_lock:
            for subject in subjects:
                self._heads.pop(subject, None)

    async def _heads_for(
        self, values: dict[str, list[int]], *, fresh: bool, whole: bool = False
    ) -> dict[str, Head | None]:
        """Each subject's head (`values`: the values a write puts on each subject): from the
        cache, or with `fresh` read through the stream leader.

        A subject missing from the cache is taken to be empty without a read only when the write
        starts a new aggregate (version 1). Any other miss is read first: services write the
        next version of an aggregate they know from the event stream, not from a read through
        this recorder, so a write that expected an empty subject would always conflict, and
        every conflicting attempt is still delivered to core subscribers of the subject (a
        process writing a job it never wrote before published each event twice). The server's
        check still turns a wrong guess into a conflict, which reads and decides again.

        A fresh read takes the last message; when that is not ours (or with `whole`, when its
        value did not fit), the subject is read whole to find where its chain ends.
        """
        subjects = list(values)
        if fresh:
            return await self._read_heads(subjects, whole=whole)
        with self._heads_lock:
            heads = {subject: self._heads.get(subject) for subject in subjects}
        unknown = [s for s, head in heads.items() if head is None and not self._starts(s, values[s][0])]
        return heads | await self._read_heads(unknown, whole=False) if unknown else heads

    def _starts(self, subject: str, first: int) -> bool:
        """Whether writing `first` on `subject` starts a new aggregate (so it needs no head)."""
        return self.contiguous and first == 1 and not subject.startswith(f"{self.root}.{TRACKING}.")

    async def _read_heads(self, subjects: Sequence[str], *, whole: bool) -> dict[str, Head | None]:
        records = await _io(asyncio.gather(*(self.io.last(s, consistent=True) for s in subjects)))
        heads: dict[str, Head | None] = {}
        for subject, record in zip(subjects, records, strict=True):
            if record is None:
                heads[subject] = None
                continue
            span = None if whole else self._value_of(record)
            head = (
                Head(span[1], record.seq) if span is not None else await self._whole_head(subject, record.seq)
            )
            heads[subject] = head
            self._remember(subject, head)
        return heads

    async def _whole_head(self, subject: str, last_seq: int) -> Head:
        """The head of a subject whose last message (at `last_seq`) is foreign or out of its chain."""
        records = await _io(self.io.scan(subject, 1, stop=last_seq))
        if not records or records[-1].seq != last_seq:
            # A replica behind the leader answered the direct gets: read through the leader.
            records = await _io(self.io.scan_leader(subject, last_seq))
        _chain, head = self._chain(subject, records)
        assert head is not None  # the subject holds at least the message at last_seq
        return head

    # -- the write protocol ---------------------------------------------------------------

    def _write(self, events: Sequence[StoredEvent], tracking: Tracking | None = None) -> list[int]:
        """The write protocol for eventsourcing's synchronous callers (in a worker thread)."""
        # Bounded by the write's own attempts, each bounded by the I/O timeout.
        limit = (self.io.timeout * 2 + 1) * (MAX_ATTEMPTS + 2)
        try:
            return self.io.bridge.call(lambda: self.write(events, tracking), timeout=limit)
        except TimeoutError as exc:
            raise OperationalError(f"write did not finish within {limit}s: {exc}") from exc

    async def write(
        self, events: Sequence[StoredEvent], tracking: Tracking | None = None, *, packed: bool = False
    ) -> list[int]:
        """Append atomically, each subject expecting its last sequence; the events' sequences.

        Runs on the connection's loop: services call it there directly (no thread hop), and
        eventsourcing's synchronous path reaches it through `_write`.

        `packed` writes each aggregate's events as one message (a packed record, when several):
        its body the JSON array of their states (which must be JSON), `VERSIONS_HEADER` naming
        the versions it holds. One message costs 0.5 ms where an atomic batch costs 3-4 ms
        (nats-server builds a temporary store per batch), so a save of one aggregate's events
        needs no batch at all; one spanning aggregates is still one atomic batch.
        """
        plan = self._plan(events, tracking, packed=packed)
        if not plan.messages:
            return []
        if len(plan.messages) > MAX_ATOMIC_BATCH:
            raise DataError(f"at most {MAX_ATOMIC_BATCH} messages can be written atomically")
        heads: dict[str, Head | None] | None = None
        fresh = False  # read heads through the leader, ignoring the cache
        whole = False  # read the subjects whole: their last messages may be out of their chains
        unknown = False  # an earlier attempt timed out: it may have landed
        for _ in range(MAX_ATTEMPTS):
            if heads is None:
                heads = await self._heads_for(plan.values, fresh=fresh, whole=whole)
                if problem := self._problem(plan, heads):
                    if whole:
                        raise IntegrityError(problem)
                    # The cache may be stale: check the store; then, before refusing, read
                    # each subject whole (its last message may be a copy of an old version).
                    heads, whole, fresh = None, fresh, True
                    continue
            messages = self._with_expectations(plan, heads)
            try:
                ack = await asyncio.wait_for(self.io.publish(messages), self.io.timeout * 2 + 1)
            except nats.errors.NoRespondersError as exc:
                raise OperationalError(
                    f"no stream stores {messages[0].subject}: does stream {self.io.stream} "
                    "exist (shared.topology.ensure creates it)?"
                ) from exc
            except TimeoutError:  # nats.errors.TimeoutError is one too
                # Unknown outcome. Retrying with the same expected sequences cannot apply twice:
                # if the first attempt landed, the retry fails its expectation instead.
                unknown = True
                if (landed := await self._landed(plan, heads)) is not None:
                    return self._done(plan, landed)
                continue
            except nats.errors.Error as exc:
                raise OperationalError(f"publishing failed: {exc!r}") from exc
            if ack.ok:
                if ack.count != len(messages):
                    raise OperationalError(f"batch of {len(messages)} acked as {ack.count}")
                return self._done(plan, range(ack.seq - len(messages) + 1, ack.seq + 1))
            conflict = ack.error_code == WRONG_LAST_SEQUENCE
            duplicate = ack.duplicate or ack.error_code == DUPLICATE_IN_BATCH
            if not (conflict or duplicate):
                raise OperationalError(f"JetStream refused the write: {ack.description}")
            if unknown and (landed := await self._landed(plan, heads)) is not None:
                return self._done(plan, landed)
            self._forget(plan.values)
            if duplicate:
                raise IntegrityError(f"already recorded (duplicate message id): {plan.values}")
            heads, fresh = None, True
        raise OperationalError(f"gave up writing {list(plan.values)} after {MAX_ATTEMPTS} attempts")

    async def _landed(self, plan: _Plan, heads: dict[str, Head | None]) -> list[int] | None:
        """After a timeout: did our write land? Our first message would follow its head."""
        first = plan.messages[0]
        head = heads[first.subject]
        try:
            found = await _io(self.io.next_after(first.subject, head.seq if head else 0))
        except OperationalError as exc:
            raise OperationalError(f"write outcome unknown (publish timed out): {exc}") from exc
        if found is None or found.headers.get(WRITE_HEADER) != plan.write_id:
            return None
        # An atomic batch occupies consecutive sequences.
        return list(range(found.seq, found.seq + len(plan.messages)))

    def _done(self, plan: _Plan, seqs: Sequence[int]) -> list[int]:
        for subject, positions in plan.positions.items():
            self._remember(subject, Head(plan.values[subject][-1], seqs[positions[-1]]))
        return [seqs[holder] for holder in plan.holders]

    # -- reading --------------------------------------------------------------------------

    def _stored_events(self, record: StoredRecord) -> list[StoredEvent]:
        """The stored events a record holds, in version order; none when it is not ours (no
        writer headers, headers that do not parse or do not match its body, an originator whose
        subject it is not on, or an event the application's check refuses)."""
        events = stored_events_of(record, self._subject_prefix, self._id_value)
        if self.check is not None:
            for event in events:
                if (reason := self.check(event)) is not None:
                    log.warning("stepping over message %d on %s: %s", record.seq, record.subject, reason)
                    return []
        return events

    def _notifications(self, record: StoredRecord) -> list[Notification]:
        """A record's events as notifications: all of them have the record's stream sequence
        as id (see `RecordNotification`)."""
        events = self._stored_events(record)
        return [
            RecordNotification(
                id=record.seq,
                originator_id=event.originator_id,
                originator_version=event.originator_version,
                topic=event.topic,
                state=event.state,
                ordinal=ordinal,
                count=len(events),
            )
            for ordinal, event in enumerate(events)
        ]


@dataclass(frozen=True)
class RecordNotification(Notification):
    """A notification, and its place among the events of its stored message.

    Notification ids are stream sequences, so the events of one packed record share one id:
    a reader that tracks its position by id must take all `count` of them together (or none),
    and tells them apart by `ordinal`."""

    ordinal: int = 0
    count: int = 1

    @property
    def ends_record(self) -> bool:
        return self.ordinal == self.count - 1


def stored_events_of(
    record: StoredRecord, subject_prefix: str, id_value: Callable[[str], UUID | str]
) -> list[StoredEvent]:
    """The stored events a record on `<subject_prefix><originator>` holds by its headers: one,
    or a packed record's several; none when it is not a record of stored events."""
    headers = record.headers
    text = headers.get(ORIGINATOR_HEADER)
    # The header as this recorder writes it names the subject (compared as text: cheaper
    # than parsing, and a reworded id is not ours either).
    if text is None or record.subject != subject_prefix + subject_token(text):
        return []
    try:
        originator, last, topics = id_value(text), int(headers[VERSION_HEADER]), headers[TOPIC_HEADER]
        versions = headers.get(VERSIONS_HEADER)
        if versions is None:
            return [
                StoredEvent(
                    originator_id=originator, originator_version=last, topic=topics, state=record.data
                )
            ]
        first_text, _, last_text = versions.partition("-")
        first, names, states = int(first_text), topics.split(TOPIC_SEPARATOR), unpack(record.data)
        if int(last_text) != last or not len(names) == len(states) == last - first + 1 > 1:
            return []
    except (KeyError, ValueError):  # msgspec.DecodeError is a ValueError
        return []  # not stored events (someone else's message on our subjects)
    return [
        StoredEvent(originator_id=originator, originator_version=first + i, topic=name, state=state)
        for i, (name, state) in enumerate(zip(names, states, strict=True))
    ]


class JetStreamAggregateRecorder(JetStreamRecorder, AggregateRecorder):
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        self._write(stored_events)
        return None

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        subject = self.subject(originator_id)
        if desc and limit == 1 and lte is None and not self.contiguous:
            # The latest snapshot: one direct get, when that message is ours.
            last = self.io.run(lambda: self.io.last(subject))
            if last is None:
                return []
            if (span := self._value_of(last)) is not None:
                self._remember(subject, Head(span[1], last.seq))
                return self._stored_events(last)[-1:]
        # An aggregate is short: read it all through the subject index, keep its chain.
        records, head = self._chain(subject, self.io.run(lambda: self.io.scan(subject, 1)))
        if head is not None:
            self._remember(subject, head)
        events = [e for r in records for e in self._stored_events(r)]
        if gt is not None:
            events = [e for e in events if e.originator_version > gt]
        if lte is not None:
            events = [e for e in events if e.originator_version <= lte]
        if desc:
            events.reverse()
        return events if limit is None else events[:limit]


class JetStreamApplicationRecorder(JetStreamAggregateRecorder, ApplicationRecorder):
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        return self._write(stored_events)

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        first = 1 if start is None else start if inclusive_of_start else start + 1
        wanted = frozenset(topics)

        def keep(record: StoredRecord) -> bool:
            topics = record.headers.get(TOPIC_HEADER)
            if topics is None or VERSION_HEADER not in record.headers:
                return False
            return not wanted or not wanted.isdisjoint(topics.split(TOPIC_SEPARATOR))

        # `limit` counts records: a packed record's events come together or not at all (they
        # share its id), so a page may hold a few more notifications than asked.
        records = self.io.run(
            lambda: self.io.scan(self.events_filter, first, limit=limit, stop=stop, keep=keep)
        )
        found = [n for r in records for n in self._notifications(r)]
        return [n for n in found if n.topic in wanted] if wanted else found

    def max_notification_id(self) -> int | None:
        # The stream's last sequence, in O(1): an upper bound that may name a tracking record or
        # another application's event (ids have gaps anyway). Anything recorded later has a
        # greater id, which is what callers rely on. The exact answer, a last-by-subject get on
        # `<root>.*`, costs O(subjects) on the server (20 ms at 40k aggregates, measured).
        info = self.io.run(lambda: self.io.bridge.js.stream_info(self.io.stream))
        return info.state.last_seq or None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return JetStreamSubscription(self, gt=gt, topics=topics)


class JetStreamTrackingRecorder(JetStreamRecorder, TrackingRecorder):
    def insert_tracking(self, tracking: Tracking) -> None:
        self._write((), tracking)

    def max_tracking_id(self, application_name: str) -> int | None:
        last = self.io.run(lambda: self.io.last(self.tracking_subject(application_name)))
        return None if last is None else int(last.data)


class JetStreamProcessRecorder(JetStreamTrackingRecorder, JetStreamApplicationRecorder, ProcessRecorder):
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        # Events and the tracking record of the notification they answer: one atomic batch.
        return self._write(stored_events, kwargs.get("tracking"))


class Resumable:
    """An ordered consumer its owner stops when its reader falls behind and resumes after the
    last record it took: back-pressure that bounds what is buffered. Holding the consumer's
    callback instead does not hold the server past a heartbeat's interval (the client answers a
    stalled flow control regardless, nats-py CONSUMER_STALLED), so a reader slower than the
    stream buffered it to the subscription's limit, lost messages as a slow consumer and stalled.

    Everything but `start` and `close` is called on the loop. `on_record(msg, seq)` gets each
    record once, in order (a stopped consumer's last deliveries and a new one's first again are
    dropped by sequence); `on_error` what a resume raised."""

    def __init__(
        self,
        io: JetStreamIO,
        subject: str,
        after: int,
        on_record: Callable[[Msg, int], Awaitable[None]],
        on_error: Callable[[BaseException], None],
        *,
        pending_bytes_limit: int = DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
    ) -> None:
        self.io, self.subject, self.taken = io, subject, after
        self._on_record, self._on_error = on_record, on_error
        self._pending_bytes_limit = pending_bytes_limit
        self._consumer: Any = None
        self._stopping: asyncio.Task[None] | None = None
        self._resuming = False
        self.closed = False
        self.pauses = 0  # how often it was stopped for its reader

    @property
    def paused(self) -> bool:
        return self._consumer is None and not self.closed

    async def start(self) -> None:
        consumer = await self.io.ordered(
            self.subject, self.taken + 1, self._on_msg, pending_bytes_limit=self._pending_bytes_limit
        )
        if self.closed:  # closed meanwhile: nothing is left to stop this one
            await consumer.unsubscribe()
        else:
            self._consumer = consumer

    async def _on_msg(self, msg: Msg) -> None:
        if self.closed:
            return
        seq = msg.metadata.sequence.stream
        if seq <= self.taken:
            return
        self.taken = seq
        await self._on_record(msg, seq)

    def pause(self) -> None:
        if self._consumer is None:
            return
        self.pauses += 1
        consumer, self._consumer = self._consumer, None
        # Not awaited: the caller may be the callback of the subscription being stopped.
        self._stopping = asyncio.get_running_loop().create_task(consumer.unsubscribe())

    def resume(self) -> None:
        if self.paused and not self._resuming:
            self._resuming = True  # one new consumer, however often it is asked meanwhile
            asyncio.get_running_loop().create_task(self._resume())

    async def _resume(self) -> None:
        try:
            await self._stopped()  # the old consumer is gone before the new one starts
            if not self.closed:
                await self.start()
        except Exception as exc:
            self._on_error(exc)
        finally:
            self._resuming = False

    async def _stopped(self) -> None:
        stopping, self._stopping = self._stopping, None
        if stopping is not None:
            await stopping

    async def close(self) -> None:
        self.closed = True
        consumer, self._consumer = self._consumer, None
        await self._stopped()
        if consumer is not None and not self.io.bridge.closed:
            await consumer.unsubscribe()


class JetStreamSubscription(Subscription[JetStreamApplicationRecorder]):
    """Notifications from an ordered consumer, handed from the loop to the iterating thread."""

    def __init__(
        self,
        recorder: JetStreamApplicationRecorder,
        gt: int | None = None,
        topics: Sequence[str] = (),
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._io = recorder.io
        self._wanted = frozenset(topics)
        # A deque plus an Event rather than a queue.Queue: appends and pops need no lock, and
        # the loop only signals when the reader is waiting (about 1.3x the replay rate here).
        self._items: deque[Notification | BaseException | None] = deque()
        self._waiting = threading.Event()
        # Back-pressure: past HIGH_WATER items waiting the consumer is stopped, and resumed
        # after the last record taken once the reader is down to LOW_WATER (see Resumable).
        self._consumer = Resumable(
            self._io, recorder.events_filter, gt or 0, self._on_record, self._hand_over
        )
        self._io.run(self._consumer.start)
        self._io.subscriptions.add(self)

    async def _on_record(self, msg: Msg, seq: int) -> None:
        if self._has_been_stopped:
            return
        try:
            record = StoredRecord(seq, msg.subject, msg.data, msg.headers or {})
            notifications = self._recorder._notifications(record)
        except Exception as exc:  # surfaces in the iterating thread, never lost on the loop
            self._hand_over(exc)
            return
        for notification in notifications:
            if not self._wanted or notification.topic in self._wanted:
                self._hand_over(notification)
        if len(self._items) >= HIGH_WATER:
            self._consumer.pause()

    def _hand_over(self, item: Notification | BaseException | None) -> None:
        self._items.append(item)
        if not self._waiting.is_set():
            self._waiting.set()

    def _take(self) -> Notification | BaseException | None:
        while True:
            try:
                return self._items.popleft()
            except IndexError:
                self._waiting.clear()
                if not self._items:  # checked after clear(): an append now sets it again
                    self._waiting.wait()

    def __next__(self) -> Notification:
        if self._has_been_stopped:
            raise StopIteration
        item = self._take()
        if item is None or self._has_been_stopped:
            raise StopIteration
        if isinstance(item, BaseException):
            self.stop()
            raise item
        if self._consumer.paused and len(self._items) <= LOW_WATER:
            try:
                self._io.bridge.loop.call_soon_threadsafe(self._consumer.resume)
            except RuntimeError as exc:  # the loop is closed: nothing more will be read
                log.debug("not resuming subscription: %r", exc)
        self._last_notification_id = item.id
        return item

    def stop(self) -> None:
        if self._has_been_stopped:
            return
        super().stop()
        self._hand_over(None)  # wakes a blocked __next__
        bridge = self._io.bridge
        if bridge.closed:
            return
        try:
            done = bridge.submit(self._consumer.close)
            if not bridge.in_loop_thread():
                done.result(self._io.timeout)
        except Exception as exc:  # the connection is gone: nothing left to stop
            log.debug("stopping subscription: %r", exc)


class Factory(InfrastructureFactory[JetStreamTrackingRecorder]):
    """Builds the recorders over one bridge: a registered one, or its own from a URL."""

    NATS_BRIDGE = BRIDGE_ENV
    NATS_URL = URL_ENV
    EVENTS_STREAM = "WARDEN_EVENTS_STREAM"
    SUBJECT_ROOT = "WARDEN_EVENTS_SUBJECT_ROOT"
    NATS_TIMEOUT = "WARDEN_NATS_TIMEOUT"
    ORIGINATOR_ID_TYPE = "ORIGINATOR_ID_TYPE"
    # Topic of an `EventCheck`: the application's test of a stored event's payload.
    EVENT_CHECK = "WARDEN_EVENT_CHECK"

    aggregate_recorder_class: type[JetStreamAggregateRecorder] = JetStreamAggregateRecorder
    application_recorder_class: type[JetStreamApplicationRecorder] = JetStreamApplicationRecorder
    tracking_recorder_class: type[JetStreamTrackingRecorder] = JetStreamTrackingRecorder
    process_recorder_class: type[JetStreamProcessRecorder] = JetStreamProcessRecorder

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        # Settings first, so a bad one never leaves a started bridge behind.
        id_type = (self.env.get(self.ORIGINATOR_ID_TYPE) or "uuid").lower()
        if id_type not in ("uuid", "text"):
            raise InfrastructureFactoryError(f"{self.ORIGINATOR_ID_TYPE} must be 'uuid' or 'text'")
        self.uuid_ids = id_type == "uuid"
        check_topic = self.env.get(self.EVENT_CHECK)
        self.check: EventCheck | None = resolve_topic(check_topic) if check_topic else None
        self.root = _check_root(self.env.get(self.SUBJECT_ROOT) or topology.EVENT_ROOT)
        stream = self.env.get(self.EVENTS_STREAM) or topology.EVENT_STREAM
        try:
            timeout = float(self.env.get(self.NATS_TIMEOUT) or DEFAULT_TIMEOUT_S)
        except ValueError:
            raise InfrastructureFactoryError(f"{self.NATS_TIMEOUT} must be seconds") from None
        key, url = self.env.get(self.NATS_BRIDGE), self.env.get(self.NATS_URL)
        if key:
            bridge, self._owns_bridge = lookup(key), False
        elif url:
            bridge, self._owns_bridge = NatsBridge.start(url), True
        else:
            raise InfrastructureFactoryError(
                f"shared.persistence.jetstream needs {self.NATS_BRIDGE} (the key of a bridge "
                f"registered in this process) or {self.NATS_URL} (a NATS server URL)"
            )
        self.io = JetStreamIO(bridge, stream, timeout)

    def _build(self, cls: type[R], purpose: str = "events") -> R:
        if purpose == TRACKING or not _SAFE_TOKEN.fullmatch(purpose):
            raise InfrastructureFactoryError(f"recorder purpose {purpose!r} cannot name subjects")
        return cls(self.io, root=self.root, purpose=purpose, uuid_ids=self.uuid_ids, check=self.check)

    def _class(self, topic_key: str, default: type[R]) -> type[R]:
        topic = self.env.get(topic_key)
        return resolve_topic(topic) if topic else default

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        return self._build(self.aggregate_recorder_class, purpose)

    def application_recorder(self) -> ApplicationRecorder:
        cls = self._class(self.APPLICATION_RECORDER_TOPIC, self.application_recorder_class)
        return self._build(cls)

    def tracking_recorder(
        self, tracking_recorder_class: type[JetStreamTrackingRecorder] | None = None
    ) -> JetStreamTrackingRecorder:
        cls = tracking_recorder_class or self._class(
            self.TRACKING_RECORDER_TOPIC, self.tracking_recorder_class
        )
        return self._build(cls)

    def process_recorder(self) -> ProcessRecorder:
        cls = self._class(self.PROCESS_RECORDER_TOPIC, self.process_recorder_class)
        return self._build(cls)

    def close(self) -> None:
        for subscription in list(self.io.subscriptions):
            subscription.stop()
        if self._owns_bridge:
            self.io.bridge.close()
