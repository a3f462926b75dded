"""One job is one trace: every service's span for a job descends from its request, parent by parent.

All services run in-process against a real nats-server; an in-memory exporter collects every span
they finish. Each handler span must be a child of the span that produced what it handled (the
grant's for a heartbeat, the proposal's for its invariants, the accepting span's for the
effect, ...), every event must name the span that appended it, and a sender's own trace context
can link to a job's spans but never move them into another trace.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import bus, telemetry, topology
from shared.contract import Contract, Scope, Stopping, Target
from shared.events import (
    EffectRolledBack,
    Event,
    JobCompleted,
    JobTombstoned,
    LeaseExpired,
    LeaseRevoked,
)
from shared.messages import Accepted, OperatorCommand
from shared.sdk import Proposal
from shared.server import EmbeddedServer
from tests.cdp import browser_page
from tests.harness import client, events_of, running, submit, wait_for_event
from tests.harness import lease_job as lease
from tests.harness import propose_accepted as propose
from tests.readside import job_request, quick_contract, read_side
from tests.test_dashboard import READY, card_in_state, chromium  # noqa: F401 (a fixture)


class Spans(SimpleSpanProcessor):
    """Collects finished spans in an InMemorySpanExporter and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        super().__init__(self.exporter)
        self._ended = threading.Condition()

    def on_end(self, span: ReadableSpan) -> None:
        super().on_end(span)
        with self._ended:
            self._ended.notify_all()

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    async def wait(self, name: str, count: int = 1, timeout: float = 10.0) -> None:
        """Until `count` spans named `name` have ended (a span ends just after what it appended
        is stored); TimeoutError after `timeout`."""

        def enough() -> bool:
            return sum(1 for s in self.finished() if s.name == name) >= count

        def block() -> bool:
            with self._ended:
                return self._ended.wait_for(enough, timeout)

        if not await anyio.to_thread.run_sync(block):
            raise TimeoutError(f"fewer than {count} {name!r} spans after {timeout}s")


@pytest.fixture
def spans() -> Iterator[Spans]:
    """Every span this process finishes while the test runs (the provider is the process's)."""
    telemetry.configure("test", exporter="none")
    collected = Spans()
    telemetry.take_spans(collected)
    yield collected
    collected.exporter.shutdown()  # the processor stays registered, but keeps nothing more


def span_id_of(traceparent: str) -> int:
    ctx = telemetry.context_of(traceparent)
    assert ctx is not None, f"not a traceparent: {traceparent!r}"
    return trace.get_current_span(ctx).get_span_context().span_id


def trace_id_of(traceparent: str) -> int:
    return int(telemetry.trace_id_of(traceparent), 16)


