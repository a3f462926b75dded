// Warden dashboard: plain JS over the read API. Loads once, then follows /api/events/stream.
// Under `--auth all` it asks for a token once per tab (sessionStorage) and sends it on every call;
// operator actions need an operator token, asked for the same way (never put in the URL).
// Addresses: / (its query string holds the job search), /jobs/ID and /agents/NAME (the drawer).
"use strict";

const STATES = ["queued", "leased", "proposed", "accepted", "completed", "tombstoned", "cancelled"];
const FAILURE_TYPES = new Set(["lease.expired", "message.rejected", "input.rejected", "job.tombstoned", "effect.failed"]);
const AGENT_TYPES_PREFIX = "agent.";
const MAX_CARDS_PER_COLUMN = 200;

const PAGE_SIZE = 25;
const SINCE = { "": null, "15m": 15 * 60e3, "1h": 3600e3, "24h": 24 * 3600e3, "7d": 7 * 24 * 3600e3 };

const state = { position: 0, jobs: new Map(), openJob: null, openAgent: null, refreshTimer: null, searchTimer: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// --- the API token (needed for reads under `--auth all`), kept for this tab only ----------

const TOKEN_KEY = "warden.token";

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askForToken(message) {
  const form = document.getElementById("login");
  form.hidden = false;
  document.getElementById("login-message").textContent = message;
  const connection = document.getElementById("connection");
  connection.dataset.state = "reconnecting";
  connection.textContent = "signed out";
}

function setUpLogin() {
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    location.reload();  // the address (a job, an agent, a search) is kept
  });
  document.getElementById("show-login").addEventListener("click", () => {
    const form = document.getElementById("login");
    form.hidden = false;
    document.getElementById("login-message").textContent = "operator token";
    document.getElementById("token").focus();
  });
  document.getElementById("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  const signedIn = Boolean(sessionStorage.getItem(TOKEN_KEY));
  document.getElementById("show-login").hidden = signedIn;
  document.getElementById("signed-in").hidden = !signedIn;
}

class Unauthorized extends Error {}
class NotFound extends Error {}

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json", ...authHeaders() } });
  if (response.status === 401) {
    askForToken(sessionStorage.getItem(TOKEN_KEY) ? "that token was refused" : "this API needs a token");
    throw new Unauthorized(`${path}: 401`);
  }
  if (response.status === 404) throw new NotFound(`${path}: 404`);
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function shortId(id) { return id ? id.slice(0, 8) : "–"; }
function when(iso) { return iso ? iso.replace("T", " ").slice(5, 19) : ""; }
function ms(value) { return value === null || value === undefined ? "–" : `${Math.round(value)} ms`; }

// --- jobs board -------------------------------------------------------------------------

function buildBoard() {
  const board = document.getElementById("board");
  board.replaceChildren(
    ...STATES.map((s) =>
      el("div", { class: "column", "data-column": s },
        el("h3", {}, s, el("span", { class: "count" }, "0")),
        el("div", { class: "cards-list" })))
  );
}

function jobCard(job) {
  const agent = job.agent ? `${job.agent} · epoch ${job.epoch}` : "unleased";
  return el("div", {
    class: "job", "data-job-id": job.job_id, "data-state": job.state, title: job.reason || job.job_id,
    "data-rollback": job.rollback || null, "data-awaiting": job.awaiting_approval ? "true" : null,
    onclick: () => navigate(jobPath(job.job_id)),
  },
    el("div", {}, el("span", { class: "kind" }, job.kind), " ", el("span", { class: "id" }, shortId(job.job_id))),
    el("div", { class: "muted" }, agent, ` · ${job.attempts}/${job.max_attempts}`),
    jobBadges(job));
}

