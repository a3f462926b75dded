"""`warden`: run the services, submit jobs, govern agents, and inspect the record.

Every command is listed here, by the module and attribute that define it, and registered on
the group explicitly; importing a command's module registers nothing. Start-up is kept cheap
because every command pays it: a command's module (and what it imports) is loaded only when
that command runs, and `warden --help` lists the commands from the table without loading any.
"""

from __future__ import annotations

from services.cli.app import Listed, cli

__all__ = ["COMMANDS", "cli", "main"]

# Every subcommand. A test checks this against the commands the modules define, summaries
# included, so a command cannot go missing from --help or completion.
COMMANDS: dict[str, Listed] = {
    "agent": Listed("agent", "agent", "Run an agent under Warden's governance."),
    "agents": Listed(
        "finding", "agents_command", "List agents with their level, standing and what their leases came to."
    ),
    "approve": Listed(
        "jobs", "approve", "Operator: Approve a proposal whose contract requires a person's approval."
    ),
    "at": Listed(
        "forensics",
        "at_command",
        "Jobs and agents as they stood at TIME (ISO 8601; naive means local) or --seq N.",
    ),
    "backtest": Listed(
        "forensics",
        "backtest_command",
        "Run an invariant over every past proposal; compare with what was recorded then.",
    ),
    "bench": Listed("bench", "bench", "Measure Warden against raw JetStream on the same server, in one run."),
    "cancel": Listed(
        "jobs",
        "cancel",
        "Operator: Cancel a job; a live lease is revoked and its agent learns on its next heartbeat.",
    ),
    "chaos": Listed(
        "chaos",
        "chaos",
        "Kill services, agents and the broker on a seeded schedule; check that no guarantee bent.",
    ),
    "creds": Listed(
        "creds", "creds", "Per-agent NATS credentials: each agent gets its own user and password."
    ),
    "demo": Listed(
        "demo",
        "demo",
        "Run a fleet of agents, some failing by design, through Warden against a real git repo.",
    ),
    "demote": Listed("jobs", "demote", "Operator: Lower an agent's autonomy level (one level, or --level)."),
    "deny": Listed("jobs", "deny", "Operator: Deny a proposal whose contract requires a person's approval."),
    "doctor": Listed(
        "doctor",
        "doctor_command",
        "Check a running deployment: server versions, JetStream and `sync_interval: always`, stream "
        "settings (replicas, deny delete/purge, duplicate window), consumers' ack wait and max ack "
        "pending, and that every service answers.",
    ),
    "dossier": Listed(
        "forensics", "dossier_command", "Everything about JOB in one JSON bundle, to attach to an incident."
    ),
    "explain": Listed(
        "forensics", "explain", "How JOB went, request to outcome, with the cause when it failed."
    ),
    "jobs": Listed("finding", "jobs_command", "List jobs, newest first, from the read model."),
    "ledger": Listed("forensics", "ledger", "The phase ledger: every aggregate's events form a hash chain."),
    "logs": Listed(
        "finding",
        "logs_command",
        "What each attempt of JOB printed (the output tails `warden agent exec` records on its "
        "proposals), with how each attempt ended.",
    ),
    "promote": Listed(
        "jobs", "promote", "Operator: Raise an agent's autonomy level (one level, or --level)."
    ),
    "reinstate": Listed("jobs", "reinstate", "Operator: Reinstate a revoked or suspended agent."),
    "replay": Listed(
        "replay", "replay", "Rebuild the read model from the streams and compare it with the live one."
    ),
    "requeue": Listed(
        "jobs", "requeue", "Operator: Give a dead (tombstoned or cancelled) job fresh attempts."
    ),
    "revocations": Listed(
        "authority",
        "revocations",
        "List revocations with their latency: failure signal → revocation event, and how long after "
        "the signal the agent could still get a message accepted.",
    ),
    "revoke": Listed(
        "jobs",
        "revoke",
        "Operator: Revoke an agent: no more leases, its live leases end, policy rollback applies.",
    ),
    "rollback": Listed(
        "jobs",
        "rollback",
        "Operator: Roll back the applied effect of a proposal with its compensating effect.",
    ),
    "run": Listed(
        "serve", "run_service", "Run one service (replicas of a service are safe to run side by side)."
    ),
    "schemas": Listed("schemas", "schemas_group", "JSON Schema generated from the message Structs."),
    "status": Listed(
        "finding",
        "status_command",
        "The deployment at a glance: server, each service alive, backlog per consumer, the read "
        "model's lag, live leases and the oldest queued job.",
    ),
    "submit": Listed(
        "jobs", "submit", "Submit a job request, as any client service would on the request subject."
    ),
    "suspend": Listed(
        "jobs", "suspend", "Operator: Suspend an agent: no new leases until reinstated (live leases run on)."
    ),
    "up": Listed(
        "serve", "up", "Run every service in one process (with an embedded server unless --nats is given)."
    ),
}


cli.register(COMMANDS)


def main() -> None:
    cli(prog_name="warden", standalone_mode=True)  # also names the completion variable: _WARDEN_COMPLETE
