"""Replay: rebuild the read model from the event stream into a fresh store and compare it, row by
row, with the live one (`warden replay` is the command; `warden bench` times the rebuild).

The rebuild stops at the live read model's tracked position, so a projector that is still
running is compared at the same point in the stream; live rows it has changed since (their
`seq` is past that position) are counted as skipped, not as differences.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from eventsourcing.persistence import OperationalError
from nats.aio.msg import Msg

from shared.events import AnyEvent
from shared.persistence.jetstream import JetStreamApplicationRecorder, StoredRecord
from shared.readmodel import queries
from shared.readmodel.runner import decode_notification
from shared.readmodel.store import ReadModel
from shared.readmodel.tables import TABLES, Table

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

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "events": self.events,
            "rebuilt_into": self.store,
            "scope": self.scope,
            "compared": self.compared,
            "skipped_moved_on": self.skipped,
            "identical": not self.differences,
            "differences": [d.__dict__ for d in self.differences],
        }


class OrderedPages:
    """The records on `subject` from stream sequence `start` up to `stop`, read through one
    ordered consumer (the stream pushed, flow-controlled) and handed to the iterating thread in
    pages: about twice the rate of paged direct gets, which wait one round trip per page.

    Back-pressure: at most `PAGES_AHEAD` pages wait for the reader; past that the consumer's
    callback waits, so its flow control stalls the server instead of buffering the stream.
    """

    def __init__(self, recorder: JetStreamApplicationRecorder, subject: str, start: int, stop: int) -> None:
        self.io = recorder.io
        self.subject = subject
        self.start = max(1, start)
        self.stop = stop
        self._pages: queue.Queue[list[StoredRecord] | BaseException | None] = queue.Queue()
        self._page: list[StoredRecord] = []
        self._room: asyncio.Semaphore | None = None
        self._consumer: Any = None
        self._done = False

    def __iter__(self) -> Iterator[list[StoredRecord]]:
        last = self.io.run(lambda: self.io.last(self.subject, consistent=True))
        # The last record on the subject bounds the read: the consumer's end is then a message it
        # is sure to deliver, whatever else (tracking records, other writers) the stream holds.
        self.stop = min(self.stop, last.seq if last is not None else 0)
        if self.stop < self.start:
            return
        self.io.run(self._subscribe)
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
                room = self._room
                assert room is not None
                self.io.bridge.loop.call_soon_threadsafe(room.release)
                yield item
        finally:
            self._done = True
            self._unsubscribe()

    async def _subscribe(self) -> None:
        self._room = asyncio.Semaphore(PAGES_AHEAD)
        self._consumer = await self.io.ordered(self.subject, self.start, self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        if self._done:
            return
        try:
            seq = msg.metadata.sequence.stream
            if seq <= self.stop:
                self._page.append(StoredRecord(seq, msg.subject, msg.data, msg.headers or {}))
            if len(self._page) >= PAGE or seq >= self.stop:
                page, self._page = self._page, []
                assert self._room is not None
                await self._room.acquire()
                self._pages.put(page)
                if seq >= self.stop:
                    self._done = True
                    self._pages.put(None)
        except Exception as exc:  # raised in the reading thread, never lost on the loop
            self._done = True
            self._pages.put(exc)

    def _unsubscribe(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None or self.io.bridge.closed:
            return
        if self._room is not None:  # a callback waiting for room must not outlive the read
            room = self._room
            for _ in range(PAGES_AHEAD):
                self.io.bridge.loop.call_soon_threadsafe(room.release)
        try:
            self.io.run(consumer.unsubscribe)
        except OperationalError as exc:  # the connection is gone: nothing left to stop
            log.debug("stopping the replay's consumer: %r", exc)


def rebuild(
    recorder: JetStreamApplicationRecorder,
    fresh: ReadModel,
    subject: str,
    position: int,
    reached: Callable[[int], None] = lambda _position: None,
) -> int:
    """Folds the events on `subject` up to `position` into `fresh`; the number of events folded.

    Events are folded in transactions of about `FOLD_BATCH` (never splitting a packed record,
    whose events share one position). `reached` is told the stream position after each
    transaction (a caller's progress bar).
    """
    count = 0
    batch: list[tuple[int, AnyEvent | None]] = []
    for page in OrderedPages(recorder, subject, 1, position):
        for record in page:
            batch.extend((n.id, decode_notification(n)) for n in recorder._notifications(record))
        if len(batch) >= FOLD_BATCH:
            fresh.project(batch)
            count += len(batch)
            reached(batch[-1][0])
            batch = []
    if batch:
        fresh.project(batch)
        count += len(batch)
    reached(position)
    return count


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
