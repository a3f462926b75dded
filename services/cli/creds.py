"""`warden creds`: per-agent NATS credentials (user and password), written to the servers' users
file; and the HTTP API's bearer tokens (operators, client services), kept hashed in the data dir."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from services.cli.options import Exit, data_dir_option, fail, json_option
from shared import credentials, tokens, topology


def users_file_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--users-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"The servers' users include file (default: ${credentials.USERS_FILE_ENV} or "
        f"{credentials.DEFAULT_USERS_FILE}).",
    )(f)


def reload_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--reload-pid",
        "reload_pids",
        type=int,
        multiple=True,
        help="Send SIGHUP to this nats-server process so it rereads the file (repeatable).",
    )(f)


def _reload(pids: tuple[int, ...]) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            fail(f"no process {pid} to reload; the file is written, reload the servers yourself")
    return list(pids)


RELOAD_HINT = (
    "reload every server so it takes effect: `docker compose kill -s HUP nats-1 nats-2 nats-3`, "
    "`nats-server --signal reload=PID`, or --reload-pid PID"
)


@click.group()
def creds() -> None:
    """Per-agent NATS credentials: each agent gets its own user and password.

    Warden uses plain user/password authentication. An agent's user may publish only on its own
    input subjects (warden.in.agent.NAME.<verb>, and .payload for proposal chunks), and receive only
    on its own inbox prefix (_INBOX.NAME.>): it cannot append events, give operator commands,
    speak as another agent, or read, delete or purge a stream. Services (warden-service) and
    operators (warden-operator) have
    their own users, whose passwords the servers read from WARDEN_SERVICE_PASSWORD and
    WARDEN_OPERATOR_PASSWORD. Users live in ops/nats/users.conf, which the servers include.
    """


@creds.command("add-agent")
@click.argument("name")
@users_file_option
@reload_option
@json_option
def add_agent(name: str, users_file: Path | None, reload_pids: tuple[int, ...], as_json: bool) -> None:
    """Create (or replace) agent NAME's user and print its password once.

    The password is stored only as a bcrypt hash: keep the printed one (give it to the agent
    as WARDEN_NATS_USER / WARDEN_NATS_PASSWORD, or `warden agent exec --user --password`).
    Running it again for the same NAME issues a new password and invalidates the old one.
    """
    try:
        topology.check_agent_name(name)
    except topology.BadAgentName as exc:
        fail(str(exc))
    path = credentials.users_file_from_env(users_file)
    password = credentials.add_agent(path, name)
    reloaded = _reload(reload_pids)
    user = credentials.agent_user(name)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "agent": name,
                    "user": user,
                    "password": password,
                    "users_file": str(path),
                    "reloaded": reloaded,
                }
            )
        )
        return
    click.echo(f"agent {name}: user {user}")
    click.echo(f"password (shown once): {password}")
    click.echo(f"written to {path}")
    if not reloaded:
        click.echo(RELOAD_HINT)


@creds.command("remove-agent")
@click.argument("name")
@users_file_option
@reload_option
def remove_agent(name: str, users_file: Path | None, reload_pids: tuple[int, ...]) -> None:
    """Delete agent NAME's user; after the reload its connections are closed."""
    path = credentials.users_file_from_env(users_file)
    if not credentials.remove_agent(path, name):
        fail(f"no agent {name} in {path}", code=Exit.NOT_FOUND)
    if not _reload(reload_pids):
        click.echo(RELOAD_HINT)
    click.echo(f"agent {name} removed from {path}")


