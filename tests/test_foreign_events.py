"""Defence in depth on the event stream: a message on `warden.evt.>` that Warden did not write.

NATS permissions already keep agents and operators off the event subjects; these tests play a
compromised or buggy writer that gets past them (the test connection has no credentials at all)
and publishes junk on a job's and an agent's subject, each time as the subject's last message:

- no headers and bytes that are not JSON;
- no headers, but a well-formed Warden event (a cancellation, a revocation) that, if believed,
  would end the job or the agent;
- forged writer headers (taking the aggregate's next version) over a payload that does not decode;
- forged writer headers over valid JSON of a type Warden does not know.

The job must stay claimable, cancellable and revocable, the agent revocable, every real event
landing after the junk; the services' views, the read model, explain, the dossier, a client's
job and `warden submit --wait` keep serving; and `warden ledger verify` names every foreign
sequence while Warden's own chains verify.
"""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import anyio
import msgspec
import pytest
from click.testing import CliRunner, Result
from nats.js import JetStreamContext

from services.cli.main import cli
from shared import bus, topology
from shared.client import JobHandle, WardenClient
from shared.events import (
    AgentRevoked,
    JobCancelled,
    LeaseGranted,
    agent_id_for,
    encode,
)
from shared.forensics import dossier, explain, ledger
from shared.messages import Accepted, OperatorCommand
from shared.persistence.jetstream import ORIGINATOR_HEADER, TOPIC_HEADER, VERSION_HEADER
from shared.readmodel import open_read_model, queries
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.harness import client, submit, wait_for_event
from tests.readside import job_request, quick_contract, read_side

OTHER_SERVICES = ["scheduler", "reconciler", "checker", "applier", "revoker"]


async def publish_foreign(
    js: JetStreamContext, aggregate: UUID, believable: bytes, next_version: int
) -> list[int]:
    """Four kinds of junk on `aggregate`'s subject; their stream sequences."""
    subject = topology.event_subject(aggregate)
    forged = {ORIGINATOR_HEADER: str(aggregate), VERSION_HEADER: str(next_version)}
    unknown = msgspec.json.encode(
        {"type": "job.exploded", "originator_id": str(aggregate), "originator_version": next_version}
    )
    acks = [
        await js.publish(subject, b"\xff\x00 not json"),
        await js.publish(subject, believable),
        await js.publish(
            subject,
            b'{"type": "lease.granted", "originator',
            headers={**forged, TOPIC_HEADER: "lease.granted"},
        ),
        await js.publish(subject, unknown, headers={**forged, TOPIC_HEADER: "job.exploded"}),
    ]
    return [ack.seq for ack in acks]


async def operate(nc: object, verb: str, **fields: object) -> None:
    command = OperatorCommand(operator="carol", reason=f"{verb} after junk", **fields)  # type: ignore[arg-type]
    reply = await bus.request(nc, topology.operator_subject(verb), command)  # type: ignore[arg-type]
    assert isinstance(reply, Accepted), reply


