"""`warden doctor`: is this deployment what Warden's guarantees assume? Says what is wrong and how to fix it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import click
from nats.aio.client import Client

from services import registry
from services.cli.options import Exit, data_dir_option, json_option, nats_option, replicas_option, resolve_url
from shared import bus, credentials, datadir, doctor

CONNECT_DEADLINE_S = 10.0
MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


def _monitor_from_state(data_dir: Path) -> list[str]:
    state = data_dir / datadir.STATE_FILE
    if not state.is_file():
        return []
    url = json.loads(state.read_text()).get("monitor_url")
    return [str(url)] if url else []


@click.command("doctor")
@nats_option
@data_dir_option
@click.option(
    "--monitor",
    "monitor_urls",
    multiple=True,
    envvar="WARDEN_MONITOR_URLS",
    help="A server's monitoring URL, e.g. http://nats-1:8222 (repeat for every cluster node; "
    "or WARDEN_MONITOR_URLS, space-separated). Default: the one `warden up` recorded in --data-dir.",
)
@replicas_option("Replicas every stream should have (3 on a three-node cluster; or WARDEN_REPLICAS).")
@click.option(
    "--service",
    "services",
    multiple=True,
    type=click.Choice(sorted(registry.SERVICES)),
    help="A service that must answer a ping (repeatable). Default: every service.",
)
@click.option("--no-services", is_flag=True, help="Do not ping services.")
@click.option("--user", default=None, help="NATS user (default: WARDEN_NATS_USER).")
@click.option("--password", default=None, help="NATS password (default: WARDEN_NATS_PASSWORD).")
@json_option
def doctor_command(
    nats_url: str | None,
    data_dir: Path,
    monitor_urls: tuple[str, ...],
    replicas: int,
    services: tuple[str, ...],
    no_services: bool,
    user: str | None,
    password: str | None,
    as_json: bool,
) -> None:
    """Check a running deployment: server versions, JetStream and `sync_interval: always`,
    stream settings (replicas, deny delete/purge, duplicate window), consumers' ack wait and
    max ack pending, and that every service answers. Exits 1 when something is wrong, 4 when
    the server cannot be reached at all (as every client command does).

    Example: warden doctor --nats nats://nats-1:4222 --monitor http://nats-1:8222
    --monitor http://nats-2:8222 --monitor http://nats-3:8222 --replicas 3
    """
    url = resolve_url(nats_url, data_dir)
    monitors = list(monitor_urls) or _monitor_from_state(data_dir)
    expect = doctor.Expectations(
        replicas=replicas,
        services=() if no_services else (services or tuple(sorted(registry.SERVICES))),
    )

    async def go() -> list[doctor.Finding]:
        nc: Client | None = None
        unreachable: list[doctor.Finding] = []
        seen: list[Exception] = []

        async def remember(exc: Exception) -> None:
            seen.append(exc)

        try:
            with anyio.fail_after(CONNECT_DEADLINE_S):
                # Each server tried once, no reconnect loop: a refused login or a dead server
                # is the finding, not something to wait out.
                nc = await bus.connect(
                    url,
                    "warden-doctor",
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    error_cb=remember,
                    **credentials.client_credentials(user, password),
                )
        except Exception as exc:  # any failure to connect is itself the finding
            cause = f" ({seen[-1]})" if seen else ""
            unreachable.append(
                doctor.Finding(
                    f"connection to {url}",
                    "fail",
                    f"cannot connect: {exc}{cause}",
                    "check the URL, that the servers run, and the user/password (WARDEN_NATS_USER)",
                )
            )
        try:
            return unreachable + await doctor.diagnose(nc, monitors, expect)
        finally:
            if nc is not None:
                await nc.close()

    findings = anyio.run(go)
    # No answer at all is exit 4, like every client command; a refused login is a failed check.
    unreachable = any(
        f.check == f"connection to {url}" and f.status == "fail" and "authorization" not in f.detail.lower()
        for f in findings
    )
    if as_json:
        click.echo(
            json.dumps(
                {"healthy": doctor.healthy(findings), "findings": [f.to_json() for f in findings]}, indent=2
            )
        )
    else:
        for finding in findings:
            click.echo(f"{MARK[finding.status]}  {finding.check}: {finding.detail}")
            if finding.status != "ok" and finding.fix:
                click.echo(f"      fix: {finding.fix}")
        failed = sum(1 for f in findings if f.status == "fail")
        click.echo("healthy" if failed == 0 else f"{failed} problem(s) found")
    if unreachable:
        sys.exit(Exit.UNREACHABLE)
    sys.exit(Exit.OK if doctor.healthy(findings) else Exit.FAILED)
