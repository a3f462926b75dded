"""NATS plumbing every service and client shares: connecting, input requests, consuming, following.

Input is stored before it is interpreted: a client publishes to an input subject through
JetStream (the stream's ack says "stored") and names, in the `Warden-Reply-To` header, the inbox
where it waits for Warden's verdict. Services consume inputs from durable pull consumers, and
follow the event stream with ordered push consumers (callbacks are 4-5x faster than fetch).
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Container, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import api as js_api

from shared import credentials, telemetry, topology
from shared.events import AnyEvent
from shared.messages import AnyReply, reply_decoder
from shared.persistence import written

log = logging.getLogger("warden.bus")


class NoServerNamed(RuntimeError):
    """Raised when a command needs a running deployment but no NATS URL was given."""


class ReplyTimeout(TimeoutError):
    """Raised when Warden stored an input but no service answered within the wait."""


class NotStored(TimeoutError):
    """Raised when no stream answered a publish (a cluster electing a stream leader, or no
    stream for the subject): nothing was stored, so sending it again is safe."""


class InputRefused(ValueError):
    """Raised when the input stream refused a publish as it stands (e.g. larger than the stream
    takes): nothing was stored, and sending the same bytes again would be refused again."""


class PermissionDenied(RuntimeError):
    """Raised when the server refused a publish or subscribe for this connection's credentials."""


class Unreachable(ConnectionError):
    """Raised when a bounded first connection (see CONNECT_BOUND) reaches no server in time."""


class BadServerURL(ValueError):
    """Raised when a NATS URL names a scheme nats-py cannot speak (an http:// URL, say)."""


