"""Replay: rebuild the read model from the event stream into a fresh store and compare it, row by
row, with the live one (`warden replay` is the command; `warden bench` times the rebuild).

The rebuild stops at the live read model's tracked position, so a projector that is still
running is compared at the same point in the stream; live rows it has changed since (their
`seq` is past that position) are counted as skipped, not as differences.

Checkpoints: a rebuild commits its position with every transaction, so a store it was folding
into is a checkpoint it resumes from (`rebuild` starts after the store's position). `warden
replay` keeps its store between runs (`checkpoint_path`, named by the code that folds it), so a
replay killed halfway, or the next replay a day later, folds only what the stream gained since:
a full rebuild is needed only when the folding code changed or the stream is not the one the
checkpoint was folded from (`checkpoint_holds`).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import queue
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from eventsourcing.persistence import OperationalError
from nats.aio.msg import Msg
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT

from shared.events import AnyEvent, tag_of
from shared.persistence import written
from shared.persistence.jetstream import (
    JetStreamApplicationRecorder,
    Resumable,
    StoredRecord,
    stored_events_of,
)
from shared.readmodel import queries
from shared.readmodel.runner import decode_notification
from shared.readmodel.store import ReadModel
from shared.readmodel.tables import TABLES, TIMELINE, Table

log = logging.getLogger("warden.replay")

PAGE = 1000  # records handed over at a time
PAGES_AHEAD = 8
# Events per transaction of a rebuild: large, because a commit costs about as much as folding
# hundreds of events, and a fresh store has no reader waiting on it.
FOLD_BATCH = 10_000


@dataclass
class Difference:
    table: str
    key: list[Any]
    problem: Literal["differs", "missing from the live read model", "not reproduced by replay"]
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Report:
    """A rebuild compared with the live read model: what was compared, skipped, and differs."""

    position: int
    events: int
    store: str
    scope: dict[str, Any]
    compared: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    # The checkpoint's position the rebuild resumed from (0: it folded the stream from the start).
    resumed_from: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "events": self.events,
            "resumed_from": self.resumed_from,
            "rebuilt_into": self.store,
            "scope": self.scope,
            "compared": self.compared,
            "skipped_moved_on": self.skipped,
            "identical": not self.differences,
            "differences": [d.__dict__ for d in self.differences],
        }


class OrderedPages:
    """The records on `subject` from stream sequence `start` up to `stop`, read through an
    ordered consumer (the stream pushed) and handed to the iterating thread in pages: about
    twice the rate of paged direct gets, which wait one round trip per page.

    Back-pressure: once `PAGES_AHEAD` pages wait for the reader the consumer is stopped, and
    resumed after the last record taken when half of them have been read (`Resumable`: a reader
    slower than the stream, every rebuild, once lost messages at 1M events and stalled).
    """

    def __init__(
        self,
        recorder: JetStreamApplicationRecorder,
        subject: str,
        start: int,
        stop: int,
        *,
        pending_bytes_limit: int = DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
    ) -> None:
        self.io = recorder.io
        self.subject = subject
        self.start = max(1, start)
        self.stop = stop
        self._pages: queue.Queue[list[StoredRecord] | BaseException | None] = queue.Queue()
        self._page: list[StoredRecord] = []
        self._ahead = 0  # pages handed over and not yet read (only the loop counts them)
        self._done = False
        self._consumer = Resumable(
            self.io,
            subject,
            self.start - 1,
            self._on_record,
            self._failed,
            pending_bytes_limit=pending_bytes_limit,
        )

    @property
    def pauses(self) -> int:
        """How often the consumer was stopped for the reader."""
        return self._consumer.pauses

    def __iter__(self) -> Iterator[list[StoredRecord]]:
        last = self.io.run(lambda: self.io.last(self.subject, consistent=True))
        # The last record on the subject bounds the read: the consumer's end is then a message it
        # is sure to deliver, whatever else (tracking records, other writers) the stream holds.
        self.stop = min(self.stop, last.seq if last is not None else 0)
        if self.stop < self.start:
            return
        self.io.run(self._consumer.start)
        try:
            while True:
                try:
                    item = self._pages.get(timeout=self.io.timeout * 10)
                except queue.Empty:
                    raise OperationalError(
                        f"replay of {self.subject} stalled: nothing read for {self.io.timeout * 10:.0f} s"
                    ) from None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.io.bridge.loop.call_soon_threadsafe(self._read_one)
                yield item
        finally:
            self._done = True
            try:
                self.io.run(self._consumer.close)
            except OperationalError as exc:  # the connection is gone: nothing left to stop
                log.debug("stopping the replay's consumer: %r", exc)

    def _read_one(self) -> None:
        self._ahead -= 1
        if not self._done and self._ahead <= PAGES_AHEAD // 2:
            self._consumer.resume()

    def _failed(self, exc: BaseException) -> None:  # raised in the reading thread, never lost
        self._done = True
        self._pages.put(exc)

    async def _on_record(self, msg: Msg, seq: int) -> None:
        if self._done:
            return
        try:
            if seq <= self.stop:
                self._page.append(StoredRecord(seq, msg.subject, msg.data, msg.headers or {}))
            if len(self._page) >= PAGE or seq >= self.stop:
                page, self._page = self._page, []
                self._pages.put(page)
                self._ahead += 1
                if seq >= self.stop:
                    self._done = True
                    self._pages.put(None)
                elif self._ahead >= PAGES_AHEAD:
                    self._consumer.pause()
        except Exception as exc:
            self._failed(exc)


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a rebuild's duration.

    A rebuild allocates millions of short-lived objects (records, events, rows) that reference
    counting frees; each allocation burst still triggers collections that walk everything alive
    (the pages waiting, the batch, the caches): with the collector on, decoding took 2 to 4 times as long
    (measured). What cyclic garbage the rebuild makes is collected once, at the end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def record_events(recorder: JetStreamApplicationRecorder) -> Callable[[StoredRecord], list[AnyEvent | None]]:
    """How a rebuild turns a stored record into its events, checked as the recorder checks them.

    The recorder's check (`written.foreign_reason`, the application's) decodes each event to
    judge it, and the projection then decoded it again: when the check is that one, each event
    is decoded once, by the same function, and a record with any event it refuses is stepped
    over whole, as the recorder steps over it."""
    prefix, id_value = recorder._subject_prefix, recorder._id_value
    if recorder.check is not written.foreign_reason:

        def through_recorder(record: StoredRecord) -> list[AnyEvent | None]:
            return [decode_notification(n) for n in recorder._notifications(record)]

        return through_recorder

    def checked_once(record: StoredRecord) -> list[AnyEvent | None]:
        events: list[AnyEvent | None] = []
        for stored in stored_events_of(record, prefix, id_value):
            event = written.stored_event_of(stored)
            if isinstance(event, str):
                log.warning("stepping over message %d on %s: %s", record.seq, record.subject, event)
                return []
            events.append(event)
        return events

    return checked_once


def rebuild(
    recorder: JetStreamApplicationRecorder,
    fresh: ReadModel,
    subject: str,
    position: int,
    reached: Callable[[int], None] = lambda _position: None,
    *,
    stopping: Callable[[], bool] = lambda: False,
) -> int:
    """Folds the events on `subject` after `fresh`'s position up to `position` into it; the
    number of events folded.

    A scratch store (not durable: a replay's, the bench's) is loaded without its secondary
    indexes and with the collector paused; a live one (a projector catching up) keeps both,
    since readers and the process's other services use them meanwhile. `stopping` is asked
    after each transaction: true ends the rebuild there (resumable from that commit).

    Events are folded in transactions of about `FOLD_BATCH` (never splitting a packed record,
    whose events share one position), each committing its position: a rebuild that dies
    resumes from its last commit (the caller checks it is a checkpoint of this stream:
    `checkpoint_holds`). `reached` is told the stream position after each transaction (a
    caller's progress bar).
    """
    count = 0
    events_of = record_events(recorder)
    batch: list[tuple[int, AnyEvent | None]] = []
    start = fresh.position() + 1
    with ExitStack() as scratch:
        if not fresh.durable:
            scratch.enter_context(collector_paused())
            scratch.enter_context(fresh.loading())
        for page in OrderedPages(recorder, subject, start, position):
            for record in page:
                seq = record.seq
                batch.extend((seq, event) for event in events_of(record))
            if len(batch) >= FOLD_BATCH:
                fresh.project(batch)
                count += len(batch)
                reached(batch[-1][0])
                batch = []
                if stopping():
                    return count
        if batch:
            fresh.project(batch)
            count += len(batch)
    reached(position)
    return count


@cache
def fold_fingerprint() -> str:
    """The code a rebuild's rows depend on besides the stream: a checkpoint folded by other code
    (another version of Warden) is not resumed, since its rows may differ from what this code
    folds."""
    from shared import aggregates, contract, events
    from shared.forensics import sentences, story
    from shared.readmodel import fold, tables

    digest = hashlib.sha256()
    for module in (aggregates, contract, events, sentences, story, fold, tables):
        assert module.__file__ is not None
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_path(folder: Path, scope: str) -> Path:
    """The store a replay of `scope` ("all", or a job's id) keeps between runs in `folder`."""
    return folder / f"{scope}-{fold_fingerprint()}.sqlite"


def stale_checkpoints(folder: Path, scope: str) -> list[Path]:
    """Stores of `scope` folded by other code: never resumed, so removed."""
    keep = checkpoint_path(folder, scope).name
    return [p for p in folder.glob(f"{scope}-*.sqlite*") if not p.name.startswith(keep)]


def checkpoint_holds(recorder: JetStreamApplicationRecorder, store: ReadModel, subject: str) -> bool:
    """Whether `store`'s position is a checkpoint of the stream the recorder reads: the stream
    still holds, at that sequence, the record whose events the store folded last (a stream
    recreated, or another server's, holds something else there or nothing)."""
    position = store.position()
    if position == 0:
        return True
    with store.reading() as db:
        folded = db.all(
            f"SELECT aggregate_id, type FROM {TIMELINE.name} WHERE seq = ? ORDER BY ordinal", (position,)
        )
    record = recorder.io.run(lambda: recorder.io.next_after(subject, position - 1))
    if record is None or record.seq != position or not folded:
        return False
    held = [(str(event.originator_id), tag_of(event)) for event in record_events(recorder)(record) if event]
    return held == [(str(a), str(t)) for a, t in folded]


def compare(
    live: ReadModel,
    fresh: ReadModel,
    report: Report,
    *,
    job: str | None,
    since: str | None,
    until: str | None,
) -> None:
    tables: list[Table] = [t for t in TABLES if job is None or t.job_column is not None]
    for table in tables:
        live_rows = queries.dump(live, table, job_id=job)
        fresh_rows = queries.dump(fresh, table, job_id=job)
        compared = skipped = 0
        for key in sorted(set(live_rows) | set(fresh_rows), key=repr):
            got, want = live_rows.get(key), fresh_rows.get(key)
            row = want or got
            assert row is not None
            when = row[table.time]
            if (since and (when is None or when < since)) or (until and (when is None or when > until)):
                continue
            if got is not None and int(got["seq"]) > report.position:
                skipped += 1  # changed by the live projector after the position we replayed to
                continue
            compared += 1
            if got is None:
                report.differences.append(
                    Difference(table.name, list(key), "missing from the live read model")
                )
            elif want is None:
                report.differences.append(Difference(table.name, list(key), "not reproduced by replay"))
            elif got != want:
                columns = {
                    c: {"live": got[c], "replay": want[c]} for c in table.column_names if got[c] != want[c]
                }
                report.differences.append(Difference(table.name, list(key), "differs", columns))
        report.compared[table.name] = compared
        if skipped:
            report.skipped[table.name] = skipped