// What a job's state alone does not say: a rollback, a wait for a person.
function jobBadges(job) {
  const badges = [];
  if (job.rollback === "done") badges.push(el("span", { class: "badge rollback" }, "rolled back"));
  else if (job.rollback === "requested") badges.push(el("span", { class: "badge rollback" }, "rollback requested"));
  else if (job.rollback === "failed") badges.push(el("span", { class: "badge fail" }, "rollback failed"));
  if (job.awaiting_approval) badges.push(el("span", { class: "badge approval" }, "awaiting approval"));
  return badges.length ? el("div", { class: "badges" }, badges) : null;
}

function placeJob(job, flash = false) {
  const previous = state.jobs.get(job.job_id);
  if (previous && previous.seq > job.seq) return; // an older snapshot than the one shown
  state.jobs.set(job.job_id, job);
  const existing = document.querySelector(`.job[data-job-id="${CSS.escape(job.job_id)}"]`);
  const card = jobCard(job);
  if (flash) card.classList.add("flash");
  const column = document.querySelector(`.column[data-column="${job.state}"] .cards-list`);
  if (!column) return;
  if (existing) existing.remove();
  column.prepend(card);
  while (column.children.length > MAX_CARDS_PER_COLUMN) column.lastChild.remove();
  countColumns();
}

function countColumns() {
  for (const column of document.querySelectorAll(".column")) {
    column.querySelector(".count").textContent = String(column.querySelectorAll(".job").length);
  }
}

// --- panels -----------------------------------------------------------------------------

function renderSummary(summary) {
  const s = summary;
  const cards = [
    ["jobs", s.jobs.total],
    ...STATES.filter((st) => s.jobs.by_state[st]).map((st) => [st, s.jobs.by_state[st]]),
    ["detection p50", ms(s.detection_latency_ms.p50)],
    ["detection p99", ms(s.detection_latency_ms.p99)],
    ["failures", Object.values(s.failures).reduce((a, b) => a + b, 0)],
    ["revocations", Object.values(s.revocations.by_kind).reduce((a, b) => a + b, 0)],
    ["accepted", s.decisions.accepted || 0],
    ["rejected", s.decisions.rejected || 0],
  ];
  document.getElementById("summary").replaceChildren(
    ...cards.map(([label, value]) =>
      el("div", { class: "card", "data-metric": label }, el("div", { class: "value" }, value), el("div", { class: "label" }, label)))
  );
  document.getElementById("latency-stats").textContent =
    `${s.detection_latency_ms.count} expiries · p50 ${ms(s.detection_latency_ms.p50)} · p99 ${ms(s.detection_latency_ms.p99)} · max ${ms(s.detection_latency_ms.max)}`;
}

function renderAgents(page) {
  const body = document.querySelector("#agents tbody");
  body.replaceChildren(
    ...page.items.map((a) =>
      el("tr", { "data-agent": a.name },
        el("td", {}, link(agentPath(a.name), a.name)),
        el("td", {}, el("span", { class: "level" }, a.level)),
        el("td", { class: `standing-${a.standing}`, title: a.standing_reason }, a.standing),
        el("td", {}, a.leases), el("td", {}, a.completed), el("td", {}, a.expired),
        el("td", {}, a.revoked), el("td", {}, a.rejected)))
  );
}

function renderFeed(failures, revocations) {
  const items = [
    ...failures.items.map((f) => ({ ...f, cls: "failure" })),
    ...revocations.items.map((r) => ({ ...r, cls: "revocation" })),
  ].sort((a, b) => b.seq - a.seq).slice(0, 60);
  document.getElementById("feed").replaceChildren(
    ...items.map((item) =>
      el("li", { class: item.cls, "data-kind": item.kind, "data-seq": item.seq },
        el("span", { class: "when" }, when(item.at)),
        el("span", { class: "tag" }, item.kind),
        el("span", {},
          item.agent ? `${item.agent} ` : "",
          item.job_id ? link(jobPath(item.job_id), shortId(item.job_id)) : "",
          " ", item.reason || "",
          item.latency_ms !== null && item.latency_ms !== undefined ? ` (${ms(item.latency_ms)})` : "")))
  );
}

