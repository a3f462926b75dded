"""The built-in invariants: scope, output_shape, base_drift, ci_gate, budget, exit_status, empty_change.

Each fails with evidence an operator can act on without re-running anything: the paths outside
the globs, the schema errors, the commits that landed since the proposal's base, the tail of
the CI run's output, the usage against the budget.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from shared import gitops
from shared.invariants.base import Invariant, Subject, Verdict, errored, failed, not_applicable, passed
from shared.lifecycle import budget_breach
from shared.paths import GlobError, compile_glob, unsafe_path

TAIL_CHARS = 4000
MAX_LISTED = 200


def touched_paths(subject: Subject) -> list[str]:
    """Every path the proposed effect would create, change, delete or rename (git.patch, file.write)."""
    proposal = subject.proposal
    if proposal.effect == "file.write":
        return list(proposal.files)
    if proposal.effect == "git.patch":
        paths = gitops.patch_paths(proposal.patch)
        for path in gitops.numstat_paths(proposal.patch):  # git's own reading, in case ours missed one
            if path not in paths:
                paths.append(path)
        return paths
    return []


class Scope:
    """Every touched path is inside contract.scope.paths; the effect kind is in scope.effects.

    Effect "none" changes nothing and is always in scope.
    """

    name = "scope"
    # 2: globs through shared.paths (a leading `/` is no longer stripped; `\\` separates too).
    version = "2"

    async def check(self, subject: Subject) -> Verdict:
        return await anyio.to_thread.run_sync(self._check, subject)

    def _check(self, subject: Subject) -> Verdict:
        scope = subject.job.contract.scope
        effect = subject.proposal.effect
        problems: list[str] = []
        if effect != "none" and effect not in scope.effects:
            problems.append(f"effect {effect} is not in scope.effects {scope.effects}")
        try:
            paths = touched_paths(subject)
        except gitops.GitError as exc:
            return failed(f"the patch does not parse: {exc.stderr.strip()}", effect=effect)
        try:
            globs = [compile_glob(g) for g in scope.paths]
        except GlobError as exc:  # accepted before submission checked globs: cannot be enforced
            return errored(f"scope.paths holds a glob that does not compile: {exc}", globs=scope.paths)
        unsafe = {p: why for p in paths if (why := unsafe_path(p))}
        outside = [p for p in paths if p not in unsafe and not any(g.matches(p) for g in globs)]
        if unsafe:
            problems.append("unsafe paths: " + ", ".join(f"{p} ({why})" for p, why in unsafe.items()))
        if outside:
            problems.append(f"{len(outside)} path(s) outside {scope.paths}: {', '.join(outside[:10])}")
        evidence: dict[str, Any] = {
            "effect": effect,
            "globs": scope.paths,
            "effects_allowed": scope.effects,
            "paths": paths[:MAX_LISTED],
        }
        if problems:
            return failed("; ".join(problems), outside=outside[:MAX_LISTED], unsafe=unsafe, **evidence)
        return passed(**evidence)


class OutputShape:
    """The proposal's `output` validates against contract.output_schema (JSON Schema)."""

    name = "output_shape"
    version = "1"

    async def check(self, subject: Subject) -> Verdict:
        schema = subject.job.contract.output_schema
        if schema is None:
            return not_applicable("the contract declares no output_schema")
        cls = validator_for(schema)
        try:
            cls.check_schema(schema)
        except SchemaError as exc:
            return errored(f"the contract's output_schema is not valid JSON Schema: {exc.message}")
        errors = sorted(cls(schema).iter_errors(subject.proposal.output), key=lambda e: str(list(e.path)))
        if errors:
            listed = [
                {"path": "$" + "".join(f"[{p!r}]" for p in e.absolute_path), "message": e.message}
                for e in errors[:20]
            ]
            return failed(f"output does not match the schema: {listed[0]['message']}", errors=listed)
        return passed(schema_draft=cls.META_SCHEMA.get("$schema", ""))


def _git_target(subject: Subject) -> tuple[str, str] | Verdict:
    """(repo, head the change would land on), or the verdict when that cannot be known."""
    target = subject.job.contract.target
    if not target.repo:
        return failed("the contract names no target.repo for a git.patch effect")
    if not gitops.is_repo(target.repo):
        return errored(f"target.repo {target.repo} is not a git repository")
    head = gitops.landing_head(target.repo, subject.branch, target.branch)
    if head is None:
        return errored(f"neither branch {subject.branch} nor target branch {target.branch} exists")
    return target.repo, head


