"""`warden agent exec -- CMD ARGS...`: govern any command-line agent.

For each job the command runs in a fresh workspace: a new git repository holding only the files
of the target's branch that `scope.read` lets it read (no history, no refs of the target, so it
can neither read what it may not nor commit where Warden would not). It gets a task file
(`.warden/task.json`), an environment with nothing but an allow-list and the job's variables
(never Warden's credentials), and a file to report its usage to. Exec heartbeats for it while it
shows signs of progress; when it stalls, is stopped (SIGSTOP), loses its lease or exec stops,
its whole process group is killed, also when exec itself is killed (a watchdog does it). Its
diff becomes a proposal, with its exit status and output tails as evidence: the command never
applies anything itself, and the `exit_status` invariant fails a command that exited non-zero.

Exit codes (Warden's own, see README): 0 stopped as asked (job limit, --once, idle,
SIGINT/SIGTERM), 1 the agent is revoked or its credentials or registration were refused (the
last line says which), 2 a usage error, 4 no server answered at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import click
import msgspec
import nats.errors

from services.cli.options import Exit, data_dir_option, json_option, nats_option, resolve_url
from shared import paths, task
from shared.bus import PermissionDenied
from shared.events import now
from shared.forensics import log as eventlog
from shared.messages import LeaseGrant
from shared.sdk import (
    AgentClient,
    AgentError,
    JobContext,
    Outcome,
    Proposal,
    ServeResult,
    Stalled,
    connect_agent,
)

log = logging.getLogger("warden.exec")

TAIL = 4000
# What the command's environment keeps from exec's own; everything else only by --env NAME.
ENV_ALLOWED = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TERM",
    "TZ",
    "TMPDIR",
)
# Never passed, even when asked for: the command must not speak as Warden or as this agent.
ENV_FORBIDDEN_PREFIX = "WARDEN_NATS"
WORKSPACES = Path(tempfile.gettempdir()) / "warden-exec"

# Runs beside the command, outside its process group. The kernel signals it when exec dies
# (PR_SET_PDEATHSIG, even on kill -9), and it then kills the command's whole group.
WATCHDOG = """
import ctypes, os, signal, sys
exec_pid, group = int(sys.argv[1]), int(sys.argv[2])
def finish(*_):
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, finish)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != exec_pid:  # exec died before the prctl took effect
    finish()
while True:
    signal.pause()
