"""A hostile agent against the deployed credentials (ops/nats/single.conf) and every input
service: forged reply addresses never make a service publish for it, and hundreds of generated
hostile inputs are each refused with a recorded reason, none retried, nothing stored changed."""

from __future__ import annotations

import json
import logging
import os
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.js import api as js_api

from shared import bus, credentials, topology
from shared.contract import Contract, Stopping
from shared.events import AnyEvent, InputRejected, LeaseGranted, ReplyRefused, agent_id_for, decode_all
from shared.forensics.ledger import verify_log
from shared.messages import Accepted, JobRequest, LeaseGrant, OperatorCommand, Rejected, reply_decoder
from shared.persistence import written
from shared.runtime import Context
from shared.sdk import AgentClient, JobContext, connect_agent
from shared.server import EmbeddedServer
from tests import opsnats
from tests.harness import running, submit
from tests.test_credentials import add_agent

SERVICES = ["scheduler", "reconciler", "checker", "revoker"]
REGISTERED = {"alice"}
CONTRACT = Contract(stopping=Stopping(lease_ttl_s=60, heartbeat_interval_s=20))


@pytest.fixture
def server(ops_server: opsnats.OpsServer, monkeypatch: pytest.MonkeyPatch) -> opsnats.OpsServer:
    """The deployed configuration, with this process's services connecting as warden-service."""
    monkeypatch.setenv(credentials.USER_ENV, credentials.SERVICE_USER)
    monkeypatch.setenv(credentials.PASSWORD_ENV, opsnats.SERVICE_PASSWORD)
    return ops_server


@asynccontextmanager
async def as_agent(node: opsnats.OpsServer, name: str, password: str) -> AsyncIterator[Client]:
    nc = await connect_agent(node.server.url, name, user=credentials.agent_user(name), password=password)
    try:
        yield nc
    finally:
        await nc.close()