function renderChart(points, summary) {
  const svg = document.getElementById("latency-chart");
  const W = 600, H = 220, left = 44, bottom = 20, top = 10;
  const NS = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  svg.replaceChildren();
  const max = Math.max(10, ...points.map((p) => p.latency_ms)) * 1.1;
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  const x = (i) => left + (W - left - 10) * (points.length <= 1 ? 0.5 : i / (points.length - 1));
  svg.append(node("line", { class: "axis", x1: left, y1: top, x2: left, y2: H - bottom }));
  svg.append(node("line", { class: "axis", x1: left, y1: H - bottom, x2: W - 10, y2: H - bottom }));
  for (const tick of [0, max / 2, max]) {
    svg.append(node("text", { x: 4, y: y(tick) + 3 }, `${Math.round(tick)} ms`));
  }
  points.forEach((p, i) => {
    const dot = node("circle", { class: "point", cx: x(i), cy: y(p.latency_ms), r: 3 });
    dot.append(node("title", {}, `${p.agent} · ${shortId(p.job_id)} · ${ms(p.latency_ms)}`));
    svg.append(dot);
  });
  for (const [name, value] of [["p50", summary.detection_latency_ms.p50], ["p99", summary.detection_latency_ms.p99]]) {
    if (value === null) continue;
    svg.append(node("line", { class: name, x1: left, y1: y(value), x2: W - 10, y2: y(value) }));
    svg.append(node("text", { x: W - 40, y: y(value) - 3 }, name));
  }
  if (!points.length) svg.append(node("text", { x: W / 2 - 60, y: H / 2 }, "no lease has expired yet"));
}

// --- job detail -------------------------------------------------------------------------

const section = (title, rows) => rows.length ? [el("h3", {}, title), ...rows] : [];

async function openJob(jobId) {
  state.openJob = jobId;
  state.openAgent = null;
  let job;
  try {
    job = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
  } catch (err) {
    if (err instanceof NotFound) return showMissing(`no job ${jobId} in the read model (yet)`);
    throw err;
  }
  if (state.openJob !== jobId) return;
  redrawDrawer(
    el("h2", {}, `${job.kind} `, el("span", { class: "muted" }, job.job_id)),
    ...(job.trace_url ? [el("p", {}, el("a", { href: job.trace_url, target: "_blank", rel: "noopener", "data-trace-link": job.trace_id }, "open this job's trace"))] : []),
    el("p", { "data-detail-state": job.state }, `state ${job.state} · attempts ${job.attempts}/${job.max_attempts}`,
      job.reason ? ` · ${job.reason}` : ""),
    jobBadges(job),
    actionBar("job", { job_id: job.job_id }, ["requeue", "cancel"]),
    ...section("Leases", job.leases.map((l) =>
      el("div", { class: "lease", "data-epoch": l.epoch, "data-liveness": leaseLiveness(job, l) },
        `epoch ${l.epoch} · `, link(agentPath(l.agent), l.agent), ` · granted ${when(l.granted_at)} · `,
        leaseLabel(job, l)))),
    ...section("Proposals", job.proposals.map((p) => proposalRow(job, p))),
    ...section("Failures", job.failures.map((f) => el("div", {}, `${f.kind} · ${f.reason} ${f.latency_ms !== null ? `(${ms(f.latency_ms)})` : ""}`))),
    ...section("Revocations", job.revocations.map((r) => el("div", {}, `${r.kind} · ${r.reason}`))),
    el("h3", {}, "Timeline (as stored in the stream)"),
    el("ol", { class: "timeline" }, job.timeline.map((entry) =>
      el("li", { "data-type": entry.type },
        el("span", { class: "type" }, entry.type), " ", el("span", { class: "muted" }, when(entry.at)),
        el("div", {}, entry.summary),
        el("details", {}, el("summary", {}, "evidence"), el("pre", {}, JSON.stringify(entry.event, null, 2)))))),
  );
  document.getElementById("detail").hidden = false;
}