# How long a first connection may take before `connect` raises Unreachable. None (services):
# keep trying, a service may start before its server. The CLI bounds its client commands.
CONNECT_BOUND: ContextVar[float | None] = ContextVar("warden_connect_bound", default=None)
NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def server_urls(url: str) -> list[str]:
    """The servers a URL lists (comma-separated for a cluster), each checked for its scheme."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise BadServerURL("no NATS server URL given")
    for server in servers:
        scheme, sep, _rest = server.partition("://")
        if sep and scheme.lower() not in NATS_SCHEMES:
            hint = (
                " (that is an HTTP address; the NATS URL is nats://HOST:4222)"
                if scheme.startswith("http")
                else ""
            )
            raise BadServerURL(
                f"{server} is not a NATS URL: use {', '.join(s + '://' for s in NATS_SCHEMES)}{hint}"
            )
    return servers


_DENIAL = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.IGNORECASE)


@dataclass
class _DenialWatch:
    """One operation waiting to hear whether the server refused its subjects."""

    subjects: frozenset[str]
    inbox_prefix: str
    scope: anyio.CancelScope
    error: Exception | None = None

    def matches(self, verb: str, subject: str) -> bool:
        # nats-py lowercases the server's error text, subject included: compare lowercased.
        subject = subject.lower()
        if subject in self.subjects:
            return True
        # A refused reply subscription (the request's muxed inbox) means no answer can arrive.
        return verb.lower() == "subscription" and subject.startswith(self.inbox_prefix)


async def connect(url: str, name: str, **kwargs: Any) -> Client:
    """Connect with unlimited reconnects; permission errors are logged and raised by `request`
    (nats-py only reports them through the error callback, a publish just times out).

    `url` may list several servers separated by commas (a cluster). Credentials come from
    kwargs (`user`, `password`) or else WARDEN_NATS_USER / WARDEN_NATS_PASSWORD.
    """
    servers = server_urls(url)
    bound = CONNECT_BOUND.get()
    errors: list[Exception] = []
    watches: list[_DenialWatch] = []
    holder: list[Client] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)
        del errors[:-100]  # recent ones are what explain a failure; keep memory bounded
        if bound is not None and not holder:
            # A bounded first connection reports once, as Unreachable, not every 250 ms.
            log.debug("NATS error on %s while connecting: %s", name, exc)
        elif match := _DENIAL.search(str(exc)):
            log.error("NATS refused an operation for %s: %s", name, exc)
            for watch in watches:
                if watch.error is None and watch.matches(match.group(1), match.group(2)):
                    watch.error = exc
                    watch.scope.cancel()
        else:
            log.warning("NATS error on %s: %s", name, exc)

    async def disconnected_cb() -> None:
        if not holder or holder[0].is_closed or holder[0].is_draining:
            return  # a first connection given up, or our own close: not an outage
        log.warning("%s disconnected from NATS", name)

    async def reconnected_cb() -> None:
        log.warning("%s reconnected to NATS", name)

    options: dict[str, Any] = {
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "connect_timeout": 3,
        "allow_reconnect": True,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
    }
    if "user" not in kwargs and "password" not in kwargs:
        options.update(credentials.client_credentials())
    options.update(kwargs)
    # Replies come only under the prefix this user's permissions allow (credentials.inbox_prefix).
    if "inbox_prefix" not in options and (prefix := credentials.inbox_prefix(options.get("user"))):
        options["inbox_prefix"] = prefix
    nc: Client | None = None
    if bound is None:
        nc = await _connect(servers, options)
    else:
        options["connect_timeout"] = min(float(options["connect_timeout"]), bound)
        with anyio.move_on_after(bound):
            nc = await _connect(servers, options)
        if nc is None:
            last = f" ({errors[-1]})" if errors else ""
            raise Unreachable(
                f"cannot reach NATS at {url} within {bound:g}s{last}: check the URL (--nats, "
                "WARDEN_NATS_URL) and that the server is running (`warden up`), or raise --timeout"
            )
    holder.append(nc)
    nc._warden_watches = watches  # type: ignore[attr-defined]
    return nc


async def _connect(servers: list[str], options: dict[str, Any]) -> Client:
    """nats.connect, closing the half-made connection when it fails or is cancelled: nats-py
    leaves the socket of a refused login (or an interrupted attempt) open otherwise."""
    nc = Client()
    try:
        await nc.connect(servers, **options)
    except BaseException:
        with anyio.move_on_after(5, shield=True):  # a close that hangs must not hold the error
            await nc.close()
        raise
    return nc


@contextmanager
def refused(nc: Client, *subjects: str) -> Iterator[_DenialWatch]:
    """Cancel the block as soon as the server refuses one of `subjects` (or a reply inbox) for
    this connection's credentials, and raise PermissionDenied naming it.

    Refusals arrive asynchronously (a subscription's may come after a later PONG): the block
    must be waiting for something the refusal makes impossible. Do not `nc.flush()` inside:
    nats-py leaves a cancelled flush's PONG waiter queued, and the next PONG then breaks its
    read loop."""
    watches: list[_DenialWatch] = getattr(nc, "_warden_watches", [])
    prefix = bytes(getattr(nc, "_inbox_prefix", b"_INBOX")).decode()
    with anyio.CancelScope() as scope:
        watch = _DenialWatch(frozenset(s.lower() for s in subjects), prefix.lower(), scope)
        watches.append(watch)
        try:
            yield watch
        finally:
            watches.remove(watch)
    if watch.error is not None:
        raise PermissionDenied(
            f"the NATS server refused this connection's credentials: {watch.error} "
            "(check the user's permissions: `warden creds list`)"
        ) from watch.error


async def request(
    nc: Client,
    subject: str,
    payload: msgspec.Struct | bytes,
    *,
    timeout: float = 10.0,
    inbox_prefix: str | None = None,
) -> AnyReply:
    """Store an input on its subject and wait for the service's verdict on it."""
    js = nc.jetstream()
    agent = topology.input_agent(subject)
    default_prefix = bytes(getattr(nc, "_inbox_prefix", b"_INBOX")) == topology.INBOX_ROOT.encode()
    if inbox_prefix is None and default_prefix and agent is not None and topology.AGENT_NAME.match(agent):
        # Warden answers an agent's input only under the agent's own inbox prefix (a connection
        # with credentials has its prefix set by `connect` already).
        inbox_prefix = topology.reply_inbox_prefix(agent)
    inbox = f"{inbox_prefix}.{uuid.uuid4().hex}" if inbox_prefix else nc.new_inbox()
    # A refusal cancels the wait at once (the publish alone would only time out).
    with refused(nc, subject, inbox):
        sub = await nc.subscribe(inbox, max_msgs=1)
        try:
            data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
            headers = telemetry.inject({topology.REPLY_HEADER: inbox})
            try:
                await js.publish(subject, data, headers=headers, timeout=timeout)
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError) as exc:
                raise NotStored(f"no stream took {subject} (no leader right now?); nothing stored") from exc
            except nats.js.errors.BadRequestError as exc:
                raise InputRefused(
                    f"the input stream refused {len(data)} bytes on {subject}: {exc.description}; "
                    f"nothing stored (inputs are at most {topology.MAX_INPUT_BYTES} bytes)"
                ) from exc
            try:
                msg = await sub.next_msg(timeout=timeout)
            except NatsTimeout as exc:
                raise ReplyTimeout(
                    f"input on {subject} was stored but no Warden service answered within {timeout}s "
                    "(is `warden up` running?)"
                ) from exc
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
    answer: AnyReply = reply_decoder.decode(msg.data)
    return answer


