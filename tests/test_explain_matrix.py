"""Explain's causes against real faults, the classes tests/test_forensics.py's first matrix leaves
out: a passed deadline, an operator revoking the agent in flight, an operator denying a proposal,
an effect that fails (a webhook nobody answers) and a stale base. Each job is driven through the
real services to its end, then `explain` (and `warden explain --json`) must name the injected
fault's class and its evidence."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import anyio
from click.testing import CliRunner

from services.cli.main import cli
from shared import bus, topology
from shared.contract import Contract, Scope, Stopping, Target
from shared.events import JobTombstoned, LeaseRevoked, ProposalSubmitted
from shared.forensics import explain
from shared.messages import Accepted, JobRequest, OperatorCommand
from shared.sdk import AgentClient, JobContext, Proposal
from shared.server import EmbeddedServer
from tests import gitrepo
from tests.harness import client, running, submit, wait_for_event

SERVICES = ["scheduler", "reconciler", "revoker", "checker", "applier"]


def stopping(ttl: float = 10.0, **kw: Any) -> Stopping:
    return Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=1, **kw)


def request(kind: str, contract: Contract) -> JobRequest:
    return JobRequest(idempotency_key=str(uuid.uuid4()), kind=kind, contract=contract, submitter="tests")


class Refuses(BaseHTTPRequestHandler):
    """A webhook receiver that refuses every delivery (HTTP 422): a permanent effect failure."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(422)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def tombstoned(job: uuid.UUID) -> Any:
    return lambda e: isinstance(e, JobTombstoned) and e.originator_id == job


async def test_explain_names_deadline_revocation_denial_effect_failure_and_stale_base(
    nats_server: EmbeddedServer, tmp_path: Path, permissive_policy: Path
) -> None:
    repo = gitrepo.make_repo(tmp_path)
    patch, stale_base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    (repo / "app" / "calc.py").write_text("def compute_total(items):\n    return sum(list(items))\n")
    moved = gitrepo.commit(repo, "someone else changed calc")
    refusing = HTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    nobody = f"http://127.0.0.1:{refusing.server_port}/hook"
    async with running(nats_server.url, SERVICES), client(nats_server.url) as nc:
        kinds = ["deadline", "revoked", "denied", "hook", "stale"]
        agents = {kind: AgentClient(nc, f"agent-{kind}", kinds=[kind]) for kind in kinds}
        for agent in agents.values():
            await agent.register()
        soon = datetime.now(UTC) + timedelta(seconds=3)
        jobs = {
            "deadline": await submit(nc, request("deadline", Contract(stopping=stopping(deadline=soon)))),
            "revoked": await submit(nc, request("revoked", Contract(stopping=stopping()))),
            "denied": await submit(
                nc,
                request(
                    "denied",
                    Contract(scope=Scope(effects=["none"]), approval_required=True, stopping=stopping()),
                ),
            ),
            "hook": await submit(
                nc,
                request(
                    "hook",
                    Contract(
                        scope=Scope(effects=["webhook"]), target=Target(url=nobody), stopping=stopping()
                    ),
                ),
            ),
            "stale": await submit(
                nc,
                request(
                    "stale",
                    gitrepo.git_contract(repo, ci=False, attempts=1, ttl=10.0, invariants=["base_drift"]),
                ),
            ),
        }
        grants = {}
        for kind, agent in agents.items():
            grant = await agent.claim()
            assert grant is not None and grant.job_id == jobs[kind], kind
            grants[kind] = JobContext(grant=grant)

        # Deadline: the lease is live (TTL 10 s), the job's deadline passes first.
        await wait_for_event(
            nc, lambda e: isinstance(e, LeaseRevoked) and e.originator_id == jobs["deadline"], timeout=30
        )
        # Revocation: an operator revokes the agent while it holds the lease.
        revoke = OperatorCommand(operator="carol", reason="leaked a token", agent="agent-revoked")
        assert isinstance(await bus.request(nc, topology.operator_subject("revoke"), revoke), Accepted)
        # Denial: the proposal waits for approval, and a person denies it.
        await agents["denied"].propose(grants["denied"], Proposal(effect="none", output={"x": 1}))
        submitted = await wait_for_event(
            nc, lambda e: isinstance(e, ProposalSubmitted) and e.originator_id == jobs["denied"]
        )
        assert isinstance(submitted, ProposalSubmitted)
        deny = OperatorCommand(operator="dave", reason="not this week", proposal_id=submitted.proposal_id)
        assert isinstance(await bus.request(nc, topology.operator_subject("deny"), deny), Accepted)
        # Effect failure: the webhook's target refuses connections.
        await agents["hook"].propose(grants["hook"], Proposal(effect="webhook", output={"ping": 1}))
        # Stale base: the patch was built on a commit main has moved past.
        await agents["stale"].propose(
            grants["stale"], Proposal(effect="git.patch", patch=patch, base=stale_base)
        )

        for job in jobs.values():
            await wait_for_event(nc, tombstoned(job), timeout=90)
        js = nc.jetstream()
        explained = {kind: await explain.explain_job(js, job) for kind, job in jobs.items()}

    refusing.shutdown()
    refusing.server_close()
    # The command as an operator runs it, in its own thread (it runs its own event loop).
    argv = ["explain", str(jobs["hook"]), "--json", "--nats", nats_server.url]
    as_json = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(cli, argv))
    classes = {kind: e.cause_class for kind, e in explained.items()}
    causes = {kind: e.cause for kind, e in explained.items()}
    assert classes == {
        "deadline": "deadline",
        "revoked": "operator",
        "denied": "operator",
        "hook": "effect_failed",
        "stale": "stale_base",
    }, causes
    assert causes["deadline"].startswith("deadline passed while agent agent-deadline held lease 1"), causes
    assert "carol" in causes["revoked"] and "leaked a token" in causes["revoked"], causes
    assert "dave" in causes["denied"] and "not this week" in causes["denied"], causes
    assert "HTTP 422" in causes["hook"], causes
    assert f"{moved[:7]} someone else changed calc" in causes["stale"], causes
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["cause_class"] == "effect_failed"
