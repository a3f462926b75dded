"""Every stream, subject and durable consumer Warden uses, declared in one place.

Untrusted input lands on `warden.in.>` and is stored before anything reads it, in two streams:
client requests and operator commands in WARDEN_INPUT, every agent subject in WARDEN_AGENT_INPUT,
which keeps only each subject's latest few messages (so one agent can evict only its own older
inputs, never starve anyone else's: see "the agent input stream" below). Authoritative events,
which only Warden's services append, live on `warden.evt.>`: one subject per aggregate, so
`Nats-Expected-Last-Subject-Sequence` gives optimistic concurrency. Every stream denies delete
and purge: their sequences are positions that projections track, and they are the record.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Container
from dataclasses import dataclass
from uuid import UUID

import anyio
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError

log = logging.getLogger("warden.topology")

PREFIX = "warden"
INPUT_STREAM = "WARDEN_INPUT"
AGENT_INPUT_STREAM = "WARDEN_AGENT_INPUT"
EVENT_STREAM = "WARDEN_EVENTS"
PAYLOAD_BUCKET = "WARDEN_PAYLOADS"
PAYLOAD_STREAM = f"OBJ_{PAYLOAD_BUCKET}"  # the stream behind the object store bucket
# Snapshots of the services' view (shared/snapshot.py): disposable, rebuilt from the log.
SNAPSHOT_BUCKET = "WARDEN_SNAPSHOTS"
SNAPSHOT_STREAM = f"OBJ_{SNAPSHOT_BUCKET}"

INPUT_ROOT = f"{PREFIX}.in"
EVENT_ROOT = f"{PREFIX}.evt"

# Client services publish job requests here, with any NATS client.
REQUEST_SUBJECT = f"{INPUT_ROOT}.request"
# Header naming where the submitter (or agent) waits for Warden's verdict on its input.
REPLY_HEADER = "Warden-Reply-To"

AGENT_VERBS = ("register", "claim", "heartbeat", "propose", "release")
# Where an agent uploads a large proposal's payload, in chunks, before proposing: raw bytes, not
# messages. No consumer reads this subject; each chunk's answer is its stream ack (its sequence),
# and the checker reads the chunks a proposal names, by sequence, and checks their subject.
PAYLOAD_VERB = "payload"
OPERATOR_VERBS = (
    "requeue",
    "cancel",
    "revoke",
    "suspend",
    "reinstate",
    "promote",
    "demote",
    "approve",
    "deny",
    "rollback",
)
# Agent names become subject tokens: no dots, wildcards or spaces.
AGENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Live lifecycle notices (lease standing changes) pushed to agents; core NATS, not stored.
NOTICE_ROOT = f"{PREFIX}.notice"


class TopologyError(RuntimeError):
    """Raised when the server cannot host Warden's topology (too old, or a stream conflicts)."""


class BadAgentName(ValueError):
    """Raised when an agent name cannot be used as a subject token."""


def check_agent_name(agent: str) -> str:
    if not AGENT_NAME.match(agent):
        raise BadAgentName(f"agent name {agent!r} must be 1-64 characters of letters, digits, '_' or '-'")
    return agent


def agent_subject(agent: str, verb: str) -> str:
    """Where agent `agent` publishes message kind `verb`."""
    if verb not in AGENT_VERBS:
        raise ValueError(f"unknown agent verb {verb!r}")
    return f"{INPUT_ROOT}.agent.{check_agent_name(agent)}.{verb}"


def payload_subject(agent: str) -> str:
    """Where agent `agent` publishes its payload chunks; only its own credential may."""
    return f"{INPUT_ROOT}.agent.{check_agent_name(agent)}.{PAYLOAD_VERB}"


def agent_subject_all(verb: str) -> str:
    return f"{INPUT_ROOT}.agent.*.{verb}"


def agent_input_root(agent: str) -> str:
    return f"{INPUT_ROOT}.agent.{check_agent_name(agent)}.>"


