"""One chaos run: a deployment of separate processes, a seeded schedule of kill -9, an oracle.

Services run as `warden run <service>` processes (replicas of the deciding ones), agents as
`warden agent exec` processes whose command makes a change inside its scope (the demo's
well-behaved stand-in) against a scratch git repository, and this process submits the jobs,
recording every publish acknowledgement. The broker is killed too when it is embedded (this
process owns it): restarted at once on the same port and store. Afterwards everything is read
back from the record (the log, the input stream, git, `warden replay`, the ledger) and checked
(services/chaos/oracle.py); nothing is taken from the processes' word.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from services.chaos import oracle, schedule
from services.chaos.oracle import Attempt, Check
from services.demo import repo as demo_repo
from services.demo.scenario import stand_in_exec_args
from shared import bus, gitops, liveness, topology
from shared.contract import CiGate, Contract, Scope, Stopping, Target
from shared.events import EffectApplied, EffectFailed, LeaseGranted, ProposalAccepted, job_id_for
from shared.forensics import log as eventlog
from shared.forensics.ledger import verify_log
from shared.messages import JobRequest
from shared.readmodel.store import URL_ENV, open_read_model
from shared.runtime import close_connection
from shared.server import EmbeddedServer
from shared.views import Views

Say = Callable[[str], None]
PUBLISH_TIMEOUT_S = 2.0
STOP_GRACE_S = 10.0


@dataclass
class ChaosOptions:
    seed: int
    kills: int = 12
    duration_s: float = 60.0
    jobs: int = 20
    agents: int = 3
    replicas: int = 2
    broker_kills: int | None = None  # None: a sixth of the kills (at least one) when embedded
    nats_url: str | None = None
    settle_s: float = 180.0  # after the schedule, how long jobs may take to become terminal
    lease_ttl_s: float = 5.0
    max_attempts: int = 10
    keep: bool = False

    def broker_kill_count(self) -> int:
        if self.nats_url is not None:
            return 0  # not ours to kill
        if self.broker_kills is not None:
            return self.broker_kills
        return max(1, self.kills // 6) if self.kills else 0


@dataclass
class Summary:
    seed: int
    options: dict[str, Any]
    nats_url: str = ""
    kills: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    unplanned_exits: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)
    effects: dict[str, int] = field(default_factory=dict)
    # What the faults cost, from the log: expiries, fenced messages, rejections, requeues.
    signals: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    elapsed_s: float = 0.0
    data_dir: str = ""  # "" once removed

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(
            {k: v for k, v in self.__dict__.items() if k != "checks"}, str_keys=True
        )
        data["checks"] = [c.__dict__ for c in self.checks]
        data["ok"] = self.ok
        return data


def _contract(repo: Path, name: str, options: ChaosOptions) -> Contract:
    ttl = options.lease_ttl_s
    return Contract(
        scope=Scope(paths=demo_repo.SCOPE, effects=["git.patch"], read=demo_repo.READABLE),
        inputs={"feature": name},
        target=Target(repo=str(repo), branch="main"),
        ci=CiGate(command=demo_repo.CI_COMMAND, timeout_s=60),
        stopping=Stopping(lease_ttl_s=ttl, heartbeat_interval_s=ttl / 4, max_attempts=options.max_attempts),
    )


@dataclass
class Record:
    """What the run itself knows, for the oracle: its jobs, every publish and its ack."""

    repo: Path
    job_ids: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)


class Fleet:
    """The processes in their slots: start, kill -9, restart, and notice exits nobody asked for."""

    def __init__(self, url: str, folder: Path, run: str, kind: str, say: Say) -> None:
        self.url, self.folder, self.run, self.kind, self.say = url, folder, run, kind, say
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (folder / "tmp").mkdir(exist_ok=True)
        (folder / "state").mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.names: dict[str, str] = {}  # slot -> what runs in it now (an agent's name)
        self.generation: Counter[str] = Counter()
        self.unplanned: list[dict[str, Any]] = []
        self.env = {
            **os.environ,
            URL_ENV: f"sqlite:///{folder / 'warden' / 'projections.sqlite'}",
            "WARDEN_HTTP": "127.0.0.1:0",
            "WARDEN_NATS_URL": url,
            "WARDEN_DEMO_BEHAVIOUR": "good",
            "WARDEN_DEMO_STATE": str(folder / "state"),
            "TMPDIR": str(folder / "tmp"),  # agents' workspaces live (and die) in the run's folder
        }

    def _command(self, slot: str) -> list[str]:
        cli = [sys.executable, "-m", "services.cli"]
        service = schedule.slot_service(slot)
        if service != "agent":
            data = str(self.folder / "warden")
            return [*cli, "run", service, "--nats", self.url, "--data-dir", data]
        index = slot.partition("#")[2]
        name = f"c{self.run}-{index}-{self.generation[slot]}"
        self.names[slot] = name
        return [*cli, *stand_in_exec_args(name, self.kind)]

    def start(self, slot: str) -> None:
        command = self._command(slot)
        log = self.logs / f"{slot.replace('#', '-')}.{self.generation[slot]}.log"
        with log.open("wb") as sink:
            self.procs[slot] = subprocess.Popen(
                command, env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.names.setdefault(slot, slot)

    def kill(self, slot: str) -> int:
        """kill -9 the slot's process and start its replacement; the pid killed."""
        proc = self.procs[slot]
        pid = proc.pid
        if proc.poll() is None:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        self.generation[slot] += 1
        self.start(slot)
        return pid

    def reap(self, elapsed: float) -> None:
        """Restart any process that exited without being killed, and record that it did."""
        for slot, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            log = self.logs / f"{slot.replace('#', '-')}.{self.generation[slot]}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            exit_ = {
                "slot": slot,
                "name": self.names.get(slot, slot),
                "code": code,
                "at_s": round(elapsed, 1),
            }
            exit_["last_line"] = tail[0][-300:] if tail else ""
            exit_["log"] = str(log)
            self.unplanned.append(exit_)
            self.say(f"[{elapsed:6.1f}s] {slot} exited unasked with {code}: {exit_['last_line']}")
            self.generation[slot] += 1
            self.start(slot)

    def stop(self) -> None:
        """SIGTERM (services drain, agents give up their leases), SIGKILL what does not exit."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Broker:
    """The embedded nats-server this run owns, killed and restarted on its port and store."""

    def __init__(self, folder: Path) -> None:
        self.server = EmbeddedServer(store_dir=folder / "nats", name="chaos")

    async def start(self) -> str:
        await anyio.to_thread.run_sync(self.server.start)
        return self.server.url

    async def kill_and_restart(self) -> tuple[datetime, datetime]:
        await anyio.to_thread.run_sync(self.server.kill)
        killed = datetime.now(UTC)
        await anyio.to_thread.run_sync(self.server.start)  # same port, same store
        return killed, datetime.now(UTC)

    def stop(self) -> None:
        self.server.stop()


async def _publish(js: JetStreamContext, data: bytes) -> int | None:
    """The stream sequence the server acknowledged, or None when no ack came."""
    try:
        ack = await js.publish(topology.REQUEST_SUBJECT, data, timeout=PUBLISH_TIMEOUT_S)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return None
    return int(ack.seq)


async def _submit(
    js: JetStreamContext,
    requests: list[JobRequest],
    spread_s: float,
    give_up_at: float,
    attempts: list[Attempt],
) -> None:
    """Submit the jobs spread over `spread_s`, each until acknowledged (an unacked publish is
    sent again, same key and bytes: the scheduler's idempotency makes that one job)."""
    started = time.monotonic()
    for i, request in enumerate(requests):
        await anyio.sleep(max(0.0, started + spread_s * i / len(requests) - time.monotonic()))
        data = msgspec.json.encode(request)
        sha = eventlog.Stored("", 0, "", 0, data).sha256
        while True:
            seq = await _publish(js, data)
            attempts.append(Attempt(request.idempotency_key, sha, seq))
            if seq is not None or time.monotonic() > give_up_at:
                break
            await anyio.sleep(0.25)


async def _await_services(nc: Any, deadline_s: float) -> list[str]:
    """The services that have not answered a ping within `deadline_s` (empty: all serving)."""
    waiting = set(schedule.REPLICATED + schedule.SINGLE)
    with anyio.move_on_after(deadline_s):
        while waiting:
            for name in sorted(waiting):
                if await liveness.ping(nc, name, timeout=0.5) is not None:
                    waiting.discard(name)
            if waiting:
                await anyio.sleep(0.25)
    return sorted(waiting)


async def run_chaos(options: ChaosOptions, say: Say) -> Summary:
    """Run the schedule in a fresh temporary folder; it is removed afterwards unless `keep` or
    a check failed (then its logs, store and repository are left for inspection)."""
    folder = Path(tempfile.mkdtemp(prefix="warden-chaos-"))
    run = uuid.uuid4().hex[:6]
    summary = Summary(seed=options.seed, options=dict(options.__dict__), data_dir=str(folder))
    broker = Broker(folder) if options.nats_url is None else None
    began = time.monotonic()
    try:
        url = options.nats_url or await broker.start()  # type: ignore[union-attr]
        summary.nats_url = url
        fleet = Fleet(url, folder, run, f"chaos-{run}", say)
        record = Record(repo=demo_repo.make_repo(folder / "repo"))
        try:
            await _run(options, summary, record, run, fleet, broker, say)
        finally:
            await anyio.to_thread.run_sync(fleet.stop)
        summary.unplanned_exits = fleet.unplanned
        await _check(options, summary, record, run, fleet, say)
    finally:
        if broker is not None:
            await anyio.to_thread.run_sync(broker.stop)
    summary.elapsed_s = round(time.monotonic() - began, 1)
    if not options.keep and summary.ok:
        shutil.rmtree(folder, ignore_errors=True)
        summary.data_dir = ""
    return summary


async def _run(
    options: ChaosOptions,
    summary: Summary,
    record: Record,
    run: str,
    fleet: Fleet,
    broker: Broker | None,
    say: Say,
) -> None:
    repo = record.repo
    nc = await bus.connect(fleet.url, "chaos")
    try:
        js = nc.jetstream()
        await topology.ensure_when_ready(js, str(nc.connected_server_version))
        slots = schedule.service_slots(options.replicas) + schedule.agent_slots(options.agents)
        kills = schedule.plan(
            options.seed, options.kills, options.duration_s, slots, options.broker_kill_count()
        )
        say(
            f"chaos seed {options.seed}: {len(slots)} processes on {fleet.url}, {options.jobs} jobs, "
            f"{len(kills)} kills over {options.duration_s:g}s ({options.broker_kill_count()} of the broker)"
        )
        for slot in slots:
            fleet.start(slot)
        missing = await _await_services(nc, 120.0)
        if missing:
            say(f"services not answering after 120s: {', '.join(missing)} (going on: they may yet)")
        requests = [
            JobRequest(
                idempotency_key=f"chaos-{run}-{i}",
                kind=fleet.kind,
                contract=_contract(repo, f"feature_{i}", options),
                submitter="chaos",
            )
            for i in range(options.jobs)
        ]
        job_ids = [job_id_for(r.idempotency_key) for r in requests]
        record.job_ids = [str(j) for j in job_ids]
        views = Views()
        attempts = record.attempts
        started = time.monotonic()
        give_up_at = started + options.duration_s + options.settle_s

        def counts() -> Counter[str]:
            return Counter(str(views.jobs[j].status) if j in views.jobs else "unsubmitted" for j in job_ids)

        def all_terminal() -> bool:
            return all(j in views.jobs and views.jobs[j].terminal for j in job_ids)

        async def killer() -> None:
            for kill in kills:
                await anyio.sleep(max(0.0, started + kill.at_s - time.monotonic()))
                at = round(time.monotonic() - started, 2)
                if kill.slot == schedule.BROKER:
                    assert broker is not None
                    # A resume time means something only when there was work to resume.
                    pending = sum(not (j in views.jobs and views.jobs[j].terminal) for j in job_ids)
                    killed, ready = await broker.kill_and_restart()
                    summary.kills.append({"at_s": at, "slot": kill.slot, "name": "nats-server"})
                    summary.restarts.append(
                        {
                            "at_s": at,
                            "killed_at": killed.isoformat(),
                            "ready_at": ready.isoformat(),
                            "down_s": round((ready - killed).total_seconds(), 3),
                            "pending_jobs": pending,
                        }
                    )
                    say(f"[{at:6.1f}s] kill -9 broker; restarted on the same port and store")
                else:
                    name = fleet.names.get(kill.slot, kill.slot)
                    pid = fleet.kill(kill.slot)
                    summary.kills.append({"at_s": at, "slot": kill.slot, "name": name, "pid": pid})
                    say(f"[{at:6.1f}s] kill -9 {kill.slot} ({name}, pid {pid})")

        async def supervise() -> None:
            last = 0.0
            while True:
                await anyio.sleep(0.5)
                now = time.monotonic() - started
                fleet.reap(now)
                if now - last >= 5.0:
                    last = now
                    state = ", ".join(f"{n} {s}" for s, n in sorted(counts().items()))
                    say(f"[{now:6.1f}s] jobs: {state}; kills {len(summary.kills)}/{len(kills)}")

        settled = anyio.Event()

        def watch(_event: Any, _job: Any, _agent: Any) -> None:
            if all_terminal():
                settled.set()

        views.listeners.append(watch)
        async with anyio.create_task_group() as tg:
            await tg.start(bus.follow, js, views.on_stream_event)
            tg.start_soon(supervise)
            async with anyio.create_task_group() as schedule_tg:
                schedule_tg.start_soon(killer)
                schedule_tg.start_soon(_submit, js, requests, 0.8 * options.duration_s, give_up_at, attempts)
            with anyio.move_on_after(max(0.0, give_up_at - time.monotonic())):
                await settled.wait()
            say(f"[{time.monotonic() - started:6.1f}s] schedule done; jobs: {dict(counts())}")
            await _await_read_model(js, fleet, 60.0)
            tg.cancel_scope.cancel()
    finally:
        await close_connection(nc)


async def _await_read_model(js: JetStreamContext, fleet: Fleet, deadline_s: float) -> None:
    """Until the projector has folded everything stored (bounded): replay compares at a position."""
    url = fleet.env[URL_ENV]
    with anyio.move_on_after(deadline_s):
        while True:
            info = await js.stream_info(topology.EVENT_STREAM)

            def position() -> int:
                store = open_read_model(url)
                try:
                    return store.position()
                finally:
                    store.close()

            if await anyio.to_thread.run_sync(position) >= info.state.last_seq:
                return
            await anyio.sleep(0.5)


async def _check(
    options: ChaosOptions, summary: Summary, record: Record, run: str, fleet: Fleet, say: Say
) -> None:
    """Read everything back and check it (the deployment's processes are stopped by now)."""
    job_ids, attempts, repo = record.job_ids, record.attempts, record.repo
    say("checking: the log, the input stream, git, a clean replay, the ledger")
    nc = await bus.connect(fleet.url, "chaos-oracle")
    try:
        js = nc.jetstream()
        logged = await eventlog.read_events(js)
        views = Views()
        for item in logged:
            if item.event is not None:
                views.apply(item.event)
        mine = set(job_ids)
        statuses = {j: str(views.jobs[uuid.UUID(j)].status) for j in job_ids if uuid.UUID(j) in views.jobs}
        summary.jobs = dict(Counter(statuses.values()))
        checks = [oracle.terminal(statuses, options.jobs)]

        stored_at, namespace = await _stored_inputs(js, attempts, f"chaos-{run}-")
        check, summary.inputs = oracle.inputs(attempts, stored_at, namespace)
        checks.append(check)

        accepted: dict[str, str] = {}
        applied: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for item in logged:
            event, job = item.event, item.aggregate
            if event is None or job not in mine:
                continue
            if isinstance(event, ProposalAccepted):
                accepted[str(event.proposal_id)] = job
            elif isinstance(event, EffectApplied):
                applied[str(event.proposal_id)] += 1
            elif isinstance(event, EffectFailed):
                failed[str(event.proposal_id)] += 1
        check, summary.signals = oracle.no_valid_rejection(
            [(item.aggregate, item.event) for item in logged if item.event is not None],
            mine,
            f"c{run}-",
        )
        checks.append(check)
        proposal_commits, job_commits = await anyio.to_thread.run_sync(_commits, repo, accepted, job_ids)
        check, summary.effects = oracle.exactly_once(
            accepted, applied, failed, proposal_commits, job_commits, statuses
        )
        checks.append(check)

        summary.replay = await _replay(fleet)
        checks.append(
            Check(
                "projections == a clean replay",
                bool(summary.replay.get("identical")),
                f"{summary.replay.get('events', '?')} events replayed, "
                f"{sum(summary.replay.get('compared', {}).values())} rows compared, "
                f"{len(summary.replay.get('differences', []))} differences"
                + (f" ({summary.replay['error']})" if "error" in summary.replay else ""),
                summary.replay.get("differences", [])[:20],
            )
        )

        report = await verify_log(js)
        summary.ledger = msgspec.to_builtins(report)
        checks.append(
            Check(
                "ledger verified",
                report.clean,
                f"{report.events} events in {report.aggregates} hash chains, {len(report.breaks)} breaks, "
                f"{len(report.foreign)} foreign",
                [msgspec.to_builtins(b) for b in report.breaks[:20]],
            )
        )
        _resume_times(summary, logged)
        checks.append(
            Check(
                "no process exited unasked",
                not summary.unplanned_exits,
                f"{len(summary.unplanned_exits)} exits nobody asked for",
                summary.unplanned_exits,
            )
        )
        summary.checks = checks
    finally:
        await close_connection(nc)


async def _stored_inputs(
    js: JetStreamContext, attempts: list[Attempt], prefix: str
) -> tuple[dict[int, str], dict[int, str]]:
    """What the input stream holds at each acked sequence, and every stored request whose
    idempotency key is in this run's namespace (seq -> sha256 of the stored bytes)."""
    stored_at: dict[int, str] = {}
    for a in attempts:
        if a.seq is not None and a.seq not in stored_at:
            found = await eventlog.get(js, topology.INPUT_STREAM, a.seq)
            if found is not None and found.subject == topology.REQUEST_SUBJECT:
                stored_at[a.seq] = found.sha256
    namespace: dict[int, str] = {}
    for stored in await eventlog.scan(js, topology.INPUT_STREAM, topology.REQUEST_SUBJECT):
        try:
            key = json.loads(stored.data).get("idempotency_key", "")
        except (ValueError, AttributeError):
            continue
        if isinstance(key, str) and key.startswith(prefix):
            namespace[stored.seq] = stored.sha256
    return stored_at, namespace


def _commits(
    repo: Path, accepted: dict[str, str], job_ids: list[str]
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Commits on any branch carrying each proposal's trailer, and each job's (reverts aside)."""
    per_proposal = {
        pid: {sha for sha, _ in gitops.branches_with_trailer(repo, "Warden-Proposal", pid)}
        for pid in accepted
    }
    reverts = {
        sha for pid in accepted for sha, _ in gitops.branches_with_trailer(repo, "Warden-Rollback", pid)
    }
    per_job = {
        job: {sha for sha, _ in gitops.branches_with_trailer(repo, "Warden-Job", job)} - reverts
        for job in job_ids
    }
    return per_proposal, per_job


async def _replay(fleet: Fleet) -> dict[str, Any]:
    """`warden replay` as an operator runs it, against the read model the projector wrote."""
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "replay",
        "--nats",
        fleet.url,
        "--projections",
        fleet.env[URL_ENV],
        "--json",
    ]
    done = await anyio.run_process(command, check=False)
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return {"identical": False, "error": f"replay exited {done.returncode}: {''.join(tail)}"}
    return result


def _resume_times(summary: Summary, logged: list[eventlog.LoggedEvent]) -> None:
    """For each broker restart: ready -> the first event stored after it, and the first lease."""
    for restart in summary.restarts:
        ready = datetime.fromisoformat(restart["ready_at"])
        after = [item for item in logged if item.time > ready]
        first = after[0] if after else None
        lease = next((i for i in after if isinstance(i.event, LeaseGranted)), None)
        restart["first_event_s"] = round((first.time - ready).total_seconds(), 3) if first else None
        restart["first_lease_s"] = round((lease.time - ready).total_seconds(), 3) if lease else None
