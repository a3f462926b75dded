"""One NATS connection per process, on its event loop, usable from worker threads.

eventsourcing is synchronous; nats-py is asyncio and not thread-safe. So a process keeps one
connection on one event loop, runs its eventsourcing applications in worker threads
(`anyio.to_thread.run_sync`), and a recorder reaches NATS only through `NatsBridge.call`, which
schedules a coroutine on the loop and blocks the *worker* thread until it finishes. Calling it
from the loop thread would block the very loop that must run the coroutine, so that raises.

Services `attach` the connection they already run; the CLI and sync tests `start` a bridge that
owns a daemon thread with its own loop and connection. eventsourcing hands its persistence
module only string settings, so a bridge is `register`ed under a key and the application gets
`WARDEN_NATS_BRIDGE=<key>` in its environment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext

from shared.credentials import client_credentials

T = TypeVar("T")

BRIDGE_ENV = "WARDEN_NATS_BRIDGE"
URL_ENV = "WARDEN_NATS_URL"
# How long `start` waits for the first connection (nats-py itself would retry forever).
CONNECT_DEADLINE_S = 10.0

log = logging.getLogger(__name__)


class BridgeError(RuntimeError):
    """Raised when a bridge is misused: called on its own loop, closed, or not registered."""


async def _log_error(exc: Exception) -> None:
    # Permission denials reach nats-py only here (the publish itself just times out): make
    # them visible instead of leaving a bare timeout to explain.
    log.warning("NATS error: %r", exc)


async def _run(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


class NatsBridge:
    """A NATS connection on an event loop, plus a thread-safe way to run coroutines on it."""

    loop: asyncio.AbstractEventLoop
    nc: Client
    js: JetStreamContext

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        nc: Client,
        *,
        loop_thread_id: int,
        thread: threading.Thread | None = None,
    ) -> None:
        self.loop = loop
        self.nc = nc
        self.js = nc.jetstream()
        self.key: str | None = None
        self._loop_thread_id = loop_thread_id
        self._thread = thread  # set only when this bridge owns its loop and connection
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread_id

    def submit(self, coro_factory: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the loop without waiting (safe from any thread)."""
        if self._closed:
            raise BridgeError("this NatsBridge is closed")
        return asyncio.run_coroutine_threadsafe(_run(coro_factory), self.loop)

    def call(self, coro_factory: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
        """Run `coro_factory()` on the loop and return its result, from a worker thread.

        The factory (not a coroutine object) is taken so that nothing is created on the wrong
        thread, and nothing is left un-awaited when the call is refused.
        """
        if self.in_loop_thread():
            raise BridgeError(
                "NatsBridge.call() was called on the event loop's own thread, which would "
                "deadlock: run synchronous eventsourcing code (applications, recorders) in a "
                "worker thread, e.g. `await anyio.to_thread.run_sync(app.save, aggregate)`"
            )
        future = self.submit(coro_factory)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine's own TimeoutError, not ours
                raise
            future.cancel()
            raise TimeoutError(f"NATS call did not finish within {timeout}s") from None

    @classmethod
    def start(cls, url: str, **connect_kwargs: Any) -> NatsBridge:
        """Start a daemon thread running a new loop, and connect to `url` on it."""
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name="warden-nats-bridge", daemon=True)
        thread.start()
        started.wait()
        options: dict[str, Any] = {
            "name": "warden-eventsourcing",
            "error_cb": _log_error,
            # Ride out server restarts; every call still has its own timeout.
            "max_reconnect_attempts": -1,
        }
        if "user" not in connect_kwargs:
            options.update(client_credentials())  # WARDEN_NATS_USER / WARDEN_NATS_PASSWORD
        options.update(connect_kwargs)
        deadline = float(options.pop("connect_deadline", CONNECT_DEADLINE_S))

        async def connect() -> Client:
            # Several servers (a cluster) separated by commas, as everywhere in Warden.
            servers = [u.strip() for u in url.split(",") if u.strip()]
            nc = Client()
            try:
                await asyncio.wait_for(nc.connect(servers, **options), deadline)
            except BaseException:
                await nc.close()  # nats-py leaves a failed attempt's socket open otherwise
                raise
            return nc

        try:
            nc = asyncio.run_coroutine_threadsafe(connect(), loop).result(deadline + 5)
        except BaseException as exc:
            _stop_loop(loop, thread)
            if isinstance(exc, TimeoutError):
                raise BridgeError(f"could not connect to NATS at {url} within {deadline}s") from exc
            raise
        assert thread.ident is not None
        return cls(loop, nc, loop_thread_id=thread.ident, thread=thread)

    @classmethod
    def attach(cls, nc: Client) -> NatsBridge:
        """Wrap the running loop's existing connection (services). Call it on the loop thread."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise BridgeError(
                "NatsBridge.attach() must be called on the event loop that owns the connection"
            ) from None
        return cls(loop, nc, loop_thread_id=threading.get_ident())

    def close(self) -> None:
        """Forget the bridge; close the connection and thread only if this bridge owns them."""
        if self._closed:
            return
        unregister(self)
        thread = self._thread
        if thread is None:
            self._closed = True
            return
        if self.in_loop_thread():
            raise BridgeError("close() an owned NatsBridge from another thread than its loop")
        try:
            self.call(self.nc.close, timeout=5.0)
        except Exception as exc:  # closing anyway: report, do not mask the caller's flow
            log.warning("closing NATS connection failed: %r", exc)
        self._closed = True
        _stop_loop(self.loop, thread)

    def __enter__(self) -> NatsBridge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    if not thread.is_alive():
        loop.close()


_registry: dict[str, NatsBridge] = {}
_registry_lock = threading.Lock()


def register(bridge: NatsBridge) -> str:
    """Make `bridge` findable by key (idempotent); the key goes in `WARDEN_NATS_BRIDGE`."""
    with _registry_lock:
        if bridge.key is None:
            bridge.key = f"bridge-{uuid.uuid4().hex}"
        _registry[bridge.key] = bridge
        return bridge.key


def lookup(key: str) -> NatsBridge:
    with _registry_lock:
        bridge = _registry.get(key)
    if bridge is None:
        raise BridgeError(
            f"{BRIDGE_ENV}={key} names no registered NatsBridge in this process "
            "(register it with shared.persistence.bridge.register before building the application)"
        )
    return bridge


def unregister(bridge: NatsBridge) -> None:
    with _registry_lock:
        if bridge.key is not None:
            _registry.pop(bridge.key, None)


def bridge_env(bridge: NatsBridge) -> dict[str, str]:
    """The environment entries that make an eventsourcing application use `bridge`."""
    return {BRIDGE_ENV: register(bridge)}