class Record:
    """Every event appended from now on, folded as it arrives (an ordered consumer)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, AnyEvent]] = []
        self.changed = anyio.Event()

    async def follow(self, nc: Client, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async def cb(msg: Any) -> None:
            seq = msg.metadata.sequence.stream
            self.events.extend((seq, msg.subject, event) for event in decode_all(msg.data))
            self.changed.set()

        sub = await nc.jetstream().subscribe(
            f"{topology.EVENT_ROOT}.>", ordered_consumer=True, cb=cb, deliver_policy=js_api.DeliverPolicy.ALL
        )
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def until(self, done: Any, timeout: float) -> None:
        """Wait (with a deadline) until `done()` holds over the events seen so far."""
        with anyio.fail_after(timeout):
            while not done():
                self.changed = anyio.Event()
                await self.changed.wait()

    def of(self, tp: type[Any]) -> list[Any]:
        return [e for _s, _subj, e in self.events if isinstance(e, tp)]


async def publish(nc: Client, subject: str, data: bytes, reply_to: str | None = None) -> int:
    """Store one input as a raw client would (no SDK): its input stream sequence."""
    headers = {topology.REPLY_HEADER: reply_to} if reply_to is not None else None
    ack = await nc.jetstream().publish(subject, data, headers=headers, timeout=10)
    return int(ack.seq)


async def test_forged_reply_addresses_are_decided_but_never_published_to(
    server: opsnats.OpsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's escape: an agent names the event stream, the JetStream API, another agent's
    inbox or an operator subject as its reply address. Its inputs are still decided (it is
    granted a lease); nothing is published there; each refusal is recorded; and the operator can
    still revoke it and cancel its job, with the ledger intact."""
    mallory = add_agent(server, "mallory")
    alice = add_agent(server, "alice")
    record = Record()
    url = server.server.url
    async with (
        running(url, SERVICES),
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
        opsnats.connected(url, **opsnats.service_credentials()) as watcher,
        as_agent(server, "mallory", mallory) as nc,
        as_agent(server, "alice", alice) as alice_nc,
        anyio.create_task_group() as tg,
    ):
        await tg.start(record.follow, watcher)
        job_id = await submit(
            operator, JobRequest(idempotency_key=str(uuid.uuid4()), kind="k", contract=CONTRACT)
        )
        overheard: list[str] = []

        async def overhear(msg: Any) -> None:
            overheard.append(msg.subject)

        # What an answer at each forged address would reach (the service credential may listen).
        await watcher.subscribe("_INBOX.alice.>", cb=overhear)
        await watcher.subscribe(topology.operator_subject("reinstate"), cb=overhear)
        await alice_nc.subscribe("_INBOX.alice.>", cb=overhear)
        await watcher.flush()

        own_agent = topology.event_subject(agent_id_for("mallory"))
        register_seq = await publish(nc, topology.agent_subject("mallory", "register"), b"{}", own_agent)
        await record.until(lambda: record.of(ReplyRefused), 20)
        claim = msgspec.json.encode({"wait_s": 30})
        targets = [
            topology.event_subject(job_id),
            "$JS.API.CONSUMER.PAUSE.WARDEN_INPUT.revoker",
            "_INBOX.alice.steal",
            topology.operator_subject("reinstate"),
            "a b",
        ]
        seqs = [await publish(nc, topology.agent_subject("mallory", "claim"), claim, t) for t in targets]
        wanted = {register_seq, *seqs}
        await record.until(lambda: {e.input_seq for e in record.of(ReplyRefused)} >= wanted, 30)

        refusals = {e.input_seq: e for e in record.of(ReplyRefused)}
        for seq, target in zip([register_seq, *seqs], [own_agent, *targets], strict=True):
            assert refusals[seq].reply_to == target and refusals[seq].sender == "mallory"
            assert "mallory's own inbox" in refusals[seq].reason or "not a subject" in refusals[seq].reason
        # Still decided: the first claim was granted the job (the rest found no more work).
        grants = [e for e in record.of(LeaseGranted) if e.originator_id == job_id]
        assert [g.agent for g in grants] == ["mallory"] and grants[0].claim_seq == seqs[0]

        # Only Warden's own events on the job's and the agent's subjects; the chain holds.
        for subject in (topology.event_subject(job_id), own_agent):
            for stored in await bus.read_subject(watcher.jetstream(), topology.EVENT_STREAM, subject):
                found = written.events_of(stored.subject, stored.headers, stored.data)
                assert not isinstance(found, str), found
        report = await verify_log(watcher.jetstream())
        assert report.ok, report.breaks

        # The operator's commands are answered and take effect.
        revoke = OperatorCommand(operator="op", reason="forged replies", agent="mallory")
        answer = await bus.request(operator, topology.operator_subject("revoke"), revoke, timeout=20)
        assert isinstance(answer, Accepted), answer
        cancel = OperatorCommand(operator="op", reason="forged replies", job_id=job_id)
        answer = await bus.request(operator, topology.operator_subject("cancel"), cancel, timeout=20)
        assert isinstance(answer, Accepted), answer
        assert overheard == []
        tg.cancel_scope.cancel()
    assert "not answered" in caplog.text


# --- the fuzzer ------------------------------------------------------------------------------

# Fields by the JSON type they must have, per input type: a value of another type breaks them.
TYPED_FIELDS: dict[str, dict[str, str]] = {
    "request": {"idempotency_key": "str", "kind": "str", "contract": "object", "submitter": "str"},
    "register": {"max_concurrent": "int", "kinds": "list"},
    "claim": {"kinds": "list", "wait_s": "number"},
    "heartbeat": {"job_id": "uuid", "epoch": "int", "progress": "number", "note": "str"},
    "propose": {"job_id": "uuid", "epoch": "int", "patch": "str", "files": "object"},
    "release": {"job_id": "uuid", "epoch": "int", "reason": "str"},
    "op": {"operator": "str", "reason": "str", "job_id": "uuid", "agent": "str", "level": "int"},
}
WRONG: dict[str, list[Any]] = {
    "str": [1, [], {}, True],  # not None: some string fields are optional
    "int": ["1", 1.5, [], {}, True, -(2**70)],
    "number": ["x", [], {}, True],
    "list": ["x", 1, {}, True],
    "object": ["x", 1, [], True],
    "uuid": ["not-a-uuid", 1, [], "0" * 40],
}


