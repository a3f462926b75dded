"""Live updates: one watcher per API process follows the read model and fans out to SSE clients.

Updates are driven by the read model, not by the raw stream: a client told about an event can
query the API and find it already folded in. The watcher checks the tracked position a few
times a second (one cheap query, however many clients), reads the new timeline rows, and hands
each client its copy; a client too slow to keep up is dropped and its EventSource reconnects
with Last-Event-ID, which replays what it missed.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from shared.readmodel import ReadModel, queries

log = logging.getLogger("warden.api")

POLL_S = 0.2
PAGE = 1000
CLIENT_BUFFER = 2000
SUMMARY_EVERY_S = 1.0


def sse(update: dict[str, Any]) -> bytes:
    """One server-sent event: data the JSON update, id the stream sequence. The events of a
    packed record share its sequence, so only the record's last one carries the id: a client's
    Last-Event-ID (and `after`) always names a record it received whole."""
    data = msgspec.json.encode({"entry": update["entry"], "job": update["job"]})
    if not update.get("ends_record", True):
        return b"event: timeline\ndata: %s\n\n" % data
    return b"id: %d\nevent: timeline\ndata: %s\n\n" % (update["entry"]["seq"], data)


def updates(rows: list[dict[str, Any]], jobs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Timeline rows (whole records, in order) as live updates, each saying whether it is the
    last of its record."""
    return [
        {
            "entry": row,
            "job": jobs.get(row["job_id"]) if row["job_id"] else None,
            "ends_record": i == len(rows) - 1 or rows[i + 1]["seq"] != row["seq"],
        }
        for i, row in enumerate(rows)
    ]


class Hub:
    def __init__(self, store: ReadModel) -> None:
        self.store = store
        self.position = 0
        self.summary: dict[str, Any] | None = None
        self._clients: set[MemoryObjectSendStream[dict[str, Any]]] = set()
        self._advanced = anyio.Event()
        self._closed = False
        self._summarised = -SUMMARY_EVERY_S
        self._stale = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.position = await anyio.to_thread.run_sync(self.store.position)
        await self.refresh_summary()
        task_status.started()
        while True:
            try:
                await self._step()
                # The summary (for /metrics) scans whole tables: at most once a second.
                if self._stale and anyio.current_time() - self._summarised >= SUMMARY_EVERY_S:
                    await self.refresh_summary()
            except Exception:  # a database hiccup: keep serving, try again shortly
                log.exception("reading the read model for live updates failed")
                await anyio.sleep(1.0)
            await anyio.sleep(POLL_S)

    async def _step(self) -> None:
        position = await anyio.to_thread.run_sync(self.store.position)
        if position <= self.position:
            return
        # With no client the rows would be read for nobody (a client that connects later replays
        # from its own position, `after` or Last-Event-ID, not from the hub's).
        while self._clients and self.position < position:
            rows, jobs = await anyio.to_thread.run_sync(
                queries.timeline_after, self.store, self.position, PAGE
            )
            for update in updates(rows, jobs):
                self._broadcast(update)
            if len(rows) < PAGE:
                break
            self.position = rows[-1]["seq"]
        # Positions of events the timeline does not show (unreadable ones) count as seen too.
        self.position = position
        self._stale = True
        self._advanced.set()
        self._advanced = anyio.Event()

    async def refresh_summary(self) -> dict[str, Any]:
        self._stale = False
        self._summarised = anyio.current_time()
        self.summary = await anyio.to_thread.run_sync(queries.summary, self.store)
        return self.summary

    async def current_summary(self) -> dict[str, Any]:
        """The summary as of the latest position (recomputed now if it is behind)."""
        if self._stale or self.summary is None:
            return await self.refresh_summary()
        return self.summary

    def _broadcast(self, update: dict[str, Any]) -> None:
        for client in list(self._clients):
            try:
                client.send_nowait(update)
            except anyio.WouldBlock:
                log.warning("dropping a live-update client that fell %d events behind", CLIENT_BUFFER)
                self._clients.discard(client)
                client.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._clients.discard(client)
                client.close()  # its reader went away; an unclosed stream warns when collected

    def subscribe(self) -> MemoryObjectReceiveStream[dict[str, Any]]:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](CLIENT_BUFFER)
        if self._closed:
            send.close()
        else:
            self._clients.add(send)
        return receive

    def close(self) -> None:
        """End every live stream (on shutdown), so open SSE responses finish."""
        self._closed = True
        for client in self._clients:
            client.close()
        self._clients.clear()

    async def wait_for(self, position: int, timeout: float) -> bool:
        """True once the read model has folded `position`; False after `timeout` seconds."""
        with anyio.move_on_after(timeout if timeout > 0 else 0):
            while self.position < position:
                await self._advanced.wait()
        return self.position >= position
