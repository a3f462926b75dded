"""Did Warden write this? The one test every reader of the event stream applies to a message.

NATS permissions let only the service credential publish on `warden.evt.>`; this is defence in
depth against a compromised or buggy writer. A message is Warden's event when it carries the
writer headers the recorder puts on every event (`Warden-Originator`, `Warden-Version`,
`Warden-Topic`), sits on the subject of the aggregate its originator header names, and its
payload decodes as a Warden event that says the same originator, version and type as the
headers (a packed record, several events of one aggregate in one message, holds events that
each say the originator, and the version and type its headers give them in turn: see
shared/persistence/jetstream.py). Anything else is foreign, the whole message: readers step over it and say so, naming its stream sequence;
it is never folded, never counted as an aggregate's version, and never wedges a write.

No separate writer header is added: it would be as forgeable as these three by anyone who can
publish there, and streams written before it would lack it. What a forger with valid headers and
a valid payload cannot fake is the hash chain: `warden ledger verify` catches that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

import msgspec
from eventsourcing.persistence import StoredEvent

from shared import topology
from shared.events import AnyEvent, decode, tag_of, unpack
from shared.persistence.jetstream import (
    ORIGINATOR_HEADER,
    TOPIC_HEADER,
    TOPIC_SEPARATOR,
    VERSION_HEADER,
    VERSIONS_HEADER,
)

WRITER_HEADERS = (ORIGINATOR_HEADER, VERSION_HEADER, TOPIC_HEADER)
_EVENT_PREFIX = topology.EVENT_ROOT + "."


def is_aggregate_subject(subject: str) -> bool:
    """`warden.evt.<one token>`: an aggregate's events (tracking records and snapshots have more)."""
    return subject.startswith(_EVENT_PREFIX) and "." not in subject[len(_EVENT_PREFIX) :]


@dataclass(frozen=True, slots=True)
class Written:
    """One Warden event of a stored message, and its bytes as stored (what its digest, and so
    its successor's `prev_hash`, is taken of): the whole message unless it is packed."""

    event: AnyEvent
    data: bytes


def events_of(subject: str, headers: Mapping[str, str] | None, data: bytes) -> list[AnyEvent] | str:
    """The Warden events this stored message holds (one, or a packed record's several), in
    order, or (a string) why it is not Warden's. Every reader of raw event messages asks here."""
    found = written_of(subject, headers, data)
    return found if isinstance(found, str) else [w.event for w in found]


def written_of(subject: str, headers: Mapping[str, str] | None, data: bytes) -> list[Written] | str:
    """`events_of`, with each event's bytes as stored (for the ledger and forensics)."""
    headers = headers or {}
    versions = headers.get(VERSIONS_HEADER)
    if versions is None:
        event = _one_event_of(subject, headers, data)
        return event if isinstance(event, str) else [Written(event, data)]
    if problem := _header_problem(subject, headers):
        return problem
    originator = headers[ORIGINATOR_HEADER]
    first_text, _, last_text = versions.partition("-")
    try:
        first, last = int(first_text), int(last_text)
        if int(headers[VERSION_HEADER]) != last:
            raise ValueError(f"{VERSION_HEADER} is not the last of {VERSIONS_HEADER}")
    except ValueError:
        return f"Warden writer headers that do not parse ({_shown(headers)}, {VERSIONS_HEADER}: {versions[:40]!r})"
    topics = headers[TOPIC_HEADER].split(TOPIC_SEPARATOR)
    try:
        elements = unpack(data)
    except msgspec.DecodeError as exc:
        return f"a packed payload that is not a list of Warden events ({exc})"
    if not len(topics) == len(elements) == last - first + 1 > 1:
        return (
            f"a packed record of {len(elements)} event(s) under {VERSIONS_HEADER} {versions[:40]!r} "
            f"and {len(topics)} topic(s)"
        )
    out: list[Written] = []
    for offset, (topic, element) in enumerate(zip(topics, elements, strict=True)):
        event = _decoded(element)
        if isinstance(event, str):
            return f"element {offset} of a packed record: {event}"
        if str(event.originator_id) != originator:
            return f"a payload of aggregate {event.originator_id} under {ORIGINATOR_HEADER} {originator}"
        if problem := _disagreement(event, event.originator_id, first + offset, topic):
            return f"element {offset} of a packed record: {problem}"
        out.append(Written(event, element))
    return out


def _header_problem(subject: str, headers: Mapping[str, str]) -> str | None:
    """Why a message's writer headers are not Warden's for this subject, or None."""
    missing = [name for name in WRITER_HEADERS if name not in headers]
    if missing:
        return f"no Warden writer header ({', '.join(missing)} missing)"
    # Compared as text, as the recorder writes them (parsing a UUID per event costs more than
    # decoding a small one: this runs on every event every service folds).
    originator = headers[ORIGINATOR_HEADER]
    if subject != _EVENT_PREFIX + originator:
        return f"{ORIGINATOR_HEADER} {originator[:40]!r} on another subject than that aggregate's"
    return None


def _one_event_of(subject: str, headers: Mapping[str, str], data: bytes) -> AnyEvent | str:
    """The Warden event a stored message of one event (not packed) is, or why it is not one."""
    if problem := _header_problem(subject, headers):
        return problem
    originator = headers[ORIGINATOR_HEADER]
    try:
        version = int(headers[VERSION_HEADER])
    except ValueError:
        return f"Warden writer headers that do not parse ({_shown(headers)})"
    event = _decoded(data)
    if isinstance(event, str):
        return event
    if str(event.originator_id) != originator:
        return f"a payload of aggregate {event.originator_id} under {ORIGINATOR_HEADER} {originator}"
    return _disagreement(event, event.originator_id, version, headers[TOPIC_HEADER]) or event


def stored_event_of(stored: StoredEvent) -> AnyEvent | str:
    """The Warden event a recorder's stored event (or notification) is, or why it is not one.

    The recorder has already checked its headers and subject; this checks its payload."""
    if not isinstance(stored.originator_id, UUID):
        return f"originator {stored.originator_id!r} is not a UUID"
    event = _decoded(stored.state)
    if isinstance(event, str):
        return event
    return _disagreement(event, stored.originator_id, stored.originator_version, stored.topic) or event


def foreign_reason(stored: StoredEvent) -> str | None:
    """The recorder's payload check (`WARDEN_EVENT_CHECK`): why a stored event is not Warden's,
    or None. It keeps such a record out of an aggregate's events and out of its head, so the
    mapper never sees it and the next write still lands."""
    event = stored_event_of(stored)
    return event if isinstance(event, str) else None


def _decoded(data: bytes) -> AnyEvent | str:
    try:
        return decode(data)
    except msgspec.DecodeError as exc:  # ValidationError too: an unknown type, a missing field
        return f"a payload that is not a Warden event ({exc})"


def _disagreement(event: AnyEvent, originator: UUID, version: int, topic: str) -> str | None:
    if tag_of(event) != topic:
        return f"{TOPIC_HEADER} {topic!r} on a {tag_of(event)!r} payload"
    if event.originator_id != originator:
        return f"a payload of aggregate {event.originator_id} under {ORIGINATOR_HEADER} {originator}"
    if event.originator_version != version:
        return f"a payload of version {event.originator_version} under {VERSION_HEADER} {version}"
    return None


def _shown(headers: Mapping[str, str]) -> str:
    return ", ".join(f"{name}: {headers[name][:40]!r}" for name in WRITER_HEADERS)