def _valid(kind: str, job_id: uuid.UUID, rng: random.Random) -> dict[str, Any]:
    bodies: dict[str, dict[str, Any]] = {
        "request": {"idempotency_key": f"fuzz-{rng.random()}", "kind": "k"},
        "register": {"max_concurrent": 1},
        "claim": {"wait_s": 5},
        "heartbeat": {"job_id": str(job_id), "epoch": 1},
        "propose": {"job_id": str(job_id), "epoch": 1, "patch": ""},
        "release": {"job_id": str(job_id), "epoch": 1},
        "op": {"operator": "fuzz", "reason": "fuzz", "job_id": str(job_id)},
    }
    return bodies[kind]


def _break(kind: str, body: dict[str, Any], rng: random.Random) -> bytes:
    """One mutation that no decoder may accept: every fuzz input must be refused."""
    choice = rng.randrange(10)
    encoded = json.dumps(body).encode()
    if choice == 0:  # not JSON at all
        return rng.choice([b"\x00", b"{", b"", b"}{", b"\xff\xfe"]) + bytes(
            rng.randrange(256) for _ in range(20)
        )
    if choice == 1:  # invalid UTF-8 inside a string
        return encoded[:-1] + b', "note\xff": "\xc3\x28"}'
    if choice == 2:  # nested past any limit, at the top or in a field
        n = rng.choice([100, 5_000, 60_000])
        return rng.choice([b"[" * n + b"]" * n, b'{"kinds": ' + b"[" * n + b"]" * n + b"}"])
    if choice == 3:  # numbers out of any range
        field = rng.choice(["epoch", "max_concurrent", "level", "wait_s", "progress"])
        number = rng.choice([b"1e400", b"-1e400", b"1" + b"0" * 400])
        return b'{"%s": %s}' % (field.encode(), number)
    if choice == 4:  # a field that does not exist
        return json.dumps({**body, f"x{rng.randrange(10**6)}": rng.random()}).encode()
    if choice == 5:  # a known field of the wrong type
        name, tp = rng.choice(sorted(TYPED_FIELDS[kind].items()))
        return json.dumps({**body, name: rng.choice(WRONG[tp])}).encode()
    if choice == 6:  # the wrong type tag, or not an object at all
        return rng.choice(
            [json.dumps({**body, "type": "job.completed"}).encode(), b"[]", b'"x"', b"null", b"7"]
        )
    if choice == 7:  # huge
        return json.dumps({**body, "x": "a" * (topology.MAX_INPUT_BYTES + 1)}).encode()
    if choice == 8:  # control characters and unicode in every string, plus an unknown field
        return json.dumps(
            {k: "\u0000\u202e\ud7ff" if isinstance(v, str) else v for k, v in body.items()} | {"\u0000": 1}
        ).encode()
    return json.dumps({**body, "epoch": 0, "max_concurrent": 0, "wait_s": -1, "level": "x"}).encode()


def _reply(subject: str, rng: random.Random) -> str | None:
    agent = topology.input_agent(subject)
    own = (
        f"_INBOX.{agent}.fuzz.{rng.randrange(10**9)}"
        if agent
        else f"{topology.OPERATOR_INBOX_PREFIX}.fuzz.{rng.randrange(10**9)}"
    )
    hostile = [
        "warden.evt.00000000-0000-0000-0000-000000000000",
        "$JS.API.STREAM.PURGE.WARDEN_INPUT",
        "$O.WARDEN_PAYLOADS.C.x",
        "_INBOX.alice.x",
        "a b",
        "_INBOX.>",
        "_INBOX." + "y" * 300,
        "warden.in.op.reinstate",
    ]
    return rng.choice([None, own, own, *hostile])


