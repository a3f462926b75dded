"""Scheduler: admits job requests, registers agents, and grants leases on claims.

Grants are appended with optimistic concurrency on the job's subject, so two scheduler replicas
racing for one job never both grant it: the loser re-reads and offers the agent the next job.
Runnable jobs are offered oldest first (by request time, requeues keep their place): none starves.

What each input comes to is decided by `shared.decide.jobs` and `shared.decide.leases` (pure);
a handler here decodes, loads what the rule needs, decides, saves and replies.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from uuid import UUID

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg

from services.scheduler.runnable import Runnable
from services.scheduler.waiting import Full, Parked, Waiting
from shared import bus, telemetry, throttle, topology
from shared.aggregates import Agent, Job, project_job
from shared.contract import partial_semantic_errors
from shared.decide import Refusal, retry
from shared.decide import jobs as job_rules
from shared.decide import leases as rules
from shared.decide.leases import RECENT_CLAIM_S
from shared.events import Event, job_id_for
from shared.handling import answer, decode_or_reject, give_up, input_seq, reject_input
from shared.messages import Claim, JobRequest, LeaseGrant, NoWork, OperatorCommand, Register, Reply
from shared.policy import load_policy
from shared.runtime import Context
from shared.task import PreviousAttempt, previous_attempts
from shared.validation import FieldError

log = logging.getLogger("warden.scheduler")


def _ordering_key(msg: Msg) -> str:
    """Requests are independent (the idempotency key dedupes); one agent's claims go in order."""
    if msg.subject == topology.REQUEST_SUBJECT:
        return f"request-{msg.metadata.sequence.stream}"
    return str(msg.subject)


class RecentClaims:
    """When each agent last claimed, kept only for the window in which a claim counts as
    presence (an older one never does), so it holds the agents claiming lately and no more."""

    def __init__(self, window_s: float = RECENT_CLAIM_S) -> None:
        self.window = timedelta(seconds=window_s)
        # Oldest claim first: pruning stops at the first one still inside the window.
        self._at: OrderedDict[str, datetime] = OrderedDict()

    def saw(self, name: str, at: datetime) -> None:
        self._at.pop(name, None)
        self._at[name] = at
        self.prune(at)

    def prune(self, at: datetime) -> None:
        cutoff = at - self.window
        while self._at:
            name, seen = next(iter(self._at.items()))
            if seen >= cutoff:
                return
            del self._at[name]

    def present(self, at: datetime) -> list[str]:
        cutoff = at - self.window
        return [name for name, seen in self._at.items() if seen >= cutoff]

    def __len__(self) -> int:
        return len(self._at)


@dataclass(frozen=True)
class Offer:
    """A waiting claim taken from the book to be granted a new job in its request's save."""

    parked: Parked[Msg]
    granted: rules.Granted


