"""A client for services: submit a job, follow it to its end, cancel it, over Warden's subjects.

    async with WardenClient.connect("nats://127.0.0.1:4222", name="billing") as warden:
        job = await warden.submit(Contract(scope=Scope(paths=["src/**"])), kind="refactor")
        final = await job.wait(timeout=600)     # the Job as folded from its events
        print(final.status, final.reason)

What it sends is what any client in any language sends: a job request stored on
`warden.in.request` and an operator `cancel` on `warden.in.op.cancel`, each with
`Warden-Reply-To` naming an inbox for the verdict. What it reads is the job's own event subject
(`warden.evt.<job id>`) on the event stream, folded by the same function the services use
(`shared.aggregates.evolve_job`), so `get()` and `wait()` answer from the record itself, not
from a read model that may lag.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api as js_api

from shared import bus, topology
from shared.aggregates import TERMINAL, Job, evolve_job
from shared.contract import Contract
from shared.messages import Accepted, AnyReply, JobRequest, OperatorCommand, Rejected
from shared.persistence import written
from shared.validation import FieldError, InvalidInput
from shared.validation import decode as decode_checked


class Refused(ValueError):
    """Raised when Warden rejects a request or command; `errors` names every reason."""

    def __init__(self, what: str, errors: list[FieldError], rejection_id: UUID | None = None) -> None:
        self.errors = errors
        self.rejection_id = rejection_id
        super().__init__(f"{what} refused: " + "; ".join(f"{e.path}: {e.message}" for e in errors))


class JobNotFound(LookupError):
    """Raised when the event stream holds nothing about a job id."""


def _refusal(what: str, reply: AnyReply) -> Refused:
    if isinstance(reply, Rejected):
        return Refused(what, reply.errors, reply.rejection_id)
    return Refused(what, [FieldError(path="$", message=f"unexpected reply {reply!r}")])


@dataclass(frozen=True)
class JobHandle:
    """A submitted job: its id, and whether this submission found it already submitted."""

    client: WardenClient
    job_id: UUID
    duplicate: bool = False

    async def get(self) -> Job:
        """The job as its events stand now."""
        stored = await bus.read_subject(
            self.client.js, topology.EVENT_STREAM, topology.event_subject(self.job_id)
        )
        job: Job | None = None
        for message in stored:
            found = written.events_of(message.subject, message.headers, message.data)
            if not isinstance(found, str):  # a message Warden did not write is never folded
                for event in found:
                    job = evolve_job(job, event)
        if job is None:
            raise JobNotFound(f"no events for job {self.job_id}")
        return job

    async def wait(self, timeout: float | None = None) -> Job:
        """The job once it is terminal (completed, tombstoned or cancelled).

        Raises TimeoutError when `timeout` seconds pass first; the job goes on regardless.
        """
        done = anyio.Event()
        state: list[Job | None] = [None]

        async def on_message(msg: Msg) -> None:
            found = written.events_of(msg.subject, msg.headers, msg.data)
            for event in () if isinstance(found, str) else found:
                state[0] = evolve_job(state[0], event)
            if state[0] is not None and state[0].status in TERMINAL:
                done.set()

        sub = await self.client.js.subscribe(
            topology.event_subject(self.job_id),
            ordered_consumer=True,
            cb=on_message,
            deliver_policy=js_api.DeliverPolicy.ALL,
        )
        try:
            with anyio.fail_after(timeout):
                await done.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
        job = state[0]
        assert job is not None
        return job

    async def cancel(self, reason: str) -> None:
        """Cancel the job (recorded as the client's operator command, with `reason`); a live lease
        is revoked and its agent learns on its next heartbeat. Raises Refused (e.g. already over)."""
        command = OperatorCommand(operator=self.client.name, reason=reason, job_id=self.job_id)
        reply = await bus.request(
            self.client.nc, topology.operator_subject("cancel"), command, timeout=self.client.timeout
        )
        if not isinstance(reply, Accepted):
            raise _refusal(f"cancel of job {self.job_id}", reply)


class WardenClient:
    """Submits jobs as `name` (the request's `submitter`, and the operator of its cancels)."""

    def __init__(self, nc: Client, *, name: str = "client", timeout: float = 10.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name
        self.timeout = timeout  # for each request's verdict

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, *, name: str = "client", timeout: float = 10.0, **kwargs: Any
    ) -> AsyncIterator[WardenClient]:
        """Connect to `url` (credentials from WARDEN_NATS_USER/PASSWORD, or `user`/`password`)."""
        nc = await bus.connect(url, f"warden-client-{name}", **kwargs)
        try:
            yield cls(nc, name=name, timeout=timeout)
        finally:
            with anyio.CancelScope(shield=True):
                await nc.close()

    async def submit(
        self,
        contract: Contract | Mapping[str, Any] | None = None,
        *,
        kind: str,
        idempotency_key: str | None = None,
    ) -> JobHandle:
        """Request a job; its handle once Warden accepted it (or found it already submitted
        under `idempotency_key`). Raises Refused listing every problem with the request."""
        if contract is None:
            contract = Contract()
        elif not isinstance(contract, Contract):
            try:
                contract = decode_checked(msgspec.json.encode(dict(contract)), Contract)
            except InvalidInput as exc:
                errors = [FieldError(path="$.contract" + e.path[1:], message=e.message) for e in exc.errors]
                raise Refused("job request", errors) from None
        request = JobRequest(
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            kind=kind,
            contract=contract,
            submitter=self.name,
        )
        reply = await bus.request(self.nc, topology.REQUEST_SUBJECT, request, timeout=self.timeout)
        if not isinstance(reply, Accepted) or reply.job_id is None:
            raise _refusal("job request", reply)
        return JobHandle(self, reply.job_id, reply.duplicate)

    def job(self, job_id: UUID | str) -> JobHandle:
        """A handle on a job submitted earlier (by anyone)."""
        return JobHandle(self, UUID(str(job_id)))
