"""webhook: a POST to contract.target.url with `Idempotency-Key: <proposal id>`.

The receiver deduplicates on the key, so a POST re-driven after a crash is the same request;
its answer is kept in the object store before the event, and a 2xx kept there is the receipt.
Warden cannot compensate a webhook: its receiver must undo it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Hashable
from uuid import UUID

import anyio
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import ObjectNotFoundError

from services.applier.effects.base import EffectError, Performed, Receipt
from shared import proposals, topology
from shared.aggregates import Job, ProposalState
from shared.messages import Propose

TIMEOUT_S = 30.0


class Webhook:
    def exclusive(self, job: Job, state: ProposalState) -> Hashable | None:
        return None  # each POST is its own request, deduplicated by its receiver

    async def find_receipt(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose | None
    ) -> Receipt | None:
        recorded = await _recorded(js, state)
        if recorded is not None and 200 <= int(recorded.get("status", 0)) < 300:
            return recorded
        return None

    async def perform(
        self, js: JetStreamContext, job: Job, state: ProposalState, proposal: Propose
    ) -> Performed:
        receipt = await _post(job, state, proposal)
        # Written as the payload bucket allows (no rollup, no purge); a later answer for the
        # same proposal adds a newer metadata record, which is the one read back.
        await proposals.put_object(js, answer_name(state.id), json.dumps(receipt).encode())
        return Performed(receipt, False)

    async def compensate(self, js: JetStreamContext, job: Job, state: ProposalState) -> Performed:
        raise EffectError("a webhook cannot be compensated by Warden; its receiver must undo it")


def answer_name(proposal_id: UUID) -> str:
    return f"@webhook/{proposal_id}"


async def _recorded(js: JetStreamContext, state: ProposalState) -> Receipt | None:
    store = await js.object_store(topology.PAYLOAD_BUCKET)
    try:
        raw = (await store.get(answer_name(state.id))).data or b""
    except ObjectNotFoundError:
        return None
    recorded: Receipt = json.loads(raw)
    return recorded


async def _post(job: Job, state: ProposalState, proposal: Propose) -> Receipt:
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
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    status = await anyio.to_thread.run_sync(post)  # URLError (unreachable) is retried later
    if 400 <= status < 500:
        raise EffectError(f"{url} refused the request with HTTP {status}", status=status)
    if not 200 <= status < 300:
        raise RuntimeError(f"{url} answered HTTP {status}; retrying")
    return {"url": url, "status": status, "idempotency_key": str(state.id)}
