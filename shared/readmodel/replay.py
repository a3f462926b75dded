"""Replay: rebuild the read model from the event stream into a fresh store and compare it, row by
row, with the live one (`warden replay` is the command; `warden bench` times the rebuild).

The rebuild stops at the live read model's tracked position, so a projector that is still
running is compared at the same point in the stream; live rows it has changed since (their
`seq` is past that position) are counted as skipped, not as differences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from eventsourcing.persistence import Notification

from shared.persistence.jetstream import TOPIC_HEADER, VERSION_HEADER, JetStreamApplicationRecorder
from shared.readmodel import queries
from shared.readmodel.runner import decode_notification
from shared.readmodel.store import ReadModel
from shared.readmodel.tables import TABLES, Table

PAGE = 1000


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


def notifications(
    recorder: JetStreamApplicationRecorder, subject: str, start: int, stop: int
) -> Iterator[list[Notification]]:
    """Pages of the events on `subject` from `start` up to stream sequence `stop`."""
    io = recorder.io

    def keep(record: Any) -> bool:
        return TOPIC_HEADER in record.headers and VERSION_HEADER in record.headers

    while start <= stop:
        records = io.run(partial(io.scan, subject, start, limit=PAGE, stop=stop, keep=keep))
        page = [n for r in records for n in recorder._notifications(r)]
        if not page:
            return
        yield page
        start = page[-1].id + 1


def rebuild(
    recorder: JetStreamApplicationRecorder,
    fresh: ReadModel,
    subject: str,
    position: int,
    reached: Callable[[int], None] = lambda _position: None,
) -> int:
    """Folds the events on `subject` up to `position` into `fresh`; the number of events folded.

    `reached` is told the stream position after each page (a caller's progress bar).
    """
    count = 0
    for page in notifications(recorder, subject, 1, position):
        fresh.project([(n.id, decode_notification(n)) for n in page])
        count += len(page)
        reached(page[-1].id)
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