def reply_address(msg: Msg, agents: Container[str] = ()) -> tuple[str, str | None] | None:
    """The input's reply address and why it may not be used (None when it may); None when the
    sender named none. `agents`: the registered agents, whose inboxes only they may be sent."""
    target = (msg.headers or {}).get(topology.REPLY_HEADER)
    if not target:
        return None
    return target, topology.reply_refusal(msg.subject, target, agents)


async def reply(nc: Client, msg: Msg, answer: msgspec.Struct, agents: Container[str] = ()) -> str | None:
    """Answer an input at the address its sender named, if the sender may receive there.

    The only place a service publishes to an address an input names. Returns why the address
    was refused (nothing is published), None when answered or when no address was named;
    callers record a refusal with the input (shared/handling.py `answer`).
    """
    named = reply_address(msg, agents)
    if named is None:
        return None
    target, refusal = named
    if refusal is None:
        await nc.publish(target, msgspec.json.encode(answer))
    return refusal


Handler = Callable[[Msg], Awaitable[None]]
KeyFunction = Callable[[Msg], str]
GiveUp = Callable[[Msg, Exception], Awaitable[None]]


def by_subject(msg: Msg) -> str:
    """Default ordering key: messages on one subject (one agent's verb) are handled in order."""
    return str(msg.subject)