// A lease's liveness: ended; held while its proposal is decided (the reconciler no longer
// times it: a check or a person's approval may outlast its TTL); live until its deadline; or
// past its deadline with the expiry not recorded yet.
function leaseLiveness(job, lease, now = Date.now()) {
  if (lease.ended) return lease.ended;
  const current = lease.epoch === job.epoch;
  if (current && (job.state === "proposed" || job.state === "accepted")) return "held";
  if (Date.parse(lease.expires_at) <= now) return "overdue";
  return "live";
}

function leaseLabel(job, lease) {
  const liveness = leaseLiveness(job, lease);
  switch (liveness) {
    case "held": return job.awaiting_approval ? "held: its proposal awaits approval" : "held: its proposal is being decided";
    case "overdue": return `past its deadline ${when(lease.expires_at)} (expiry not recorded yet)`;
    case "live": return `live until ${when(lease.expires_at)}`;
    default: return `${liveness} ${when(lease.ended_at)}`;
  }
}

function proposalRow(job, p) {
  const rollback = p.rolled_back_at ? `rolled back ${when(p.rolled_back_at)}`
    : p.rollback_requested_at ? `rollback requested ${when(p.rollback_requested_at)}` : "";
  const waiting = job.pending_proposal === p.proposal_id;
  const verbs = waiting ? ["approve", "deny"] : p.applied_at && !p.rolled_back_at ? ["rollback"] : [];
  return el("div", { class: "proposal", "data-proposal-id": p.proposal_id, "data-verdict": p.verdict },
    el("div", {}, `${shortId(p.proposal_id)} · ${p.verdict}`,
      p.applied_at ? ` · applied ${when(p.applied_at)}` : "",
      rollback ? el("span", { class: "badge rollback" }, rollback) : "",
      waiting ? el("span", { class: "badge approval" }, "awaiting approval") : "",
      ` · ${p.checks.map((c) => `${c.invariant}: ${c.verdict}`).join(", ")}`),
    verbs.length ? actionBar("proposal", { proposal_id: p.proposal_id }, verbs) : null);
}

// --- agent page -------------------------------------------------------------------------

async function openAgent(name) {
  state.openAgent = name;
  state.openJob = null;
  let agent;
  try {
    agent = await api(`/api/agents/${encodeURIComponent(name)}`);
  } catch (err) {
    if (err instanceof NotFound) return showMissing(`no agent ${name} in the read model (yet)`);
    throw err;
  }
  if (state.openAgent !== name) return;
  redrawDrawer(
    el("h2", { "data-agent-page": agent.name }, `agent ${agent.name} `, el("span", { class: "muted" }, agent.agent_id)),
    el("p", { "data-detail-standing": agent.standing },
      `level ${agent.level} · ${agent.standing}`, agent.standing_reason ? ` (${agent.standing_reason})` : "",
      ` · kinds ${agent.kinds.join(", ") || "any"} · at most ${agent.max_concurrent} at once`),
    el("p", { class: "muted" }, `leases ${agent.leases} · done ${agent.completed} · expired ${agent.expired} · revoked ${agent.revoked} · rejected ${agent.rejected}`),
    actionBar("agent", { agent: agent.name }, ["suspend", "revoke", "reinstate", "promote", "demote"]),
    el("h3", {}, "Level history"),
    agent.level_changes.length
      ? el("ol", { class: "levels" }, agent.level_changes.map((c) =>
        el("li", { "data-level": c.level }, `${when(c.at)} · ${c.previous} → ${c.level} by ${c.actor}: ${c.reason}`)))
      : el("p", { class: "muted" }, `level ${agent.level} since it registered ${when(agent.registered_at)}`),
    ...section("Leases", agent.recent_leases.map((l) =>
      el("div", { class: "lease", "data-job-id": l.job_id },
        link(jobPath(l.job_id), shortId(l.job_id)), ` · epoch ${l.epoch} · granted ${when(l.granted_at)} · `,
        l.ended ? `${l.ended} ${when(l.ended_at)}` : `open, deadline ${when(l.expires_at)}`))),
    ...section("Revocations", agent.revocations.map((r) => el("div", {}, `${when(r.at)} · ${r.kind} by ${r.actor}: ${r.reason}`))),
  );
  document.getElementById("detail").hidden = false;
}