async def test_hundreds_of_generated_hostile_inputs_are_each_refused_once_and_recorded(
    server: opsnats.OpsServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each input's own record is the point here; the per-agent throttle (which records a window
    # once, tests/test_flooding.py) would stand for most of them.
    monkeypatch.setenv("WARDEN_AGENT_INPUT_LIMIT", "100000")
    # Nor the agent stream's ring (tests/test_flooding.py): every one of mallory's inputs must be
    # read, however far the services fall behind on this loaded machine.
    monkeypatch.setenv("WARDEN_AGENT_INPUT_PER_SUBJECT", "1000")
    seed = int(os.environ.get("WARDEN_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz seed {seed} (WARDEN_FUZZ_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    mallory = add_agent(server, "mallory")
    alice = add_agent(server, "alice")
    record = Record()
    url = server.server.url
    caplog.set_level(logging.WARNING, logger="warden")
    ctx: Context
    async with (
        running(url, SERVICES) as ctx,
        opsnats.connected(url, **opsnats.operator_credentials()) as operator,
        opsnats.connected(url, **opsnats.service_credentials()) as watcher,
        as_agent(server, "mallory", mallory) as nc,
        as_agent(server, "alice", alice) as alice_nc,
        anyio.create_task_group() as tg,
    ):
        await tg.start(record.follow, watcher)
        honest = AgentClient(alice_nc, "alice")
        await honest.register()  # a registered agent's inbox is no client's reply address
        job_id = await submit(
            operator, JobRequest(idempotency_key=str(uuid.uuid4()), kind="k", contract=CONTRACT)
        )
        before = [
            (m.seq, m.subject, m.data)
            for m in await bus.read_subject(
                watcher.jetstream(), topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.>"
            )
        ]

        answers: list[bytes] = []
        answered = anyio.Event()
        expect_answers = 0
        all_sent = False

        async def on_answer(msg: Any) -> None:
            answers.append(msg.data)
            if all_sent and len(answers) >= expect_answers:
                answered.set()

        await nc.subscribe("_INBOX.mallory.fuzz.>", cb=on_answer)
        await operator.subscribe(f"{topology.OPERATOR_INBOX_PREFIX}.fuzz.>", cb=on_answer)
        agent_subjects = [topology.agent_subject("mallory", v) for v in topology.AGENT_VERBS]
        operator_subjects = [
            topology.REQUEST_SUBJECT,
            *(topology.operator_subject(v) for v in topology.OPERATOR_VERBS),
        ]
        # By (stream, sequence): requests and agents' inputs are numbered in different streams.
        sent: dict[tuple[str, int], tuple[str, str | None]] = {}
        bodies: dict[tuple[str, int], bytes] = {}
        for i in range(540):
            client, subjects = (nc, agent_subjects) if i % 2 == 0 else (operator, operator_subjects)
            subject = rng.choice(subjects)
            parsed = topology.parse_agent_subject(subject)
            kind = parsed[1] if parsed else ("request" if subject == topology.REQUEST_SUBJECT else "op")
            data = _break(kind, _valid(kind, job_id, rng), rng)
            reply_to = _reply(subject, rng)
            seq = (topology.stream_of(subject), await publish(client, subject, data, reply_to))
            sent[seq] = (subject, reply_to)
            bodies[seq] = data[:300]
            if reply_to is not None and topology.reply_refusal(subject, reply_to, REGISTERED) is None:
                expect_answers += 1

        def recorded() -> dict[tuple[str, int], InputRejected]:
            return {(topology.stream_of(e.subject), e.input_seq): e for e in record.of(InputRejected)}

        def all_recorded() -> bool:
            return set(recorded()) >= set(sent)

        try:
            await record.until(all_recorded, 60)
        except TimeoutError:
            unrecorded = sorted(set(sent) - set(recorded()))
            pytest.fail(
                f"seed {seed}: no rejection recorded for {[(q, sent[q], bodies[q]) for q in unrecorded]}"
            )
        rejections = {key: e for key, e in recorded().items() if key in sent}
        for seq, (subject, reply_to) in sent.items():
            event = rejections[seq]
            assert event.subject == subject and event.errors and all(e.message for e in event.errors), seq
            assert not any("could not handle" in e.message for e in event.errors), (seed, event)
            header_refused = any(e.path == f"header {topology.REPLY_HEADER}" for e in event.errors)
            assert header_refused == (
                reply_to is not None and topology.reply_refusal(subject, reply_to, REGISTERED) is not None
            )
        # Each refusal answered once where the sender may listen, and never elsewhere.
        all_sent = True
        if len(answers) >= expect_answers:
            answered.set()
        with anyio.fail_after(30):
            await answered.wait()
        assert len(answers) == expect_answers
        assert all(isinstance(reply_decoder.decode(a), Rejected) for a in answers)
        # No handler failed or retried, and no input led to a second record.
        assert "failed on" not in caplog.text, (seed, caplog.text[-2000:])
        keys = [(topology.stream_of(e.subject), e.input_seq) for e in record.of(InputRejected)]
        assert len([k for k in keys if k in sent]) == len(sent)
        # Nothing stored before changed, and the job and agents were not touched.
        after = [
            (m.seq, m.subject, m.data)
            for m in await bus.read_subject(
                watcher.jetstream(), topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.>"
            )
        ]
        assert after[: len(before)] == before
        touched = {s for _seq, s, _d in after[len(before) :]}
        assert topology.event_subject(job_id) not in touched
        assert topology.event_subject(agent_id_for("mallory")) not in touched

        # The services still serve: an honest agent takes the job and lets it go.
        grant = await honest.claim()
        assert isinstance(grant, LeaseGrant) and grant.job_id == job_id
        assert isinstance(await honest.release(JobContext(grant=grant), "fuzz done"), Accepted)
        assert ctx.views.jobs[job_id].version > 1
        tg.cancel_scope.cancel()


async def test_inputs_that_used_to_vanish_are_answered_and_recorded(nats_server: EmbeddedServer) -> None:
    """The issue's list, on a server without credentials (as `warden demo` runs): a request
    50,000 arrays deep, a number past any range, invalid UTF-8, an unusable reply address, and a
    dotted agent name. Each is refused with a reason, once, and answered where it may be."""
    url = nats_server.url
    record = Record()
    async with (
        running(url, SERVICES),
        opsnats.connected(url) as nc,
        anyio.create_task_group() as tg,
    ):
        await tg.start(record.follow, nc)
        deep = b"[" * 50_000 + b"]" * 50_000
        cases = [
            (topology.REQUEST_SUBJECT, deep, "nested too deeply"),
            (topology.REQUEST_SUBJECT, b'{"idempotency_key": "k", "submitter": 1e400}', "out of range"),
            (topology.REQUEST_SUBJECT, b'{"idempotency_key": "k", "kind": "\xff"}', "UTF-8"),
            ("warden.in.agent.a.b.register", b"{}", "agent names have no dots"),
        ]
        for subject, data, why in cases:
            answer = await bus.request(nc, subject, data, timeout=20)
            assert isinstance(answer, Rejected), answer
            assert why in "; ".join(e.message for e in answer.errors)
        seq = await publish(nc, topology.REQUEST_SUBJECT, deep, "a b")
        await record.until(
            lambda: (
                seq
                in {e.input_seq for e in record.of(InputRejected) if e.subject == topology.REQUEST_SUBJECT}
            ),
            20,
        )
        [event] = [
            e
            for e in record.of(InputRejected)
            if e.input_seq == seq and e.subject == topology.REQUEST_SUBJECT
        ]
        assert [e.path for e in event.errors] == ["$", f"header {topology.REPLY_HEADER}"]
        assert len(record.of(InputRejected)) == len(cases) + 1
        tg.cancel_scope.cancel()


async def test_an_input_too_large_for_the_stream_is_refused_by_the_server_and_nothing_is_stored(
    server: opsnats.OpsServer,
) -> None:
    """The server's max_payload is 8 MB; the input stream takes at most INPUT_MAX_MSG_BYTES, so a
    flood of large inputs costs the disk nothing. The sender is told at once, on every subject."""
    mallory = add_agent(server, "mallory")
    url = server.server.url
    async with (
        opsnats.connected(url, **opsnats.service_credentials()) as service,
        as_agent(server, "mallory", mallory) as nc,
    ):
        js = service.jetstream()
        await topology.ensure(js, str(service.connected_server_version))
        before = (await js.stream_info(topology.AGENT_INPUT_STREAM)).state
        big = b"x" * (4 * 1024 * 1024)
        for subject in (topology.agent_subject("mallory", "claim"), topology.payload_subject("mallory")):
            with pytest.raises(bus.InputRefused, match="nothing stored"):
                await bus.request(nc, subject, big, timeout=10)
        after = (await js.stream_info(topology.AGENT_INPUT_STREAM)).state
        assert (after.messages, after.bytes, after.last_seq) == (
            before.messages,
            before.bytes,
            before.last_seq,
        )
        for stream in (topology.INPUT_STREAM, topology.AGENT_INPUT_STREAM):
            config = (await js.stream_info(stream)).config
            assert config.max_msg_size == topology.INPUT_MAX_MSG_BYTES
