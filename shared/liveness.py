"""Liveness: every service process answers NATS service pings, so `warden doctor` (or the `nats`
CLI: `nats micro ls`) can tell which services are running, where, and how many replicas.

A process running services registers one NATS micro service per Warden service, named
`warden-<service>`, once every one of them has started. A ping on `$SRV.PING.warden-<service>`
is answered by each live replica; no answer within the wait means no replica is serving. The
answer comes from the process's own connection, so a process that lost the server (or is
wedged on its event loop) does not answer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.errors import FlushTimeoutError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.service import Service, ServiceConfig

log = logging.getLogger("warden.liveness")

PING_ROOT = "$SRV.PING"
# How long a responder waits for its server to come back mid-start (as for a cluster's leaders).
RESTART_WAIT_S = 60.0
NAME_PREFIX = "warden-"


def micro_name(service: str) -> str:
    return f"{NAME_PREFIX}{service}"


def ping_subject(service: str) -> str:
    return f"{PING_ROOT}.{micro_name(service)}"


def _version() -> str:
    try:
        return metadata.version("warden")
    except metadata.PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0"


async def serve(
    nc: Client, services: Sequence[str], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer pings for `services` on `nc` until cancelled."""
    where = {"host": socket.gethostname(), "pid": str(os.getpid())}
    registered: list[Any] = []
    try:
        for name in services:
            config = ServiceConfig(
                name=micro_name(name),
                version=_version(),
                description=f"Warden {name}",
                metadata={"service": name, **where},
            )
            service = Service(nc, config)
            registered.append(service)
            await _start(nc, service)
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            for service in registered:
                try:
                    await service.stop()
                except Exception as exc:  # stopping anyway; a closed connection needs no goodbye
                    log.debug("stopping liveness responder %s: %r", service, exc)


async def _start(nc: Client, service: Service) -> None:
    """Subscribe a responder. A broker outage during the confirming flush is waited out, not
    a crash: the subscriptions stand (nats-py sends them again on reconnect), only the PING's
    answer was lost, so confirm again once the server is back (found by `warden chaos`)."""
    try:
        await service.start()
    except FlushTimeoutError:
        with anyio.fail_after(RESTART_WAIT_S):
            while True:
                log.warning("liveness responder %s: no answer from NATS; confirming again", service)
                try:
                    await nc.flush(timeout=2)
                    return
                except FlushTimeoutError:
                    continue


async def ping(nc: Client, service: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The first live replica's answer (its host, pid, version), or None when none answers."""
    try:
        msg = await nc.request(ping_subject(service), b"", timeout=timeout)
    except (NatsTimeout, NoRespondersError):
        return None
    answer: dict[str, Any] = json.loads(msg.data)
    return answer