function showMissing(message) {
  document.getElementById("detail-body").replaceChildren(el("p", { class: "missing" }, message));
  document.getElementById("detail").hidden = false;
}

// --- operator actions -------------------------------------------------------------------

// A reason field, one button per verb, and the answer. The command goes to
// POST /api/operator/VERB with this tab's token; who acts is the token's name.
function actionBar(scope, target, verbs) {
  const reason = el("input", {
    class: "reason", type: "text", placeholder: "reason (recorded)", "aria-label": "reason",
    onfocus: () => { reason.dataset.focused = "true"; },
    onblur: () => { if (reason.isConnected) reason.dataset.focused = "false"; },
  });
  const result = el("span", { class: "action-result", role: "status" });
  const buttons = verbs.map((verb) => el("button", {
    type: "button", "data-verb": verb,
    onclick: async (event) => {
      event.stopPropagation();
      const why = reason.value.trim();
      if (!why) { result.dataset.outcome = "refused"; result.textContent = "a reason is required"; reason.focus(); return; }
      result.dataset.outcome = "pending";
      result.textContent = `${verb}…`;
      const outcome = await operate(verb, { ...target, reason: why });
      result.dataset.outcome = outcome.ok ? "done" : "refused";
      result.textContent = outcome.message;
      if (outcome.ok) { reason.value = ""; scheduleRefresh(); }
    },
  }, verb));
  return el("div", { class: "actions", "data-scope": scope, "data-key": `${scope}:${JSON.stringify(target)}` },
    reason, buttons, result);
}

// Redraw the drawer (live updates do, often) keeping what the operator typed into a reason,
// where the cursor was, and the answers shown.
function redrawDrawer(...children) {
  const body = document.getElementById("detail-body");
  const before = new Map([...body.querySelectorAll(".actions")].map((bar) => [bar.dataset.key, bar]));
  body.replaceChildren(...children);
  for (const bar of body.querySelectorAll(".actions")) {
    const old = before.get(bar.dataset.key);
    if (!old) continue;
    const oldReason = old.querySelector(".reason");
    const reason = bar.querySelector(".reason");
    reason.value = oldReason.value;
    bar.querySelector(".action-result").replaceWith(old.querySelector(".action-result"));
    if (document.activeElement === oldReason || oldReason.dataset.focused === "true") reason.focus();
  }
}