async def test_foreign_messages_never_wedge_a_job_or_an_agent_and_every_reader_names_them(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = nats_server.url
    store_url = f"sqlite:///{tmp_path / 'foreign.sqlite'}"
    async with read_side(url, store_url, services=OTHER_SERVICES) as side, client(url) as nc:
        js = nc.jetstream()
        agent = AgentClient(nc, "worker")
        await agent.register()
        agent_id = agent_id_for("worker")
        job_id = await submit(nc, job_request(contract=quick_contract(ttl=30)))

        # A cancellation nobody decided: folded, it would leave the job unclaimable.
        fake_cancel = encode(
            JobCancelled(originator_id=job_id, originator_version=2, reason="forged", by="x")
        )
        junk = await publish_foreign(js, job_id, fake_cancel, 2)
        # A client reading the job's subject does not believe the junk either.
        assert (await JobHandle(WardenClient(nc), job_id).get()).status == "queued"
        grant = await agent.claim()
        assert grant is not None and grant.job_id == job_id
        granted = await wait_for_event(
            nc, lambda e: isinstance(e, LeaseGranted) and e.originator_id == job_id
        )
        assert granted.originator_version == 2

        junk += await publish_foreign(js, job_id, fake_cancel, 3)
        await operate(nc, "cancel", job_id=job_id)
        cancelled = await wait_for_event(nc, lambda e: isinstance(e, JobCancelled) and e.by == "carol")
        assert cancelled.originator_id == job_id and cancelled.originator_version >= 3

        agent_version = side.ctx.views.agents["worker"].version
        fake_revoke = encode(
            AgentRevoked(
                originator_id=agent_id,
                originator_version=agent_version + 1,
                name="worker",
                reason="forged",
                by="x",
            )
        )
        agent_junk = await publish_foreign(js, agent_id, fake_revoke, agent_version + 1)
        await operate(nc, "revoke", agent="worker")
        revoked = await wait_for_event(nc, lambda e: isinstance(e, AgentRevoked) and e.by == "carol")
        assert revoked.originator_version == agent_version + 1

        # The real events landed after the junk, on the versions the junk claimed.
        job_seqs = [
            m.seq for m in await bus.read_subject(js, topology.EVENT_STREAM, topology.event_subject(job_id))
        ]
        agent_seqs = [
            m.seq for m in await bus.read_subject(js, topology.EVENT_STREAM, topology.event_subject(agent_id))
        ]
        assert job_seqs[-1] > max(junk) and agent_seqs[-1] > max(agent_junk)
        job_version = cancelled.originator_version
        assert len(job_seqs) == job_version + len(junk)
        assert len(agent_seqs) == agent_version + 1 + len(agent_junk)

        # The services' view, and the store as eventsourcing reads it, hold only Warden's events.
        job_view, agent_view = side.ctx.views.require_job(job_id), side.ctx.views.agents["worker"]
        assert (job_view.status, job_view.version) == ("cancelled", job_version)
        assert (agent_view.standing, agent_view.version) == ("revoked", agent_version + 1)
        stored_job = await anyio.to_thread.run_sync(side.ctx.app.job, job_id)
        assert (stored_job.status, stored_job.version) == ("cancelled", job_version)
        stored_agent = await anyio.to_thread.run_sync(side.ctx.app.agent, agent_id)
        assert stored_agent.standing == "revoked"

        # The read model folded past the junk.
        await side.projector.wait_for(agent_seqs[-1])
        store = await anyio.to_thread.run_sync(open_read_model, store_url)
        try:
            job_row = await anyio.to_thread.run_sync(queries.job_detail, store, str(job_id))
            agent_row = await anyio.to_thread.run_sync(queries.agent_detail, store, "worker")
        finally:
            await anyio.to_thread.run_sync(store.close)
        assert job_row is not None and job_row["state"] == "cancelled"
        assert agent_row is not None and agent_row["standing"] == "revoked"

        # Forensics: Warden's chains intact, every foreign sequence a finding.
        report = await ledger.verify_log(js)
        expl = await explain.explain_job(js, job_id)
        bundle = await dossier.dossier(js, job_id)
    assert report.ok, ledger.render(report)
    assert not report.clean
    assert [f.seq for f in report.foreign] == sorted(junk + agent_junk)
    assert {f.aggregate for f in report.foreign} == {str(job_id), str(agent_id)}
    reasons = [f.reason for f in report.foreign[:4]]
    assert "no Warden writer header" in reasons[0] and "no Warden writer header" in reasons[1]
    assert "not a Warden event" in reasons[2] and "not a Warden event" in reasons[3]
    assert expl.cause.startswith("cancelled by operator carol: cancel after junk")
    assert expl.ledger.ok and [f.seq for f in expl.ledger.foreign] == junk
    assert expl.events == job_version
    # The dossier marks the junk, and its copy verifies the same way, offline.
    assert [r.seq for r in bundle.events if r.foreign] == junk
    copy = ledger.verify_copy(json.loads(dossier.encode(bundle)), "dossier")
    assert copy.ok and [f.seq for f in copy.foreign] == sorted(junk + agent_junk)

    def verify_from_the_cli() -> Result:
        return CliRunner().invoke(cli, ["ledger", "verify", "--nats", url], catch_exceptions=False)

    result = await anyio.to_thread.run_sync(verify_from_the_cli)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("ledger intact:")
    for seq in junk + agent_junk:
        assert f"seq {seq} on " in result.output


async def test_a_copy_passing_a_warden_event_off_as_foreign_fails_against_the_log(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    url = nats_server.url
    async with (
        read_side(url, f"sqlite:///{tmp_path / 'rm.sqlite'}", services=OTHER_SERVICES),
        client(url) as nc,
    ):
        js = nc.jetstream()
        job_id = await submit(nc, job_request())
        await operate(nc, "cancel", job_id=job_id)
        await wait_for_event(nc, lambda e: isinstance(e, JobCancelled))
        document = json.loads(dossier.encode(await dossier.dossier(js, job_id)))
        # Hide the cancellation (the last event, which no successor vouches for) as "foreign".
        document["events"][-1]["foreign"] = "not ours, honest"
        entries = ledger.entries_from_copy(document)
        offline = ledger.verify(entries, "copy")
        against = await ledger.compare_with_log(js, entries, "copy")
    assert offline.ok and len(offline.foreign) == 1  # offline, the claim cannot be checked
    assert not against.ok and against.first_break is not None
    assert against.first_break.kind == "copy" and "calls foreign" in against.first_break.detail


async def test_following_a_job_steps_over_junk_and_ends_at_the_real_cancellation(
    nats_server: EmbeddedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli.jobs import follow_job

    url = nats_server.url
    async with (
        read_side(url, f"sqlite:///{tmp_path / 'rm.sqlite'}", services=OTHER_SERVICES),
        client(url) as nc,
    ):
        job_id = await submit(nc, job_request())
        fake = encode(JobCancelled(originator_id=job_id, originator_version=2, reason="forged", by="mallory"))
        junk = await publish_foreign(nc.jetstream(), job_id, fake, 2)
        await operate(nc, "cancel", job_id=job_id)
        job = await follow_job(nc, job_id, quiet=False, timeout=10)
    assert job is not None and job.status == "cancelled"
    printed = capsys.readouterr()
    assert "cancelled by carol" in printed.out and "mallory" not in printed.out
    for seq in junk:
        assert f"stepped over message {seq}, not written by Warden" in printed.err
