"""Helpers every input handler uses: where a message sits in the stream, and recording bad input.

Bad input is never dropped: it becomes an `input.rejected` event (one Rejection aggregate per
stored message, so a redelivery records nothing new) and, where the sender waits, a reply.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar
from uuid import UUID

from eventsourcing.persistence import IntegrityError
from nats.aio.msg import Msg

from shared import bus, telemetry, topology
from shared.events import InputRejected, ReplyRefused, rejection_id_for, reply_refusal_id_for
from shared.messages import Input, Rejected, Reply, decode_input
from shared.runtime import Context
from shared.validation import FieldError, InvalidInput

log = logging.getLogger("warden.handling")


def input_seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


async def reject_input(
    ctx: Context,
    msg: Msg,
    errors: list[FieldError],
    sender: str = "",
    *,
    job_id: UUID | None = None,
    throttled_until: datetime | None = None,
    throttled_by: str = "",
) -> None:
    """Record why an input was refused, and tell the sender if it waits for an answer.

    `job_id` names the job the refusal is about when the sender needs it (an idempotency conflict).
    `throttled_until` and `throttled_by` make it the one record of a throttle window.
    A reply address the sender may not use is one more error of the same rejection, unanswered.
    """
    seq = input_seq(msg)
    rejection_id = rejection_id_for(msg.metadata.stream, seq)
    named = bus.reply_address(msg, ctx.views.agents)
    if named is not None and named[1] is not None:
        errors = [*errors, FieldError(path=f"header {topology.REPLY_HEADER}", message=named[1])]
    event = InputRejected(
        originator_id=rejection_id,
        originator_version=1,
        subject=msg.subject,
        input_seq=seq,
        errors=errors,
        sender=sender or topology.input_agent(msg.subject) or "",
        excerpt=msg.data[:256].decode("utf-8", "replace"),
        trace=telemetry.current_traceparent(),
        throttled_until=throttled_until,
        throttled_by=throttled_by,
    )
    with contextlib.suppress(IntegrityError):  # a redelivery: its rejection is already recorded
        await ctx.save(event)
    telemetry.instruments().rejected_inputs.add(1, {"subject": msg.subject.rsplit(".", 1)[-1]})
    await bus.reply(
        ctx.nc, msg, Rejected(errors=errors, rejection_id=rejection_id, job_id=job_id), ctx.views.agents
    )


async def answer(ctx: Context, msg: Msg, reply: Reply) -> None:
    """Answer an input where its sender named, or record why that address was not used.

    Every service answers through here (never `nc.publish` to an address an input names), so
    the reply-address rule (topology.reply_refusal) holds for every verdict.
    """
    refusal = await bus.reply(ctx.nc, msg, reply, ctx.views.agents)
    if refusal is None:
        return
    named = bus.reply_address(msg, ctx.views.agents)
    seq = input_seq(msg)
    event = ReplyRefused(
        originator_id=reply_refusal_id_for(msg.metadata.stream, seq),
        originator_version=1,
        subject=msg.subject,
        input_seq=seq,
        reply_to=named[0][:256] if named else "",
        reason=refusal,
        sender=topology.input_agent(msg.subject) or "",
        trace=telemetry.current_traceparent(),
    )
    log.warning("input %s on %s: not answered: %s", seq, msg.subject, refusal)
    with contextlib.suppress(IntegrityError):  # a redelivery: already recorded
        await ctx.save(event)


async def give_up(ctx: Context, msg: Msg, exc: Exception) -> None:
    """Record an input whose handler failed on every delivery, so it is refused with a reason
    rather than dropped by the consumer's delivery limit with no trace."""
    error = FieldError(
        path="$",
        message=f"Warden could not handle this input ({type(exc).__name__}: {str(exc)[:200]}); not retried",
    )
    await reject_input(ctx, msg, [error])


InputT = TypeVar("InputT", bound=Input)


async def decode_or_reject(
    ctx: Context,
    msg: Msg,
    tp: type[InputT],
    sender: str = "",
    *,
    also: Callable[[bytes, list[FieldError]], list[FieldError]] | None = None,
) -> InputT | None:
    """The input decoded as `tp`, or None once its rejection is recorded and answered.

    `also` adds the problems a handler finds beyond the types (given the data and the type
    errors), so a refusal lists everything wrong at once.
    """
    try:
        return decode_input(msg.data, tp, topology.MAX_INPUT_BYTES)
    except InvalidInput as exc:
        errors = exc.errors + (also(msg.data, exc.errors) if also else [])
        await reject_input(ctx, msg, errors, sender=sender)
        return None


async def known_job(ctx: Context, msg: Msg, job_id: UUID, sender: str) -> bool:
    """True when the view or else the store knows `job_id`; otherwise the input's rejection is
    recorded and answered."""
    if await ctx.job(job_id) is not None:
        return True
    error = FieldError(path="$.job_id", message=f"no job {job_id} (the store has none)")
    await reject_input(ctx, msg, [error], sender)
    return False
