"""file.write: atomic writes inside contract.target.directory, with a journal of what they replace.

The previous contents are written to the object store before any file changes (write-ahead),
so a crash halfway through a multi-file write still knows what to restore; small ones are also
inlined in the receipt. The receipt is found again by the new contents' hashes being in place.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import tempfile
from collections.abc import Hashable
from pathlib import Path
from uuid import UUID

import anyio
from nats.js import JetStreamContext
from nats.js.errors import ObjectNotFoundError

from services.applier.effects.base import EffectError, Performed, Receipt
from shared import paths, proposals, topology
from shared.aggregates import Job, ProposalState
from shared.messages import Propose

# Receipts inline the previous contents of written files up to this size (else the journal).
INLINE_PREVIOUS_BYTES = 64 * 1024


class FileWrite:
    def exclusive(self, job: Job, state: ProposalState) -> Hashable | None:
        # One write or restore at a time in a directory: a journal records what the files held
        # just before this effect, which another job's write landing in between would falsify.
        directory = (state.receipt or {}).get("directory") or job.contract.target.directory
        return ("files", os.path.realpath(directory)) if directory else None

    async def find_receipt(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose | None
    ) -> Receipt | None:
        if proposal is None:
            return None
        try:
            root = _root(job)
            targets = _targets(root, proposal.files)
        except EffectError:
            return None  # no such target: nothing could have been written there
        current = await anyio.to_thread.run_sync(_hashes, targets)
        if current != _new_hashes(proposal.files):
            return None
        return await _receipt(js, root, state, proposal)

    async def perform(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose
    ) -> Performed:
        root = _root(job)
        targets = _targets(root, proposal.files)
        if await _journal(js, state) is None:
            # Write-ahead: what the files held before, kept durably before any of them changes.
            previous = await anyio.to_thread.run_sync(_read_all, targets)
            encoded = {
                rel: None if data is None else base64.b64encode(data).decode()
                for rel, data in previous.items()
            }
            # Written once per proposal; the bucket allows no rollup or purge (proposals.put_object).
            await proposals.put_object(js, journal_name(state.id), json.dumps(encoded).encode())
        writes: dict[str, tuple[Path, bytes | None]] = {
            rel: (targets[rel], content.encode()) for rel, content in proposal.files.items()
        }
        await anyio.to_thread.run_sync(_write_all, writes)
        return Performed(await _receipt(js, root, state, proposal), False)

    async def compensate(self, js: JetStreamContext, job: Job, state: ProposalState) -> Performed:
        receipt = state.receipt or {}
        root = Path(receipt["directory"])
        files: dict[str, dict[str, str | None]] = receipt["files"]
        targets = _targets(root, dict.fromkeys(files, ""))
        previous: dict[str, bytes | None] | None
        if "previous" in receipt:
            previous = {
                rel: None if text is None else text.encode() for rel, text in receipt["previous"].items()
            }
        else:
            previous = await _journal(js, state)
        if previous is None:
            raise EffectError(f"the journal {receipt.get('journal')} of previous contents is gone")
        current = await anyio.to_thread.run_sync(_hashes, targets)
        restored = {rel: files[rel]["previous_sha256"] for rel in files}
        result: Receipt = {"directory": str(root), "restored": restored}
        if current == restored:
            return Performed(result, True)
        changed = [
            rel for rel in files if current[rel] not in (files[rel]["sha256"], files[rel]["previous_sha256"])
        ]
        if changed:
            raise EffectError(
                f"{len(changed)} file(s) changed since the effect; not overwriting them", changed=changed
            )
        await anyio.to_thread.run_sync(_write_all, {rel: (targets[rel], previous.get(rel)) for rel in files})
        return Performed(result, False)


def journal_name(proposal_id: UUID) -> str:
    # '@' is not allowed in agent names, so no agent's payload object can take this name.
    return f"@journal/{proposal_id}"


async def _journal(js: JetStreamContext, state: ProposalState) -> dict[str, bytes | None] | None:
    store = await js.object_store(topology.PAYLOAD_BUCKET)
    try:
        raw = (await store.get(journal_name(state.id))).data or b""
    except ObjectNotFoundError:
        return None
    stored: dict[str, str | None] = json.loads(raw)
    return {rel: None if b64 is None else base64.b64decode(b64) for rel, b64 in stored.items()}


async def _receipt(js: JetStreamContext, root: Path, state: ProposalState, proposal: Propose) -> Receipt:
    previous = await _journal(js, state)
    if previous is None:  # the files already held this content: nothing was journaled
        previous = {rel: content.encode() for rel, content in proposal.files.items()}
    files = {
        rel: {
            "sha256": proposals.sha256(content.encode()),
            "previous_sha256": None if previous.get(rel) is None else proposals.sha256(previous[rel] or b""),
        }
        for rel, content in proposal.files.items()
    }
    receipt: Receipt = {"directory": str(root), "files": files, "journal": journal_name(state.id)}
    inline = _inline_previous(previous)
    if inline is not None:
        receipt["previous"] = inline
    return receipt


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
