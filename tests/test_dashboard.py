"""The web dashboard in headless Chromium: it loads, and a job submitted now appears and moves."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from uuid import UUID

import anyio
import pytest

from shared import bus, topology
from shared.events import AnyEvent
from shared.messages import Accepted, Rejected
from shared.sdk import AgentClient
from shared.server import EmbeddedServer
from tests.cdp import Page, browser_page, find_chromium
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
            reloaded = page.expect_load()
            await page.evaluate("document.querySelector('#login button').click()")
            await reloaded.wait()
            await page.goto(side.api.url + "/")  # the tab keeps the token (sessionStorage)
            assert await page.evaluate(READY) is True
            assert await page.evaluate("document.getElementById('login').hidden") is True
            # Live updates arrive over the authenticated stream too.
            job_id = await submit(nc, job_request(kind="behind-login", contract=quick_contract(ttl=5.0)))
            assert "behind-login" in await page.evaluate(card_in_state(str(job_id), "queued"))
        errors = [line for line in page.console if line.startswith("exception")]
        assert errors == []


# --- acting from the dashboard: deep links, search, approvals, operator actions ---------------


def until(expression: str) -> str:
    """JavaScript resolving with `expression`'s value once it is truthy, re-read on every DOM
    change (a MutationObserver, no polling)."""
    return f"""
    new Promise((resolve) => {{
      const read = () => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }};
      const first = read();
      if (first) return resolve(first);
      new MutationObserver((m, o) => {{ const v = read(); if (v) {{ o.disconnect(); resolve(v); }} }})
        .observe(document.documentElement, {{ subtree: true, childList: true, attributes: true, characterData: true }});
    }})
    """


def text_of(selector: str) -> str:
    return f"(document.querySelector({selector!r}) || {{}}).textContent"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


async def shown(page: Page, selector: str) -> dict[str, float]:
    """The element is drawn: on a screenshot of the viewport, inside it, and on top."""
    where = await page.box(selector)
    width, height = png_size(await page.screenshot())
    assert where["width"] > 0 and where["height"] > 0, f"{selector} has no size: {where}"
    assert where["left"] >= 0 and where["left"] + where["width"] <= width + 1, (selector, where, width)
    assert where["top"] >= 0 and where["top"] + where["height"] <= height + 1, (selector, where, height)
    assert where["hit"], f"{selector} is covered by another element: {where}"
    return where


async def act(page: Page, scope: str, verb: str, reason: str) -> str:
    """Type a reason into an action bar and click one of its buttons: the answer shown."""
    await page.type(f"{scope} .actions .reason", reason)
    await page.click(f"{scope} .actions button[data-verb={verb}]")
    outcome = f"{scope} .actions .action-result"
    return str(
        await page.evaluate(
            until(
                f"['done', 'refused'].includes(document.querySelector({outcome!r}).dataset.outcome)"
                f" && {text_of(outcome)}"
            )
        )
    )


@pytest.mark.timeout(240)
async def test_an_operator_finds_approves_denies_rolls_back_and_suspends_from_the_dashboard(
    nats_server: EmbeddedServer, tmp_path: Path, chromium: str
) -> None:
    from shared.contract import Contract, Scope
    from shared.events import InvariantChecked, JobCompleted, ProposalRejected
    from shared.messages import OperatorCommand
    from shared.sdk import JobContext, Proposal
    from shared.tokens import TokenStore, tokens_path
    from tests import gitrepo
    from tests.harness import events_of, wait_for_event

    repo = gitrepo.make_repo(tmp_path)
    patch, base = gitrepo.patch_for(repo, gitrepo.RENAMED)
    token_file = tokens_path(tmp_path)
    token = TokenStore(token_file).add("alice", "operator")
    store = f"sqlite:///{tmp_path / 'dashboard.sqlite'}"
    services = ["scheduler", "reconciler", "checker", "applier", "revoker"]
    async with (
        read_side(nats_server.url, store, api=True, tokens=token_file, services=services) as side,
        client(nats_server.url) as nc,
        browser_page(chromium) as page,
    ):
        assert side.api is not None
        url = side.api.url
        with anyio.fail_after(150):
            # Two jobs wait for a person: one to approve (a git patch), one to deny.
            careful = AgentClient(nc, "careful")
            await careful.register()
            approve_job = await submit(
                nc,
                job_request(
                    kind="rename", contract=gitrepo.git_contract(repo, approval_required=True, ttl=1.0)
                ),
            )
            grant = await careful.claim()
            assert grant is not None and grant.job_id == approve_job
            reply = await careful.propose(
                JobContext(grant=grant), Proposal(effect="git.patch", patch=patch, base=base)
            )
            assert isinstance(reply, Accepted)
            approve_pid = reply.proposal_id
            hopeful = AgentClient(nc, "hopeful")
            await hopeful.register()
            deny_job = await submit(
                nc,
                job_request(
                    kind="wishful",
                    contract=Contract(
                        scope=Scope(effects=["none"]),
                        approval_required=True,
                        stopping=quick_contract(ttl=1.0, attempts=1).stopping,
                    ),
                ),
            )
            grant = await hopeful.claim()
            assert grant is not None and grant.job_id == deny_job
            reply = await hopeful.propose(JobContext(grant=grant), Proposal(output="please"))
            assert isinstance(reply, Accepted)
            deny_pid = reply.proposal_id
            for job in (approve_job, deny_job):

                def ci_gate_checked(e: AnyEvent, j: UUID = job) -> bool:
                    return (
                        isinstance(e, InvariantChecked) and e.originator_id == j and e.invariant == "ci_gate"
                    )

                await wait_for_event(nc, ci_gate_checked, timeout=60)
            # An operator's typo (over NATS): refused and recorded, yet no failure of the system.
            typo = await bus.request(
                nc,
                topology.operator_subject("approve"),
                OperatorCommand(operator="bob", reason="oops", proposal_id=uuid.uuid4()),
            )
            assert isinstance(typo, Rejected)
            await side.caught_up()

            # The queue lists both, each with approve and deny buttons.
            await page.goto(url + "/")
            assert await page.evaluate(READY) is True
            queued = await page.evaluate(
                until(
                    "document.querySelectorAll('#approvals li.approval').length === 2 && "
                    "[...document.querySelectorAll('#approvals li.approval')].map(li => li.dataset.proposalId)"
                )
            )
            assert set(queued) == {str(approve_pid), str(deny_pid)}
            # While it waits, a lease is held for the decision: past its deadline, never "live".
            await page.goto(f"{url}/jobs/{deny_job}")
            assert await page.evaluate(READY) is True
            held = await page.evaluate(
                until(
                    "document.querySelector('#detail .lease') && document.querySelector('#detail .lease').dataset.liveness"
                )
            )
            assert held == "held"
            assert "awaits approval" in await page.evaluate(text_of("#detail .lease"))
            await page.goto(url + "/")
            assert await page.evaluate(READY) is True
            item = f'#approvals li[data-proposal-id="{approve_pid}"]'
            await shown(page, f"{item} button[data-verb=approve]")
            await shown(page, f"{item} button[data-verb=deny]")
            # Not signed in: the action asks for a token instead of sending one.
            assert "sign in" in await act(page, item, "approve", "looks right")
            assert await page.evaluate(LOGIN_SHOWN) == "operator actions need an operator token"
            await page.type("#token", token)
            reloaded = page.expect_load()
            await page.click("#login button[type=submit]")
            await reloaded.wait()
            assert await page.evaluate(READY) is True  # reloaded, the token kept for the tab
            assert await page.evaluate("location.href.includes('wdn_')") is False, "a token in the URL"
            await shown(page, "#signed-in")

            # A reason is required; then the approval is recorded as alice's.
            await page.click(f"{item} button[data-verb=approve]")
            assert await page.evaluate(text_of(f"{item} .action-result")) == "a reason is required"
            answer = await act(page, item, "approve", "reviewed the rename")
            assert "approved by alice" in answer, answer
            text = await page.evaluate(card_in_state(str(approve_job), "completed"))
            assert "rename" in text
            deny_item = f'#approvals li[data-proposal-id="{deny_pid}"]'
            # The approved one leaves the queue (the list moves up): act once it has.
            gone = f"!document.querySelector('#approvals li[data-proposal-id=\"{approve_pid}\"]')"
            assert await page.evaluate(until(gone)) is True
            assert "denied" in await act(page, deny_item, "deny", "not this week")
            rejected = await wait_for_event(nc, lambda e: isinstance(e, ProposalRejected), timeout=20)
            assert isinstance(rejected, ProposalRejected) and rejected.by == "alice"
            assert rejected.violations == ["denied by alice: not this week"]
            assert await page.evaluate(until("document.querySelector('#approvals li.empty') && true")) is True

            # The failures feed shows the rejected proposal, not the operator's typo.
            feed = await page.evaluate(
                until(
                    "document.querySelector('#feed li[data-kind=\"proposal.rejected\"]')"
                    " && document.querySelector('#feed').textContent"
                )
            )
            assert "denied by alice" in feed
            kinds = await page.evaluate(
                "[...document.querySelectorAll('#feed li')].map(li => li.dataset.kind)"
            )
            assert "input.rejected" not in kinds

            # A job's own address: the drawer opens from it and survives a reload.
            await page.goto(f"{url}/jobs/{approve_job}")
            assert await page.evaluate(READY) is True
            drawn = await page.evaluate(
                until(
                    "document.querySelector('#detail:not([hidden]) [data-detail-state]') && "
                    + text_of("#detail [data-detail-state]")
                )
            )
            assert drawn.startswith("state completed"), drawn
            await shown(page, "#detail .proposal button[data-verb=rollback]")
            answer = await act(page, "#detail .proposal", "rollback", "the rename broke a user")
            assert "rollback" in answer and "refused" not in answer, answer
            # Rolled back: on the card and in the drawer, not just "completed".
            await page.evaluate(
                until(f"document.querySelector('.job[data-job-id=\"{approve_job}\"][data-rollback=done]')")
            )
            badge = await page.evaluate(
                until(
                    "[...document.querySelectorAll('#detail .badge.rollback')].map(b => b.textContent).join(' ').includes('rolled back') && true"
                )
            )
            assert badge is True
            await page.goto(f"{url}/jobs/{approve_job}")  # reload
            assert await page.evaluate(READY) is True
            assert "rolled back" in await page.evaluate(until(text_of("#detail .badges")))
            await shown(page, "#detail .badges .badge.rollback")
            await page.click("#close-detail")
            assert await page.evaluate(until("document.getElementById('detail').hidden")) is True
            assert await page.evaluate("location.pathname") == "/"
            await shown(page, f'.job[data-job-id="{approve_job}"] .badge.rollback')
            await page.evaluate("history.back()")  # the drawer's address is in the history
            assert await page.evaluate(until(f"location.pathname === '/jobs/{approve_job}'")) is True
            assert await page.evaluate(until("!document.getElementById('detail').hidden")) is True

            # Lease liveness: the denied job's lease was held for the decision, then ended; a
            # lease is never "live" past its deadline.
            await page.click('#feed li[data-kind="proposal.rejected"] a')
            assert await page.evaluate(until(f"location.pathname === '/jobs/{deny_job}'")) is True
            liveness = await page.evaluate(
                until(
                    f"document.querySelector('#detail h2').textContent.includes('{deny_job}') && "
                    "document.querySelectorAll('#detail .lease').length && "
                    "[...document.querySelectorAll('#detail .lease')].map(l => l.dataset.liveness)"
                )
            )
            assert liveness == ["rejected"]

            # The agent's page: its address, its leases, an action and its level history.
            await page.click("#detail .lease a")
            assert await page.evaluate(until("location.pathname === '/agents/hopeful'")) is True
            assert (
                await page.evaluate(until("document.querySelector('[data-agent-page=hopeful]') && true"))
                is True
            )
            assert (
                await page.evaluate(
                    f"document.querySelectorAll('#detail .lease[data-job-id=\"{deny_job}\"]').length"
                )
                == 1
            )
            assert "suspend" in await act(page, "#detail", "suspend", "paging alice")
            assert (
                await page.evaluate(
                    until("document.querySelector('[data-detail-standing=suspended]') && true")
                )
                is True
            )
            answer = await act(page, "#detail", "promote", "earned it")
            assert "refused" not in answer, answer
            changes = await page.evaluate(
                until(
                    "document.querySelectorAll('#detail .levels li').length && "
                    "[...document.querySelectorAll('#detail .levels li')].map(li => li.textContent)"
                )
            )
            assert "earned it" in changes[-1] and "alice" in changes[-1]
            await page.goto(url + "/agents/hopeful")  # the agent's address survives a reload
            assert (
                await page.evaluate(
                    until(
                        "document.querySelector('[data-agent-page=hopeful] ') && "
                        "document.querySelector('[data-detail-standing]').dataset.detailStanding"
                    )
                )
                == "suspended"
            )

            # An address naming nothing says so (no blank drawer, no exception).
            await page.goto(f"{url}/jobs/{uuid.uuid4()}")
            missing = await page.evaluate(until(text_of("#detail .missing")))
            assert "no job" in missing and "in the read model" in missing
            await page.goto(f"{url}/agents/nobody")
            assert "no agent nobody" in await page.evaluate(until(text_of("#detail .missing")))

            # Search: many jobs, found by id prefix, kind, agent and state, and paged through.
            for i in range(30):
                await submit(nc, job_request(kind=f"bulk-{i % 3}", contract=quick_contract(ttl=30.0)))
            await side.caught_up()
            await page.goto(url + "/")
            assert await page.evaluate(READY) is True
            total = "parseInt(document.getElementById('page-info').textContent.split(' of ')[1])"
            assert await page.evaluate(until(f"{total} === 32 && {total}")) == 32
            await page.click("#page-next")
            assert (
                await page.evaluate(
                    until(
                        "location.search === '?page=2' && document.getElementById('page-info').textContent.endsWith('page 2 of 2') && document.querySelectorAll('#job-list tbody tr').length"
                    )
                )
                == 7
            )
            await page.goto(url + "/?page=2")  # the page is in the address
            assert await page.evaluate(READY) is True
            assert await page.evaluate("document.querySelectorAll('#job-list tbody tr').length") == 7
            await page.type("#search-q", str(deny_job)[:8])
            rows = await page.evaluate(
                until(
                    "document.querySelectorAll('#job-list tbody tr').length === 1 && "
                    "[...document.querySelectorAll('#job-list tbody tr')].map(r => r.dataset.jobId)"
                )
            )
            assert rows == [str(deny_job)]
            assert await page.evaluate("location.search") == f"?q={str(deny_job)[:8]}"
            await page.evaluate("document.getElementById('search-q').select()")
            await page.send("Input.insertText", {"text": "BULK-1"})
            assert await page.evaluate(until(f"{total} === 10 && {total}")) == 10
            await page.evaluate("document.getElementById('search-q').select()")
            await page.send("Input.insertText", {"text": "careful"})
            rows = await page.evaluate(
                until(
                    f"{total} === 1 && [...document.querySelectorAll('#job-list tbody tr')].map(r => r.dataset.jobId)"
                )
            )
            assert rows == [str(approve_job)]
            await page.evaluate("document.getElementById('search-q').select()")
            await page.send("Input.insertText", {"text": " "})
            await page.evaluate(
                "{ const s = document.getElementById('search-state'); s.value = 'cancelled'; s.dispatchEvent(new Event('change')); }"
            )
            assert (
                await page.evaluate(
                    until(
                        f"document.getElementById('page-info').textContent.startsWith('0–0 of 0') && {total} === 0"
                    )
                )
                is True
            )
            await page.evaluate(
                "{ const s = document.getElementById('search-state'); s.value = 'completed'; s.dispatchEvent(new Event('change')); }"
            )
            rows = await page.evaluate(
                until(
                    f"{total} === 1 && [...document.querySelectorAll('#job-list tbody tr')].map(r => r.dataset.jobId)"
                )
            )
            assert rows == [str(approve_job)]
            await shown(page, "#job-list tbody tr a")
            if os.environ.get("WARDEN_SCREENSHOT"):
                await page.screenshot(Path(os.environ["WARDEN_SCREENSHOT"]))
            done = [e for e in await events_of(nc) if isinstance(e, JobCompleted)]
            assert [e.originator_id for e in done] == [approve_job]
        errors = [line for line in page.console if line.startswith("exception")]
        assert errors == []
