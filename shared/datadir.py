"""A data directory's owner: one process runs the embedded server on a directory's store at a time.

The owner holds an exclusive `flock` on `warden.lock` (which names its pid) for as long as it
runs, and publishes where its server listens in `server.json`. The kernel releases the lock when
the owner exits, however it exits (kill -9 included), so a stale lock file never blocks anyone:
only a live owner does. Other processes join the owner's server instead of starting a second
nats-server on the same JetStream store.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK_FILE = "warden.lock"
STATE_FILE = "server.json"
# How long a process that finds the directory owned waits for the owner to publish its server
# (the owner writes server.json once its nats-server is ready, about a second after start).
JOIN_WAIT_S = 20.0


class DirInUse(RuntimeError):
    """Raised when another live process owns the data directory and cannot be joined."""

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class StaleState(RuntimeError):
    """Raised when server.json names a server whose process is gone."""


@dataclass(frozen=True)
class ServerState:
    """What the owner publishes: its server's client URL, its pid and monitoring endpoint."""

    url: str
    pid: int
    monitor_url: str = ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return pid > 0


def read_state(data_dir: Path) -> ServerState | None:
    """The server the directory's owner runs, or None when no server.json is there.

    Raises StaleState when the file names a process that is no longer running."""
    path = data_dir / STATE_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StaleState(f"{path} is unreadable ({exc}); remove it and start `warden up`") from exc
    state = ServerState(
        url=str(info["url"]), pid=int(info.get("pid", 0)), monitor_url=str(info.get("monitor_url", ""))
    )
    if not _alive(state.pid):
        raise StaleState(
            f"{path} names a server (pid {state.pid}) that is no longer running; start `warden up`"
        )
    return state


@dataclass
class Ownership:
    """A held lock on a data directory; `publish` writes server.json for other processes."""

    data_dir: Path
    _lock: IO[str]

    def publish(self, url: str, monitor_url: str) -> None:
        state = self.data_dir / STATE_FILE
        tmp = state.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "monitor_url": monitor_url}))
        tmp.replace(state)  # readers never see half a file

    def release(self) -> None:
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        self._lock.close()  # closing the descriptor releases the flock


def owner_pid(data_dir: Path) -> int:
    try:
        return int((data_dir / LOCK_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def try_own(data_dir: Path) -> Ownership | None:
    """Take the directory's lock, or None when a live process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / LOCK_FILE, "a+", encoding="ascii")  # noqa: SIM115  (held until release)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return Ownership(data_dir, lock)


def wait_for_owner(data_dir: Path, timeout: float = JOIN_WAIT_S) -> ServerState:
    """The server of the live process that owns `data_dir`, once it has published it."""
    deadline = time.monotonic() + timeout
    while True:
        pid = owner_pid(data_dir)
        try:
            state = read_state(data_dir)
        except StaleState:
            state = None  # the previous owner's file; the new owner has not replaced it yet
        if state is not None and state.pid == pid:
            return state
        if time.monotonic() > deadline:
            raise DirInUse(
                f"data dir {data_dir} is owned by warden pid {pid}, which has not published its "
                f"server in {timeout:g}s; stop it or use another --data-dir",
                pid,
            )
        time.sleep(0.1)  # the owner is still starting its server: poll its file with a deadline


@contextmanager
def owned_or_joined(data_dir: Path, *, join: bool) -> Iterator[tuple[Ownership | None, ServerState | None]]:
    """Own the directory (yield (ownership, None)), or, when a live process owns it: join its
    server (yield (None, its state)) if `join`, else raise DirInUse naming the owner."""
    ownership = try_own(data_dir)
    if ownership is None:
        pid = owner_pid(data_dir)
        if not join:
            raise DirInUse(
                f"data dir {data_dir} is in use by warden pid {pid}: stop it, use another --data-dir, "
                "or add services to it with `warden run SERVICE`",
                pid,
            )
        yield None, wait_for_owner(data_dir)
        return
    try:
        yield ownership, None
    finally:
        ownership.release()
