"""The JetStream persistence module against a real nats-server.

First eventsourcing's own recorder test cases (the contract every persistence module must keep),
then Warden's own properties: optimistic concurrency through the server, atomic batches, retries
after a lost ack, and the bridge between worker threads and the connection's event loop.

Every class starts its own nats-server; every test gets a fresh stream (the event stream's
config, renamed) and its own subject root, so no test sees another's sequences.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar
from unittest import TestCase, mock
from uuid import UUID, uuid4

import anyio
import nats
import nats.errors
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DataError,
    InfrastructureFactoryError,
    IntegrityError,
    ProcessRecorder,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.tests import application as upstream_app
from eventsourcing.tests import persistence as upstream
from eventsourcing.utils import Environment

from shared import topology
from shared.persistence.bridge import BRIDGE_ENV, URL_ENV, BridgeError, NatsBridge, bridge_env
from shared.persistence.jetstream import (
    EXPECTED_SUBJECT_SEQ,
    Factory,
    JetStreamAggregateRecorder,
    JetStreamApplicationRecorder,
    JetStreamIO,
    JetStreamProcessRecorder,
    JetStreamRecorder,
    JetStreamTrackingRecorder,
    RecordNotification,
    _Ack,
    _Out,
)
from shared.server import EmbeddedServer

MODULE = "shared.persistence.jetstream"


def create_stream(bridge: NatsBridge) -> tuple[str, str]:
    """A new stream with Warden's event-stream config, under a unique name and subject root."""
    suffix = uuid4().hex[:12]
    name, root = f"ES_{suffix}", f"es.{suffix}"
    (template,) = [c for c in topology.stream_configs() if c.name == topology.EVENT_STREAM]
    config = dataclasses.replace(template, name=name, subjects=[f"{root}.>"])
    bridge.call(lambda: bridge.js.add_stream(config))
    return name, root


def jetstream_env(bridge: NatsBridge, stream: str, root: str) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": MODULE,
        **bridge_env(bridge),
        "WARDEN_EVENTS_STREAM": stream,
        "WARDEN_EVENTS_SUBJECT_ROOT": root,
    }


class JetStreamCase(TestCase):
    """Base for the upstream cases: a server per class, a stream and a factory per test."""

    server: ClassVar[EmbeddedServer]
    bridge: ClassVar[NatsBridge]
    store: ClassVar[tempfile.TemporaryDirectory[str]]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.store = tempfile.TemporaryDirectory(prefix="warden-es-")
        cls.server = EmbeddedServer(store_dir=Path(cls.store.name), name="es").start()
        cls.bridge = NatsBridge.start(cls.server.url)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.bridge.close()
        cls.server.stop()
        cls.store.cleanup()
        super().tearDownClass()

    def setUp(self) -> None:
        self.stream, self.root = create_stream(self.bridge)
        # `env` is what the upstream factory case builds its own factory from.
        self.env = Environment(env=jetstream_env(self.bridge, self.stream, self.root))
        self.jetstream = Factory(jetstream_env(self.bridge, self.stream, self.root))
        self.addCleanup(self.jetstream.close)
        super().setUp()


class TestAggregateRecorder(JetStreamCase, upstream.AggregateRecorderTestCase):
    def create_recorder(self) -> AggregateRecorder:
        return self.jetstream.aggregate_recorder()


class TestSnapshotRecorder(JetStreamCase, upstream.AggregateRecorderTestCase):
    """Snapshots live on `<root>.snapshots.<id>`, where versions may skip but never repeat."""

    def create_recorder(self) -> AggregateRecorder:
        return self.jetstream.aggregate_recorder(purpose="snapshots")


class TestApplicationRecorder(JetStreamCase, upstream.ApplicationRecorderTestCase):
    def create_recorder(self) -> ApplicationRecorder:
        return self.jetstream.application_recorder()

    def test_insert_subscribe(self) -> None:
        self.optional_test_insert_subscribe()


class TestNonInterleavingNotificationIds(JetStreamCase, upstream.NonInterleavingNotificationIDsBaseCase):
    """Two writers of 1000 events each: an atomic batch occupies consecutive sequences."""

    def create_recorder(self) -> ApplicationRecorder:
        return self.jetstream.application_recorder()