async function operate(verb, body) {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    askForToken("operator actions need an operator token");
    return { ok: false, message: "sign in with an operator token first" };
  }
  let response;
  try {
    response = await fetch(`/api/operator/${verb}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
  } catch (err) {
    return { ok: false, message: `${verb}: ${err.message}` };
  }
  const answer = await response.json().catch(() => ({}));
  if (response.status === 401) askForToken("that token was refused");
  if (response.ok) return { ok: true, message: `${verb}: ${answer.detail || "recorded"}` };
  const details = (answer.errors || answer.details || []).map((e) => e.message).join("; ");
  return { ok: false, message: `${verb} refused (${response.status}): ${details || answer.error || answer.reason || "no reason given"}` };
}

// --- approvals queue --------------------------------------------------------------------

function renderApprovals(page) {
  const list = document.getElementById("approvals");
  document.getElementById("approvals-count").textContent = String(page.total);
  if (!page.items.length) {
    list.replaceChildren(el("li", { class: "muted empty" }, "nothing waits for approval"));
    return;
  }
  // An item still waiting keeps its element where it is (moving a node would take the focus
  // from a reason being typed): decided ones are removed, new ones added, checks redrawn.
  const wanted = new Set(page.items.map((p) => p.proposal_id));
  for (const li of [...list.children]) {
    if (!li.classList.contains("approval") || !wanted.has(li.dataset.proposalId)) li.remove();
  }
  for (const p of page.items) {
    const checks = p.checks.length ? p.checks.map((c) => `${c.invariant}: ${c.verdict}`).join(", ") : "no checks recorded yet";
    const existing = list.querySelector(`li.approval[data-proposal-id="${CSS.escape(p.proposal_id)}"]`);
    if (existing) {
      existing.querySelector(".checks").textContent = checks;
      continue;
    }
    list.append(el("li", { class: "approval", "data-proposal-id": p.proposal_id, "data-job-id": p.job_id },
      el("div", {}, el("span", { class: "kind" }, p.kind), " ", link(jobPath(p.job_id), shortId(p.job_id)),
        ` · proposal ${shortId(p.proposal_id)} by `, link(agentPath(p.agent), p.agent),
        ` · ${p.effect} · ${p.size} bytes · submitted ${when(p.submitted_at)}`),
      el("div", { class: "muted checks" }, checks),
      actionBar("approval", { proposal_id: p.proposal_id }, ["approve", "deny"])));
  }
}

// --- job search: text, state, time, pages; kept in the address ---------------------------

function searchFromUrl() {
  const params = new URLSearchParams(location.search);
  document.getElementById("search-q").value = params.get("q") || "";
  document.getElementById("search-state").value = STATES.includes(params.get("state")) ? params.get("state") : "";
  document.getElementById("search-since").value = params.get("since") in SINCE ? params.get("since") : "";
  return Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
}

function searchParams(page) {
  const out = new URLSearchParams();
  const q = document.getElementById("search-q").value.trim();
  const st = document.getElementById("search-state").value;
  const since = document.getElementById("search-since").value;
  if (q) out.set("q", q);
  if (st) out.set("state", st);
  if (since) out.set("since", since);
  if (page > 1) out.set("page", String(page));
  return out;
}

async function runSearch(page = 1) {
  const params = searchParams(page);
  const query = params.toString();
  history.replaceState(history.state, "", `${location.pathname}${query ? `?${query}` : ""}`);
  const apiParams = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String((page - 1) * PAGE_SIZE) });
  if (params.get("q")) apiParams.set("q", params.get("q"));
  if (params.get("state")) apiParams.set("state", params.get("state"));
  if (params.get("since")) apiParams.set("since", new Date(Date.now() - SINCE[params.get("since")]).toISOString());
  const result = await api(`/api/jobs?${apiParams}`);
  const pages = Math.max(1, Math.ceil(result.total / PAGE_SIZE));
  document.querySelector("#job-list tbody").replaceChildren(...result.items.map((job) =>
    el("tr", { "data-job-id": job.job_id, "data-state": job.state },
      el("td", { class: "id" }, link(jobPath(job.job_id), shortId(job.job_id))),
      el("td", {}, job.kind),
      el("td", {}, el("span", { class: `state state-${job.state}` }, job.state), jobBadges(job)),
      el("td", {}, job.agent ? link(agentPath(job.agent), job.agent) : "–"),
      el("td", { class: "muted" }, when(job.updated_at)),
      el("td", { class: "muted reason" }, job.reason))));
  const first = result.total ? result.offset + 1 : 0;
  document.getElementById("page-info").textContent =
    `${first}–${result.offset + result.items.length} of ${result.total} · page ${page} of ${pages}`;
  const prev = document.getElementById("page-prev");
  const next = document.getElementById("page-next");
  prev.disabled = page <= 1;
  next.disabled = page >= pages;
  prev.onclick = () => runSearch(page - 1);
  next.onclick = () => runSearch(page + 1);
  document.getElementById("job-search").dataset.page = String(page);
}

function setUpSearch() {
  const form = document.getElementById("job-search");
  form.addEventListener("submit", (event) => { event.preventDefault(); runSearch(1); });
  document.getElementById("search-q").addEventListener("input", () => {
    clearTimeout(state.searchTimer);
    state.searchTimer = setTimeout(() => runSearch(1), 250);
  });
  for (const id of ["search-state", "search-since"]) {
    document.getElementById(id).addEventListener("change", () => runSearch(1));
  }
}

// --- addresses --------------------------------------------------------------------------

function jobPath(jobId) { return `/jobs/${encodeURIComponent(jobId)}`; }
function agentPath(name) { return `/agents/${encodeURIComponent(name)}`; }

function link(path, text) {
  return el("a", {
    href: path,
    onclick: (event) => {
      if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;  // a new tab
      event.preventDefault();
      event.stopPropagation();
      navigate(path);
    },
  }, text);
}

// Open a drawer at its own address; the search's query string stays.
function navigate(path) {
  history.pushState({}, "", path + location.search);
  route();
}

function route() {
  const match = location.pathname.match(/^\/(jobs|agents)\/([^/]+)$/);
  if (!match) {
    state.openJob = null;
    state.openAgent = null;
    document.getElementById("detail").hidden = true;
    return Promise.resolve();
  }
  const id = decodeURIComponent(match[2]);
  return (match[1] === "jobs" ? openJob(id) : openAgent(id)).catch((err) => console.warn(err));
}

// --- loading and live updates -----------------------------------------------------------

async function refreshPanels() {
  const [summary, agents, failures, revocations, latency, approvals] = await Promise.all([
    api("/api/metrics/summary"),
    api("/api/agents?limit=500"),
    api("/api/failures?limit=40"),
    api("/api/revocations?limit=40"),
    api("/api/metrics/detection-latency?limit=300"),
    api("/api/approvals?limit=100"),
  ]);
  renderSummary(summary);
  renderApprovals(approvals);
  renderAgents(agents);
  renderFeed(failures, revocations);
  renderChart(latency, summary);
  return summary;
}

function scheduleRefresh() {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(async () => {
    state.refreshTimer = null;
    try {
      await refreshPanels();
      await runSearch(parseInt(document.getElementById("job-search").dataset.page || "1", 10));
      if (state.openAgent) await openAgent(state.openAgent);
    } catch (err) { console.warn(err); }
  }, 400);
}

function onTimeline(update) {
  state.position = Math.max(state.position, update.entry.seq);
  document.getElementById("position").textContent = `position ${state.position}`;
  if (update.job) placeJob(update.job, true);
  if (state.openJob && update.entry.job_id === state.openJob) openJob(state.openJob);
  scheduleRefresh();
}

// Server-sent events read through fetch (EventSource cannot send the Authorization header);
// on any end or error it reconnects after the last position it saw, as EventSource would.
async function follow() {
  const connection = document.getElementById("connection");
  try {
    const response = await fetch(`/api/events/stream?after=${state.position}`, {
      headers: { Accept: "text/event-stream", ...authHeaders() },
    });
    if (response.status === 401) { askForToken("this API needs a token"); return; }
    if (!response.ok) throw new Error(`/api/events/stream: ${response.status}`);
    connection.dataset.state = "live";
    connection.textContent = "live";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const lines = buffer.slice(0, end).split("\n");
        buffer = buffer.slice(end + 2);
        const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (lines.includes("event: timeline") && data) onTimeline(JSON.parse(data));
      }
    }
  } catch (err) {
    console.warn(err);
  }
  connection.dataset.state = "reconnecting";
  connection.textContent = "reconnecting…";
  setTimeout(follow, 1000);
}

async function start() {
  setUpLogin();
  buildBoard();
  setUpSearch();
  document.getElementById("close-detail").addEventListener("click", () => navigate("/"));
  window.addEventListener("popstate", () => { searchFromUrl(); route(); });
  const page = searchFromUrl();
  const summary = await refreshPanels();
  state.position = summary.position;
  document.getElementById("position").textContent = `position ${state.position}`;
  const jobs = await api("/api/jobs?limit=500");
  for (const job of jobs.items.slice().reverse()) placeJob(job);
  await runSearch(page);
  await route();
  document.body.dataset.ready = "true";
  follow();
}

start().catch((err) => {
  if (err instanceof Unauthorized) return;  // the login field is showing
  console.error(err);
  const connection = document.getElementById("connection");
  connection.textContent = `error: ${err.message}`;
});
