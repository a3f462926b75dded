"""The demo run: real server, real services, real git repository, a fleet with failures by design.

Every guarantee the summary states is checked against the log (and the repository), not
assumed: the exit code is non-zero when any of them fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from services import registry
from services.api import parse_address
from services.api.auth import TOKENS_ENV, is_loopback
from services.demo import repo as demo_repo
from shared import bus, datadir, runtime, topology
from shared.aggregates import TERMINAL
from shared.contract import CiGate, Contract, Scope, Stopping, Target
from shared.events import (
    AgentRevoked,
    AnyEvent,
    EffectApplied,
    EffectRolledBack,
    InvariantChecked,
    JobCompleted,
    LeaseExpired,
    LeaseGranted,
    MessageRejected,
    ProposalRejected,
    ProposalSubmitted,
)
from shared.messages import Accepted, JobRequest
from shared.persistence import written
from shared.readmodel.store import URL_ENV, default_url
from shared.runtime import Context
from shared.sdk import AgentClient, JobContext, Proposal
from shared.tokens import local_operator_token, tokens_path
from shared.views import Views

FLEET = {
    # name: behaviour of agent_script.py ("zombie" runs in-process, see below)
    "crasher": "crash",
    "hanger": "good",
    "liar": "liar",
    "scoper": "scope",
    "good-1": "good",
    "good-2": "good",
}


def stand_in_exec_args(name: str, kind: str) -> list[str]:
    """`warden agent exec` arguments that run the demo's stand-in agent as `name` for `kind`
    (the chaos run's agents are the same stand-ins)."""
    return [
        "agent",
        "exec",
        "--name",
        name,
        "--kind",
        kind,
        "--grace",
        "1",
        # The command's environment is an allow-list: the stand-ins need these two.
        "--env",
        "WARDEN_DEMO_BEHAVIOUR",
        "--env",
        "WARDEN_DEMO_STATE",
        "--",
        sys.executable,
        "-m",
        "services.demo.agent_script",
    ]


@dataclass
class DemoOptions:
    jobs: int = 10
    nats_url: str | None = None
    http: str | None = None
    ttl: float = 2.0
    timeout: float = 240.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Summary:
    jobs: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    revocations: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    effects: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    dashboard: str = ""
    nats_url: str = ""
    operator_token: str = ""  # --keep on loopback: the local operator's, for the dashboard's actions
    operator_token_file: str = ""
    data_dir: str = ""  # "" once removed

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        data = msgspec.to_builtins(self.__dict__, builtin_types=(uuid.UUID,), str_keys=True)
        data["checks"] = [c.__dict__ for c in self.checks]
        data["ok"] = self.ok
        return dict(data)


Progress = Callable[[dict[str, int], str], None]


def _free_http() -> str:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8765))
            return "127.0.0.1:8765"
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{sock.getsockname()[1]}"


def _contract(repo: Path, name: str, ttl: float) -> Contract:
    return Contract(
        scope=Scope(paths=demo_repo.SCOPE, effects=["git.patch"], read=demo_repo.READABLE),
        inputs={"feature": name},
        target=Target(repo=str(repo), branch="main"),
        ci=CiGate(command=demo_repo.CI_COMMAND, timeout_s=60),
        stopping=Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=4),
    )


class Fleet:
    """The agents: `warden agent exec` processes, plus one in-process zombie."""

    def __init__(self, url: str, state: Path) -> None:
        self.url = url
        self.state = state
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = state / "agents"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tmp = state / "tmp"
        self.tmp.mkdir(exist_ok=True)

    def start(self, name: str, behaviour: str) -> None:
        env = {
            **os.environ,
            "WARDEN_NATS_URL": self.url,
            "WARDEN_DEMO_BEHAVIOUR": behaviour,
            "WARDEN_DEMO_STATE": str(self.state),
            # Their workspaces (a killed agent's included) live in the demo's folder, removed with it.
            "TMPDIR": str(self.tmp),
        }
        with open(self.logs / f"{name}.log", "wb") as log:  # the child has its own copy
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *stand_in_exec_args(name, "feature")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, name: str, signum: signal.Signals) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signum)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()


async def _zombie(nc: Any, expired: anyio.Event) -> None:
    """Repeats a side effect on retry: it sits on its lease past the TTL, then proposes anyway."""
    agent = AgentClient(nc, "zombie", kinds=["feature"])
    await agent.register()
    grant = None
    while grant is None:
        grant = await agent.claim()
        if grant is None:
            await anyio.sleep(0.05)
    await expired.wait()
    await agent.propose(
        JobContext(grant=grant),
        Proposal(effect="git.patch", patch="", evidence={"note": "late result of a timed-out run"}),
    )


async def read_log(nc: Any) -> list[AnyEvent]:
    stored = await bus.read_subject(nc.jetstream(), topology.EVENT_STREAM, f"{topology.EVENT_ROOT}.*")
    events: list[AnyEvent] = []
    for item in stored:
        found = written.events_of(item.subject, item.headers, item.data)
        if not isinstance(found, str):  # a message Warden did not write tells nothing
            events.extend(found)
    return events


