"""git.patch: a commit on a branch of contract.target.repo (a sandbox branch per agent and job at
low levels, the target branch at higher ones), found again by its `Warden-Proposal:` trailer.

Branches move by compare-and-swap (`git update-ref NEW OLD`), so two appliers can never both
land a commit; a revert carries a `Warden-Rollback:` trailer and is found the same way.
"""

from __future__ import annotations

import os
from collections.abc import Hashable

import anyio
from nats.js import JetStreamContext

from services.applier.effects.base import EffectError, Performed, Receipt
from shared import gitops
from shared.aggregates import Job, ProposalState
from shared.messages import Propose

# Compare-and-swap attempts on a branch other appliers move too (not event-store races).
CAS_TRIES = 10


class GitPatch:
    def exclusive(self, job: Job, state: ProposalState) -> Hashable | None:
        # One branch at a time: its compare-and-swap keeps replicas apart, but drivers of one
        # process racing on a branch would each rebuild their commit on every lost swap and
        # could run out of tries; in turn, each lands on the head the last one left.
        target = job.contract.target
        receipt = state.receipt or {}
        repo = receipt.get("repo") or target.repo
        branch = receipt.get("branch") or state.branch or target.branch
        return ("git", os.path.realpath(repo), branch) if repo else None

    async def find_receipt(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose | None
    ) -> Receipt | None:
        return await anyio.to_thread.run_sync(_find, job, state)

    async def perform(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose
    ) -> Performed:
        return await anyio.to_thread.run_sync(_apply, job, state, proposal)

    async def compensate(self, js: JetStreamContext, job: Job, state: ProposalState) -> Performed:
        return await anyio.to_thread.run_sync(_revert, job, state, state.receipt or {})


def _receipt(repo: str, branch: str, commit: str) -> Receipt:
    parent = gitops.resolve_commit(repo, f"{commit}^") or ""
    return {"repo": repo, "branch": branch, "commit": commit, "parent": parent}


def _commit_message(job: Job, state: ProposalState, proposal: Propose) -> str:
    title = proposal.evidence.get("title")
    if not isinstance(title, str) or not title.strip():
        title = f"{job.kind}: change proposed by {state.agent}"
    title = title.strip().splitlines()[0][:200]
    trailers = gitops.trailers(job=str(job.id), proposal=str(state.id), agent=state.agent)
    return f"{title}\n\nApplied by Warden after every required invariant passed.\n\n{trailers}\n"


def _find(job: Job, state: ProposalState) -> Receipt | None:
    """The commit whose trailer names the proposal: on its branch, else on any branch of the
    repository (wherever it landed, it landed; it must not land a second time)."""
    target = job.contract.target
    if not target.repo or not gitops.is_repo(target.repo):
        return None
    branch = state.branch or target.branch
    pid = str(state.id)
    found = gitops.commits_with_trailer(target.repo, branch, gitops.TRAILER_PROPOSAL, pid)
    if found:
        return _receipt(target.repo, branch, found[0])
    elsewhere = gitops.branches_with_trailer(target.repo, gitops.TRAILER_PROPOSAL, pid)
    if elsewhere:
        commit, on = elsewhere[0]
        return _receipt(target.repo, on, commit)
    return None


def _apply(job: Job, state: ProposalState, proposal: Propose) -> Performed:
    target = job.contract.target
    repo = target.repo
    if not repo or not gitops.is_repo(repo):
        raise EffectError(f"target.repo {repo!r} is not a git repository")
    branch = state.branch or target.branch
    pid = str(state.id)
    message = _commit_message(job, state, proposal)
    author = gitops.Identity(state.agent, f"{state.agent}@agents.warden")
    for _ in range(CAS_TRIES):
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
            receipt = _receipt(repo, branch, new)
            receipt["created_branch"] = old is None
            return Performed(receipt, False)
        # The branch moved under us: maybe another applier landed this very proposal.
        found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_PROPOSAL, pid)
        if found:
            return Performed(_receipt(repo, branch, found[0]), True)
    raise RuntimeError(f"branch {branch} of {repo} kept moving")


def _revert(job: Job, state: ProposalState, receipt: Receipt) -> Performed:
    repo, branch, commit = receipt.get("repo"), receipt.get("branch"), receipt.get("commit")
    if not repo or not branch or not commit or not gitops.is_repo(repo):
        raise EffectError(f"the receipt names no usable commit: {receipt}")
    pid = str(state.id)

    def reverted(found: str) -> Performed:
        return Performed({**_receipt(repo, branch, found), "reverted": commit}, True)

    found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_ROLLBACK, pid)
    if found:
        return reverted(found[0])
    patch = gitops.diff_of(repo, commit)
    title = (gitops.out(repo, "log", "-1", "--format=%s", commit) or commit)[:200]
    reason = " ".join(state.rollback_reason.split())[:500]
    trailers = gitops.trailers(job=str(job.id), rollback=pid)
    message = f'Revert "{title}"\n\nThis reverts commit {commit}.\nReason: {reason}\n\n{trailers}\n'
    for _ in range(CAS_TRIES):
        head = gitops.branch_head(repo, branch)
        if head is None:
            raise EffectError(f"branch {branch} no longer exists in {repo}")
        try:
            new = gitops.commit_patch(repo, head, patch, message, gitops.WARDEN, reverse=True)
        except gitops.GitError as exc:
            # The revert may not apply because a replica's revert is already there.
            found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_ROLLBACK, pid)
            if found:
                return reverted(found[0])
            raise EffectError(
                f"the revert of {commit[:12]} does not apply on {branch} at {head[:12]}: "
                "later commits changed the same lines",
                stderr=exc.stderr[-2000:],
            ) from exc
        if gitops.cas_branch(repo, branch, new, head):
            return Performed({**_receipt(repo, branch, new), "reverted": commit}, False)
        found = gitops.commits_with_trailer(repo, branch, gitops.TRAILER_ROLLBACK, pid)
        if found:
            return reverted(found[0])
    raise RuntimeError(f"branch {branch} of {repo} kept moving")
