"""The web dashboard in headless Chromium: it loads, and a job submitted now appears and moves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import pytest

from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.cdp import browser_page, find_chromium
from tests.harness import client, submit
from tests.readside import job_request, quick_contract, read_side

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium: found, or installed once when running as root, or a clear skip (a
    failure in CI, where the browser test must run)."""
    found = find_chromium()
    if found is None and os.geteuid() == 0 and os.environ.get("WARDEN_INSTALL_CHROMIUM", "1") == "1":
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env, timeout=900)
        found = find_chromium()
    if found is None:
        reason = "chromium is not installed (apt-get install chromium) and could not be installed here"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def card_in_state(job_id: str, wanted: str) -> str:
    """JavaScript resolving once the job's card shows `wanted`: a MutationObserver, no polling."""
    return f"""
    new Promise((resolve) => {{
      const check = () => {{
        const card = document.querySelector('.job[data-job-id="{job_id}"]');
        if (card && card.dataset.state === "{wanted}" && card.closest('[data-column="{wanted}"]')) {{
          resolve(card.textContent);
          return true;
        }}
        return false;
      }};
      if (!check()) {{
        const observer = new MutationObserver(() => {{ if (check()) observer.disconnect(); }});
        observer.observe(document.body, {{ subtree: true, childList: true, attributes: true }});
      }}
    }})
    """


READY = """
new Promise((resolve) => {
  if (document.body && document.body.dataset.ready === "true") return resolve(true);
  const observer = new MutationObserver(() => {
    if (document.body.dataset.ready === "true") { observer.disconnect(); resolve(true); }
  });
  observer.observe(document.documentElement, { subtree: true, attributes: true, childList: true });
})
"""

FEED_HAS_EXPIRY = """
new Promise((resolve) => {
  const check = () => {
    const item = document.querySelector('#feed li[data-kind="lease.expired"]');
    if (item) { resolve(item.textContent); return true; }
    return false;
  };
  if (!check()) {
    const observer = new MutationObserver(() => { if (check()) observer.disconnect(); });
    observer.observe(document.getElementById("feed"), { childList: true, subtree: true });
  }
})
"""


@pytest.mark.timeout(300)  # the first run may install chromium; the test itself is bounded below
async def test_the_dashboard_shows_a_new_job_and_follows_it_through_its_states(
    nats_server: EmbeddedServer, tmp_path: Path, chromium: str
) -> None:
    store = f"sqlite:///{tmp_path / 'dashboard.sqlite'}"
    async with (
        read_side(nats_server.url, store, api=True, services=["scheduler", "reconciler"]) as side,
        client(nats_server.url) as nc,
        browser_page(chromium) as page,
    ):
        assert side.api is not None
        with anyio.fail_after(60):
            await page.goto(side.api.url + "/")
            assert await page.evaluate(READY) is True
            assert await page.evaluate("document.title") == "Warden"
            columns = await page.evaluate(
                "[...document.querySelectorAll('.column')].map(c => c.dataset.column)"
            )
            assert columns == [
                "queued",
                "leased",
                "proposed",
                "accepted",
                "completed",
                "tombstoned",
                "cancelled",
            ]

            agent = AgentClient(nc, "dozy")
            await agent.register()
            job_id = await submit(
                nc, job_request(kind="dashboard-demo", contract=quick_contract(ttl=1.0, attempts=1))
            )
            text = await page.evaluate(card_in_state(str(job_id), "queued"))
            assert "dashboard-demo" in text

            assert await agent.claim() is not None
            text = await page.evaluate(card_in_state(str(job_id), "leased"))
            assert "dozy" in text

            # The agent never heartbeats: the lease expires and, with one attempt, the job dies.
            await page.evaluate(card_in_state(str(job_id), "tombstoned"))
            feed = await page.evaluate(FEED_HAS_EXPIRY)
            assert "dozy" in feed

            # A job's timeline shows its events with their evidence, straight from the stream.
            await page.evaluate(f"document.querySelector('.job[data-job-id=\"{job_id}\"]').click()")
            types = await page.evaluate(
                """new Promise((resolve) => {
                  const read = () => [...document.querySelectorAll('#detail .timeline li')].map(li => li.dataset.type);
                  const check = () => { const t = read(); if (t.includes('job.tombstoned')) { resolve(t); return true; } return false; };
                  if (!check()) new MutationObserver((m, o) => { if (check()) o.disconnect(); })
                    .observe(document.getElementById('detail'), { childList: true, subtree: true });
                })"""
            )
            assert types[:3] == ["job.requested", "lease.granted", "lease.expired"]
            agents = await page.evaluate(
                "[...document.querySelectorAll('#agents tbody tr')].map(r => r.dataset.agent)"
            )
            assert "dozy" in agents
            points = await page.evaluate("document.querySelectorAll('#latency-chart circle').length")
            assert points >= 1
            if os.environ.get("WARDEN_SCREENSHOT"):
                await page.screenshot(Path(os.environ["WARDEN_SCREENSHOT"]))
        errors = [line for line in page.console if line.startswith("exception")]
        assert errors == []


LOGIN_SHOWN = """
new Promise((resolve) => {
  const form = document.getElementById("login");
  const check = () => { if (!form.hidden) { resolve(document.getElementById("login-message").textContent); return true; } return false; };
  if (!check()) new MutationObserver((m, o) => { if (check()) o.disconnect(); })
    .observe(form, { attributes: true, subtree: true, childList: true });
})
"""


async def test_under_auth_all_the_dashboard_asks_for_a_token_then_reads_and_follows_with_it(
    nats_server: EmbeddedServer, tmp_path: Path, chromium: str
) -> None:
    from shared.tokens import TokenStore, tokens_path

    store = f"sqlite:///{tmp_path / 'dashboard.sqlite'}"
    token_file = tokens_path(tmp_path)
    token = TokenStore(token_file).add("viewer", "client")
    async with (
        read_side(
            nats_server.url, store, api=True, auth="all", tokens=token_file, services=["scheduler"]
        ) as side,
        client(nats_server.url) as nc,
        browser_page(chromium) as page,
    ):
        assert side.api is not None
        with anyio.fail_after(60):
            await page.goto(side.api.url + "/")
            assert await page.evaluate(LOGIN_SHOWN) == "this API needs a token"
            assert await page.evaluate("document.body.dataset.ready") is None
            await page.evaluate("document.getElementById('token').focus()")
            await page.send("Input.insertText", {"text": token})
            await page.evaluate("document.querySelector('#login button').click()")
            await page.goto(side.api.url + "/")  # the tab keeps the token (sessionStorage)
            assert await page.evaluate(READY) is True
            assert await page.evaluate("document.getElementById('login').hidden") is True
            # Live updates arrive over the authenticated stream too.
            job_id = await submit(nc, job_request(kind="behind-login", contract=quick_contract(ttl=5.0)))
            assert "behind-login" in await page.evaluate(card_in_state(str(job_id), "queued"))
        errors = [line for line in page.console if line.startswith("exception")]
        assert errors == []