class BaseDrift:
    """For git.patch: the proposal's base is the head it would land on, and the patch applies there."""

    name = "base_drift"
    version = "1"

    async def check(self, subject: Subject) -> Verdict:
        if subject.proposal.effect != "git.patch":
            return not_applicable(f"effect {subject.proposal.effect} is not git.patch")
        return await anyio.to_thread.run_sync(self._check, subject)

    def _check(self, subject: Subject) -> Verdict:
        where = _git_target(subject)
        if isinstance(where, Verdict):
            return where
        repo, head = where
        proposal = subject.proposal
        evidence: dict[str, Any] = {"branch": subject.branch, "base": proposal.base, "head": head}
        if not proposal.base:
            return failed("the proposal names no base commit", **evidence)
        base = gitops.resolve_commit(repo, proposal.base)
        if base != head:
            evidence.update(gitops.drift_evidence(repo, proposal.base, head))
            changed = evidence.get("commits_since_base") or []
            if base is None:
                reason = f"base {proposal.base} is not a commit of {repo}"
            else:
                reason = (
                    f"stale base: {subject.branch} is at {head[:12]}, the proposal was built on "
                    f"{base[:12]} ({len(changed)} commit(s) since)"
                )
            return failed(reason, **evidence)
        problem = gitops.apply_check(repo, head, proposal.patch)
        if problem:
            return failed(f"the patch does not apply on {head[:12]}: {problem}", apply=problem, **evidence)
        return passed(**evidence)


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    timed_out: bool


def _tail(buf: bytearray) -> str:
    return buf.decode("utf-8", "replace")[-TAIL_CHARS:]


async def run_command(argv: list[str], cwd: Path, timeout_s: float, env: dict[str, str]) -> CommandResult:
    """Run in its own process group; on timeout (or cancellation) the whole group is killed."""
    started = time.monotonic()
    out, err = bytearray(), bytearray()
    process = await anyio.open_process(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, start_new_session=True
    )

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    async def pump(stream: Any, buf: bytearray) -> None:
        async for chunk in stream:
            buf.extend(chunk)
            del buf[: -TAIL_CHARS * 4]

    timed_out = False
    try:
        async with anyio.create_task_group() as tg:
            pumps_done = anyio.Event()

            async def pumps() -> None:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(pump, process.stdout, out)
                    inner.start_soon(pump, process.stderr, err)
                pumps_done.set()

            tg.start_soon(pumps)
            with anyio.move_on_after(timeout_s) as scope:
                await process.wait()
            if scope.cancelled_caught:
                timed_out = True
                kill_group()
                await process.wait()
            # A grandchild that left the group may hold the pipes open: stop reading soon.
            with anyio.move_on_after(5):
                await pumps_done.wait()
            tg.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            kill_group()
            with anyio.CancelScope(shield=True):
                await process.wait()
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return CommandResult(
        exit_code=process.returncode,
        stdout_tail=_tail(out),
        stderr_tail=_tail(err),
        duration_s=round(time.monotonic() - started, 3),
        timed_out=timed_out,
    )


