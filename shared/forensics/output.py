"""What each attempt of a job printed: `warden logs JOB`, from the log alone.

An agent's output reaches Warden only as evidence on its proposals (`warden agent exec` puts the
command, its exit code and the tails of stdout and stderr there). So each attempt's output is
read from the proposals it stored, exactly as received (a large proposal's payload is read from
the object store and verified), next to how the attempt ended.
"""

from __future__ import annotations

import shlex
from typing import Any
from uuid import UUID

from msgspec import Struct
from nats.js import JetStreamContext

from shared import proposals
from shared.events import ProposalSubmitted
from shared.forensics.collect import JobLog, collect
from shared.forensics.explain import explain
from shared.validation import InvalidInput


class Output(Struct, frozen=True, kw_only=True):
    """One proposal's account of the command it ran (fields absent when the agent gave none)."""

    proposal_id: UUID
    command: list[str] | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    stdout: str = ""
    stderr: str = ""
    # Why the output could not be read ("" when it was).
    problem: str = ""


class AttemptOutput(Struct, frozen=True, kw_only=True):
    epoch: int
    agent: str
    ended: str  # "" while the lease lives
    end_detail: str = ""
    outputs: list[Output]


class JobOutput(Struct, frozen=True, kw_only=True):
    job_id: UUID
    status: str
    attempts: list[AttemptOutput]


def _text(evidence: dict[str, Any], key: str) -> str:
    value = evidence.get(key)
    return value if isinstance(value, str) else ""


async def _output(js: JetStreamContext, job_log: JobLog, submitted: ProposalSubmitted) -> Output:
    record = job_log.input_at(submitted.input_seq)
    try:
        # From the record object (it outlives the agent stream's ring), else the input message.
        whole = await proposals.read_recorded(
            js,
            agent=submitted.agent,
            input_seq=submitted.input_seq,
            content_hash=submitted.content_hash,
            payload_object=submitted.payload_object,
            payload_hash=submitted.payload_hash,
            message=record.data if record else None,
            record=submitted.record,
        )
    except (InvalidInput, proposals.PayloadProblem) as exc:
        return Output(proposal_id=submitted.proposal_id, problem=str(exc))
    evidence = whole.evidence
    command = evidence.get("command")
    code = evidence.get("exit_code")
    duration = evidence.get("duration_s")
    return Output(
        proposal_id=submitted.proposal_id,
        command=[str(c) for c in command] if isinstance(command, list) else None,
        exit_code=code if isinstance(code, int) else None,
        duration_s=float(duration) if isinstance(duration, int | float) else None,
        stdout=_text(evidence, "stdout"),
        stderr=_text(evidence, "stderr"),
    )


async def job_output(js: JetStreamContext, job_id: UUID) -> JobOutput:
    """Every attempt of the job with the output its proposals carried (JobNotFound if none)."""
    job_log = await collect(js, job_id)
    story = explain(job_log)
    submitted = [e.event for e in job_log.events if isinstance(e.event, ProposalSubmitted)]
    attempts = []
    for attempt in story.attempts:
        outputs = [await _output(js, job_log, s) for s in submitted if s.epoch == attempt.epoch]
        attempts.append(
            AttemptOutput(
                epoch=attempt.epoch,
                agent=attempt.agent,
                ended=attempt.ended,
                end_detail=attempt.end_detail,
                outputs=outputs,
            )
        )
    return JobOutput(job_id=job_id, status=story.status, attempts=attempts)


def render(out: JobOutput) -> str:
    lines = [f"job {out.job_id}: {out.status}"]
    if not out.attempts:
        lines.append("  no attempts yet")
    for attempt in out.attempts:
        ended = attempt.ended or "live"
        detail = f" ({attempt.end_detail})" if attempt.end_detail else ""
        lines.append(f"attempt {attempt.epoch} by {attempt.agent}: {ended}{detail}")
        if not attempt.outputs:
            lines.append("  no output recorded (the attempt proposed nothing)")
        for output in attempt.outputs:
            if output.problem:
                lines.append(f"  proposal {output.proposal_id}: output unreadable: {output.problem}")
                continue
            head = f"  proposal {output.proposal_id}"
            if output.command is not None:
                head += f": {shlex.join(output.command)}"
            if output.exit_code is not None:
                head += f" exited {output.exit_code}"
            if output.duration_s is not None:
                head += f" after {output.duration_s:g}s"
            lines.append(head)
            for name in ("stdout", "stderr"):
                text = getattr(output, name)
                if text:
                    lines.append(f"  --- {name} (tail) ---")
                    lines.extend(f"  {line}" for line in text.rstrip("\n").splitlines())
            if not output.stdout and not output.stderr:
                lines.append("  (no output captured)")
    return "\n".join(lines)
