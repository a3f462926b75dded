"""Liveness responders survive a broker outage in the middle of their start-up.

Found by `warden chaos` (seed 2026, 200 jobs): a restarted applier was registering its ping
responder when the broker was killed; the responder's confirming flush timed out and the whole
service process exited 1 with a traceback. The broker is frozen (SIGSTOP) so the flush's PING
is sent and never answered, then killed and started again on its port and store.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest

from shared import bus, liveness
from shared.server import EmbeddedServer
from tests.harness import client


@pytest.mark.slow
async def test_a_responder_registering_across_a_broker_restart_starts_and_answers(tmp_path: Path) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "nats", name="live").start()
    try:
        nc = await bus.connect(server.url, "svc")
        try:
            assert server.process is not None
            os.kill(server.process.pid, signal.SIGSTOP)  # connected, silent: the PING goes unanswered
            async with anyio.create_task_group() as tg:

                async def outage() -> None:
                    await anyio.sleep(0.5)  # the responder is mid-start, waiting on its flush
                    await anyio.to_thread.run_sync(server.kill)
                    await anyio.to_thread.run_sync(server.start)  # same port, same store

                tg.start_soon(outage)
                with anyio.fail_after(60):
                    await tg.start(liveness.serve, nc, ["applier"])
                async with client(server.url) as other:
                    with anyio.fail_after(30):
                        answer = None
                        while answer is None:
                            answer = await liveness.ping(other, "applier", timeout=1.0)
                assert answer["metadata"]["service"] == "applier"
                assert answer["metadata"]["pid"] == str(os.getpid())
                tg.cancel_scope.cancel()
        finally:
            await nc.close()
    finally:
        server.stop()
