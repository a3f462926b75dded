"""A minimal Chrome DevTools Protocol client: launch headless Chromium, drive one page.

Only what the dashboard test needs: open a page, evaluate JavaScript (awaiting promises), and
take a screenshot. Chromium runs with the flags this sandboxed, offline machine needs.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import anyio
from websockets.asyncio.client import ClientConnection, connect

FLAGS = (
    "--headless",
    "--remote-debugging-port=0",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1400,1000",
)


def find_chromium() -> str | None:
    for candidate in (os.environ.get("WARDEN_CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


class CDPError(RuntimeError):
    """Raised when the browser answers a command with an error, or a script throws."""


class Page:
    def __init__(self, ws: ClientConnection, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self._ids = itertools.count(1)
        self._pending: dict[int, anyio.Event] = {}
        self._results: dict[int, dict[str, Any]] = {}
        self.console: list[str] = []
        self._waiters: dict[str, list[anyio.Event]] = {}

    async def _reader(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if "id" in message and message["id"] in self._pending:
                self._results[message["id"]] = message
                self._pending.pop(message["id"]).set()
            for waiter in self._waiters.pop(message.get("method", ""), []):
                waiter.set()
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif message.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(message["params"]["exceptionDetails"])[:500])

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True
    ) -> dict[str, Any]:
        call_id = next(self._ids)
        done = self._pending[call_id] = anyio.Event()
        payload: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session:
            payload["sessionId"] = self.session_id
        await self.ws.send(json.dumps(payload))
        await done.wait()
        reply = self._results.pop(call_id)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression; promises are awaited."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise CDPError(f"script failed: {json.dumps(result['exceptionDetails'])[:800]}")
        return result["result"].get("value")

    def expect_load(self) -> anyio.Event:
        """An event set by the page's next load (register it before what navigates)."""
        loaded = anyio.Event()
        self._waiters.setdefault("Page.loadEventFired", []).append(loaded)
        return loaded

    async def goto(self, url: str) -> None:
        """Navigate and wait for the page's load event."""
        loaded = anyio.Event()
        self._waiters.setdefault("Page.loadEventFired", []).append(loaded)
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        await loaded.wait()

    async def screenshot(self, path: Path | None = None) -> bytes:
        """The viewport as PNG bytes (also written to `path` when given)."""
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(shot["data"])
        if path is not None:
            await anyio.Path(path).write_bytes(data)
        return data

    async def box(self, selector: str) -> dict[str, float]:
        """Where the first element matching `selector` is drawn, scrolled into view: its box in
        viewport pixels, and whether it is what a click at its centre would hit (not hidden,
        covered or outside the viewport)."""
        found = await self.evaluate(
            f"""(() => {{
              const node = document.querySelector({json.dumps(selector)});
              if (!node) return null;
              node.scrollIntoView({{ block: "center", inline: "center" }});
              const r = node.getBoundingClientRect();
              const x = r.left + r.width / 2, y = r.top + r.height / 2;
              const hit = document.elementFromPoint(x, y);
              return {{ x, y, width: r.width, height: r.height, left: r.left, top: r.top,
                        hit: Boolean(hit && (hit === node || node.contains(hit))) }};
            }})()"""
        )
        if found is None:
            raise CDPError(f"no element matches {selector}")
        result: dict[str, float] = found
        return result

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (what a person's click does)."""
        where = await self.box(selector)
        if not where["hit"]:
            raise CDPError(f"{selector} is not clickable: covered, hidden or out of view ({where})")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": where["x"], "y": where["y"], "button": "left", "clickCount": 1},
            )

    async def type(self, selector: str, text: str) -> None:
        """Click into a field and type `text` into it, as keyboard input."""
        await self.click(selector)
        await self.send("Input.insertText", {"text": text})


@asynccontextmanager
async def browser_page(executable: str) -> AsyncIterator[Page]:
    """A fresh headless Chromium (its own profile) with one blank page attached."""
    profile = tempfile.mkdtemp(prefix="warden-chromium-")
    # Popen returns at once (it does not wait for the browser); its stderr is read in a thread.
    process = subprocess.Popen(  # noqa: ASYNC220
        [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = await anyio.to_thread.run_sync(_devtools_endpoint, process)
        async with connect(endpoint, max_size=64 * 1024 * 1024) as ws, anyio.create_task_group() as tg:
            page = Page(ws, "")
            tg.start_soon(page._reader)
            target = await page.send("Target.createTarget", {"url": "about:blank"}, session=False)
            attached = await page.send(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False
            )
            page.session_id = attached["sessionId"]
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            yield page
            tg.cancel_scope.cancel()
    finally:
        process.terminate()
        try:
            await anyio.to_thread.run_sync(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def _drain(pipe: IO[str]) -> None:
    """Read to the end (the browser's exit), then close: a pipe left open warns when collected."""
    with pipe:
        for _ in pipe:
            pass


def _devtools_endpoint(process: subprocess.Popen[str], deadline_s: float = 30.0) -> str:
    """Chromium prints its DevTools websocket address on stderr once it listens."""
    assert process.stderr is not None
    stderr = process.stderr
    # A browser that never starts is killed, which ends the read below.
    watchdog = threading.Timer(deadline_s, process.kill)
    watchdog.start()
    seen = []
    try:
        for line in stderr:
            seen.append(line)
            if "DevTools listening on" in line:
                # Keep draining, or a chatty browser blocks on a full pipe.
                threading.Thread(target=_drain, args=(stderr,), daemon=True).start()
                return line.split("DevTools listening on", 1)[1].strip()
        stderr.close()
    finally:
        watchdog.cancel()
    raise CDPError("chromium exited before DevTools listened:\n" + "".join(seen[-20:]))