class Scheduler:
    name = "scheduler"

    def __init__(self) -> None:
        self._queue = Runnable()
        # Jobs `_candidates` found gone from the view or no longer queued: settled after the
        # decision that walked past them (the queue is not changed while it is walked).
        self._stale: list[UUID] = []
        self.policy = load_policy()
        self._last_claim = RecentClaims()
        # Jobs a claim handled concurrently is granting right now: another claim passes them by
        # rather than race its own process to the same version (a lost race is still a publish
        # every core subscriber of the job's subject sees).
        self._granting: set[UUID] = set()
        # Claims waiting for work (see waiting.py), the agents whose claim is being decided now
        # (one decision per agent at a time), and the waiting agents to check the standing of.
        self._waiting: Waiting[Msg] = Waiting()
        self._deciding: set[str] = set()
        self._recheck: set[str] = set()
        self._wake = anyio.Event()
        self._agent_verbs: dict[str, Callable[[Msg, str], Awaitable[None]]] = {
            "register": self.on_register,
            "claim": self.on_claim,
        }
        self.ctx: Context
        self._tg: TaskGroup

    async def run(self, ctx: Context, *, task_status: TaskStatus[None]) -> None:
        self.ctx = ctx
        for job in ctx.views.jobs.values():
            self._track(job)
        ctx.views.listeners.append(lambda _e, job, _a: self._track(job) if job else None)
        ctx.views.listeners.append(lambda _e, job, agent: self._heard(job, agent))
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._serve_waiting)
            await tg.start(
                partial(bus.consume, key=_ordering_key, give_up=partial(give_up, ctx)),
                ctx.js,
                topology.SCHEDULER_CONSUMER,
                throttle.guard(ctx, topology.SCHEDULER_CONSUMER.durable, self.handle),
            )
            task_status.started()

    def _track(self, job: Job) -> None:
        if job.status == "queued":
            self._queue.add(job.id, job.kind, job.created_on)
        else:
            self._untrack(job.id)

    def _untrack(self, job_id: UUID) -> None:
        self._queue.remove(job_id)

    def _settle_stale(self) -> None:
        stale, self._stale = self._stale, []
        for job_id in stale:
            job = self.ctx.views.jobs.get(job_id)
            if job is None:
                self._untrack(job_id)
            else:
                self._track(job)

    # --- routing ---------------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        if msg.subject == topology.REQUEST_SUBJECT:
            # The request opens the job's trace (under the submitter's, when it sent one).
            with telemetry.span("scheduler request", headers=msg.headers):
                await self.on_request(msg)
        elif msg.subject.startswith(f"{topology.INPUT_ROOT}.op."):
            verb = msg.subject.rsplit(".", 1)[-1]
            named = telemetry.names_in(msg.data).job_id
            job = self.ctx.views.job(named) if named is not None else None
            with telemetry.span(
                f"scheduler {verb}", parent=job.trace if job else None, headers=msg.headers, job_id=named
            ):
                await self.on_operator(msg, verb)
        else:
            parsed = topology.parse_agent_subject(msg.subject)
            with telemetry.span(
                f"scheduler {parsed[1] if parsed else 'input'}",
                headers=msg.headers,
                agent=parsed[0] if parsed else None,
            ):
                route = self._agent_verbs.get(parsed[1]) if parsed else None
                if parsed is None or route is None:  # the malformed agent subjects are ours to refuse
                    await self.on_malformed(msg)
                    return
                await route(msg, parsed[0])

    async def _reply(self, msg: Msg, outcome: Reply | Refusal, sender: str = "") -> None:
        if isinstance(outcome, Refusal):
            await reject_input(self.ctx, msg, outcome.errors, sender, job_id=outcome.job_id)
        else:
            await answer(self.ctx, msg, outcome)

    async def on_malformed(self, msg: Msg) -> None:
        sender = topology.input_agent(msg.subject) or ""
        error = FieldError(
            path="subject",
            message=f"{msg.subject} does not parse: agent inputs go on "
            f"{topology.INPUT_ROOT}.agent.<name>.<verb>, and agent names have no dots",
        )
        await reject_input(self.ctx, msg, [error], sender)

    # --- requests and registrations ----------------------------------------------------------

    async def on_request(self, msg: Msg) -> None:
        request = await decode_or_reject(self.ctx, msg, JobRequest, also=self._contract_rules)
        if request is None:
            return
        job_id = job_id_for(request.idempotency_key)
        telemetry.annotate(job_id=job_id)
        # A terminal job may have left the view: a lost race on version 1 reads it from the store.
        known = [self.ctx.views.job(job_id)]

        async def step() -> Reply | Refusal:
            decided = job_rules.admit(
                request,
                known[0],
                max_level=self.policy.top_level,
                input_seq=input_seq(msg),
                at=self.ctx.clock(),
            )
            if isinstance(decided, Refusal):
                return decided
            if decided.events:
                offer = self._offer_new(decided.events)
                try:
                    await self.ctx.save(*decided.events, *([offer.granted.event] if offer else []))
                except BaseException:
                    if offer is not None:
                        self._withdraw(offer)
                    raise
                telemetry.instruments().jobs.add(1, {"state": "requested"})
                if offer is not None:
                    self._deciding.discard(offer.parked.name)
                    grant = rules.lease_grant(offer.granted.job, offer.granted.event, [])
                    self._answer_later(offer.parked.msg, grant)
            return decided.reply

        async def reload() -> None:  # the same key raced in through another replica or a redelivery
            known[0] = await self.ctx.job_from_store(job_id)

        outcome = await retry(step, reload, what=f"request of job {job_id}")
        await self._reply(msg, outcome, request.submitter)

    def _offer_new(self, requested: list[Event]) -> Offer | None:
        """The waiting claim a new job goes to at once, granted in the request's own save (one
        stored message for both): the oldest waiting claim whose choice, among the queued jobs
        and this one, is this one. None when no waiting claim would choose it first (the queue
        is served as before). No await: the claim is taken from the book before anything else
        decides."""
        new = project_job(None, requested)
        if new is None or not self._waiting:
            return None
        at = self.ctx.clock()
        for parked in self._waiting.oldest_first():
            agent = self.ctx.views.agents.get(parked.name)
            if (
                parked.until <= at  # its agent stops waiting: `_serve_waiting` answers it
                or parked.name in self._deciding
                or rules.claimant_refusal(parked.name, agent) is not None
            ):
                continue
            assert agent is not None  # a claimant that may claim is a registered agent
            decided = self._decide(agent, parked.claim, at, parked.seq, set(), also=[new])
            if isinstance(decided, rules.Granted) and decided.job.id == new.id:
                self._waiting.take(parked.name)
                self._deciding.add(parked.name)
                return Offer(parked=parked, granted=decided)
        return None

    def _withdraw(self, offer: Offer) -> None:
        """The request's save failed: its claim waits on, in its old place."""
        self._deciding.discard(offer.parked.name)
        if self._waiting.restore(offer.parked):
            self._wake.set()

    def _contract_rules(self, data: bytes, type_errors: list[FieldError]) -> list[FieldError]:
        """The contract's rules on a request that has type errors, for the parts that have types."""
        if any(e.path == "$" for e in type_errors):
            return []  # not JSON, too large, or wrong as a whole: there are no parts to check
        raw = msgspec.json.decode(data)  # decoded once already by the typed decode's fallback
        contract = raw.get("contract") if isinstance(raw, dict) else None
        return [
            FieldError(path=p, message=m)
            for p, m in partial_semantic_errors(contract, self.ctx.clock(), max_level=self.policy.top_level)
        ]

    async def on_register(self, msg: Msg, name: str) -> None:
        reg = await decode_or_reject(self.ctx, msg, Register, sender=name)
        if reg is None:
            return
        known = [self.ctx.views.agents.get(name)]

        async def step() -> Reply:
            decided = job_rules.register(known[0], name, reg, self.ctx.clock())
            await self.ctx.save(*decided.events)
            return decided.reply

        async def reload() -> None:
            known[0] = await self.ctx.agent_from_store(name)

        await self._reply(msg, await retry(step, reload, what=f"registration of {name}"), name)

    # --- claims --------------------------------------------------------------------------------

    async def on_claim(self, msg: Msg, name: str) -> None:
        claim = await decode_or_reject(self.ctx, msg, Claim, sender=name)
        if claim is None:
            return
        at = self.ctx.clock()
        if rules.claim_too_late(claim, at):
            await answer(self.ctx, msg, NoWork(detail="claim arrived after its wait"))
            return
        self._last_claim.saw(name, at)
        agent = self.ctx.views.agents.get(name) or await self.ctx.agent_from_store(name)
        refusal = rules.claimant_refusal(name, agent)
        if refusal is not None and agent is not None:
            agent = await self.ctx.agent_from_store(name) or agent  # never refuse on a lagging view
            refusal = rules.claimant_refusal(name, agent)
        if refusal is not None or agent is None:
            await self._reply(msg, refusal or Refusal.of("$", f"agent {name} is not registered"), name)
            return
        seq = input_seq(msg)
        unknown = await self._unknown_lease(name, claim, seq)
        if unknown is not None:
            await answer(self.ctx, msg, await self._grant_again(unknown))
            return
        if self._waiting or name in self._deciding:
            # Others wait already (or this agent's previous claim is being served): this one
            # joins the line, so the waiting are served first, oldest first.
            self._park(msg, name, claim, seq, at, "no runnable job for this agent")
            return
        self._deciding.add(name)
        try:
            verdict = await self._lease_for(agent, claim, at, seq)
            if isinstance(verdict, NoWork) and await self.ctx.view_current():
                # "No work" rests on what the view lacks: decide again once it holds what the
                # store held when the claim arrived (after an outage the view catches up first).
                agent = self.ctx.views.agents.get(name) or agent
                verdict = await self._lease_for(agent, claim, at, seq)
        finally:
            self._deciding.discard(name)
        if isinstance(verdict, LeaseGrant):
            await answer(self.ctx, msg, verdict)
        else:
            self._park(msg, name, claim, seq, at, verdict.detail)

    def _park(self, msg: Msg, name: str, claim: Claim, seq: int, at: datetime, detail: str) -> None:
        """Keep a claim that found no work until work turns up or its wait ends. Its input is
        acknowledged when this handler returns: the consumer moves on, and the input is never
        delivered again for waiting past the consumer's ack_wait."""
        until = rules.wait_until(claim, at)
        if until is None:
            self._answer_later(msg, NoWork(detail=detail))
            return
        try:
            replaced = self._waiting.park(
                Parked(name=name, claim=claim, seq=seq, until=until, msg=msg, detail=detail)
            )
        except Full as full:
            self._answer_later(msg, NoWork(detail=f"{detail} ({full}: claim again)"))
            return
        if replaced is not None and replaced.seq != seq:  # the same claim delivered again: one answer
            self._answer_later(replaced.msg, NoWork(detail="a newer claim of this agent waits instead"))
        self._wake.set()

    def _heard(self, job: Job | None, agent: Agent | None) -> None:
        """A listener of the view: wake the waiting claims when work may have turned up for
        them, or when a waiting agent's standing may have changed."""
        if not self._waiting:
            return
        if agent is not None and agent.name in self._waiting:
            self._recheck.add(agent.name)
            self._wake.set()
        if job is not None and rules.may_bring_work(job, self._waiting):
            self._wake.set()

    def _answer_later(self, msg: Msg, reply: Reply | Refusal, sender: str = "") -> None:
        self._tg.start_soon(self._answer_safely, msg, reply, sender)

    async def _answer_safely(self, msg: Msg, reply: Reply | Refusal, sender: str = "") -> None:
        """Answer a claim outside the consumer (it was acknowledged when it began to wait):
        a failure here is logged, never the end of the scheduler; the agent's wait runs out
        and it claims again."""
        try:
            await self._reply(msg, reply, sender)
        except Exception:
            log.exception("could not answer claim %d on %s", input_seq(msg), msg.subject)

    async def _serve_waiting(self, *, task_status: TaskStatus[None]) -> None:
        """Answer waiting claims: refused once their agent may no longer claim, granted (oldest
        first) when work turns up, "no work" when their wait ends."""
        task_status.started()
        while True:
            until = self._waiting.next_due()
            left = (until - self.ctx.clock()).total_seconds() if until is not None else None
            with anyio.move_on_after(max(left, 0.0) if left is not None else math.inf):
                await self._wake.wait()
            self._wake = anyio.Event()
            for parked in self._waiting.due(self.ctx.clock()):
                self._answer_later(parked.msg, NoWork(detail=parked.detail))
            self._refuse_stopped()
            if self._queue:
                self._grant_waiting()

    def _refuse_stopped(self) -> None:
        """A waiting agent suspended or revoked meanwhile: its claim is refused, as it would be
        if it arrived now."""
        names, self._recheck = self._recheck, set()
        for name in names:
            refusal = rules.claimant_refusal(name, self.ctx.views.agents.get(name))
            if refusal is None:
                continue
            parked = self._waiting.take(name)
            if parked is not None:
                self._answer_later(parked.msg, refusal, name)

    def _grant_waiting(self) -> None:
        """Decide for every waiting claim in arrival order, each on what the earlier left: a job
        chosen is marked as being granted before the next decides (no await between), so the
        oldest claim gets the oldest job it may take. Each grant is saved concurrently."""
        at = self.ctx.clock()
        for parked in self._waiting.oldest_first():
            agent = self.ctx.views.agents.get(parked.name)
            if parked.name in self._deciding or rules.claimant_refusal(parked.name, agent) is not None:
                continue  # decided elsewhere now, or about to be refused (`_refuse_stopped`)
            assert agent is not None  # a claimant that may claim is a registered agent
            decided = self._decide(agent, parked.claim, at, parked.seq, set())
            if isinstance(decided, NoWork):
                parked.detail = decided.detail
                continue
            self._waiting.take(parked.name)
            self._deciding.add(parked.name)
            self._granting.add(decided.job.id)
            self._tg.start_soon(self._grant_parked, parked, agent, decided)

    async def _grant_parked(self, parked: Parked[Msg], agent: Agent, decided: rules.Granted) -> None:
        verdict: LeaseGrant | NoWork
        # The claim's own trace (its headers) parents the span, as when it is granted on arrival.
        with telemetry.span("scheduler claim waited", headers=parked.msg.headers, agent=parked.name):
            lost: list[UUID] = []
            try:
                try:
                    verdict = await self._grant(decided, lost)
                except IntegrityError:  # another replica granted it first: on down the queue
                    await self._reload(lost[-1])
                    verdict = await self._lease_for(agent, parked.claim, self.ctx.clock(), parked.seq, lost)
            except Exception:  # Contended, a store that did not answer: the claim waits on
                log.exception("claim %d of %s not granted; it waits on", parked.seq, parked.name)
                verdict = NoWork(detail=parked.detail)
            finally:
                self._granting.discard(decided.job.id)
                self._deciding.discard(parked.name)
            if isinstance(verdict, LeaseGrant):
                await self._answer_safely(parked.msg, verdict)
                return
            parked.detail = verdict.detail
            if self.ctx.clock() < parked.until and self._waiting.restore(parked):
                self._wake.set()  # its deadline is the book's again
                return
            await self._answer_safely(parked.msg, verdict)

    def _candidates(self, passed: set[UUID], kinds: Iterable[str] = ()) -> Iterator[Job]:
        """The queued jobs of `kinds` (every kind when empty), oldest first, but those being
        granted here now or `passed` by. Walked without a copy: nothing awaits meanwhile, and
        what it finds stale is settled afterwards (`_settle_stale`)."""
        for job_id in self._queue.oldest_first(kinds):
            if job_id in self._granting or job_id in passed:
                continue
            job = self.ctx.views.jobs.get(job_id)
            if job is None or job.status != "queued":  # reloaded after a lost race, say
                self._stale.append(job_id)
                continue
            yield job

    def _decide(
        self,
        agent: Agent,
        claim: Claim,
        at: datetime,
        seq: int,
        passed: set[UUID],
        also: Iterable[Job] = (),
    ) -> rules.Granted | NoWork:
        """What this claim is granted now among the queued jobs of its kinds (not `passed`) and
        then `also`, on what this process knows (no await: a job it chooses can be marked as
        being granted before anything else decides)."""
        name = agent.name
        candidates = itertools.chain(self._candidates(passed, rules.claim_kinds(agent, claim)), also)
        present = [
            other
            for other_name in self._last_claim.present(at)
            if other_name != name and (other := self.ctx.views.agents.get(other_name)) is not None
        ]
        decided = rules.grant(
            candidates,
            agent,
            claim,
            policy=self.policy,
            held=rules.held(self.ctx.views.leased_to(name), name),
            present=present,
            at=at,
            claim_seq=seq,
        )
        self._settle_stale()
        return decided

    async def _lease_for(
        self, agent: Agent, claim: Claim, at: datetime, seq: int, lost: list[UUID] | None = None
    ) -> LeaseGrant | NoWork:
        # A job this claim lost to another replica is passed by, as in one walk down the queue:
        # so at most one try per queued job, and the last try finds none left (no work).
        passed: list[UUID] = lost if lost is not None else []

        async def step() -> LeaseGrant | NoWork:
            decided = self._decide(agent, claim, at, seq, set(passed))
            if isinstance(decided, NoWork):
                return decided
            return await self._grant(decided, passed)

        async def reload() -> None:  # another replica moved it first
            await self._reload(passed[-1])

        return await retry(step, reload, tries=len(self._queue) + 1, what=f"claim of {agent.name}")

    async def _reload(self, job_id: UUID) -> None:
        stored = await self.ctx.job_from_store(job_id)
        if stored is None:
            self._untrack(job_id)
        else:
            self._track(stored)

    async def _unknown_lease(self, name: str, claim: Claim, seq: int) -> Job | None:
        """A job whose live lease `name` holds without knowing it (`leases.unknown_to`): handed
        back, it is worked; left alone, it would expire and spend an attempt. Only a lease with
        nothing proposed under it yet, as the store has it (the view may not hold the proposal)."""
        for job in self.ctx.views.leased_to(name):
            if not rules.unknown_to(job, name, claim, seq):
                continue
            stored = await self.ctx.job_from_store(job.id)
            if stored is not None and rules.unknown_to(stored, name, claim, seq):
                return stored
        return None

    async def _grant_again(self, job: Job) -> LeaseGrant:
        lease = job.live_lease
        assert lease is not None
        log.info(
            "handing lease %d of job %s back to %s (its grant was not received)",
            lease.epoch,
            job.id,
            lease.agent,
        )
        return rules.lease_grant(job, lease, await self._previous_attempts(job.id, lease.epoch))

    async def _grant(self, decided: rules.Granted, lost: list[UUID]) -> LeaseGrant:
        job, event = decided.job, decided.event
        # A child of what made the job runnable, not of the claim (an agent's, about no job yet):
        # the claim's span is linked. The grant carries this span (one job is one trace).
        with telemetry.span(
            "scheduler grant",
            parent=job.trace,
            link=telemetry.current_traceparent(),
            job_id=job.id,
            agent=event.agent,
            epoch=event.epoch,
        ):
            self._granting.add(job.id)
            try:
                await self.ctx.save(event)
                moved: IntegrityError | None = None
            except IntegrityError as exc:
                moved = exc
            finally:
                self._granting.discard(job.id)
        if moved is not None:  # raised past the span: a lost race is no fault of the grant's
            lost.append(job.id)
            raise moved
        return rules.lease_grant(job, event, await self._previous_attempts(job.id, event.epoch))

    async def _previous_attempts(self, job_id: UUID, epoch: int) -> list[PreviousAttempt]:
        """A retry's grant tells how the earlier attempts ended (one read of the job, retries only)."""
        if epoch <= 1:
            return []
        events = await anyio.to_thread.run_sync(self.ctx.app.events_of, job_id)
        return previous_attempts(events, epoch)

    # --- operators -----------------------------------------------------------------------------

    async def on_operator(self, msg: Msg, verb: str) -> None:
        cmd = await decode_or_reject(self.ctx, msg, OperatorCommand)
        if cmd is None:
            return
        job_id = cmd.job_id
        known = [await self.ctx.job(job_id) if job_id else None]

        async def step() -> Reply | Refusal:
            decided = job_rules.operate(verb, known[0], cmd, self.ctx.clock())
            if isinstance(decided, Refusal):
                return decided
            await self.ctx.save(*decided.events)
            return decided.reply

        async def reload() -> None:
            assert job_id is not None  # only a save about a job can lose a race
            known[0] = await self.ctx.job_from_store(job_id)

        await self._reply(msg, await retry(step, reload, what=f"{verb} of job {job_id}"))
