"""Runs the read-model projection over the WardenApp's recorder subscription, in batches.

eventsourcing's ProjectionRunner hands a projection one event at a time, and one SQLite
transaction per event runs at about 3.4k events/s here. This runner keeps its shape (an
eventsourcing `Projection` whose view is a `TrackingRecorder`, fed by the application
recorder's `subscribe`, resuming after the view's `max_tracking_id`) but folds everything that is
already waiting in one transaction: batches of up to `max_batch` while catching up, single events
when live.

It is synchronous and blocking: run it in a worker thread. The JetStream subscription reaches
NATS through the process's bridge; nothing here touches the event loop directly.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import Notification, Subscription, Tracking
from eventsourcing.projection import Projection
from opentelemetry.context import Context as OtelContext

from shared import telemetry
from shared.events import AnyEvent
from shared.persistence import written
from shared.persistence.jetstream import RecordNotification
from shared.readmodel.store import APPLICATION, PROJECTION_NAME, ReadModel

log = logging.getLogger("warden.projection")

_STOP = object()
# Batches up to this size are live folding, traced event by event (see fold_spans).
LIVE_BATCH = 64
# A live batch waits this long after its first event for more: a commit (with its position, its
# prefetch and upserts) per event was the projector's largest cost under load; the read model
# lags the stream by at most this much more.
LINGER_S = float(os.environ.get("WARDEN_PROJECTION_LINGER_S") or 0.05)


def decode_notification(notification: Notification) -> AnyEvent | None:
    """The event a notification carries, or None for one that is not Warden's or of a type this
    version cannot read.

    Either still advances the position (so one bad record cannot wedge the read model); `warden
    replay` rebuilds from the stream once the code knows the type. The recorder has already left
    out messages without Warden's writer headers.
    """
    event = written.stored_event_of(notification)
    if isinstance(event, str):
        log.warning("stepping over notification %s (%s): %s", notification.id, notification.topic, event)
        return None
    return event


@contextmanager
def fold_spans(batch: Sequence[tuple[int, AnyEvent | None]]) -> Iterator[None]:
    """One "projector fold" span per live event, a child of the span that appended it, lasting
    until its batch is committed. A catch-up batch (a replay, a restart) gets none: a million
    spans would cost more than the folding."""
    if len(batch) > LIVE_BATCH or not telemetry.taking_spans():
        yield
        return
    tracer = telemetry.tracer()
    spans = [
        tracer.start_span(
            "projector fold",
            context=telemetry.context_of(event.trace) or OtelContext(),
            attributes={
                "warden.event": type(event).__struct_config__.tag or "",
                "warden.seq": seq,
                "warden.aggregate_id": str(event.originator_id),
            },
        )
        for seq, event in batch
        if event is not None and event.trace
    ]
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
        raise
    finally:
        for span in spans:
            span.end()


class ReadModelProjection(Projection[ReadModel]):
    """The eventsourcing projection whose materialised view is the read model."""

    name = PROJECTION_NAME

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.project([(tracking.notification_id, domain_event)])

    def process_batch(self, batch: Sequence[tuple[int, AnyEvent | None]]) -> int:
        return self.view.project(batch)


class BatchingProjectionRunner:
    """Subscribes from the view's tracked position and folds batches until stopped."""

    def __init__(
        self,
        app: Application[Any],
        projection: ReadModelProjection,
        *,
        max_batch: int = 1000,
        on_commit: Callable[[int], None] | None = None,
        linger_s: float = LINGER_S,
    ) -> None:
        self.app = app
        self.projection = projection
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.on_commit = on_commit
        # Bounded: when the database is slower than the stream, the pump blocks, the
        # subscription's buffer fills, and it stops taking from the consumer (back-pressure).
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=4 * max_batch)
        self._stopping = threading.Event()
        self._subscription: Subscription[Any] | None = None
        self._lock = threading.Lock()
        self._pump_finished = False  # its final marker has been taken off the queue

    def stop(self) -> None:
        """Safe from any thread, including the event loop's: ends `run` after its current batch."""
        self._stopping.set()
        with self._lock:
            subscription = self._subscription
        if subscription is not None:
            subscription.stop()

    def run(self) -> None:
        """Fold until stopped; raises what the view or the subscription raised."""
        gt = self.projection.view.max_tracking_id(APPLICATION)
        subscription = self.app.recorder.subscribe(gt=gt)
        with self._lock:
            self._subscription = subscription
        if self._stopping.is_set():
            subscription.stop()
        pump = threading.Thread(target=self._pump, args=(subscription,), name="warden-projection-pump")
        pump.start()
        try:
            while not self._stopping.is_set():
                batch, error, done = self._take()
                if batch:
                    decoded = [(n.id, decode_notification(n)) for n in batch]
                    with fold_spans(decoded):
                        position = self.projection.process_batch(decoded)
                    if self.on_commit is not None:
                        self.on_commit(position)
                if error is not None:
                    raise error
                if done:
                    break
        finally:
            self.stop()
            self._drain()
            pump.join()

    def _take(self) -> tuple[list[Notification], BaseException | None, bool]:
        """Block for one item, then take what else arrives within `linger_s` of it, up to a batch.

        A batch never ends inside a packed record: its events share one notification id, and
        the read model tracks its position by id, so a record cut in two would lose its rest."""
        batch: list[Notification] = []
        item = self._queue.get()
        until = time.monotonic() + self.linger_s
        while True:
            if item is _STOP:
                self._pump_finished = True
                return batch, None, True
            if isinstance(item, BaseException):
                return batch, item, True
            batch.append(item)
            inside = isinstance(item, RecordNotification) and not item.ends_record
            if len(batch) >= self.max_batch and not inside:
                return batch, None, False
            try:
                left = until - time.monotonic()
                item = (
                    self._queue.get()
                    if inside
                    else self._queue.get(timeout=left)
                    if left > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return batch, None, False

    def _drain(self) -> None:
        """Consume until the pump's final marker, so a pump blocked on a full queue can finish."""
        while not self._pump_finished:
            self._pump_finished = self._queue.get() is _STOP

    def _pump(self, subscription: Subscription[Any]) -> None:
        try:
            for notification in subscription:
                self._queue.put(notification)
        except BaseException as exc:  # handed to the folding thread, which raises it
            self._queue.put(exc)
        finally:
            self._queue.put(_STOP)