def ci_environment(subject: Subject) -> dict[str, str]:
    """The CI run's environment: the agent's code runs here, so none of Warden's own settings
    (NATS URL, credentials, fault injection) leak into it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
    env.update(
        WARDEN_JOB_ID=str(subject.job.id),
        WARDEN_PROPOSAL_ID=str(subject.proposal_id),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


class CiGate:
    """contract.ci.command passes in an isolated temporary worktree with the change applied."""

    name = "ci_gate"
    version = "1"
    # Skipped (not recorded) when a cheaper invariant already failed: its run would be waste.
    expensive = True

    def is_expensive(self, subject: Subject) -> bool:
        """Only a real run is slow; "not applicable" costs nothing and is decided with the rest."""
        return subject.job.contract.ci is not None and subject.proposal.effect in ("git.patch", "file.write")

    async def check(self, subject: Subject) -> Verdict:
        ci = subject.job.contract.ci
        if ci is None:
            return not_applicable("the contract declares no ci")
        effect = subject.proposal.effect
        if effect == "git.patch":
            return await self._git(subject, ci.command, ci.timeout_s)
        if effect == "file.write":
            return await self._files(subject, ci.command, ci.timeout_s)
        return not_applicable(f"effect {effect} changes no files to test")

    async def _git(self, subject: Subject, command: list[str], timeout_s: float) -> Verdict:
        where = await anyio.to_thread.run_sync(_git_target, subject)
        if isinstance(where, Verdict):
            return where
        repo, head = where
        path = await anyio.to_thread.run_sync(gitops.add_worktree, repo, head)
        try:
            applied = await anyio.to_thread.run_sync(
                lambda: gitops.git(
                    path,
                    "apply",
                    "--whitespace=nowarn",
                    "-",
                    stdin=subject.proposal.patch.encode(),
                    check=False,
                )
            )
            if applied.returncode != 0:
                return failed(
                    f"the patch does not apply on {head[:12]}",
                    apply=applied.stderr.decode("utf-8", "replace")[-TAIL_CHARS:],
                    ran_at=head,
                )
            return await self._run(subject, command, timeout_s, path, {"ran_at": head})
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(gitops.remove_worktree, repo, path)

    async def _files(self, subject: Subject, command: list[str], timeout_s: float) -> Verdict:
        directory = subject.job.contract.target.directory
        if not directory or not await anyio.Path(directory).is_dir():
            return failed(f"target.directory {directory!r} is not a directory")
        tmp = Path(tempfile.mkdtemp(prefix="warden-ci-"))
        try:
            tree = tmp / "tree"

            def prepare() -> str:
                shutil.copytree(directory, tree, symlinks=True)
                for rel, content in subject.proposal.files.items():
                    if unsafe_path(rel):
                        return f"unsafe path {rel}"
                    dest = tree / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_text(content)
                return ""

            problem = await anyio.to_thread.run_sync(prepare)
            if problem:
                return failed(problem)
            return await self._run(subject, command, timeout_s, tree, {"ran_in": "copy of " + directory})
        finally:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))

    async def _run(
        self, subject: Subject, command: list[str], timeout_s: float, cwd: Path, where: dict[str, Any]
    ) -> Verdict:
        try:
            result = await run_command(command, cwd, timeout_s, ci_environment(subject))
        except OSError as exc:
            return errored(f"cannot run {command[0]!r}: {exc}", command=command, **where)
        evidence: dict[str, Any] = {
            "command": command,
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "duration_s": result.duration_s,
            "stdout_tail": result.stdout_tail,
            "stderr_tail": result.stderr_tail,
            **where,
        }
        if result.timed_out:
            return failed(f"{' '.join(command)} timed out after {timeout_s}s", **evidence)
        if result.exit_code != 0:
            return failed(f"{' '.join(command)} exited {result.exit_code}", **evidence)
        return passed(**evidence)


class Budget:
    """The usage the agent declared with its proposal is within contract.stopping.budgets."""

    name = "budget"
    version = "1"

    async def check(self, subject: Subject) -> Verdict:
        budgets = subject.job.contract.stopping.budgets
        declared = msgspec.to_builtins(budgets)
        if all(v is None for v in declared.values()):
            return not_applicable("the contract sets no budgets")
        lease = subject.lease or subject.job.lease
        evidence: dict[str, Any] = {"usage": msgspec.to_builtins(subject.proposal.usage), "budgets": declared}
        if lease is None:
            return errored("no lease to measure wall-clock time from", **evidence)
        evidence["wall_clock_s"] = round((subject.received_at - lease.granted_at).total_seconds(), 3)
        breach = budget_breach(subject.job, subject.proposal.usage, lease, subject.received_at)
        if breach:
            return failed(f"budget exceeded: {breach}", **evidence)
        return passed(**evidence)


class ExitStatus:
    """A proposal from a wrapped command (`warden agent exec`) names its exit status: 0 or it fails.

    A command that failed (or was killed) never has its change applied, whatever it left behind;
    the tails of its output are the evidence. A proposal naming no exit status (an SDK agent's
    own) is not judged here.
    """

    name = "exit_status"
    version = "1"

    async def check(self, subject: Subject) -> Verdict:
        evidence = subject.proposal.evidence
        if "exit_code" not in evidence:
            return not_applicable("the proposal names no exit_code (no wrapped command)")
        code = evidence["exit_code"]
        tails = {
            f"{name}_tail": text[-TAIL_CHARS:]
            for name in ("stdout", "stderr")
            if isinstance(text := evidence.get(name), str)
        }
        if not isinstance(code, int) or isinstance(code, bool):
            return failed(f"exit_code {code!r} is not an integer", **tails)
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited {code}"
            return failed(f"the command {how}", exit_code=code, **tails)
        return passed(exit_code=0)


class EmptyChange:
    """A proposal that changes nothing (effect "none") is decided by contract.on_empty."""

    name = "empty_change"
    version = "1"

    async def check(self, subject: Subject) -> Verdict:
        if subject.proposal.effect != "none":
            return not_applicable(f"effect {subject.proposal.effect} changes something")
        on_empty = subject.job.contract.on_empty
        if on_empty == "fail":
            return failed(
                "the attempt changed nothing and the contract says on_empty: fail", on_empty=on_empty
            )
        return passed(on_empty=on_empty)


BUILTINS: tuple[Invariant, ...] = (
    Scope(),
    Budget(),
    OutputShape(),
    BaseDrift(),
    CiGate(),
    ExitStatus(),
    EmptyChange(),
)