async def run_demo(
    options: DemoOptions, progress: Progress, *, keep: Callable[[Summary], Any] | None = None
) -> Summary:
    """Run the scenario in a fresh temporary folder. With `keep`, everything stays up while it
    runs (server.json lets other commands find the server); without, the folder is removed
    when every guarantee held (and left for inspection when one did not)."""
    tmp = Path(tempfile.mkdtemp(prefix="warden-demo-"))
    data_dir = tmp / "warden"
    repo = demo_repo.make_repo(tmp / "repo")
    http = options.http or _free_http()
    os.environ["WARDEN_HTTP"] = http
    # The demo's own read model, inside its own data dir: never another run's (or ./.warden's).
    os.environ[URL_ENV] = default_url(data_dir)
    # The demo's API reads its own token store (empty unless --keep issues the operator's).
    os.environ[TOKENS_ENV] = str(tokens_path(data_dir))
    summary = Summary(dashboard=f"http://{http}/", data_dir=str(data_dir))
    ownership = datadir.try_own(data_dir) if options.nats_url is None else None
    try:
        await _deploy(options, progress, keep, repo, data_dir, ownership, summary)
    finally:
        if ownership is not None:
            ownership.release()
    if keep is None and summary.ok:
        shutil.rmtree(tmp, ignore_errors=True)
        summary.data_dir = ""
    return summary


async def _deploy(
    options: DemoOptions,
    progress: Progress,
    keep: Callable[[Summary], Any] | None,
    repo: Path,
    data_dir: Path,
    ownership: datadir.Ownership | None,
    summary: Summary,
) -> None:
    tmp = data_dir.parent
    async with (
        runtime.deployment(options.nats_url, data_dir, name="demo") as (ctx, url),
        anyio.create_task_group() as tg,
    ):
        summary.nats_url = url
        if ownership is not None:
            ownership.publish(url, ctx.monitor_url)
        await tg.start(runtime.run_services, ctx, registry.build())
        fleet = Fleet(url, tmp)
        try:
            await _run(ctx, url, repo, options, fleet, progress)
        finally:
            await anyio.to_thread.run_sync(fleet.stop)
        await _summarise(ctx, repo, options, summary)
        if keep is not None:
            _issue_operator_token(data_dir, summary)
            await keep(summary)
        tg.cancel_scope.cancel()


def _issue_operator_token(data_dir: Path, summary: Summary) -> None:
    """As `warden up` on a loopback address: a token for the operator `local`, so the kept
    dashboard's actions (approve, revoke, ...) work. Elsewhere, tokens are the operator's to add."""
    if not is_loopback(parse_address(os.environ["WARDEN_HTTP"])[0]):
        return
    token, path = local_operator_token(data_dir)
    summary.operator_token, summary.operator_token_file = token, str(path)


async def _run(
    ctx: Context, url: str, repo: Path, options: DemoOptions, fleet: Fleet, progress: Progress
) -> None:
    nc = ctx.nc
    job_ids: list[uuid.UUID] = []
    for i in range(options.jobs):
        reply = await bus.request(
            nc,
            topology.REQUEST_SUBJECT,
            JobRequest(
                idempotency_key=f"demo-feature-{i}",
                kind="feature",
                contract=_contract(repo, f"feature_{i}", options.ttl),
                submitter="demo",
            ),
        )
        assert isinstance(reply, Accepted) and reply.job_id is not None, reply
        job_ids.append(reply.job_id)

    zombie_expired = anyio.Event()
    hanger_done = anyio.Event()
    scoper_clean = anyio.Event()

    def watch(event: Any, _job: Any, _agent: Any) -> None:
        if isinstance(event, LeaseGranted) and event.agent == "hanger" and not hanger_done.is_set():
            fleet.signal("hanger", signal.SIGSTOP)  # alive, connected, silent
        if isinstance(event, LeaseExpired) and event.agent == "hanger":
            fleet.signal("hanger", signal.SIGKILL)
            hanger_done.set()
        if isinstance(event, LeaseExpired) and event.agent == "zombie":
            zombie_expired.set()
        if isinstance(event, JobCompleted) and event.agent == "scoper":
            scoper_clean.set()

    ctx.views.listeners.append(watch)
    async with anyio.create_task_group() as tg:
        zombie_conn = await bus.connect(url, "zombie")
        tg.start_soon(_zombie, zombie_conn, zombie_expired)
        # The scoper's breach needs a clean job first: it starts alone, and the rest of the fleet
        # once that job is done, so its second job does not hinge on winning a claim race.
        fleet.start("scoper", FLEET["scoper"])
        with anyio.move_on_after(30):
            await scoper_clean.wait()
        for name, behaviour in FLEET.items():
            if name != "scoper":
                fleet.start(name, behaviour)
        with anyio.move_on_after(options.timeout):
            while True:
                counts: Counter[str] = Counter(
                    str(job.status) for j in job_ids if (job := ctx.views.job(j)) is not None
                )
                progress(dict(counts), "")
                if sum(counts[s] for s in TERMINAL) == len(job_ids):
                    break
                await anyio.sleep(0.25)
        tg.cancel_scope.cancel()
    await zombie_conn.close()
    ctx.views.listeners.remove(watch)