class Trace:
    """One job's finished spans, found by name and attribute."""

    def __init__(self, finished: tuple[ReadableSpan, ...], trace_id: int) -> None:
        self.all = [s for s in finished if s.context is not None and s.context.trace_id == trace_id]
        self.by_id = {s.context.span_id: s for s in self.all if s.context is not None}

    def named(self, name: str, **attrs: Any) -> list[ReadableSpan]:
        return [
            s
            for s in self.all
            if s.name == name and all((s.attributes or {}).get(f"warden.{k}") == v for k, v in attrs.items())
        ]

    def one(self, name: str, **attrs: Any) -> ReadableSpan:
        found = self.named(name, **attrs)
        assert len(found) == 1, (name, attrs, [(s.name, dict(s.attributes or {})) for s in self.all])
        return found[0]

    def parent_of(self, span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None, f"{span.name} has no parent"
        parent = self.by_id.get(span.parent.span_id)
        assert parent is not None, f"{span.name}'s parent is not in the job's trace"
        return parent


def produced_by(span: ReadableSpan, event: Event) -> bool:
    assert span.context is not None
    return bool(span_id_of(event.trace) == span.context.span_id)


async def test_a_job_is_one_trace_through_every_service_with_each_span_a_child_of_its_cause(
    nats_server: EmbeddedServer, tmp_path: Path, spans: Spans
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    contract = Contract(
        scope=Scope(paths=["**"], effects=["file.write"]),
        target=Target(directory=str(site)),
        stopping=Stopping(lease_ttl_s=5, heartbeat_interval_s=1),
    )
    async with running(nats_server.url), client(nats_server.url) as nc:
        agent, ctx = await lease(nc, "tracer", contract)
        # The agent traces its own work: its context reaches Warden as a link, never a parent.
        with telemetry.tracer().start_as_current_span("agent's own work") as own:
            ack = await agent.heartbeat(ctx)
            assert ack.standing == "extended"
        pid = await propose(agent, ctx, Proposal(effect="file.write", files={"a.txt": "traced\n"}))
        await wait_for_event(nc, lambda e: isinstance(e, JobCompleted), timeout=30)
        reply = await bus.request(
            nc,
            topology.operator_subject("rollback"),
            OperatorCommand(operator="alice", reason="trace the rollback too", proposal_id=pid),
        )
        assert isinstance(reply, Accepted), reply
        await wait_for_event(nc, lambda e: isinstance(e, EffectRolledBack), timeout=30)
        events = [e for e in await events_of(nc) if e.originator_id == ctx.job_id]
        await spans.wait("applier rollback")
        await spans.wait("projector fold", len(events))

    # Every event of the job names a span of one trace: the request's.
    assert [e.trace != "" for e in events] == [True] * len(events), [type(e).__name__ for e in events]
    trace_id = trace_id_of(events[0].trace)
    assert {trace_id_of(e.trace) for e in events} == {trace_id}
    job = Trace(spans.finished(), trace_id)
    jid = str(ctx.job_id)

    request = job.one("scheduler request", job_id=jid)
    assert request.parent is None  # the request opens the trace
    assert produced_by(request, events[0])
    grant = job.one("scheduler grant", job_id=jid, agent="tracer", epoch=1)
    assert job.parent_of(grant) is request
    assert grant.links, "the grant links the agent's claim"
    heartbeat = job.one("reconciler heartbeat", job_id=jid, agent="tracer", epoch=1)
    assert job.parent_of(heartbeat) is grant
    assert own.get_span_context().span_id in {link.context.span_id for link in heartbeat.links}
    proposal = job.one("checker proposal", job_id=jid, proposal_id=str(pid), epoch=1, verdict="accepted")
    assert job.parent_of(proposal) is grant
    invariants = [s for s in job.all if s.name.startswith("checker invariant ")]
    assert invariants, "no invariant spans"
    for check in invariants:
        assert job.parent_of(check) is proposal
        assert (check.attributes or {}).get("warden.verdict") == "pass", check.name
    effect = job.one("applier effect", job_id=jid, proposal_id=str(pid), effect="file.write")
    assert job.parent_of(effect) is proposal
    rollback = job.one("revoker rollback", job_id=jid, proposal_id=str(pid))
    assert job.parent_of(rollback) is effect  # the rollback follows the application
    undo = job.one("applier rollback", job_id=jid, proposal_id=str(pid))
    assert job.parent_of(undo) is rollback

    # Each event is the work of the span that handled its cause; the read model's fold of each
    # is a child of that span.
    by_type = {type(e).__name__: e for e in events}
    assert produced_by(grant, by_type["LeaseGranted"])
    assert produced_by(proposal, by_type["ProposalSubmitted"])
    assert produced_by(proposal, by_type["ProposalAccepted"])
    assert produced_by(effect, by_type["EffectApplied"])
    assert produced_by(effect, by_type["JobCompleted"])
    assert produced_by(undo, by_type["EffectRolledBack"])
    checked = [e for e in events if type(e).__name__ == "InvariantChecked"]
    assert {span_id_of(e.trace) for e in checked} == {s.context.span_id for s in invariants if s.context}
    folds = job.named("projector fold", aggregate_id=jid)
    assert len(folds) == len(events)
    assert sorted(job.parent_of(f).context.span_id for f in folds) == sorted(
        span_id_of(e.trace) for e in events
    )


async def test_an_expiry_and_a_revocation_stay_in_their_jobs_traces_under_the_grant(
    nats_server: EmbeddedServer, spans: Spans
) -> None:
    silent = Contract(stopping=Stopping(lease_ttl_s=0.5, heartbeat_interval_s=0.2, max_attempts=1))
    held = Contract(stopping=Stopping(lease_ttl_s=30, heartbeat_interval_s=5))
    async with running(nats_server.url), client(nats_server.url) as nc:
        _agent, dozy = await lease(nc, "dozy", silent)  # never heartbeats: its lease expires
        expired = await wait_for_event(nc, lambda e: isinstance(e, LeaseExpired), timeout=15)
        await wait_for_event(nc, lambda e: isinstance(e, JobTombstoned), timeout=15)

        _agent, doomed = await lease(nc, "doomed", held)
        reply = await bus.request(
            nc,
            topology.operator_subject("revoke"),
            OperatorCommand(operator="alice", reason="caught lying", agent="doomed"),
        )
        assert isinstance(reply, Accepted), reply
        revoked = await wait_for_event(
            nc, lambda e: isinstance(e, LeaseRevoked) and e.originator_id == doomed.job_id, timeout=15
        )
        await spans.wait("revoker revocation")
        await spans.wait("reconciler expiry")
        events = await events_of(nc)

    first = {e.originator_id: e for e in reversed(events)}
    # The expiry: a timer's span, a child of the grant of the lease it watched.
    job = Trace(spans.finished(), trace_id_of(first[dozy.job_id].trace))
    expiry = next(s for s in job.named("reconciler expiry") if produced_by(s, expired))
    assert (expiry.attributes or {}).get("warden.standing") == "expired"
    assert job.parent_of(expiry) is job.one("scheduler grant", agent="dozy")
    assert job.parent_of(job.parent_of(expiry)) is job.one("scheduler request")
    assert trace_id_of(first[dozy.job_id].trace) != trace_id_of(first[doomed.job_id].trace)

    # The operator's revocation of the agent is its own trace (about an agent, not a job); the
    # lease revocation it causes stays in the job's trace, linked to it.
    job = Trace(spans.finished(), trace_id_of(first[doomed.job_id].trace))
    revocation = job.one("revoker revocation", job_id=str(doomed.job_id), agent="doomed")
    assert produced_by(revocation, revoked)
    assert job.parent_of(revocation) is job.one("scheduler grant", agent="doomed")
    agent_revoked = next(e for e in events if type(e).__name__ == "AgentRevoked")
    assert trace_id_of(agent_revoked.trace) != trace_id_of(revoked.trace)
    assert span_id_of(agent_revoked.trace) in {link.context.span_id for link in revocation.links}


async def test_a_forged_or_garbage_traceparent_cannot_move_a_jobs_spans(
    nats_server: EmbeddedServer, spans: Spans
) -> None:
    contract = Contract(stopping=Stopping(lease_ttl_s=30, heartbeat_interval_s=5))
    forged = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    async with running(nats_server.url, ["scheduler", "reconciler"]), client(nats_server.url) as nc:
        _agent, ctx = await lease(nc, "forger", contract)
        js = nc.jetstream()
        subject = topology.agent_subject("forger", "heartbeat")
        body = b'{"job_id": "%s", "epoch": 1}' % str(ctx.job_id).encode()
        for header in (forged, "00-not-a-trace-context", "x" * 5000):
            await js.publish(subject, body, headers={"traceparent": header})
        await spans.wait("reconciler heartbeat", 3)
        granted = await wait_for_event(nc, lambda e: type(e).__name__ == "LeaseGranted")

    job = Trace(spans.finished(), trace_id_of(granted.trace))
    beats = job.named("reconciler heartbeat", job_id=str(ctx.job_id))
    assert len(beats) == 3  # all in the job's trace, none in the forger's
    grant = job.one("scheduler grant", agent="forger")
    assert all(job.parent_of(b) is grant for b in beats)
    assert [int("cd" * 8, 16)] == [link.context.span_id for b in beats for link in b.links]


TRACE_LINK = """
new Promise((resolve) => {
  const check = () => {
    const link = document.querySelector('#detail a[data-trace-link]');
    if (link) { resolve([link.href, link.dataset.traceLink]); return true; }
    return false;
  };
  if (!check()) new MutationObserver((m, o) => { if (check()) o.disconnect(); })
    .observe(document.getElementById('detail'), { childList: true, subtree: true });
})
"""


DRAWER_OPEN = """
new Promise((resolve) => {
  const check = () => {
    const shown = document.querySelector('#detail [data-detail-state]');
    // The drawer's own children, as the page built them: stray text (a "null") shows as text:.
    const body = document.getElementById('detail-body');
    if (shown) { resolve([...body.childNodes].map((n) => n.nodeType === 3 ? `text:${n.textContent}` : n.tagName)); return true; }
    return false;
  };
  if (!check()) new MutationObserver((m, o) => { if (check()) o.disconnect(); })
    .observe(document.getElementById('detail'), { childList: true, subtree: true });
})
"""


@pytest.mark.timeout(300)  # the first run may install chromium (see tests/test_dashboard.py)
async def test_the_job_drawer_links_to_the_jobs_trace_when_a_trace_url_is_configured(
    nats_server: EmbeddedServer,
    tmp_path: Path,
    chromium: str,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WARDEN_TRACE_URL", "http://traces.example:16686/trace/{trace_id}")
    store = f"sqlite:///{tmp_path / 'drawer.sqlite'}"
    async with (
        read_side(nats_server.url, store, api=True, services=["scheduler"]) as side,
        client(nats_server.url) as nc,
        browser_page(chromium) as page,
    ):
        assert side.api is not None
        job_id = await submit(nc, job_request(contract=quick_contract(ttl=30)))
        await side.caught_up()
        requested = await wait_for_event(nc, lambda e: e.originator_id == job_id)
        trace_id = telemetry.trace_id_of(requested.trace)
        assert len(trace_id) == 32
        with anyio.fail_after(60):
            await page.goto(side.api.url + "/")
            await page.evaluate(READY)
            await page.evaluate(card_in_state(str(job_id), "queued"))
            await page.evaluate(f"document.querySelector('.job[data-job-id=\"{job_id}\"]').click()")
            href, shown = await page.evaluate(TRACE_LINK)
        assert (href, shown) == (f"http://traces.example:16686/trace/{trace_id}", trace_id)

    # Without a template the drawer shows no link, and nothing in its place.
    monkeypatch.delenv("WARDEN_TRACE_URL")
    async with read_side(nats_server.url, store, api=True) as side, browser_page(chromium) as page:
        assert side.api is not None
        await side.caught_up()
        async with httpx.AsyncClient(base_url=side.api.url) as http:
            job = (await http.get(f"/api/jobs/{job_id}")).json()
        assert (job["trace_id"], job["trace_url"]) == (trace_id, "")
        with anyio.fail_after(60):
            await page.goto(side.api.url + "/")
            await page.evaluate(READY)
            await page.evaluate(card_in_state(str(job_id), "queued"))
            await page.evaluate(f"document.querySelector('.job[data-job-id=\"{job_id}\"]').click()")
            children = await page.evaluate(DRAWER_OPEN)
        assert children[:2] == ["H2", "P"], children  # the state line follows the title directly
        assert await page.evaluate("document.querySelectorAll('#detail a[data-trace-link]').length") == 0


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b'{"job_id":' * 5000,
        b"\xff",
        b'{"epoch": 1e400}',
        b'{"epoch": 99999999999999999999}',
        b'{"job_id": "not-a-uuid", "epoch": 1}',
        b"x" * (topology.MAX_INPUT_BYTES + 1),
    ],
)
def test_hostile_bytes_name_no_job_and_raise_nothing_when_a_span_picks_its_parent(data: bytes) -> None:
    assert telemetry.names_in(data) == telemetry.Names()