class TestTrackingRecorder(JetStreamCase, upstream.TrackingRecorderTestCase):
    def create_recorder(self) -> TrackingRecorder:
        return self.jetstream.tracking_recorder()


class TestProcessRecorder(JetStreamCase, upstream.ProcessRecorderTestCase):
    def create_recorder(self) -> ProcessRecorder:
        return self.jetstream.process_recorder()


class CustomTrackingRecorder(JetStreamTrackingRecorder):
    pass


class TestInfrastructureFactory(JetStreamCase, upstream.InfrastructureFactoryTestCase[Factory]):
    def expected_factory_class(self) -> type[Factory]:
        return Factory

    def expected_aggregate_recorder_class(self) -> type[AggregateRecorder]:
        return JetStreamAggregateRecorder

    def expected_application_recorder_class(self) -> type[ApplicationRecorder]:
        return JetStreamApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[TrackingRecorder]:
        return JetStreamTrackingRecorder

    def tracking_recorder_subclass(self) -> type[TrackingRecorder]:
        return CustomTrackingRecorder

    def expected_process_recorder_class(self) -> type[ProcessRecorder]:
        return JetStreamProcessRecorder


class TestExampleApplication(JetStreamCase, upstream_app.ExampleApplicationTestCase):
    """eventsourcing's bank-account example, snapshots included, with PERSISTENCE_MODULE set."""

    expected_factory_topic = f"{MODULE}:Factory"

    def setUp(self) -> None:
        super().setUp()
        patch = mock.patch.dict(os.environ, jetstream_env(self.bridge, self.stream, self.root))
        patch.start()
        self.addCleanup(patch.stop)


# -- Warden's own properties ---------------------------------------------------------------


@pytest.fixture(scope="module")
def es_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(store_dir=tmp_path_factory.mktemp("es-nats"), name="es").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bridge(es_server: EmbeddedServer) -> Iterator[NatsBridge]:
    with NatsBridge.start(es_server.url) as started:
        yield started


@pytest.fixture
def stream(bridge: NatsBridge) -> tuple[str, str]:
    return create_stream(bridge)


@pytest.fixture
def factory(bridge: NatsBridge, stream: tuple[str, str]) -> Iterator[Factory]:
    built = Factory(jetstream_env(bridge, *stream))
    yield built
    built.close()


def stored(originator_id: UUID, version: int, state: bytes = b"{}") -> StoredEvent:
    return StoredEvent(originator_id, version, "tests:Happened", state)


def application_recorder(factory: Factory) -> JetStreamApplicationRecorder:
    recorder = factory.application_recorder()
    assert isinstance(recorder, JetStreamApplicationRecorder)
    return recorder


def process_recorder(factory: Factory) -> JetStreamProcessRecorder:
    recorder = factory.process_recorder()
    assert isinstance(recorder, JetStreamProcessRecorder)
    return recorder


class Task(Aggregate):
    def __init__(self, title: str) -> None:
        self.title = title
        self.notes: list[str] = []

    @event("Noted")
    def note(self, text: str) -> None:
        self.notes.append(text)


def test_by_default_an_aggregate_lives_on_its_topology_event_subject(bridge: NatsBridge) -> None:
    recorder = application_recorder(Factory(bridge_env(bridge)))
    originator_id = uuid4()
    assert recorder.subject(originator_id) == topology.event_subject(originator_id)
    assert recorder.io.stream == topology.EVENT_STREAM