async def _summarise(ctx: Context, repo: Path, options: DemoOptions, summary: Summary) -> None:
    from shared.forensics.ledger import verify_log

    events = await read_log(ctx.nc)
    # The services' view forgets ended jobs: the summary folds the whole log it has read.
    folded = Views()
    for event in events:
        folded.apply(event)
    jobs = [j for j in folded.jobs.values() if j.kind == "feature"]
    summary.jobs = dict(Counter(j.status for j in jobs))
    proposals = {e.proposal_id: e for e in events if isinstance(e, ProposalSubmitted)}
    for e in events:
        if isinstance(e, LeaseExpired):
            summary.failures.append(
                {
                    "kind": "lease expired",
                    "agent": e.agent,
                    "job": str(e.originator_id),
                    "epoch": e.epoch,
                    "detection_latency_ms": round(e.detection_latency_ms, 1),
                }
            )
        elif isinstance(e, ProposalRejected):
            p = proposals.get(e.proposal_id)
            summary.failures.append(
                {
                    "kind": "proposal rejected",
                    "agent": p.agent if p else "?",
                    "job": str(e.originator_id),
                    "violations": e.violations,
                }
            )
        elif isinstance(e, MessageRejected):
            summary.failures.append(
                {
                    "kind": "fenced",
                    "agent": e.agent,
                    "job": str(e.originator_id),
                    "verb": e.verb,
                    "reason": e.reason,
                }
            )
        elif isinstance(e, AgentRevoked):
            latency = (e.timestamp - e.signal_at).total_seconds() * 1000 if e.signal_at else None
            summary.revocations.append(
                {
                    "agent": e.name,
                    "reason": e.reason,
                    "by": e.by,
                    "latency_ms": round(latency, 1) if latency is not None else None,
                }
            )
        elif isinstance(e, EffectRolledBack):
            summary.rollbacks.append(
                {"proposal": str(e.proposal_id), "job": str(e.originator_id), "receipt": e.receipt}
            )
    applied = Counter(e.proposal_id for e in events if isinstance(e, EffectApplied))
    commits = demo_repo.commits_with_trailer(repo, "Warden-Proposal")
    completed = [j for j in jobs if j.status == "completed"]
    summary.effects = {
        "applied": sum(applied.values()),
        "proposals_applied_more_than_once": [str(p) for p, n in applied.items() if n > 1],
        "commits_per_proposal": max(commits.values(), default=0),
        "completed_jobs": len(completed),
    }
    report = await verify_log(ctx.js)
    summary.ledger = msgspec.to_builtins(report)

    def failed_check(agent: str, invariant: str) -> bool:
        return any(
            isinstance(e, InvariantChecked)
            and e.verdict == "fail"
            and e.invariant == invariant
            and proposals.get(e.proposal_id) is not None
            and proposals[e.proposal_id].agent == agent
            for e in events
        )

    def expired(agent: str) -> bool:
        return any(isinstance(e, LeaseExpired) and e.agent == agent for e in events)

    revoked = {r["agent"] for r in summary.revocations}
    summary.checks = [
        Check(
            "every job terminal",
            len(jobs) == options.jobs and all(j.terminal for j in jobs),
            ", ".join(f"{n} {state}" for state, n in sorted(summary.jobs.items())) or "no jobs",
        ),
        Check("crash detected", expired("crasher"), "crasher's lease expired after its process was killed"),
        Check("hang detected", expired("hanger"), "hanger's lease expired while its process was stopped"),
        Check(
            "scope breach caught and revoked",
            failed_check("scoper", "scope") and "scoper" in revoked,
            "scoper edited secrets/deploy.env",
        ),
        Check(
            "false 'tests pass' caught", failed_check("liar", "ci_gate"), "liar's tests failed the CI gate"
        ),
        Check(
            "repeated side effect fenced",
            any(
                isinstance(e, MessageRejected) and e.agent == "zombie" and e.verb == "propose" for e in events
            ),
            "zombie's late proposal under a stale epoch was rejected and recorded",
        ),
        Check(
            "effects applied exactly once",
            not summary.effects["proposals_applied_more_than_once"]
            and summary.effects["commits_per_proposal"] <= 1
            and all(
                sum(1 for e in events if isinstance(e, EffectApplied) and e.originator_id == j.id) == 1
                for j in completed
            ),
            f"{summary.effects['applied']} effects, at most {summary.effects['commits_per_proposal']} commit per proposal",
        ),
        Check(
            "ledger verified",
            bool(summary.ledger.get("ok")),
            f"{summary.ledger.get('events')} events in {summary.ledger.get('aggregates')} hash chains",
        ),
    ]