async def consume(
    js: JetStreamContext,
    spec: topology.ConsumerSpec,
    handler: Handler,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    batch: int = 64,
    concurrency: int = 32,
    key: KeyFunction = by_subject,
    give_up: GiveUp | None = None,
) -> None:
    """Run `handler` over a durable input consumer, acking each message after it is handled.

    Messages with the same key are handled one at a time in stream order; different keys run
    concurrently (up to `concurrency`), because each handler mostly waits on a durable write
    and the broker commits concurrent writes together. A handler raises only for
    infrastructure faults (the message is retried after a delay); bad input is the handler's
    to record and answer. A message whose handler failed on its last allowed delivery goes to
    `give_up` (which records it as refused) and is acked: the consumer would otherwise drop it
    silently. On cancellation, handlers already started finish and ack.

    A spec whose filters span both input streams has a durable of its name on each
    (`topology.consumer_streams`): one pull subscription per stream feeds the same handler.
    Keys are subjects, and a subject lives in one stream, so per-key order is still stream order.
    """
    subs = [await js.pull_subscribe_bind(spec.durable, stream=s) for s in topology.consumer_streams(spec)]
    in_flight = anyio.Semaphore(concurrency)
    queues: dict[str, list[Msg]] = {}

    async def handle_one(msg: Msg) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await handler(msg)
            except Exception as exc:
                if give_up is None or msg.metadata.num_delivered < spec.max_deliver:
                    log.exception("handler %s failed on %s; retrying later", spec.durable, msg.subject)
                    await msg.nak(delay=1.0)
                    return
                log.exception("handler %s failed on %s for the last time", spec.durable, msg.subject)
                try:
                    await give_up(msg, exc)
                except Exception:
                    log.exception("could not record the failure of %s", msg.subject)
                    await msg.nak(delay=1.0)
                    return
            await msg.ack()

    async def drain(k: str) -> None:
        queue = queues[k]
        try:
            while queue:
                msg = queue.pop(0)
                try:
                    await handle_one(msg)
                finally:
                    in_flight.release()
        finally:
            del queues[k]

    async def pull(sub: JetStreamContext.PullSubscription, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except TimeoutError:  # nothing to fetch (nats-py raises asyncio's, or its own)
                continue
            except nats.errors.Error as exc:  # disconnected: nats-py reconnects by itself
                log.warning("fetch on %s failed (%s); retrying", spec.durable, exc)
                await anyio.sleep(0.25)
                continue
            for msg in msgs:
                await in_flight.acquire()
                k = key(msg)
                if k in queues:
                    queues[k].append(msg)
                else:
                    queues[k] = [msg]
                    tg.start_soon(drain, k)

    task_status.started()
    try:
        async with anyio.create_task_group() as tg:
            for sub in subs:
                tg.start_soon(pull, sub, tg)
    finally:
        with anyio.CancelScope(shield=True):
            for sub in subs:
                await sub.unsubscribe()


T = TypeVar("T")


async def patiently(call: Callable[[], Awaitable[T]], attempts: int = 6, first_wait: float = 0.25) -> T:
    """A JetStream API call at start-up, retried on timeout: a busy server (a backlog being
    written, a leader election) answers late, and a service should wait rather than die."""
    wait = first_wait
    for attempt in range(attempts):
        try:
            return await call()
        except TimeoutError:
            if attempt == attempts - 1:
                raise
            log.warning("JetStream API slow to answer; retrying in %.2fs", wait)
            await anyio.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


EventCallback = Callable[[int, AnyEvent], None]

# How often `follow` looks for a reconnect: a broker restart costs a service at most this much
# on top of the server's own recovery.
_RECONNECT_POLL_S = 0.05


async def follow(
    js: JetStreamContext,
    on_event: EventCallback,
    *,
    from_seq: int = 1,
    on_position: Callable[[int], None] | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Fold every authoritative event into `on_event`, in stream order, forever.

    Start-up completes once the events that existed at start have been delivered, so a service
    never decides on a half-built view. Reports the stream sequence it caught up to.
    `on_position` hears the sequence of every message delivered (events or not).

    After a reconnect (a broker restart, a move to another node) the ordered consumer is
    re-created at once from the next unseen sequence: the server held it in memory only, and
    nats-py notices it gone only after two missed idle heartbeats (10 s), and does not retry a
    re-creation that fails while JetStream is still recovering. That left services deciding on
    a view frozen at the restart for 10-20 s.
    """
    nc: Client = js._nc
    info = await patiently(lambda: js.stream_info(topology.EVENT_STREAM))
    target = info.state.last_seq
    caught_up = anyio.Event()
    if target < from_seq:
        caught_up.set()
    next_seq = max(from_seq, 1)

    async def cb(msg: Msg) -> None:
        nonlocal next_seq
        seq = msg.metadata.sequence.stream
        if seq < next_seq:
            return  # delivered already, by the consumer this one replaced
        next_seq = seq + 1
        # Tracking records and foreign messages share the stream; only Warden's events fold.
        found = written.events_of(msg.subject, msg.headers, msg.data)
        if not isinstance(found, str):
            for event in found:  # a packed record's events share its sequence
                on_event(seq, event)
        elif written.is_aggregate_subject(msg.subject):
            log.warning("stepping over message %d on %s, not Warden's: %s", seq, msg.subject, found)
        if on_position is not None:
            on_position(seq)
        if seq >= target:
            caught_up.set()

    async def subscribe() -> Any:
        return await js.subscribe(
            f"{topology.EVENT_ROOT}.>",
            ordered_consumer=True,
            cb=cb,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            config=js_api.ConsumerConfig(opt_start_seq=next_seq),
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )

    async def resubscribe() -> Any:
        wait = 0.05
        while True:
            try:
                return await subscribe()
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                log.info("event stream not followable yet (%s); retrying in %.2fs", exc, wait)
                await anyio.sleep(wait)
                wait = min(wait * 2, 1.0)

    sub = await patiently(subscribe)

    async def reestablish_on_reconnect() -> None:
        nonlocal sub
        seen = nc.stats["reconnects"]
        while True:
            await anyio.sleep(_RECONNECT_POLL_S)
            if nc.stats["reconnects"] == seen or not nc.is_connected:
                continue
            seen = nc.stats["reconnects"]
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            sub = await resubscribe()
            log.info("event stream followed again from sequence %d after a reconnect", next_seq)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reestablish_on_reconnect)
            await caught_up.wait()
            task_status.started(target)
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


class StoredMessage(msgspec.Struct, frozen=True):
    seq: int
    time: datetime
    subject: str
    data: bytes
    headers: dict[str, str] = msgspec.field(default_factory=dict)


async def read_subject(
    js: JetStreamContext, stream: str, subject: str, timeout: float = 30.0
) -> list[StoredMessage]:
    """Every message stored on `subject` (wildcards allowed) right now, in stream order."""
    info = await js.stream_info(stream, subjects_filter=subject)
    out: list[StoredMessage] = []
    if not info.state.subjects:  # nothing stored on that subject
        return out
    done = anyio.Event()

    async def cb(msg: Msg) -> None:
        meta = msg.metadata
        out.append(
            StoredMessage(
                meta.sequence.stream, meta.timestamp, msg.subject, msg.data, dict(msg.headers or {})
            )
        )
        if meta.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        subject, stream=stream, ordered_consumer=True, cb=cb, deliver_policy=js_api.DeliverPolicy.ALL
    )
    try:
        with anyio.fail_after(timeout):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return out
