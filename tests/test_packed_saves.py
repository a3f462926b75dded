"""One message per save of one aggregate: a service's save of several events of one job is one
stored message (a packed record), and every reader of the log sees each of its events, in order.

A reader that decoded such a message as a single event would call it foreign and step over it
in silence: these tests fail if any reader (the views' fold, the harness, the ledger, explain,
the live projector, a replay, the application's repository) misses one event of a packed save.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from uuid import UUID

import anyio
import anyio.to_thread
from click.testing import CliRunner, Result

import services.cli.main  # noqa: F401  (registers every command on cli)
from services.cli.app import cli
from shared import bus, topology
from shared.events import (
    AnyEvent,
    EffectApplied,
    Event,
    InvariantChecked,
    JobCompleted,
    LeaseGranted,
    ProposalAccepted,
    ProposalRejected,
    ProposalSubmitted,
    digest,
    tag_of,
)
from shared.forensics import log
from shared.forensics.explain import explain_job
from shared.forensics.ledger import verify_log
from shared.persistence.jetstream import JetStreamApplicationRecorder
from shared.readmodel import open_read_model, queries
from shared.readmodel.replay import rebuild
from shared.readmodel.tables import CHECKS
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests.harness import client, events_of, running, submit, wait_for_event
from tests.readside import agent_history, job_history, job_request, quick_contract, read_side


async def test_a_save_of_several_events_of_one_job_is_one_message_that_every_reader_reads_whole(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    history = job_history("a1", "reject", 0)  # requested .. checked x2, rejected, lease revoked
    job_id: UUID = history[0].originator_id
    url = f"sqlite:///{tmp_path / 'live.sqlite'}"
    followed: list[tuple[int, AnyEvent]] = []
    all_followed = anyio.Event()

    def fold(seq: int, event: AnyEvent) -> None:
        if event.originator_id == job_id:
            followed.append((seq, event))
        if len(followed) == len(history):
            all_followed.set()

    async with read_side(nats_server.url, url, name="packed") as side, anyio.create_task_group() as tg:
        ctx = side.ctx
        await tg.start(bus.follow, ctx.js, fold)
        await ctx.save(*agent_history("a1")[:1])
        first = await ctx.save(*history[:3])
        rest = await ctx.save(*history[3:])
        saved: list[Event] = [*first, *rest]

        # Two saves of the job, two messages (after the agent's one).
        info = await ctx.js.stream_info(topology.EVENT_STREAM, subjects_filter=f"{topology.EVENT_ROOT}.*")
        assert info.state.messages == 3
        assert info.state.subjects == {
            topology.event_subject(job_id): 2,
            topology.event_subject(agent_history("a1")[0].originator_id): 1,
        }
        last = (await ctx.js.stream_info(topology.EVENT_STREAM)).state.last_seq

        # The views' fold: every event, in order, each with its record's sequence.
        with anyio.fail_after(10):
            await all_followed.wait()
        mine = followed
        assert [e for _, e in mine] == saved
        assert [seq for seq, _ in mine] == [last - 1] * 3 + [last] * 4
        # A raw read of the stream, and the application's repository.
        async with client(nats_server.url) as nc:
            assert [e for e in await events_of(nc) if e.originator_id == job_id] == saved
        job = await anyio.to_thread.run_sync(ctx.app.job, job_id)
        assert job.version == len(saved)

        # The ledger: every event is a link, each hashed as its own bytes, and the chain holds.
        report = await verify_log(ctx.js, job_id)
        assert report.clean and report.events == len(saved), report
        logged = await log.job_events(ctx.js, job_id)
        assert [e.event for e in logged] == saved
        assert [e.hash for e in logged] == [digest(e) for e in saved]
        assert [e.ordinal for e in logged] == [0, 1, 2, 0, 1, 2, 3]
        assert all(e.hash == hashlib.sha256(e.stored.data).hexdigest() for e in logged)

        # Explain reads the job's record whole.
        explanation = await explain_job(ctx.js, job_id)
        assert explanation.events == len(saved) and explanation.ledger.ok
        assert len(explanation.timeline) >= len(saved) - 1  # fenced runs may share one line

        # The live projector: a row per event, the two checks of one record apart.
        await side.caught_up()
        store = open_read_model(url)
        try:
            timeline = queries.job_timeline(store, str(job_id))
            checks = queries.dump(store, CHECKS, job_id=str(job_id))
        finally:
            store.close()
        assert [row["type"] for row in timeline] == [tag_of(e) for e in saved]
        assert [(row["seq"], row["ordinal"]) for row in timeline] == [(s, o) for s, o in _places(mine)]
        assert sorted(row["invariant"] for row in checks.values()) == sorted(
            e.invariant for e in saved if isinstance(e, InvariantChecked)
        )

        # A replay (what `warden replay` folds) reproduces the same rows.
        recorder = ctx.app.recorder
        assert isinstance(recorder, JetStreamApplicationRecorder)
        fresh = open_read_model(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
        try:
            folded = await anyio.to_thread.run_sync(
                lambda: rebuild(recorder, fresh, f"{topology.EVENT_ROOT}.*", last)
            )
            replayed = queries.job_timeline(fresh, str(job_id))
        finally:
            fresh.close()
        assert folded == len(saved) + 1
        assert replayed == timeline
        assert any(isinstance(e, ProposalRejected) for e in saved)
        tg.cancel_scope.cancel()


async def test_a_governed_job_is_stored_in_four_messages_and_its_ledger_verifies(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = nats_server.url
    async with running(url, ["scheduler", "reconciler", "revoker", "checker", "applier"]), client(url) as nc:
        job_id = await submit(nc, job_request(contract=quick_contract(ttl=30)))

        async def handler(ctx: JobContext) -> Proposal:
            return Proposal(effect="none", output={"ok": True})

        await AgentClient(nc, "packer").serve(handler, max_jobs=1)
        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted) and e.originator_id == job_id)
        logged = await log.job_events(nc.jetstream(), job_id)
        subject = topology.event_subject(job_id)
        info = await nc.jetstream().stream_info(topology.EVENT_STREAM, subjects_filter=subject)
    seq_of = {type(e.event): e.seq for e in logged}
    # Decided at once, the proposal, its verdicts and its decision are one message; the effect
    # and the completion another.
    assert seq_of[ProposalSubmitted] == seq_of[InvariantChecked] == seq_of[ProposalAccepted]
    assert seq_of[EffectApplied] == seq_of[JobCompleted]
    # A governed job is four stored messages: its request, its grant, its decided proposal, its
    # effect with its completion (counted on its subject, as the stream holds them).
    assert info.state.subjects == {subject: 4}
    assert [type(e.event) for e in logged if e.seq == seq_of[LeaseGranted]] == [LeaseGranted]

    # `warden ledger verify`, and a dossier (one record per event) checked against the stream.
    def cli_run(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    verified = await anyio.to_thread.run_sync(cli_run, "ledger", "verify", "--nats", url)
    assert verified.exit_code == 0 and "ledger intact" in verified.output, verified.output
    copy = tmp_path / "dossier.json"
    made = await anyio.to_thread.run_sync(cli_run, "dossier", str(job_id), "--nats", url, "--out", str(copy))
    assert made.exit_code == 0, made.output
    against = await anyio.to_thread.run_sync(
        cli_run, "ledger", "verify", "--file", str(copy), "--against-log", "--nats", url
    )
    assert against.exit_code == 0, against.output
    # An edit inside a packed record's event is caught against the stream.
    bundle = json.loads(copy.read_text())
    completed = next(e for e in bundle["events"] if e["event"]["type"] == "job.completed")
    raw = completed["raw"].replace('"packer"', '"someone"')
    completed["raw"], completed["event"] = raw, json.loads(raw)
    completed["hash"] = hashlib.sha256(raw.encode()).hexdigest()
    copy.write_text(json.dumps(bundle))
    edited = await anyio.to_thread.run_sync(
        cli_run, "ledger", "verify", "--file", str(copy), "--against-log", "--nats", url
    )
    assert edited.exit_code == 1 and "differs from the event the stream holds" in edited.output


def _places(events: list[tuple[int, AnyEvent]]) -> list[tuple[int, int]]:
    """(seq, ordinal) of each event: its record's sequence and its place in that record."""
    out: list[tuple[int, int]] = []
    for seq, _event in events:
        out.append((seq, out[-1][1] + 1 if out and out[-1][0] == seq else 0))
    return out
