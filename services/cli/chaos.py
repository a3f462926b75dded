"""`warden chaos`: kill -9 services, agents and the broker on a seeded schedule, then check the
oracle (services/chaos/)."""

from __future__ import annotations

import json
import logging
import random
import sys

import anyio
import click

from services.chaos.run import ChaosOptions, Summary, run_chaos
from services.cli.options import Exit, json_option, nats_url_option


def _words(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render(summary: Summary) -> list[str]:
    """The outcome as plain text tables: the same on a terminal, in a pipe or in a CI log."""
    lines = [
        f"warden chaos seed {summary.seed}: {len(summary.kills)} kills in {summary.elapsed_s:g}s "
        f"on {summary.nats_url}",
        "",
        f"{'killed':<10} {'count':>5}",
    ]
    by_service: dict[str, int] = {}
    for kill in summary.kills:
        service = str(kill["slot"]).partition("#")[0]
        by_service[service] = by_service.get(service, 0) + 1
    lines += [f"{service:<10} {n:>5}" for service, n in sorted(by_service.items())]
    if summary.restarts:
        lines += [
            "",
            f"{'broker restart':<16} {'down s':>7} {'jobs pending':>13} {'first event s':>14} "
            f"{'first lease s':>14}",
        ]
        for r in summary.restarts:
            lines.append(
                f"{'at ' + _words(r['at_s']) + 's':<16} {_words(r['down_s']):>7} "
                f"{_words(r.get('pending_jobs')):>13} {_words(r.get('first_event_s')):>14} "
                f"{_words(r.get('first_lease_s')):>14}"
            )
    lines += ["", f"{'check':<46} {'':1} detail"]
    for check in summary.checks:
        lines.append(f"{check.name:<46} {'✔' if check.ok else '✘'} {check.detail}")
        for violation in check.violations[:10]:
            lines.append(f"{'':<48}  {json.dumps(violation, default=str)}")
        if len(check.violations) > 10:
            lines.append(f"{'':<48}  ... {len(check.violations) - 10} more (--json lists them)")
    lines.append("")
    lines.append("oracle holds" if summary.ok else f"VIOLATION (seed {summary.seed})")
    if summary.data_dir:
        lines.append(f"logs, store and repository kept in {summary.data_dir}")
    return lines


@click.command()
@click.option("--seed", type=int, default=None, help="The schedule's seed (default: a random one, printed).")
@click.option("--kills", type=click.IntRange(min=0), default=12, show_default=True, help="How many kill -9.")
@click.option(
    "--duration",
    type=click.FloatRange(min=5),
    default=60.0,
    show_default=True,
    help="Seconds over which the kills (and the job submissions) are spread.",
)
@click.option("--jobs", type=click.IntRange(min=1), default=20, show_default=True, help="How many jobs.")
@click.option("--agents", type=click.IntRange(min=1), default=3, show_default=True, help="Agent processes.")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Processes of each deciding service (scheduler, reconciler, checker, applier, revoker).",
)
@click.option(
    "--broker-kills",
    type=click.IntRange(min=0),
    default=None,
    help="How many of the kills hit the broker (embedded only; default: a sixth, at least one).",
)
@nats_url_option("Run against this server (default: an embedded one this command owns, and kills).")
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=180.0,
    show_default=True,
    help="After the schedule, how many seconds jobs may take to become terminal.",
)
@click.option(
    "--keep", is_flag=True, help="Keep the run's folder (logs, store, repository) even when it held."
)
@json_option
def chaos(
    seed: int | None,
    kills: int,
    duration: float,
    jobs: int,
    agents: int,
    replicas: int,
    broker_kills: int | None,
    nats_url: str | None,
    settle: float,
    keep: bool,
    as_json: bool,
) -> None:
    """Kill services, agents and the broker on a seeded schedule; check that no guarantee bent.

    Runs every service as its own `warden run` process (--replicas of each deciding one), a
    scratch git repository, --agents `warden agent exec` agents and --jobs jobs, and sends
    kill -9 --kills times over --duration seconds (the embedded broker too, restarted on the
    same port and store). Then checks: every job terminal; every accepted proposal applied
    exactly once (git trailers counted per proposal and per job); no acknowledged input missing
    from the input stream (lost / unexpected); projections == a clean replay; the ledger
    verified; no process exited unasked. Progress goes to stderr, the outcome to stdout.
    Exit code 1 on any violation (the run's folder is then kept and named).
    """
    if seed is None:
        seed = random.SystemRandom().randrange(1, 2**31)
    if broker_kills is not None and broker_kills > kills:
        raise click.BadParameter(f"{broker_kills} is more than --kills {kills}", param_hint="--broker-kills")
    options = ChaosOptions(
        seed=seed,
        kills=kills,
        duration_s=duration,
        jobs=jobs,
        agents=agents,
        replicas=replicas,
        broker_kills=broker_kills,
        nats_url=nats_url,
        settle_s=settle,
        keep=keep,
    )

    if not click.get_current_context().find_root().params.get("verbose"):
        # This process's own reconnects are expected here (it kills the broker): progress says it.
        logging.getLogger("warden.bus").setLevel(logging.ERROR)

    def say(line: str) -> None:
        click.echo(line, err=True)

    async def go() -> Summary:
        return await run_chaos(options, say)

    summary = anyio.run(go)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2, default=str))
    else:
        for line in render(summary):
            click.echo(line)
    sys.exit(Exit.OK if summary.ok else Exit.FAILED)