def parse_agent_subject(subject: str) -> tuple[str, str] | None:
    """(agent, verb) for an agent input subject, None for any other subject."""
    parts = subject.split(".")
    if len(parts) == 5 and parts[:3] == [PREFIX, "in", "agent"]:
        return parts[3], parts[4]
    return None


def operator_subject(verb: str) -> str:
    if verb not in OPERATOR_VERBS:
        raise ValueError(f"unknown operator command {verb!r}")
    return f"{INPUT_ROOT}.op.{verb}"


OPERATOR_SUBJECTS = f"{INPUT_ROOT}.op.>"


def event_subject(aggregate_id: UUID | str) -> str:
    """The one subject that holds every event of one aggregate (a job, an agent, a rejection)."""
    return f"{EVENT_ROOT}.{aggregate_id}"


def notice_subject(agent: str) -> str:
    return f"{NOTICE_ROOT}.{check_agent_name(agent)}"


INBOX_ROOT = "_INBOX"
# Longer reply addresses are refused: nats-py's own inboxes are under 60 characters.
MAX_REPLY_ADDRESS = 255
_SUBJECT_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII: no spaces, controls or non-ASCII


def reply_inbox_prefix(agent: str) -> str:
    """Agents receive verdicts on their own inbox prefix, so permissions can fence them."""
    return f"{INBOX_ROOT}.{check_agent_name(agent)}"


def input_agent(subject: str) -> str | None:
    """The agent whose credential alone may publish on `subject` (the token after
    `warden.in.agent.`, whatever follows it), None for client and operator subjects."""
    parts = subject.split(".", 4)
    if len(parts) >= 5 and parts[:3] == [PREFIX, "in", "agent"]:
        return parts[3]
    return None


def reply_refusal(input_subject: str, reply_to: str, agents: Container[str] = ()) -> str | None:
    """Why Warden will not answer an input on `input_subject` at `reply_to`; None when it may.

    A service publishes a verdict with its own authority, so an unchecked address would let any
    sender have Warden write for it: onto the event stream, into JetStream's API, or into
    another agent's inbox. Replies go only where the sender may listen: an agent's under its own
    `_INBOX.<agent>.` (the only inbox its credential may subscribe to), a client's or operator's
    under `_INBOX.` but not under the inbox prefix of any of `agents` (the registered agents).
    """
    shown = reply_to if len(reply_to) <= 80 else reply_to[:77] + "..."
    if len(reply_to) > MAX_REPLY_ADDRESS:
        return f"reply address is {len(reply_to)} characters; the limit is {MAX_REPLY_ADDRESS}"
    tokens = reply_to.split(".")
    if any(not _SUBJECT_TOKEN.match(t) or t in ("*", ">") for t in tokens):
        return f"reply address {shown!r} is not a subject a reply can be published to"
    agent = input_agent(input_subject)
    if agent is not None:
        if len(tokens) < 3 or tokens[0] != INBOX_ROOT or tokens[1] != agent:
            return f"reply address {shown!r} is not under agent {agent}'s own inbox {INBOX_ROOT}.{agent}."
    elif len(tokens) < 2 or tokens[0] != INBOX_ROOT:
        return f"reply address {shown!r} is not an inbox: replies go only under {INBOX_ROOT}."
    elif tokens[1] in agents:
        return f"reply address {shown!r} is agent {tokens[1]}'s inbox, not the sender's"
    return None