def test_a_stored_event_keeps_its_state_as_payload_and_the_rest_in_headers(
    factory: Factory, bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    recorder = application_recorder(factory)
    originator_id = uuid4()
    (seq,) = recorder.insert_events([stored(originator_id, 1, b'{"a":1}')]) or []

    message = bridge.call(lambda: bridge.js.get_msg(stream[0], seq))
    assert message.subject == f"{stream[1]}.{originator_id}"
    assert message.data == b'{"a":1}'
    assert message.headers is not None
    assert message.headers["Warden-Originator"] == str(originator_id)
    assert message.headers["Warden-Version"] == "1"
    assert message.headers["Warden-Topic"] == "tests:Happened"
    assert message.headers["Nats-Msg-Id"] == f"{stream[1]}.{originator_id}:1"


def race(writers: list[JetStreamApplicationRecorder], originator_id: UUID) -> list[str]:
    """Each writer appends version 2 at the same moment; how each one fared."""
    start = threading.Barrier(len(writers))
    outcomes: list[str] = []

    def write(number: int) -> None:
        start.wait()
        try:
            writers[number].insert_events([stored(originator_id, 2, f"{number}".encode())])
        except IntegrityError:
            outcomes.append("lost")
        else:
            outcomes.append("won")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_of_two_writers_of_the_same_aggregate_version_exactly_one_wins(factory: Factory) -> None:
    for _ in range(10):
        originator_id = uuid4()
        # Two replicas, each with its own cache; both loaded the aggregate at version 1, so
        # both skip the read before writing and race on the server's expected sequence.
        writers = [application_recorder(factory) for _ in range(2)]
        writers[0].insert_events([stored(originator_id, 1)])
        for writer in writers:
            writer.select_events(originator_id)

        assert sorted(race(writers, originator_id)) == ["lost", "won"]
        assert [e.originator_version for e in writers[1].select_events(originator_id)] == [1, 2]


def test_a_write_with_a_stale_cached_head_is_refused_by_the_server(factory: Factory) -> None:
    originator_id = uuid4()
    behind, ahead = application_recorder(factory), application_recorder(factory)
    behind.insert_events([stored(originator_id, 1)])
    ahead.insert_events([stored(originator_id, 2)])

    with pytest.raises(IntegrityError, match="already recorded"):
        behind.insert_events([stored(originator_id, 2, b"late")])
    assert [e.state for e in ahead.select_events(originator_id)] == [b"{}", b"{}"]


def write_packed(recorder: JetStreamRecorder, events: list[StoredEvent]) -> list[int]:
    """Warden's own save path: each aggregate's events in one message."""
    return recorder.io.bridge.call(lambda: recorder.write(events, packed=True))


@pytest.mark.parametrize(
    ("events", "packed", "retry_error"),
    [
        # A single publish: the server checks the expected sequence before the message id.
        (1, False, 10071),
        # An atomic batch: the server refuses the repeated message ids first.
        (3, False, 10201),
        # A packed record is a single publish.
        (3, True, 10071),
    ],
)
def test_a_write_whose_ack_was_lost_is_retried_with_the_same_msg_ids_and_stored_once(
    factory: Factory, monkeypatch: pytest.MonkeyPatch, events: int, packed: bool, retry_error: int
) -> None:
    recorder = application_recorder(factory)
    real_publish, real_landed = recorder.io.publish, recorder._landed
    acks: list[_Ack] = []

    async def ack_lost_once(messages: list[_Out]) -> _Ack:
        ack = await real_publish(messages)  # the write lands...
        acks.append(ack)
        if len(acks) == 1:
            raise nats.errors.TimeoutError  # ...but its ack never arrives
        return ack

    checks: list[object] = []

    async def blind_once(*args: Any) -> list[int] | None:
        # The first "did it land?" read misses it (as a lagging replica could), so the
        # recorder publishes again, with the same message ids and expectations.
        checks.append(args)
        return None if len(checks) == 1 else await real_landed(*args)

    monkeypatch.setattr(recorder.io, "publish", ack_lost_once)
    monkeypatch.setattr(recorder, "_landed", blind_once)
    originator_id = uuid4()
    batch = [stored(originator_id, v, f'"v{v}"'.encode()) for v in range(1, events + 1)]

    seqs = write_packed(recorder, batch) if packed else recorder.insert_events(batch)
    assert seqs == ([1] * events if packed else list(range(1, events + 1)))
    assert [a.error_code for a in acks] == [0, retry_error]
    assert recorder.select_events(originator_id) == batch
    assert recorder.max_notification_id() == (1 if packed else events)


def test_a_packed_write_of_one_aggregate_is_one_message_read_back_as_each_of_its_events(
    factory: Factory, bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    writer, reader = application_recorder(factory), application_recorder(factory)
    originator_id = uuid4()
    batch = [stored(originator_id, v, b'{"v":%d}' % v) for v in (1, 2, 3)]

    assert write_packed(writer, batch) == [1, 1, 1]
    info = bridge.call(lambda: bridge.js.stream_info(stream[0]))
    assert info.state.messages == 1
    message = bridge.call(lambda: bridge.js.get_msg(stream[0], 1))
    assert message.data == b'[{"v":1},{"v":2},{"v":3}]'
    assert message.headers is not None
    assert message.headers["Warden-Versions"] == "1-3" and message.headers["Warden-Version"] == "3"
    assert message.headers["Warden-Topic"] == ",".join(["tests:Happened"] * 3)
    assert message.headers["Nats-Msg-Id"] == f"{stream[1]}.{originator_id}:1"

    # Every read returns the events one by one, with the record's sequence as their id.
    assert reader.select_events(originator_id) == batch
    assert reader.select_events(originator_id, gt=1, lte=2) == batch[1:2]
    notifications = reader.select_notifications(None, 10)
    assert [(n.id, n.originator_version, n.state) for n in notifications] == [
        (1, e.originator_version, e.state) for e in batch
    ]
    with reader.subscribe(gt=0) as subscription:
        followed = [next(subscription) for _ in batch]
    assert all(isinstance(n, RecordNotification) for n in followed)
    assert [
        (n.originator_version, n.ordinal, n.count) for n in followed if isinstance(n, RecordNotification)
    ] == [(1, 0, 3), (2, 1, 3), (3, 2, 3)]
    # The head is the record's last version: the next write, by either recorder, is version 4.
    assert reader.insert_events([stored(originator_id, 4)]) == [2]
    with pytest.raises(IntegrityError):
        write_packed(writer, [stored(originator_id, 4), stored(originator_id, 5)])
    assert [e.originator_version for e in application_recorder(factory).select_events(originator_id)] == [
        1,
        2,
        3,
        4,
    ]


def test_a_packed_write_refuses_states_that_are_not_json_values(factory: Factory) -> None:
    recorder, originator_id = application_recorder(factory), uuid4()
    with pytest.raises(DataError, match="JSON value"):
        write_packed(recorder, [stored(originator_id, 1, b"v1"), stored(originator_id, 2, b"{} {}")])
    assert recorder.select_events(originator_id) == []


def test_a_packed_write_that_lost_its_race_is_refused_and_stores_nothing(
    factory: Factory, bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    originator_id = uuid4()
    behind, ahead = application_recorder(factory), application_recorder(factory)
    behind.insert_events([stored(originator_id, 1)])
    ahead.select_events(originator_id)
    ahead.insert_events([stored(originator_id, 2, b'"won"')])

    with pytest.raises(IntegrityError):
        write_packed(behind, [stored(originator_id, 2, b'"lost"'), stored(originator_id, 3, b'"lost"')])
    assert [e.state for e in behind.select_events(originator_id)] == [b"{}", b'"won"']
    assert bridge.call(lambda: bridge.js.stream_info(stream[0])).state.messages == 2


def test_a_packed_save_spanning_aggregates_is_one_atomic_batch_of_one_message_each(
    factory: Factory, bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    writer, rival = application_recorder(factory), application_recorder(factory)
    job, agent = uuid4(), uuid4()
    writer.insert_events([stored(agent, 1)])
    rival.select_events(agent)

    saved = [stored(job, 1), stored(agent, 2), stored(job, 2), stored(job, 3)]
    # Two messages (the job's packed record first, where its first event is), one batch.
    assert write_packed(writer, saved) == [2, 3, 2, 2]
    assert bridge.call(lambda: bridge.js.stream_info(stream[0])).state.messages == 3

    # A conflict on one aggregate fails the whole save: nothing of the other is stored.
    other = uuid4()
    with pytest.raises(IntegrityError):
        write_packed(rival, [stored(other, 1), stored(other, 2), stored(agent, 2, b'"late"')])
    assert rival.select_events(other) == []
    assert bridge.call(lambda: bridge.js.stream_info(stream[0])).state.messages == 3


def test_the_server_deduplicates_a_message_published_again_with_its_msg_id(
    bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    subject, headers = f"{stream[1]}.{uuid4()}", {"Nats-Msg-Id": "job-1:1"}
    first = bridge.call(lambda: bridge.js.publish(subject, b"x", headers=headers))
    again = bridge.call(lambda: bridge.js.publish(subject, b"x", headers=headers))
    assert (again.seq, again.duplicate) == (first.seq, True)


def test_inside_an_atomic_batch_only_the_first_message_per_subject_may_expect_a_sequence(
    bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    io = JetStreamIO(bridge, stream[0], 5.0)
    job, other = f"{stream[1]}.{uuid4()}", f"{stream[1]}.{uuid4()}"

    def publish(*messages: tuple[str, bytes, str | None]) -> _Ack:
        outs = [
            _Out(subject, data, {} if expect is None else {EXPECTED_SUBJECT_SEQ: expect})
            for subject, data, expect in messages
        ]
        return bridge.call(partial(io.publish, outs))

    # On nats-server 2.15 a second expectation on a subject written earlier in the same batch
    # is refused whatever its value (error 10164), even the sequence the first will get.
    assert publish((job, b"1", "0"), (job, b"2", "0")).error_code == 10164
    assert publish((job, b"1", "0"), (job, b"2", "1")).error_code == 10164
    both = publish((job, b"1", "0"), (job, b"2", None))
    assert (both.seq, both.count) == (2, 2)
    # One expectation per subject is fine, and one stale expectation fails the whole batch.
    assert publish((other, b"1", "0"), (job, b"3", "1")).error_code == 10071
    mixed = publish((other, b"1", "0"), (job, b"3", "2"))
    assert (mixed.seq, mixed.count) == (4, 2)


def test_events_and_their_tracking_record_land_together_or_not_at_all(factory: Factory) -> None:
    originator_id = uuid4()
    first, second = process_recorder(factory), process_recorder(factory)
    first.insert_events([stored(originator_id, 1)], tracking=Tracking("upstream", 1))
    second.select_events(originator_id)  # second now believes version 1 is the last
    first.insert_events([stored(originator_id, 2)], tracking=Tracking("upstream", 2))

    # The batch reaches the server and fails on the event's expectation: tracking 3 is not kept.
    with pytest.raises(IntegrityError):
        second.insert_events([stored(originator_id, 2, b"other")], tracking=Tracking("upstream", 3))
    assert second.max_tracking_id("upstream") == 2
    assert [e.state for e in second.select_events(originator_id)] == [b"{}", b"{}"]


def test_notifications_skip_tracking_records_and_snapshots_in_the_same_stream(
    factory: Factory,
) -> None:
    recorder, snapshots = process_recorder(factory), factory.aggregate_recorder("snapshots")
    originator_id = uuid4()
    recorder.insert_events([stored(originator_id, 1)], tracking=Tracking("upstream", 7))
    snapshots.insert_events([stored(originator_id, 1, b"snapshot")])
    recorder.insert_events([stored(originator_id, 2)])

    notifications = recorder.select_notifications(start=None, limit=10)
    assert [(n.id, n.originator_version) for n in notifications] == [(1, 1), (4, 2)]
    assert recorder.max_notification_id() == 4
    assert [e.state for e in snapshots.select_events(originator_id)] == [b"snapshot"]


def test_text_originator_ids_become_unique_subject_tokens(
    bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    env = {**jetstream_env(bridge, *stream), "ORIGINATOR_ID_TYPE": "text"}
    recorder = application_recorder(Factory(env))
    ids = ["job 1", "job.1", "job%201", "job*>", "tracking"]
    for originator_id in ids:
        recorder.insert_events([StoredEvent(originator_id, 1, "t", originator_id.encode())])
    for originator_id in ids:
        (only,) = recorder.select_events(originator_id)
        assert (only.originator_id, only.state) == (originator_id, originator_id.encode())
    assert len({recorder.subject(i) for i in ids}) == len(ids)


def test_a_subscription_blocked_waiting_for_events_stops_cleanly_from_another_thread(
    factory: Factory,
) -> None:
    recorder = application_recorder(factory)
    subscription = recorder.subscribe(gt=None)
    received: list[int] = []
    got_one = threading.Event()

    def consume() -> None:
        for notification in subscription:
            received.append(notification.id)
            got_one.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    recorder.insert_events([stored(uuid4(), 1)])
    assert got_one.wait(5)
    subscription.stop()  # the consumer is blocked waiting for a second event
    consumer.join(5)
    assert not consumer.is_alive()
    assert received == [1]


def test_closing_the_factory_ends_an_iteration_waiting_on_its_subscription(
    bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    factory = Factory(jetstream_env(bridge, *stream))
    subscription = application_recorder(factory).subscribe(gt=None)
    consumer = threading.Thread(target=lambda: list(subscription))
    consumer.start()
    factory.close()
    consumer.join(5)
    assert not consumer.is_alive()


def test_an_application_saves_and_reloads_an_aggregate_through_persistence_module_jetstream(
    es_server: EmbeddedServer, stream: tuple[str, str]
) -> None:
    env = {
        "PERSISTENCE_MODULE": MODULE,
        URL_ENV: es_server.url,  # each application starts (and closes) its own bridge
        "WARDEN_EVENTS_STREAM": stream[0],
        "WARDEN_EVENTS_SUBJECT_ROOT": stream[1],
        "IS_SNAPSHOTTING_ENABLED": "y",
    }
    with Application[UUID](env=env) as app:
        task = Task("ship the recorder")
        task.note("tests first")
        task.note("then the docs")
        recordings = app.save(task)
        assert [r.notification.id for r in recordings] == [1, 2, 3]
        bridge = app.factory.io.bridge  # type: ignore[attr-defined]
    assert bridge.closed

    with Application[UUID](env=env) as other:  # another process: no cache, its own connection
        copy: Task = other.repository.get(task.id)
        assert isinstance(copy, Task)
        assert (copy.title, copy.notes, copy.version) == (task.title, task.notes, 3)
        stale: Task = other.repository.get(task.id)
        copy.note("and a snapshot")
        other.save(copy)
        other.take_snapshot(task.id)
        again: Task = other.repository.get(task.id)
        assert isinstance(again, Task)
        assert (again.notes[-1], again.version) == ("and a snapshot", 4)
        stale.note("written from an old copy")
        with pytest.raises(IntegrityError):
            other.save(stale)


def test_the_factory_asks_for_a_bridge_or_a_url() -> None:
    with pytest.raises(InfrastructureFactoryError, match=f"{BRIDGE_ENV}.*{URL_ENV}"):
        Factory({"PERSISTENCE_MODULE": MODULE})


def test_a_recorder_called_on_the_event_loop_thread_is_refused(bridge: NatsBridge) -> None:
    async def on_the_loop() -> None:
        bridge.call(lambda: asyncio.sleep(0))

    with pytest.raises(BridgeError, match="event loop's own thread"):
        bridge.submit(on_the_loop).result(5)


async def test_a_service_attaches_its_connection_and_calls_the_application_from_worker_threads(
    es_server: EmbeddedServer, stream: tuple[str, str]
) -> None:
    nc = await nats.connect(es_server.url)
    try:
        bridge = NatsBridge.attach(nc)
        env = {
            "PERSISTENCE_MODULE": MODULE,
            **bridge_env(bridge),
            "WARDEN_EVENTS_STREAM": stream[0],
            "WARDEN_EVENTS_SUBJECT_ROOT": stream[1],
        }
        app = await anyio.to_thread.run_sync(lambda: Application[UUID](env=env))
        task = Task("from a service")
        await anyio.to_thread.run_sync(app.save, task)
        copy: Task = await anyio.to_thread.run_sync(app.repository.get, task.id)
        assert isinstance(copy, Task)
        assert copy.title == "from a service"
        with pytest.raises(BridgeError):
            app.repository.get(task.id)  # on the loop thread: refused, not deadlocked
        await anyio.to_thread.run_sync(app.close)
        bridge.close()
        assert nc.is_connected  # the service's connection stays the service's to close
    finally:
        await nc.close()


# -- foreign messages on the recorder's subjects ----------------------------------------------


def refuse_bad(event: StoredEvent) -> str | None:
    """A payload check (WARDEN_EVENT_CHECK) for the tests: the payload b"bad" is not ours."""
    return "a bad payload" if event.state == b"bad" else None


def publish_raw(bridge: NatsBridge, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
    ack = bridge.call(lambda: bridge.js.publish(subject, data, headers=headers))
    return int(ack.seq)


def test_a_foreign_last_message_never_wedges_the_next_write(
    factory: Factory, bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    originator_id = uuid4()
    cached = application_recorder(factory)
    cached.insert_events([stored(originator_id, 1), stored(originator_id, 2)])
    subject = cached.subject(originator_id)
    ours = {"Warden-Originator": str(originator_id), "Warden-Topic": "tests:Happened"}
    foreign = [
        (b"no headers", None),
        (b"{}", {**ours, "Warden-Originator": str(uuid4()), "Warden-Version": "3"}),  # another's
        (b"{}", {**ours, "Warden-Version": "three"}),
        (b"{}", {**ours, "Warden-Version": "1"}),  # a replayed copy of version 1: out of the chain
    ]
    version = 2
    for data, headers in foreign:
        junk = publish_raw(bridge, subject, data, headers)
        version += 1
        # A writer whose cached head is now behind the subject, and one with no cache at all.
        writer = cached if version % 2 else application_recorder(factory)
        (seq,) = writer.insert_events([stored(originator_id, version)]) or []
        assert seq > junk
    reader = application_recorder(factory)
    assert [e.originator_version for e in reader.select_events(originator_id)] == list(range(1, version + 1))
    # Notifications carry no chain: only the replayed copy, whose headers are all in order,
    # reaches their readers (the read model and the views fold a version only once anyway).
    notifications = reader.select_notifications(None, 100)
    assert [n.originator_version for n in notifications] == [1, 2, 3, 4, 5, 1, 6]
    assert notifications[5].id == junk


def test_a_record_the_payload_check_refuses_is_neither_read_nor_counted_as_a_version(
    bridge: NatsBridge, stream: tuple[str, str]
) -> None:
    env = {**jetstream_env(bridge, *stream), Factory.EVENT_CHECK: "tests.test_jetstream_recorder:refuse_bad"}
    factory = Factory(env)
    try:
        originator_id = uuid4()
        recorder = application_recorder(factory)
        recorder.insert_events([stored(originator_id, 1)])
        headers = {
            "Warden-Originator": str(originator_id),
            "Warden-Version": "2",
            "Warden-Topic": "tests:Happened",
        }
        publish_raw(bridge, recorder.subject(originator_id), b"bad", headers)
        fresh = application_recorder(factory)
        assert [e.state for e in fresh.select_events(originator_id)] == [b"{}"]
        fresh.insert_events([stored(originator_id, 2, b"good")])
        assert [e.state for e in recorder.select_events(originator_id)] == [b"{}", b"good"]
    finally:
        factory.close()


def test_reading_a_subject_through_the_leader_finds_what_direct_gets_find(factory: Factory) -> None:
    recorder = application_recorder(factory)
    originator_id, other = uuid4(), uuid4()
    for version in (1, 2, 3):
        recorder.insert_events([stored(originator_id, version), stored(other, version)])
    subject = recorder.subject(originator_id)
    direct = recorder.io.run(lambda: recorder.io.scan(subject, 1))
    leader = recorder.io.run(lambda: recorder.io.scan_leader(subject, direct[-1].seq))
    assert [r.seq for r in leader] == [r.seq for r in direct] and len(direct) == 3
    assert [r.seq for r in recorder.io.run(lambda: recorder.io.scan_leader(subject, direct[1].seq))] == [
        r.seq for r in direct[:2]
    ]
