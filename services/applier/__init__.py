"""Applier: performs the effect of every accepted proposal exactly once, and compensates on request.

It follows the event stream. For each `proposal.accepted` it reads the proposal back from the
input stream (and the object store), verifies it against the recorded hashes, and performs the
effect; `effect.applied` with the receipt is appended atomically with `job.completed`. For each
`rollback.requested` on an applied proposal it performs the compensating effect and appends
`effect.rolled_back`.

Exactly once: before acting it looks for its own receipt (for git a commit on the branch whose
`Warden-Proposal:` / `Warden-Rollback:` trailer names the proposal; for files the content hashes
already in place), so a crash between the effect and its record is re-driven into a record
(`reused_receipt=True`), never into a second effect. Git branches move by compare-and-swap
(`git update-ref NEW OLD`), so two appliers can never both land a commit.

Effects: git.patch (commit on a branch of contract.target.repo: a sandbox branch per agent and
job at low levels, the target branch at higher ones), file.write (atomic writes inside
contract.target.directory; previous contents kept in the object store for rollback), webhook
(POST with `Idempotency-Key: <proposal id>`; the receiver deduplicates, there is no receipt
to find), none (a receipt only).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from eventsourcing.persistence import IntegrityError
from nats.js.errors import ObjectNotFoundError

from shared import faults, gitops, paths, proposals, telemetry, topology
from shared.aggregates import Job, ProposalState
from shared.events import (
    EffectApplied,
    EffectFailed,
    EffectRolledBack,
    Event,
    JobCancelled,
    JobCompleted,
    JobTombstoned,
    ProposalAccepted,
    RollbackRequested,
    now,
)
from shared.lifecycle import after_attempt
from shared.messages import Propose
from shared.runtime import Context

log = logging.getLogger("warden.applier")

_RETRIES = 10
# Receipts inline the previous contents of written files up to this size (else the journal).
INLINE_PREVIOUS_BYTES = 64 * 1024
WEBHOOK_TIMEOUT_S = 30.0


class EffectError(Exception):
    """The effect cannot be performed and the world is unchanged: recorded as `effect.failed`."""

    def __init__(self, reason: str, **evidence: Any) -> None:
        self.reason = reason
        self.evidence = evidence
        super().__init__(reason)


Receipt = dict[str, Any]


class Applier:
    name = "applier"

    def __init__(self) -> None:
        self._pending: dict[UUID, None] = {}  # insertion-ordered set of jobs with work
        self._wake = anyio.Event()
        # Effects this process performed but has not recorded yet (a lost append race is retried
        # with the receipt in hand, not by looking the effect up as someone else's).
        self._unrecorded: dict[tuple[UUID, str], tuple[Receipt, bool]] = {}
        self._backoff: dict[UUID, float] = {}
        self.ctx: Context
        self._tg: TaskGroup

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        for job in list(ctx.views.jobs.values()):
            self._consider(job)  # finish what a crash left: accepted but unrecorded, rollbacks asked
        ctx.views.listeners.append(self._on_event)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._loop)
            task_status.started()

    def _on_event(self, event: Event | None, job: Job | None, _agent: object) -> None:
        if job is not None and (
            event is None  # reloaded from the store: its work may be new to us
            or isinstance(event, ProposalAccepted | RollbackRequested | JobCancelled | JobTombstoned)
        ):
            self._consider(job)

    def _consider(self, job: Job) -> None:
        if _work_for(job) is not None:
            self._pending[job.id] = None
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._pending:
                job_id = next(iter(self._pending))
                del self._pending[job_id]
                try:
                    await self._drive(job_id)
                    self._backoff.pop(job_id, None)
                except Exception:
                    delay = min(self._backoff.get(job_id, 0.5) * 2, 30.0)
                    self._backoff[job_id] = delay
                    log.exception("applier failed on job %s; retrying in %.1fs", job_id, delay)
                    self._tg.start_soon(self._retry_later, job_id, delay)

    async def _retry_later(self, job_id: UUID, delay: float) -> None:
        await anyio.sleep(delay)
        self._pending[job_id] = None
        self._wake.set()

    async def _drive(self, job_id: UUID) -> None:
        for _ in range(_RETRIES):
            job = self.ctx.views.jobs.get(job_id)
            work = _work_for(job) if job is not None else None
            if job is None or work is None:
                if job is not None:  # recorded (by us or a replica): forget any receipt in hand
                    for state in job.proposal_log:
                        self._unrecorded.pop((state.id, "apply"), None)
                        self._unrecorded.pop((state.id, "rollback"), None)
                return
            kind, state = work
            try:
                # A child of the span that accepted the proposal, or that asked for its rollback.
                with telemetry.span(
                    "applier effect" if kind == "apply" else "applier rollback",
                    parent=state.trace,
                    job_id=job.id,
                    agent=state.agent,
                    epoch=state.epoch,
                    proposal_id=state.id,
                    effect=state.effect,
                ):
                    if kind == "apply":
                        await self._apply(job, state)
                    else:
                        await self._rollback(job, state)
            except IntegrityError:
                log.info("job %s moved before our record (a replica, or another event): re-reading", job_id)
                await self.ctx.reload_job(job_id)
        raise RuntimeError(f"job {job_id} kept changing under the applier")

    # --- applying ------------------------------------------------------------------------

    async def _apply(self, job: Job, state: ProposalState) -> None:
        key = (state.id, "apply")
        done = self._unrecorded.get(key)
        if done is None:
            proposal: Propose | None = None
            try:
                proposal = await proposals.read_stored(self.ctx.js, state)
                found = await self._find_receipt(job, state, proposal)
                if found is not None:
                    done = (found, True)
                elif job.terminal:
                    # Cancelled or dead after the decision: only record an effect already made.
                    raise EffectError(f"job became {job.status} before the effect: {job.reason}")
                else:
                    done = await self._perform(job, state, proposal)
            except (EffectError, proposals.PayloadProblem) as exc:
                # A replica may have landed this very effect while ours failed (its patch no
                # longer applies on a head that already holds it): look for the receipt exactly
                # as before acting, so a landed effect is never recorded as a failure.
                found = await self._find_receipt(job, state, proposal)
                if found is None:
                    await self._fail(job, state, "apply", exc)
                    return
                done = (found, True)
            if not done[1]:
                faults.crash_if_armed("applier", "after-effect")
            self._unrecorded[key] = done
        receipt, reused = done
        events: list[Event] = [
            EffectApplied(
                originator_id=job.id,
                originator_version=job.version + 1,
                proposal_id=state.id,
                kind=state.effect,
                receipt=receipt,
                reused_receipt=reused,
                trace=telemetry.current_traceparent(),
            )
        ]
        if not job.terminal:
            events.append(
                JobCompleted(
                    originator_id=job.id,
                    originator_version=job.version + 2,
                    proposal_id=state.id,
                    agent=state.agent,
                    epoch=state.epoch,
                )
            )
        await self.ctx.save(*events)
        self._unrecorded.pop(key, None)
        telemetry.instruments().jobs.add(1, {"state": "completed"})
        log.info("applied %s for job %s%s", state.effect, job.id, " (receipt found)" if reused else "")

    async def _perform(self, job: Job, state: ProposalState, proposal: Propose) -> tuple[Receipt, bool]:
        """The effect, once `_find_receipt` found none: (receipt, found landed by a replica)."""
        match state.effect:
            case "none":
                return {"kind": "none"}, False
            case "git.patch":
                return await anyio.to_thread.run_sync(_git_apply, job, state, proposal)
            case "file.write":
                return await self._files_apply(job, state, proposal), False
            case "webhook":
                receipt = await _webhook(job, state, proposal)
                await self._record_webhook(state, receipt)
                return receipt, False
        raise EffectError(f"unknown effect kind {state.effect}")

    async def _find_receipt(self, job: Job, state: ProposalState, proposal: Propose | None) -> Receipt | None:
        """The proof that this proposal's effect already happened (by us, a replica, a crashed
        run), or None. Consulted before acting and again before recording a failure."""
        if state.effect == "git.patch":
            return await anyio.to_thread.run_sync(_git_find, job, state)
        if state.effect == "file.write" and proposal is not None:
            try:
                root = _root(job)
                targets = _targets(root, proposal.files)
            except EffectError:
                return None  # no such target: nothing could have been written there
            current = await anyio.to_thread.run_sync(_hashes, targets)
            if current == _new_hashes(proposal.files):
                return await self._file_receipt(root, state, proposal, current)
        if state.effect == "webhook":
            recorded = await self._recorded_webhook(state)
            if recorded is not None and 200 <= int(recorded.get("status", 0)) < 300:
                return recorded
        return None

    async def _record_webhook(self, state: ProposalState, receipt: Receipt) -> None:
        """The receiver's answer, kept before the event: a re-drive after a crash finds it.
        Written as the payload bucket allows (no rollup, no purge); a later answer for the same
        proposal adds a newer metadata record, which is the one read back."""
        await proposals.put_object(self.ctx.js, _webhook_name(state.id), json.dumps(receipt).encode())

    async def _recorded_webhook(self, state: ProposalState) -> Receipt | None:
        store = await self.ctx.js.object_store(topology.PAYLOAD_BUCKET)
        try:
            raw = (await store.get(_webhook_name(state.id))).data or b""
        except ObjectNotFoundError:
            return None
        recorded: Receipt = json.loads(raw)
        return recorded

    async def _fail(self, job: Job, state: ProposalState, phase: str, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, EffectError) else str(exc)
        evidence = exc.evidence if isinstance(exc, EffectError) else {}
        events: list[Event] = [
            EffectFailed(
                originator_id=job.id,
                originator_version=job.version + 1,
                proposal_id=state.id,
                kind=state.effect,
                reason=reason,
                phase="rollback" if phase == "rollback" else "apply",
                evidence=evidence,
            )
        ]
        if phase == "apply" and not job.terminal:
            events.append(
                after_attempt(job, job.version + 2, f"effect failed: {reason}", now(), by=self.name)
            )
        await self.ctx.save(*events)
        log.warning("%s of proposal %s failed: %s", phase, state.id, reason)

    # --- files -----------------------------------------------------------------------------

    async def _journal(self, state: ProposalState) -> dict[str, bytes | None] | None:
        store = await self.ctx.js.object_store(topology.PAYLOAD_BUCKET)
        try:
            raw = (await store.get(_journal_name(state.id))).data or b""
        except ObjectNotFoundError:
            return None
        stored: dict[str, str | None] = json.loads(raw)
        return {rel: None if b64 is None else base64.b64decode(b64) for rel, b64 in stored.items()}

    async def _files_apply(self, job: Job, state: ProposalState, proposal: Propose) -> Receipt:
        root = _root(job)
        targets = _targets(root, proposal.files)
        current = await anyio.to_thread.run_sync(_hashes, targets)
        if await self._journal(state) is None:
            # Write-ahead: what the files held before, kept durably before any of them changes,
            # so a crash halfway through a multi-file write still knows what to restore.
            previous = await anyio.to_thread.run_sync(_read_all, targets)
            encoded = {
                rel: None if data is None else base64.b64encode(data).decode()
                for rel, data in previous.items()
            }
            # Written once per proposal; the bucket allows no rollup or purge (proposals.put_object).
            await proposals.put_object(self.ctx.js, _journal_name(state.id), json.dumps(encoded).encode())
        writes: dict[str, tuple[Path, bytes | None]] = {
            rel: (targets[rel], content.encode()) for rel, content in proposal.files.items()
        }
        await anyio.to_thread.run_sync(_write_all, writes)
        return await self._file_receipt(root, state, proposal, current)

    async def _file_receipt(
        self, root: Path, state: ProposalState, proposal: Propose, before: dict[str, str | None]
    ) -> Receipt:
        previous = await self._journal(state)
        if previous is None:  # the files already held this content: nothing was journaled
            previous = {rel: content.encode() for rel, content in proposal.files.items()}
        files = {
            rel: {
                "sha256": proposals.sha256(content.encode()),
                "previous_sha256": None
                if previous.get(rel) is None
                else proposals.sha256(previous[rel] or b""),
            }
            for rel, content in proposal.files.items()
        }
        receipt: Receipt = {"directory": str(root), "files": files, "journal": _journal_name(state.id)}
        inline = _inline_previous(previous)
        if inline is not None:
            receipt["previous"] = inline
        return receipt

    # --- rollback ----------------------------------------------------------------------------

    async def _rollback(self, job: Job, state: ProposalState) -> None:
        key = (state.id, "rollback")
        done = self._unrecorded.get(key)
        if done is None:
            try:
                done = await self._compensate(job, state)
            except EffectError as exc:
                await self._fail(job, state, "rollback", exc)
                return
            if not done[1]:
                faults.crash_if_armed("applier", "after-rollback")
            self._unrecorded[key] = done
        receipt, reused = done
        await self.ctx.save(
            EffectRolledBack(
                originator_id=job.id,
                originator_version=job.version + 1,
                proposal_id=state.id,
                kind=state.effect,
                receipt=receipt,
                reason=state.rollback_reason,
                reused_receipt=reused,
                trace=telemetry.current_traceparent(),
            )
        )
        self._unrecorded.pop(key, None)
        log.info("rolled back proposal %s of job %s", state.id, job.id)

    async def _compensate(self, job: Job, state: ProposalState) -> tuple[Receipt, bool]:
        receipt = state.receipt or {}
        match state.effect:
            case "none":
                return {"kind": "none"}, False
            case "git.patch":
                return await anyio.to_thread.run_sync(_git_revert, job, state, receipt)
            case "file.write":
                return await self._files_restore(state, receipt)
            case "webhook":
                raise EffectError("a webhook cannot be compensated by Warden; its receiver must undo it")
        raise EffectError(f"unknown effect kind {state.effect}")

    async def _files_restore(self, state: ProposalState, receipt: Receipt) -> tuple[Receipt, bool]:
        root = Path(receipt["directory"])
        files: dict[str, dict[str, str | None]] = receipt["files"]
        targets = _targets(root, dict.fromkeys(files, ""))
        previous: dict[str, bytes | None] | None
        if "previous" in receipt:
            previous = {
                rel: None if text is None else text.encode() for rel, text in receipt["previous"].items()
            }
        else:
            previous = await self._journal(state)
        if previous is None:
            raise EffectError(f"the journal {receipt.get('journal')} of previous contents is gone")
        current = await anyio.to_thread.run_sync(_hashes, targets)
        restored = {rel: files[rel]["previous_sha256"] for rel in files}
        result: Receipt = {"directory": str(root), "restored": restored}
        if current == restored:
            return result, True
        changed = [
            rel for rel in files if current[rel] not in (files[rel]["sha256"], files[rel]["previous_sha256"])
        ]
        if changed:
            raise EffectError(
                f"{len(changed)} file(s) changed since the effect; not overwriting them", changed=changed
            )
        await anyio.to_thread.run_sync(_write_all, {rel: (targets[rel], previous.get(rel)) for rel in files})
        return result, False


def _work_for(job: Job) -> tuple[str, ProposalState] | None:
    for state in job.proposal_log:
        if state.status == "accepted":
            return "apply", state
        if state.status == "applied" and state.rollback == "requested":
            return "rollback", state
    return None


# --- git -------------------------------------------------------------------------------------


def _git_receipt(repo: str, branch: str, commit: str) -> Receipt:
    parent = gitops.resolve_commit(repo, f"{commit}^") or ""
    return {"repo": repo, "branch": branch, "commit": commit, "parent": parent}


def _commit_message(job: Job, state: ProposalState, proposal: Propose) -> str:
    title = proposal.evidence.get("title")
    if not isinstance(title, str) or not title.strip():
        title = f"{job.kind}: change proposed by {state.agent}"
    title = title.strip().splitlines()[0][:200]
    trailers = gitops.trailers(job=str(job.id), proposal=str(state.id), agent=state.agent)
    return f"{title}\n\nApplied by Warden after every required invariant passed.\n\n{trailers}\n"


def _git_find(job: Job, state: ProposalState) -> Receipt | None:
    """The commit whose trailer names the proposal: on its branch, else on any branch of the
    repository (wherever it landed, it landed; it must not land a second time)."""
    target = job.contract.target
    if not target.repo or not gitops.is_repo(target.repo):
        return None
    branch = state.branch or target.branch
    pid = str(state.id)
    found = gitops.commits_with_trailer(target.repo, branch, gitops.TRAILER_PROPOSAL, pid)
    if found:
        return _git_receipt(target.repo, branch, found[0])
    elsewhere = gitops.branches_with_trailer(target.repo, gitops.TRAILER_PROPOSAL, pid)
    if elsewhere:
        commit, on = elsewhere[0]
        return _git_receipt(target.repo, on, commit)
    return None


def _git_apply(job: Job, state: ProposalState, proposal: Propose) -> tuple[Receipt, bool]:
    target = job.contract.target
    repo = target.repo
    if not repo or not gitops.is_repo(repo):
        raise EffectError(f"target.repo {repo!r} is not a git repository")
    branch = state.branch or target.branch
    pid = str(state.id)
    message = _commit_message(job, state, proposal)
    author = gitops.Identity(state.agent, f"{state.agent}@agents.warden")
    for _ in range(_RETRIES):
        old = gitops.branch_head(repo, branch)
        parent = old or gitops.branch_head(repo, target.branch)
        if parent is None:
            raise EffectError(f"target branch {target.branch} does not exist in {repo}")
        try:
            new = gitops.commit_patch(repo, parent, proposal.patch, message, author)
        except gitops.GitError as exc:
            raise EffectError(
                f"the patch no longer applies on {branch} at {parent[:12]}", stderr=exc.stderr[-2000:]
            ) from exc
        if gitops.cas_branch(repo, branch, new, old):
            receipt = _git_receipt(repo, branch, new)
            receipt["created_branch"] = old is None
            return receipt, False
        # The branch moved under us: maybe another applier landed this very proposal.
        found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_PROPOSAL, pid)
        if found:
            return _git_receipt(repo, branch, found[0]), True
    raise RuntimeError(f"branch {branch} of {repo} kept moving")


def _git_revert(job: Job, state: ProposalState, receipt: Receipt) -> tuple[Receipt, bool]:
    repo, branch, commit = receipt.get("repo"), receipt.get("branch"), receipt.get("commit")
    if not repo or not branch or not commit or not gitops.is_repo(repo):
        raise EffectError(f"the receipt names no usable commit: {receipt}")
    pid = str(state.id)
    found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_ROLLBACK, pid)
    if found:
        return {**_git_receipt(repo, branch, found[0]), "reverted": commit}, True
    patch = gitops.diff_of(repo, commit)
    title = (gitops.out(repo, "log", "-1", "--format=%s", commit) or commit)[:200]
    reason = " ".join(state.rollback_reason.split())[:500]
    trailers = gitops.trailers(job=str(job.id), rollback=pid)
    message = f'Revert "{title}"\n\nThis reverts commit {commit}.\nReason: {reason}\n\n{trailers}\n'
    for _ in range(_RETRIES):
        head = gitops.branch_head(repo, branch)
        if head is None:
            raise EffectError(f"branch {branch} no longer exists in {repo}")
        try:
            new = gitops.commit_patch(repo, head, patch, message, gitops.WARDEN, reverse=True)
        except gitops.GitError as exc:
            # The revert may not apply because a replica's revert is already there.
            found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_ROLLBACK, pid)
            if found:
                return {**_git_receipt(repo, branch, found[0]), "reverted": commit}, True
            raise EffectError(
                f"the revert of {commit[:12]} does not apply on {branch} at {head[:12]}: "
                "later commits changed the same lines",
                stderr=exc.stderr[-2000:],
            ) from exc
        if gitops.cas_branch(repo, branch, new, head):
            return {**_git_receipt(repo, branch, new), "reverted": commit}, False
        found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_ROLLBACK, pid)
        if found:
            return {**_git_receipt(repo, branch, found[0]), "reverted": commit}, True
    raise RuntimeError(f"branch {branch} of {repo} kept moving")


# --- files -----------------------------------------------------------------------------------


def _webhook_name(proposal_id: UUID) -> str:
    return f"@webhook/{proposal_id}"


def _journal_name(proposal_id: UUID) -> str:
    # '@' is not allowed in agent names, so no agent's payload object can take this name.
    return f"@journal/{proposal_id}"


def _root(job: Job) -> Path:
    directory = job.contract.target.directory
    if not directory:
        raise EffectError("the contract names no target.directory for a file.write effect")
    root = Path(directory).resolve()
    if not root.is_dir():
        raise EffectError(f"target.directory {directory} is not a directory")
    return root


def _targets(root: Path, files: dict[str, str]) -> dict[str, Path]:
    """Where each relative path lands; refuses any that would escape the root (.., symlinks)."""
    targets: dict[str, Path] = {}
    for rel in files:
        why = paths.unsafe_path(rel)
        if why:
            raise EffectError(f"refusing to write {rel!r}: {why}")
        dest = (root / rel).resolve()
        if not dest.is_relative_to(root):
            raise EffectError(f"refusing to write {rel!r}: it resolves outside {root}")
        targets[rel] = dest
    return targets


def _new_hashes(files: dict[str, str]) -> dict[str, str | None]:
    return {rel: proposals.sha256(content.encode()) for rel, content in files.items()}


def _hashes(targets: dict[str, Path]) -> dict[str, str | None]:
    return {rel: proposals.sha256(p.read_bytes()) if p.is_file() else None for rel, p in targets.items()}


def _read_all(targets: dict[str, Path]) -> dict[str, bytes | None]:
    return {rel: p.read_bytes() if p.is_file() else None for rel, p in targets.items()}


def _inline_previous(previous: dict[str, bytes | None]) -> dict[str, str | None] | None:
    total = sum(len(v) for v in previous.values() if v is not None)
    if total > INLINE_PREVIOUS_BYTES:
        return None
    try:
        return {rel: None if v is None else v.decode("utf-8") for rel, v in previous.items()}
    except UnicodeDecodeError:
        return None


def _write_all(writes: dict[str, tuple[Path, bytes | None]]) -> None:
    """Each file atomically (temp file, fsync, rename, fsync the directory); None deletes."""
    for path, data in writes.values():
        if data is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.warden-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- webhook ---------------------------------------------------------------------------------


async def _webhook(job: Job, state: ProposalState, proposal: Propose) -> Receipt:
    url = job.contract.target.url
    if not url:
        raise EffectError("the contract names no target.url for a webhook effect")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise EffectError(f"target.url {url} is not http(s)")
    if proposal.patch:
        body, content_type = proposal.patch.encode(), "text/plain; charset=utf-8"
    else:
        body, content_type = msgspec.json.encode(proposal.output), "application/json"
    headers = {
        "Content-Type": content_type,
        # The receiver deduplicates on it: a re-driven POST after a crash is the same request.
        "Idempotency-Key": str(state.id),
        "Warden-Job": str(job.id),
        "Warden-Agent": state.agent,
    }

    def post() -> int:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    status = await anyio.to_thread.run_sync(post)  # URLError (unreachable) is retried later
    if 400 <= status < 500:
        raise EffectError(f"{url} refused the request with HTTP {status}", status=status)
    if not 200 <= status < 300:
        raise RuntimeError(f"{url} answered HTTP {status}; retrying")
    return {"url": url, "status": status, "idempotency_key": str(state.id)}