# The operator credential's replies (verdicts, JetStream acks, its ordered consumers' deliveries)
# arrive under this prefix, the only one it may subscribe to: so it cannot read agents' replies
# (lease grants) or the deliveries of services' consumers. `~` is in no agent name (AGENT_NAME),
# so no agent's prefix `_INBOX.<name>` can be this one.
OPERATOR_INBOX_PREFIX = "_INBOX.~operator"


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer owned by one service (shared by replicas). Its filters may span
    both input streams: it is then one durable of this name on each stream that holds any of
    them (`consumer_streams`), and `bus.consume` feeds both to the same handler."""

    durable: str
    filter_subjects: tuple[str, ...]
    # Longer than the slowest handler: a redelivery while the first attempt still runs is work
    # done twice (dedup makes it harmless, but it is waste).
    ack_wait_s: float = 30.0
    # Bounded so a stuck handler shows as backlog, never as silent stall at the default 1000.
    max_ack_pending: int = 1024
    max_deliver: int = 10


# An agent subject with more tokens than `warden.in.agent.<name>.<verb>`: what a dotted agent
# name, or a verb with dots, looks like. Stored so it can be refused with a reason (the
# agent's credential may publish under its own root), and refused by the scheduler.
MALFORMED_AGENT_SUBJECTS = f"{INPUT_ROOT}.agent.*.*.>"


AGENT_ROOT = f"{INPUT_ROOT}.agent"


def input_subjects() -> list[str]:
    """What WARDEN_INPUT stores: job requests and operator commands. Anything else under
    `warden.in.` that neither stream stores gets JetStream's "no stream" answer at once rather
    than a silence."""
    return [REQUEST_SUBJECT, *(operator_subject(v) for v in OPERATOR_VERBS)]


def agent_input_subjects() -> list[str]:
    """What WARDEN_AGENT_INPUT stores: every agent verb and payload subject, and the malformed
    agent subjects the scheduler refuses (only reachable without credentials: an agent's
    credential may publish its exact subjects and nothing else)."""
    return [*(agent_subject_all(v) for v in (*AGENT_VERBS, PAYLOAD_VERB)), MALFORMED_AGENT_SUBJECTS]


def stream_of(subject: str) -> str:
    """The input stream that stores `subject`: the one rule every reference to an input by
    sequence follows (an input's sequence means nothing without its stream)."""
    return AGENT_INPUT_STREAM if subject.startswith(AGENT_ROOT + ".") else INPUT_STREAM


def consumer_streams(spec: ConsumerSpec) -> tuple[str, ...]:
    """The input streams holding any of the consumer's filters, in a fixed order."""
    wanted = {stream_of(f) for f in spec.filter_subjects}
    return tuple(s for s in (INPUT_STREAM, AGENT_INPUT_STREAM) if s in wanted)


def stream_filters(spec: ConsumerSpec, stream: str) -> tuple[str, ...]:
    """The consumer's filters that `stream` stores: its durable there filters on these."""
    return tuple(f for f in spec.filter_subjects if stream_of(f) == stream)


SCHEDULER_CONSUMER = ConsumerSpec(
    durable="scheduler",
    filter_subjects=(
        REQUEST_SUBJECT,
        agent_subject_all("register"),
        agent_subject_all("claim"),
        f"{INPUT_ROOT}.op.requeue",
        f"{INPUT_ROOT}.op.cancel",
        MALFORMED_AGENT_SUBJECTS,
    ),
)
RECONCILER_CONSUMER = ConsumerSpec(
    durable="reconciler",
    filter_subjects=(agent_subject_all("heartbeat"), agent_subject_all("release")),
)
# The checker holds a proposal unacked until its decision, extending the deadline with
# in_progress() while it works (a CI run may take minutes): so a short ack_wait costs nothing,
# and a checker that crashed mid-check has its proposal redelivered within seconds.
CHECKER_CONSUMER = ConsumerSpec(
    durable="checker",
    filter_subjects=(
        agent_subject_all("propose"),
        f"{INPUT_ROOT}.op.approve",
        f"{INPUT_ROOT}.op.deny",
    ),
    ack_wait_s=10.0,
)
REVOKER_CONSUMER = ConsumerSpec(
    durable="revoker",
    filter_subjects=tuple(
        operator_subject(v) for v in OPERATOR_VERBS if v not in ("requeue", "cancel", "approve", "deny")
    ),
)
CONSUMERS = (SCHEDULER_CONSUMER, RECONCILER_CONSUMER, CHECKER_CONSUMER, REVOKER_CONSUMER)

DUPLICATE_WINDOW_S = 120.0
# Services refuse (and record) inputs larger than this. Larger proposals go to the object store.
MAX_INPUT_BYTES = 1024 * 1024
# The input stream itself refuses (stores nothing, the publisher is told at once) a message past
# this: so an oversize input costs one small recorded refusal, never up to the server's 8 MB
# max_payload of disk each. The headroom above MAX_INPUT_BYTES keeps a slightly-too-large input
# stored and answered with its sizes (headers count toward the server's check).
INPUT_MAX_MSG_BYTES = MAX_INPUT_BYTES + 64 * 1024
# Proposals whose encoded message would pass this are uploaded in chunks first (the SDK does it):
# headroom below MAX_INPUT_BYTES for the envelope and JSON escaping.
INLINE_PROPOSAL_BYTES = 512 * 1024
# A proposal whose record (its message as decoded and re-encoded) is at most this many bytes is
# kept in its `proposal.submitted` itself, not as a record object (two stored messages and four
# round trips fewer per proposal); the event stream keeps it as long as the job. Larger ones,
# and every upload, keep a record object (shared/proposals.py).
INLINE_RECORD_BYTES = 16 * 1024
# The agent input stream keeps each subject's latest AGENT_INPUT_PER_SUBJECT messages
# (`max_msgs_per_subject`; WARDEN_AGENT_INPUT_PER_SUBJECT overrides it). With credentials an
# agent may publish on exactly len(AGENT_VERBS) + 1 subjects, so what one agent can hold in the
# stream, whatever it sends, is agent_input_bound(): 6 x 32 x (1 MiB + 64 KiB) = 204 MiB. A
# flood evicts only the flooder's own older inputs; a service that falls more than K inputs
# behind on one agent's verb skips the evicted ones (claims and heartbeats are superseded by the
# newer ones anyway; an evicted proposal was never recorded, and its lease runs out).
AGENT_INPUT_PER_SUBJECT = 32
# One payload chunk on the agent's payload subject: as large as one input may be (the chunk and
# its headers fit in INPUT_MAX_MSG_BYTES), so the K chunks the ring keeps carry the most.
PAYLOAD_CHUNK_BYTES = 1024 * 1024
# The largest proposal payload the checker accepts: every chunk of an upload must still be in the
# ring when the checker reads it, so an upload fits in K chunks (32 MiB). Past it the proposal is
# rejected with the sizes named; WARDEN_MAX_PROPOSAL_BYTES lowers it (never above K chunks).
MAX_PROPOSAL_BYTES = AGENT_INPUT_PER_SUBJECT * PAYLOAD_CHUNK_BYTES
# The whole bucket: payloads are part of the record and are kept (the bucket denies delete,
# purge and rollup; only the checker writes it, with the service credential), so this bounds
# the disk they take; when it is full the checker rejects the proposal naming the store. JetStream reserves it up front on every replica, so it stays modest; set when the bucket
# is created (WARDEN_PAYLOAD_BUCKET_BYTES), raise it later with `nats object` tooling.
PAYLOAD_BUCKET_MAX_BYTES = 1024 * 1024 * 1024


# The snapshot bucket holds one object per kind of view, each rewritten in place (its old chunks
# purged); the bound is for chunks two replicas' racing writes may orphan. Discard OLD: the
# oldest go first, and a snapshot that lost a chunk fails its digest and is ignored (a full fold).
SNAPSHOT_BUCKET_MAX_BYTES = 256 * 1024 * 1024


def agent_input_per_subject() -> int:
    override = os.environ.get("WARDEN_AGENT_INPUT_PER_SUBJECT")
    return int(override) if override else AGENT_INPUT_PER_SUBJECT


def max_upload_chunks() -> int:
    """How many chunks an upload may have: the payload subject keeps only the latest K."""
    return agent_input_per_subject()


def max_proposal_bytes() -> int:
    """The payload limit: WARDEN_MAX_PROPOSAL_BYTES, but never more than K chunks can carry."""
    ring = max_upload_chunks() * PAYLOAD_CHUNK_BYTES
    override = os.environ.get("WARDEN_MAX_PROPOSAL_BYTES")
    return min(int(override), ring) if override else ring


def agent_subjects_per_credential() -> int:
    """The subjects one agent's credential may publish on (credentials.agent_permissions)."""
    return len(AGENT_VERBS) + 1


# What the store keeps per message beside its data and headers (which max_msg_size counts): its
# subject (at most 90 characters for an agent's) and the store's own record header and checksum.
STORED_MESSAGE_OVERHEAD = 256


def agent_input_bound() -> int:
    """The most one credentialed agent can keep stored in the agent input stream, in bytes:
    subjects x K x (the stream's max_msg_size + a stored message's overhead)."""
    per_message = INPUT_MAX_MSG_BYTES + STORED_MESSAGE_OVERHEAD
    return agent_subjects_per_credential() * agent_input_per_subject() * per_message


def payload_object_name(agent: str, job_id: UUID, epoch: int, digest: str) -> str:
    """Objects are named by who sent them for which lease and by their sha256, so the checker
    can tell a payload from another agent's or a swapped one."""
    return f"{check_agent_name(agent)}/{job_id}/{epoch}/{digest}"


# The input stream (requests, operator commands: no agent can write it, so no agent can fill it) is
# bounded (see README, "Threat model"): inputs are untrusted and each one that matters is cited by
# an event that keeps its digest, and proposals live on in the payload bucket. Discard NEW: a full stream refuses new inputs (the publisher gets an error, so nothing
# it believes stored is lost) rather than dropping old ones, which may be acknowledged and not yet
# processed. Inputs age out after INPUT_MAX_AGE_S; forensics then say so.
INPUT_MAX_AGE_S = 30 * 24 * 3600.0
INPUT_MAX_BYTES = 4 * 1024 * 1024 * 1024
# The agent input stream: each agent's share is bounded by the ring (agent_input_bound), so its
# max_bytes is only a ceiling for many agents at once, and it discards OLD: a full stream drops the
# oldest agent inputs (long handled, or superseded) instead of refusing every agent's new ones, so
# a busy fleet never stops Warden. WARDEN_AGENT_INPUT_MAX_BYTES / _MAX_AGE_S override them.
AGENT_INPUT_MAX_BYTES = 4 * 1024 * 1024 * 1024
AGENT_INPUT_MAX_AGE_S = INPUT_MAX_AGE_S


def agent_input_max_age_s() -> float:
    override = os.environ.get("WARDEN_AGENT_INPUT_MAX_AGE_S")
    return float(override) if override else AGENT_INPUT_MAX_AGE_S


def agent_input_max_bytes() -> int:
    override = os.environ.get("WARDEN_AGENT_INPUT_MAX_BYTES")
    return int(override) if override else AGENT_INPUT_MAX_BYTES


def input_max_age_s() -> float:
    override = os.environ.get("WARDEN_INPUT_MAX_AGE_S")
    return float(override) if override else INPUT_MAX_AGE_S


def input_max_bytes() -> int:
    override = os.environ.get("WARDEN_INPUT_MAX_BYTES")
    return int(override) if override else INPUT_MAX_BYTES


def duplicate_window_s(max_age_s: float | None) -> float:
    """Nats-Msg-Id dedup window: DUPLICATE_WINDOW_S, but never longer than the stream keeps
    messages (the server refuses a window past max_age)."""
    if max_age_s:
        return min(DUPLICATE_WINDOW_S, max_age_s)
    return DUPLICATE_WINDOW_S


MIN_SERVER_VERSION = (2, 12, 0)  # allow_atomic batches and multi-filter consumers


def stream_configs(replicas: int = 1) -> list[js_api.StreamConfig]:
    common: dict[str, object] = {
        "retention": js_api.RetentionPolicy.LIMITS,
        "storage": js_api.StorageType.FILE,
        "num_replicas": replicas,
        "deny_delete": True,
        "deny_purge": True,
        "allow_direct": True,
    }
    input_max_age = input_max_age_s()
    agent_max_age = agent_input_max_age_s()
    return [
        js_api.StreamConfig(
            name=INPUT_STREAM,
            description="Untrusted input: job requests and operator commands",
            subjects=input_subjects(),
            max_age=input_max_age,
            max_bytes=input_max_bytes(),
            max_msg_size=INPUT_MAX_MSG_BYTES,
            discard=js_api.DiscardPolicy.NEW,
            duplicate_window=duplicate_window_s(input_max_age),
            **common,  # type: ignore[arg-type]
        ),
        js_api.StreamConfig(
            name=AGENT_INPUT_STREAM,
            description="Untrusted input from agents: each subject keeps its latest messages only",
            subjects=agent_input_subjects(),
            max_msgs_per_subject=agent_input_per_subject(),
            max_age=agent_max_age,
            max_bytes=agent_input_max_bytes(),
            max_msg_size=INPUT_MAX_MSG_BYTES,
            discard=js_api.DiscardPolicy.OLD,
            duplicate_window=duplicate_window_s(agent_max_age),
            **common,  # type: ignore[arg-type]
        ),
        js_api.StreamConfig(
            name=EVENT_STREAM,
            description="Authoritative events: one subject per job, agent or rejection",
            subjects=[f"{EVENT_ROOT}.>"],
            allow_atomic=True,
            duplicate_window=DUPLICATE_WINDOW_S,
            **common,  # type: ignore[arg-type]
        ),
        js_api.StreamConfig(
            name=PAYLOAD_STREAM,
            description="Proposal payloads too large for an input message, named by sha256",
            # The object store's layout (chunks, then metadata), so nats-py's object store reads it.
            subjects=[f"$O.{PAYLOAD_BUCKET}.C.>", f"$O.{PAYLOAD_BUCKET}.M.>"],
            max_bytes=int(os.environ.get("WARDEN_PAYLOAD_BUCKET_BYTES") or PAYLOAD_BUCKET_MAX_BYTES),
            discard=js_api.DiscardPolicy.NEW,
            # No rollup: a `Nats-Rollup` header could otherwise wipe every payload at once. Warden
            # writes each object once under a content-addressed name (proposals.put_object).
            allow_rollup_hdrs=False,
            duplicate_window=DUPLICATE_WINDOW_S,
            **common,  # type: ignore[arg-type]
        ),
    ]


def snapshot_stream_config(replicas: int = 1) -> js_api.StreamConfig:
    """The snapshot bucket's stream. Not one of the record's streams (`stream_configs`): what it
    holds may be deleted and purged, and `warden doctor` checks only the record."""
    return js_api.StreamConfig(
        name=SNAPSHOT_STREAM,
        description="Snapshots of the services' view (disposable: the event stream is the truth)",
        subjects=[f"$O.{SNAPSHOT_BUCKET}.C.>", f"$O.{SNAPSHOT_BUCKET}.M.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
        max_bytes=SNAPSHOT_BUCKET_MAX_BYTES,
        discard=js_api.DiscardPolicy.OLD,
        # An object store rewrites an object by rolling up its metadata and purging its old
        # chunks; only the service credential may publish on $O (shared/credentials.py).
        allow_rollup_hdrs=True,
        deny_delete=False,
        deny_purge=False,
        allow_direct=True,
    )


def consumer_config(spec: ConsumerSpec, stream: str) -> js_api.ConsumerConfig:
    """The spec's durable on `stream`, filtering on what that stream stores of its filters."""
    return js_api.ConsumerConfig(
        durable_name=spec.durable,
        filter_subjects=list(stream_filters(spec, stream)),
        ack_policy=js_api.AckPolicy.EXPLICIT,
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_wait=spec.ack_wait_s,
        max_ack_pending=spec.max_ack_pending,
        max_deliver=spec.max_deliver,
    )


def parse_version(text: str) -> tuple[int, int, int]:
    nums = re.findall(r"\d+", text)[:3]
    while len(nums) < 3:
        nums.append("0")
    return (int(nums[0]), int(nums[1]), int(nums[2]))


async def ensure(js: JetStreamContext, server_version: str, replicas: int = 1) -> None:
    """Create or update every stream and consumer; safe to run from every replica at start."""
    if parse_version(server_version) < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        raise TopologyError(
            f"nats-server {server_version} is too old: Warden needs {need} or newer "
            "(atomic batches, multi-filter consumers)"
        )
    await _migrate_agent_inputs(js)
    for config in [*stream_configs(replicas), snapshot_stream_config(replicas)]:
        assert config.name is not None
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        try:
            await js.update_stream(config)
        except APIError as exc:
            raise TopologyError(
                f"stream {config.name} exists with settings Warden cannot change: {exc.description}"
            ) from exc
    for spec in CONSUMERS:
        for stream in consumer_streams(spec):
            await js.add_consumer(stream, consumer_config(spec, stream))


async def _migrate_agent_inputs(js: JetStreamContext) -> None:
    """Before WARDEN_AGENT_INPUT, WARDEN_INPUT stored the agent subjects too. Two streams cannot
    share a subject, so the old stream gives them up first, and its durables stop filtering on
    them (a durable left with no filter there is deleted: its work moved to the agent stream).
    The agent inputs already stored stay in WARDEN_INPUT (it denies delete and purge) until they
    age out, readable by sequence; those no service had read yet are not read any more."""
    try:
        info = await js.stream_info(INPUT_STREAM)
    except NotFoundError:
        return
    agent_subjects = [s for s in info.config.subjects or [] if stream_of(s) == AGENT_INPUT_STREAM]
    if not agent_subjects:
        return
    log.warning("moving agent subjects %s from %s to %s", agent_subjects, INPUT_STREAM, AGENT_INPUT_STREAM)
    for spec in CONSUMERS:
        try:
            await js.consumer_info(INPUT_STREAM, spec.durable)
        except NotFoundError:
            continue
        if stream_filters(spec, INPUT_STREAM):
            await js.add_consumer(INPUT_STREAM, consumer_config(spec, INPUT_STREAM))
        else:
            await js.delete_consumer(INPUT_STREAM, spec.durable)


# JetStream answers these while a cluster forms (no meta leader yet, peers still joining, a
# stream's replicas electing a leader): worth waiting for, unlike a conflicting configuration.
TRANSIENT_ERR_CODES = frozenset({10008, 10023, 10074, 10118})


async def ensure_when_ready(
    js: JetStreamContext, server_version: str, replicas: int = 1, *, timeout: float = 60.0
) -> None:
    """`ensure`, retried while JetStream is not ready yet, so a service started beside a cluster
    that is still forming waits for it (up to `timeout`) instead of crashing."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            await ensure(js, server_version, replicas)
            return
        except (NatsTimeout, NoRespondersError) as exc:
            last: Exception = exc
        except APIError as exc:
            if exc.err_code not in TRANSIENT_ERR_CODES and exc.code != 503:
                raise
            last = exc
        if time.monotonic() > deadline:
            raise TopologyError(f"JetStream was not ready within {timeout}s: {last!r}") from last
        log.warning("JetStream not ready (%r); retrying", last)
        await anyio.sleep(delay)
        delay = min(delay * 2, 2.0)