"""


def git(cwd: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout


GIT_IDENTITY = ("-c", "user.name=warden", "-c", "user.email=warden@localhost", "-c", "commit.gpgsign=false")


class Workspace:
    """One job's directory: a fresh repository with the readable files of the target's branch."""

    def __init__(self, agent: str, grant: LeaseGrant) -> None:
        self.grant = grant
        self.root = WORKSPACES / agent / f"{grant.job_id}-{grant.epoch}"
        self.path = self.root / "work"
        self.usage_file = self.root / "usage.jsonl"
        self.base = ""  # the target's commit the files come from ("" for a scratch workspace)
        self.local_base = ""  # the same tree as a commit of the workspace's own repository
        self.hidden = 0  # tracked files left out because scope.read does not cover them

    def prepare(self) -> None:
        if self.root.exists():  # a workspace of this very lease, left by a crash: start clean
            shutil.rmtree(self.root)
        self.path.mkdir(parents=True)
        (self.root / "owner.json").write_text(json.dumps({"pid": os.getpid()}))
        self.usage_file.touch()
        contract = self.grant.contract
        if contract.target.repo:
            repo = Path(contract.target.repo)
            self.base = git(repo, "rev-parse", "--verify", f"{contract.target.branch}^{{commit}}").strip()
            self._export(repo, contract.scope.read)
        git(self.path, "init", "-q")
        (self.path / ".git" / "info").mkdir(parents=True, exist_ok=True)
        (self.path / ".git" / "info" / "exclude").write_text("/.warden/\n")
        git(self.path, "add", "-A", "-f")
        git(self.path, *GIT_IDENTITY, "commit", "-q", "--allow-empty", "--no-verify", "-m", "warden: base")
        self.local_base = git(self.path, "rev-parse", "HEAD").strip()

    def _export(self, repo: Path, readable: list[str]) -> None:
        archive = subprocess.Popen(
            ["git", "archive", "--format=tar", self.base], cwd=repo, stdout=subprocess.PIPE
        )
        assert archive.stdout is not None
        with archive, tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if any(paths.glob_match(g, member.name) for g in readable):
                    tar.extract(member, self.path, filter="tar")
                else:
                    self.hidden += 1
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {self.base} failed in {repo} (exit {archive.returncode})")

    def write_task(self, body: task.TaskFile) -> Path:
        path = self.path / task.TASK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(msgspec.json.format(msgspec.json.encode(body)))
        return path

    def diff(self) -> str:
        """The command's change: every file it created, changed or deleted (.warden/ excluded)."""
        git(self.path, "add", "-A")
        # A plain patch whatever the user's git config says (prefixes, external diff, textconv).
        return git(
            self.path,
            "diff",
            "--cached",
            "--binary",
            "--no-ext-diff",
            "--no-textconv",
            "--no-color",
            "--src-prefix=a/",
            "--dst-prefix=b/",
            self.local_base,
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def sweep(agent: str) -> list[Path]:
        """Remove workspaces an earlier exec of this agent left (killed before it could), and
        kill whatever still runs in them. A workspace whose exec still lives is left alone."""
        cleaned: list[Path] = []
        for root in sorted((WORKSPACES / agent).glob("*")):
            try:
                owner = json.loads((root / "owner.json").read_text())["pid"]
            except (OSError, ValueError, KeyError, TypeError):
                owner = None
            if isinstance(owner, int) and owner != os.getpid() and _alive(owner):
                continue
            for pid in _pids_working_in(root):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(root, ignore_errors=True)
            cleaned.append(root)
        return cleaned


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_entries() -> Iterator[Path]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield entry


def _pids_working_in(root: Path) -> list[int]:
    found = []
    for entry in _proc_entries():
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")).is_relative_to(root):
                found.append(int(entry.name))
    return found


def group_states(group: int) -> list[str]:
    """The scheduler state letter of every process in process group `group` (R, S, T, Z...)."""
    states = []
    for entry in _proc_entries():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:  # fields after the name: state, ppid, pgrp, ...
                states.append(fields[0])
    return states


def tree_fingerprint(path: Path) -> str:
    """Changes when any file under `path` (its .git excluded) is created, changed or removed."""
    digest = hashlib.blake2b(digest_size=16)
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(full)
                digest.update(f"{full}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return digest.hexdigest()


def job_environment(
    grant: LeaseGrant, workspace: Workspace, task_file: Path, passed: tuple[str, ...]
) -> dict[str, str]:
    """The allow-list and --env names from exec's environment, then the job's own variables."""
    env = {k: v for k in (*ENV_ALLOWED, *passed) if (v := os.environ.get(k)) is not None}
    contract = grant.contract
    stop = contract.stopping
    env.update(
        {
            "WARDEN_JOB_ID": str(grant.job_id),
            "WARDEN_EPOCH": str(grant.epoch),
            "WARDEN_KIND": grant.kind,
            "WARDEN_WORKDIR": str(workspace.path),
            "WARDEN_TASK_FILE": str(task_file),
            "WARDEN_USAGE_FILE": str(workspace.usage_file),
            "WARDEN_INPUTS": json.dumps(contract.inputs),
            "WARDEN_SCOPE_PATHS": json.dumps(contract.scope.paths),
            "WARDEN_SCOPE_EFFECTS": json.dumps(contract.scope.effects),
            "WARDEN_CI_COMMAND": json.dumps(contract.ci.command) if contract.ci else "",
            "WARDEN_BUDGETS": msgspec.json.encode(stop.budgets).decode(),
            "WARDEN_DEADLINE": stop.deadline.isoformat() if stop.deadline else "",
        }
    )
    for key, value in contract.inputs.items():
        name = "WARDEN_INPUT_" + "".join(c if c.isalnum() else "_" for c in key).upper()
        env[name] = value if isinstance(value, str) else json.dumps(value)
    return env


async def previous_attempts(nc: Any, grant: LeaseGrant) -> tuple[list[task.PreviousAttempt], str]:
    """On a retry, how the earlier attempts ended, read from the job's events (or why not)."""
    if grant.epoch <= 1:
        return [], ""
    try:
        with anyio.fail_after(5):
            events = await eventlog.job_events(nc.jetstream(), grant.job_id)
    except (TimeoutError, nats.errors.Error, PermissionDenied, eventlog.LogUnavailable) as exc:
        return [], f"previous attempts not readable: {type(exc).__name__}: {exc}"
    return task.previous_attempts([e.event for e in events], grant.epoch), ""


def task_file_for(
    grant: LeaseGrant, workspace: Workspace, attempts: list[task.PreviousAttempt]
) -> task.TaskFile:
    contract = grant.contract
    stop = contract.stopping
    return task.TaskFile(
        job_id=grant.job_id,
        kind=grant.kind,
        epoch=grant.epoch,
        inputs=contract.inputs,
        scope=contract.scope,
        ci=contract.ci,
        output_schema=contract.output_schema,
        budgets=stop.budgets,
        deadline=stop.deadline,
        lease_ttl_s=stop.lease_ttl_s,
        stall_s=stop.stall_s,
        on_empty=contract.on_empty,
        base=workspace.base,
        usage_file=str(workspace.usage_file),
        previous_attempts=attempts,
    )


class Progress:
    """The signs of life of a running command: output, workspace changes, usage reports."""

    def __init__(self, ctx: JobContext, workspace: Workspace) -> None:
        self.ctx = ctx
        self.workspace = workspace
        self.last = time.monotonic()
        ctx.report(progress_at=now())  # the command's start is its first sign of progress
        self.offset = 0
        self.partial = b""
        self.bad_usage_lines = 0
        self.fingerprint = ""
        self.note = ""  # the command's own latest note (stdout line or usage report)

    def seen(self) -> None:
        self.last = time.monotonic()
        self.ctx.report(progress_at=now())

    def say(self, note: str | None) -> None:
        if note is not None:
            self.note = note[:500]
            self.ctx.report(note=self.note)

    def idle_for(self, idle: float) -> None:
        """Heartbeats carry how long the command has shown no sign of progress, so the
        reconciler's `lease.expired` (its last heartbeat) records it when the command stalls."""
        self.ctx.report(note=f"{self.note} [no sign of progress for {idle:.1f}s]".strip())

    def read_usage(self) -> None:
        """Take the usage lines appended since the last read; a bad line is counted, not trusted."""
        with self.workspace.usage_file.open("rb") as f:
            f.seek(self.offset)
            data = f.read(1 << 20)
        if not data:
            return
        self.offset += len(data)
        self.seen()
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            if not raw.strip():
                continue
            try:
                line = task.usage_line_decoder.decode(raw)
            except msgspec.DecodeError as exc:
                self.bad_usage_lines += 1
                log.warning("job %s: usage line ignored (%s): %r", self.ctx.job_id, exc, raw[:200])
                continue
            self.ctx.report(usage=task.merge_usage(self.ctx.usage, line), progress=line.progress)
            self.say(line.note)

    async def changed_tree(self) -> bool:
        fingerprint = await anyio.to_thread.run_sync(tree_fingerprint, self.workspace.path)
        changed = fingerprint != self.fingerprint
        self.fingerprint = fingerprint
        return changed


async def run_command(
    command: list[str], ctx: JobContext, workspace: Workspace, env: dict[str, str], grace_s: float
) -> Proposal:
    """Run the command to its end, watching for stalls; on cancellation kill its process group."""
    stall_s = ctx.grant.contract.stopping.stall_s
    poll_s = min(1.0, stall_s / 4) if stall_s else 1.0
    output: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    progress = Progress(ctx, workspace)
    progress.fingerprint = await anyio.to_thread.run_sync(tree_fingerprint, workspace.path)
    stalled: list[str] = []
    started = time.monotonic()
    process = await anyio.open_process(
        command, cwd=workspace.path, env=env, stdin=subprocess.DEVNULL, start_new_session=True
    )
    watchdog = await anyio.open_process(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(process.pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a terminal's Ctrl-C reaches exec (which stops cleanly), not it
    )

    async def drain(name: str, stream: Any) -> None:
        async for chunk in stream:
            progress.seen()
            buf = output[name]
            buf.extend(chunk)
            del buf[: -TAIL * 4]
            if name == "stdout":
                lines = bytes(buf).decode("utf-8", "replace").strip().splitlines()
                progress.say(lines[-1][:200] if lines else "")

    async def watch(scope: anyio.CancelScope) -> None:
        stopped_polls = 0
        while True:
            await anyio.sleep(poll_s)
            states = group_states(process.pid)
            stopped_polls = stopped_polls + 1 if states and all(s in "Tt" for s in states) else 0
            await anyio.to_thread.run_sync(progress.read_usage)
            if stall_s is not None and await progress.changed_tree():
                progress.seen()
            idle = time.monotonic() - progress.last
            # Without stall_s the workspace is not watched, so idleness is not known.
            if stall_s is not None and idle >= 2 * poll_s:
                progress.idle_for(idle)
            elif stall_s is not None:
                progress.say(progress.note)
            if stopped_polls >= 2:  # seen stopped twice in a row: not a passing debugger stop
                stalled.append(
                    f"the command is stopped (state T), {idle:.1f}s since its last sign of progress"
                )
            elif stall_s is not None and idle > stall_s:
                stalled.append(
                    f"no output, no change in its workspace and no usage report for {idle:.1f}s "
                    f"(stall_s {stall_s})"
                )
            if stalled:
                scope.cancel()
                return

    code: int | None = None
    try:
        async with anyio.create_task_group() as tg:
            drains_done = anyio.Event()

            async def drains() -> None:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(drain, "stdout", process.stdout)
                    inner.start_soon(drain, "stderr", process.stderr)
                drains_done.set()

            tg.start_soon(drains)
            tg.start_soon(watch, tg.cancel_scope)
            code = await process.wait()
            # A grandchild that left the group may hold the pipes open: stop reading soon.
            with anyio.move_on_after(5):
                await drains_done.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                await _kill_group(process.pid, grace_s, process)
            with contextlib.suppress(ProcessLookupError):  # what it left running in its group
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
                watchdog.kill()
            await watchdog.wait()
            await process.aclose()
            await watchdog.aclose()
    if stalled:
        raise Stalled(stalled[0])
    await anyio.to_thread.run_sync(progress.read_usage)
    patch = await anyio.to_thread.run_sync(workspace.diff)
    evidence: dict[str, Any] = {
        "command": command,
        "exit_code": code,
        "duration_s": round(time.monotonic() - started, 3),
        "stdout": output["stdout"].decode("utf-8", "replace")[-TAIL:],
        "stderr": output["stderr"].decode("utf-8", "replace")[-TAIL:],
    }
    if progress.bad_usage_lines:
        evidence["usage_lines_ignored"] = progress.bad_usage_lines
    if workspace.hidden:
        evidence["files_not_readable"] = workspace.hidden
    if not patch.strip():  # no change: a result of its own, judged by contract.on_empty
        return Proposal(effect="none", base=workspace.base, evidence=evidence)
    return Proposal(effect="git.patch", patch=patch, base=workspace.base, evidence=evidence)


async def _kill_group(pid: int, grace_s: float, process: anyio.abc.Process) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGCONT)  # a stopped process only acts on SIGTERM once continued
    except ProcessLookupError:
        return
    with anyio.move_on_after(grace_s):
        await process.wait()
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    await process.wait()


def outcome_line(outcome: Outcome, as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {
                "job_id": str(outcome.job_id),
                "epoch": outcome.epoch,
                "status": outcome.status,
                "detail": outcome.detail,
                "reply": msgspec.to_builtins(outcome.reply) if outcome.reply is not None else None,
            }
        )
    return f"{outcome.job_id} epoch {outcome.epoch}: {outcome.status} {outcome.detail}".rstrip()


@click.group()
def agent() -> None:
    """Run an agent under Warden's governance."""


@agent.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--name", required=True, help="The agent's name (its identity on the wire).")
@click.option("--kind", "kinds", multiple=True, help="Only claim jobs of this kind.")
@click.option(
    "--max-jobs",
    "--jobs",
    "max_jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after taking this many jobs (default: run on).",
)
@click.option(
    "--once",
    is_flag=True,
    help="One claim round (waiting up to 20 s for work): do the job granted, if any, then stop.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Leases held at once, each in its own workspace (capped by the policy's max_leases).",
)
@click.option("--idle-exit", type=float, default=None, help="Stop after this many idle seconds.")
@click.option(
    "--env",
    "env_names",
    multiple=True,
    metavar="NAME",
    help="Pass this variable of exec's environment to the command (e.g. an API key); repeatable.",
)
@click.option(
    "--grace",
    "grace_s",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when a lease ends.",
)
@click.option(
    "--user",
    envvar="WARDEN_NATS_USER",
    default=None,
    help="The agent's NATS user from `warden creds add-agent` (or WARDEN_NATS_USER).",
)
@click.option(
    "--password",
    envvar="WARDEN_NATS_PASSWORD",
    default=None,
    help="Its password (or WARDEN_NATS_PASSWORD; the environment keeps it out of `ps`).",
)
@nats_option
@data_dir_option
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(
    name: str,
    kinds: tuple[str, ...],
    max_jobs: int | None,
    once: bool,
    concurrency: int,
    idle_exit: float | None,
    env_names: tuple[str, ...],
    grace_s: float,
    user: str | None,
    password: str | None,
    nats_url: str | None,
    data_dir: Path,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Claim jobs and run COMMAND for each in a fresh workspace; propose its diff.

    Example: warden agent exec --name fixer --kind refactor --env ANTHROPIC_API_KEY -- ./my-agent.sh

    Exit codes: 0 stopped as asked (job limit, --once, idle, SIGINT/SIGTERM), 1 revoked or
    credentials refused, 2 usage error, 4 no server answered.
    """
    forbidden = [n for n in env_names if n.startswith(ENV_FORBIDDEN_PREFIX)]
    if forbidden:
        raise click.UsageError(f"--env {forbidden[0]}: Warden's credentials are never passed to the command")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    url = resolve_url(nats_url, data_dir)
    for root in Workspace.sweep(name):
        click.echo(f"removed workspace {root} left by an earlier run", err=True)

    async def go() -> ServeResult:
        try:
            nc = await connect_agent(url, name, user=user, password=password)
        except nats.errors.Error as exc:  # e.g. 'Authorization Violation': wrong user or password
            click.echo(f"agent {name} could not connect to {url}: {exc}", err=True)
            sys.exit(Exit.FAILED if "authorization" in str(exc).lower() else Exit.UNREACHABLE)
        try:
            client = AgentClient(nc, name, kinds=list(kinds), max_concurrent=concurrency)

            async def handler(ctx: JobContext) -> Proposal:
                workspace = Workspace(name, ctx.grant)
                try:
                    await anyio.to_thread.run_sync(workspace.prepare)
                    # The grant tells a retry's earlier attempts; a scheduler older than that
                    # field sends none, and then the log is read where credentials allow it.
                    attempts, why_not = list(ctx.grant.previous_attempts), ""
                    if not attempts and ctx.grant.epoch > 1:
                        if user is None:
                            attempts, why_not = await previous_attempts(nc, ctx.grant)
                        else:  # an agent's own credentials may not read the log
                            why_not = "the grant told no previous attempts (scheduler older than this exec?)"
                    if why_not:
                        log.warning("job %s: %s", ctx.job_id, why_not)
                    task_file = workspace.write_task(task_file_for(ctx.grant, workspace, attempts))
                    env = job_environment(ctx.grant, workspace, task_file, env_names)
                    return await run_command(list(command), ctx, workspace, env, grace_s)
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(workspace.cleanup)

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        client.stop(f"{signal.Signals(signum).name} received")

            async with anyio.create_task_group() as tg:
                tg.start_soon(on_signals)
                result = await client.serve(
                    handler,
                    max_jobs=max_jobs,
                    concurrency=concurrency,
                    once=once,
                    idle_exit_s=idle_exit,
                    on_outcome=lambda outcome: click.echo(outcome_line(outcome, as_json)),
                )
                tg.cancel_scope.cancel()
            return result
        finally:
            with anyio.CancelScope(shield=True):
                await nc.close()

    try:
        result = anyio.run(go)
    except (PermissionDenied, AgentError) as exc:  # credentials or registration refused: one line
        click.echo(f"agent {name} stopped: {exc}", err=True)
        sys.exit(Exit.FAILED)
    click.echo(f"agent {name} stopped: {result.reason}; {result.summary()}", err=True)
    sys.exit(Exit.FAILED if result.revoked else Exit.OK)