@creds.command("list")
@users_file_option
@data_dir_option
@json_option
def list_users(users_file: Path | None, data_dir: Path, as_json: bool) -> None:
    """Every user in the file (services, operators, each agent): what its kind may and may not
    do, and the subjects it may publish and subscribe to; then the HTTP API's tokens in
    --data-dir (names and roles; tokens are stored only as hashes)."""
    path = credentials.users_file_from_env(users_file)
    users = credentials.UsersFile.load(path).users()
    try:
        api_tokens = _token_store(data_dir).entries()
    except tokens.TokenStoreError as exc:
        fail(str(exc), code=1)
    if as_json:
        out: list[dict[str, Any]] = [
            {
                "user": u.name,
                "kind": u.kind,
                "may": list(u.may),
                "may_not": list(u.may_not),
                "permissions": u.permissions.to_conf(),
            }
            for u in users
        ]
        out += [
            {"api_token": t.name, "role": t.role, "created_at": t.created_at.isoformat()} for t in api_tokens
        ]
        click.echo(json.dumps(out, indent=2))
        return
    for user in users:
        perms = user.permissions
        click.echo(f"{user.name}  ({user.kind}: {user.comment})")
        for line in user.may:
            click.echo(f"  may:       {line}")
        for line in user.may_not:
            click.echo(f"  may not:   {line}")
        click.echo(f"  publish:   {', '.join(perms.publish_allow)}")
        if perms.publish_deny:
            click.echo(f"  except:    {', '.join(perms.publish_deny)}")
        click.echo(f"  subscribe: {', '.join(perms.subscribe_allow)}")
    store = tokens.tokens_path(data_dir)
    if api_tokens:
        click.echo(f"HTTP API tokens ({store}):")
        for t in api_tokens:
            click.echo(f"  {t.name}  {t.role}  since {t.created_at:%Y-%m-%d %H:%M:%S}Z")
    else:
        click.echo(f"HTTP API tokens: none in {store}")


@creds.command("sync")
@users_file_option
@reload_option
def sync(users_file: Path | None, reload_pids: tuple[int, ...]) -> None:
    """Rewrite the file from the current topology (new subjects, consumers), keeping every agent."""
    path = credentials.users_file_from_env(users_file)
    users = credentials.UsersFile.load(path)
    users.save(path)
    if not _reload(reload_pids):
        click.echo(RELOAD_HINT)
    click.echo(f"{path}: {len(users.agents)} agent(s), permissions from the current topology")


# --- HTTP API tokens --------------------------------------------------------------------------


def _token_store(data_dir: Path) -> tokens.TokenStore:
    return tokens.TokenStore(tokens.tokens_path(data_dir))


def _issue(name: str, role: tokens.Role, data_dir: Path, as_json: bool) -> None:
    store = _token_store(data_dir)
    try:
        token = store.add(name, role)
    except tokens.BadTokenName as exc:
        fail(str(exc))
    except (tokens.TokenStoreError, OSError) as exc:
        fail(str(exc), code=1)
    if as_json:
        click.echo(json.dumps({"name": name, "role": role, "token": token, "store": str(store.path)}))
        return
    click.echo(f"{role} {name}: token (shown once): {token}")
    click.echo(f"stored as a sha256 hash in {store.path}; a running API accepts it now")
    click.echo('send it as the header "Authorization: Bearer TOKEN"')


@creds.command("add-operator")
@click.argument("name")
@data_dir_option
@json_option
def add_operator(name: str, data_dir: Path, as_json: bool) -> None:
    """Issue an HTTP API token for operator NAME and print it once.

    The operator may give operator commands, submit jobs and read (POST /api/operator/VERB,
    POST /api/jobs); every command it gives is recorded as given by NAME. Running it again
    issues a new token and invalidates the old one. --data-dir is the one `warden up` (or
    `warden run api`) uses.
    """
    _issue(name, "operator", data_dir, as_json)


@creds.command("add-client")
@click.argument("name")
@data_dir_option
@json_option
def add_client(name: str, data_dir: Path, as_json: bool) -> None:
    """Issue an HTTP API token for client service NAME (submit jobs and read; no operator
    commands: those answer 403) and print it once."""
    _issue(name, "client", data_dir, as_json)


def _remove(name: str, role: tokens.Role, data_dir: Path) -> None:
    store = _token_store(data_dir)
    try:
        removed = store.remove(name, role)
    except (tokens.TokenStoreError, OSError) as exc:
        fail(str(exc), code=1)
    if not removed:
        fail(f"no {role} token named {name} in {store.path}", code=Exit.NOT_FOUND)
    click.echo(f"{role} {name}: token removed from {store.path}; a running API refuses it now")


@creds.command("remove-operator")
@click.argument("name")
@data_dir_option
def remove_operator(name: str, data_dir: Path) -> None:
    """Remove operator NAME's HTTP API token (effective on the API's next request)."""
    _remove(name, "operator", data_dir)


@creds.command("remove-client")
@click.argument("name")
@data_dir_option
def remove_client(name: str, data_dir: Path) -> None:
    """Remove client service NAME's HTTP API token (effective on the API's next request)."""
    _remove(name, "client", data_dir)
