"""`warden agent exec -- CMD ARGS...`: govern any command-line agent.

The command runs in a fresh git worktree (or a scratch repository) prepared for the job, with
the job's inputs in its environment, while Warden heartbeats for it. When the lease ends
(revoked, expired, budget) the command's whole process group is killed. Its diff becomes a
proposal, with the exit code and output as evidence: the command never applies anything itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import click
import msgspec
import nats.errors

from services.cli.main import cli, data_dir_option, json_option, nats_option, resolve_url
from shared.bus import PermissionDenied
from shared.messages import LeaseGrant
from shared.sdk import AgentClient, JobContext, Outcome, Proposal, connect_agent

TAIL = 16 * 1024


def git(cwd: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout


class Workspace:
    """A directory for one job: a detached worktree of the target repo, or a scratch repo."""

    def __init__(self, grant: LeaseGrant) -> None:
        self.grant = grant
        self.tmp = Path(tempfile.mkdtemp(prefix=f"warden-{grant.job_id}-{grant.epoch}-"))
        self.path = self.tmp / "work"
        self.repo: Path | None = None
        self.base = ""

    def prepare(self) -> None:
        target = self.grant.contract.target
        if target.repo:
            self.repo = Path(target.repo)
            git(self.repo, "worktree", "add", "--detach", str(self.path), target.branch)
        else:
            self.path.mkdir()
            git(self.path, "init", "-q")
            git(
                self.path,
                "-c",
                "user.name=warden",
                "-c",
                "user.email=warden@localhost",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                "warden: empty base",
            )
        self.base = git(self.path, "rev-parse", "HEAD").strip()

    def diff(self) -> str:
        git(self.path, "add", "-A")
        return git(self.path, "diff", "--cached", "--binary", self.base)

    def cleanup(self) -> None:
        if self.repo is not None:
            git(self.repo, "worktree", "remove", "--force", str(self.path), check=False)
        subprocess.run(["rm", "-rf", str(self.tmp)], check=False)


def job_environment(grant: LeaseGrant, workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WARDEN_JOB_ID": str(grant.job_id),
            "WARDEN_EPOCH": str(grant.epoch),
            "WARDEN_KIND": grant.kind,
            "WARDEN_WORKDIR": str(workdir),
            "WARDEN_INPUTS": json.dumps(grant.contract.inputs),
        }
    )
    for key, value in grant.contract.inputs.items():
        name = "WARDEN_INPUT_" + "".join(c if c.isalnum() else "_" for c in key).upper()
        env[name] = value if isinstance(value, str) else json.dumps(value)
    return env


async def run_command(command: list[str], ctx: JobContext, workspace: Workspace, grace_s: float) -> Proposal:
    """Run the command to its end; on cancellation (lease lost) kill its process group."""
    env = job_environment(ctx.grant, workspace.path)
    output: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    process = await anyio.open_process(command, cwd=workspace.path, env=env, start_new_session=True)

    async def drain(name: str, stream: Any) -> None:
        async for chunk in stream:
            buf = output[name]
            buf.extend(chunk)
            del buf[:-TAIL]
            if name == "stdout":
                lines = bytes(buf).decode("utf-8", "replace").strip().splitlines()
                ctx.report(note=lines[-1][:200] if lines else "")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, "stdout", process.stdout)
            tg.start_soon(drain, "stderr", process.stderr)
            code = await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _kill_group(process.pid, grace_s, process)
        raise
    patch = await anyio.to_thread.run_sync(workspace.diff)
    return Proposal(
        effect="git.patch",
        patch=patch,
        base=workspace.base,
        evidence={
            "command": command,
            "exit_code": code,
            "stdout": output["stdout"].decode("utf-8", "replace"),
            "stderr": output["stderr"].decode("utf-8", "replace"),
        },
    )


async def _kill_group(pid: int, grace_s: float, process: anyio.abc.Process) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
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


@cli.group()
def agent() -> None:
    """Run an agent under Warden's governance."""


@agent.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--name", required=True, help="The agent's name (its identity on the wire).")
@click.option("--kind", "kinds", multiple=True, help="Only claim jobs of this kind.")
@click.option("--jobs", type=int, default=None, help="Stop after this many jobs (default: run on).")
@click.option("--idle-exit", type=float, default=None, help="Stop after this many idle seconds.")
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
    jobs: int | None,
    idle_exit: float | None,
    grace_s: float,
    user: str | None,
    password: str | None,
    nats_url: str | None,
    data_dir: Path,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Claim jobs and run COMMAND for each in a fresh worktree; propose its diff.

    Example: warden agent exec --name fixer --kind refactor -- ./my-agent.sh
    """
    url = resolve_url(nats_url, data_dir)

    async def go() -> list[Outcome]:
        try:
            nc = await connect_agent(url, name, user=user, password=password)
        except nats.errors.Error as exc:  # e.g. 'Authorization Violation': wrong user or password
            raise click.ClickException(f"agent {name} could not connect to {url}: {exc}") from exc
        try:
            client = AgentClient(nc, name, kinds=list(kinds))

            async def handler(ctx: JobContext) -> Proposal:
                workspace = Workspace(ctx.grant)
                await anyio.to_thread.run_sync(workspace.prepare)
                try:
                    return await run_command(list(command), ctx, workspace, grace_s)
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(workspace.cleanup)

            return await client.run(handler, jobs=jobs, idle_exit_s=idle_exit)
        finally:
            await nc.close()

    try:
        outcomes = anyio.run(go)
    except PermissionDenied as exc:  # its credentials do not fit its name: say so, not a traceback
        raise click.ClickException(str(exc)) from exc
    for outcome in outcomes:
        line = {
            "job_id": str(outcome.job_id),
            "epoch": outcome.epoch,
            "status": outcome.status,
            "detail": outcome.detail,
            "reply": msgspec.to_builtins(outcome.reply) if outcome.reply is not None else None,
        }
        click.echo(
            json.dumps(line)
            if as_json
            else f"{outcome.job_id} epoch {outcome.epoch}: {outcome.status} {outcome.detail}"
        )
    sys.exit(0)
