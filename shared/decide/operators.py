"""The operator verbs the revoker carries out, each a pure rule over what its command names.

`VERBS` is the one routing table: verb -> (what the command is decided on, the rule). A rule
returns the events to append (numbered after the states it was given) or the `Refusal` the
operator is answered with: an agent or proposal Warden has no record of, a level beyond the
policy's, a standing the verb cannot leave (already revoked, already active).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from shared.aggregates import Agent, Job
from shared.decide import NEXT, Refusal, after, agents, proposals
from shared.events import AgentReinstated, AgentSuspended, Event
from shared.messages import OperatorCommand
from shared.policy import Policy
from shared.validation import missing


@dataclass(frozen=True)
class Given:
    """What an operator command is decided on, as loaded (None: Warden has no record of it)."""

    agent: Agent | None = None
    # The jobs in which the agent holds a live lease (a revocation ends them in the same save).
    leases: list[Job] = field(default_factory=list)
    # The job of the proposal a rollback names (the one the command names, if it names one).
    job: Job | None = None


Decided = list[Event] | Refusal
Rule = Callable[[OperatorCommand, Given, Policy, datetime], Decided]


@dataclass(frozen=True)
class Verb:
    loads: Literal["agent", "proposal"]
    rule: Rule


def _agent(verb: str, cmd: OperatorCommand, given: Given) -> Agent | Refusal:
    if not cmd.agent:
        return Refusal.of("$.agent", f"{verb} needs an agent")
    if given.agent is None:
        return Refusal(errors=[missing("$.agent", f"agent {cmd.agent}")])
    return given.agent


def suspend(cmd: OperatorCommand, given: Given, policy: Policy, at: datetime) -> Decided:
    agent = _agent("suspend", cmd, given)
    if isinstance(agent, Refusal):
        return agent
    if agent.standing != "active":
        return Refusal.of("$.agent", f"agent {agent.name} is {agent.standing}")
    return after(
        agent,
        AgentSuspended(
            originator_id=agent.id,
            originator_version=NEXT,
            name=agent.name,
            reason=cmd.reason,
            by=cmd.operator,
            timestamp=at,
        ),
    )


def reinstate(cmd: OperatorCommand, given: Given, policy: Policy, at: datetime) -> Decided:
    agent = _agent("reinstate", cmd, given)
    if isinstance(agent, Refusal):
        return agent
    if agent.standing == "active":
        return Refusal.of("$.agent", f"agent {agent.name} is already active")
    return after(
        agent,
        AgentReinstated(
            originator_id=agent.id,
            originator_version=NEXT,
            name=agent.name,
            reason=cmd.reason,
            by=cmd.operator,
            timestamp=at,
        ),
    )


def revoke(cmd: OperatorCommand, given: Given, policy: Policy, at: datetime) -> Decided:
    agent = _agent("revoke", cmd, given)
    if isinstance(agent, Refusal):
        return agent
    return agents.revoke(agent, given.leases, reason=cmd.reason, by=cmd.operator, at=at, signal_at=at)


def _level_rule(verb: Literal["promote", "demote"]) -> Rule:
    def rule(cmd: OperatorCommand, given: Given, policy: Policy, at: datetime) -> Decided:
        agent = _agent(verb, cmd, given)
        if isinstance(agent, Refusal):
            return agent
        step = 1 if verb == "promote" else -1
        level = cmd.level if cmd.level is not None else agent.level + step
        return agents.change_level(agent, level, policy, verb=verb, reason=cmd.reason, by=cmd.operator, at=at)

    rule.__name__ = verb
    return rule


promote = _level_rule("promote")
demote = _level_rule("demote")


def rollback(cmd: OperatorCommand, given: Given, policy: Policy, at: datetime) -> Decided:
    if cmd.proposal_id is None:
        return Refusal.of("$.proposal_id", "rollback needs a proposal_id")
    state = proposals.named(given.job, cmd.proposal_id, cmd.job_id)
    if isinstance(state, Refusal):
        return state
    assert given.job is not None  # named() found the proposal in it
    return agents.rollback(
        given.job, cmd.proposal_id, reason=cmd.reason, by=cmd.operator, at=at, signal_at=at
    )


VERBS: dict[str, Verb] = {
    "suspend": Verb("agent", suspend),
    "reinstate": Verb("agent", reinstate),
    "revoke": Verb("agent", revoke),
    "promote": Verb("agent", promote),
    "demote": Verb("agent", demote),
    "rollback": Verb("proposal", rollback),
}
