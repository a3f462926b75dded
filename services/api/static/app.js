// Warden dashboard: plain JS over the read API. Loads once, then follows /api/events/stream.
// Under `--auth all` it asks for a token once per tab (sessionStorage) and sends it on every call.
"use strict";

const STATES = ["queued", "leased", "proposed", "accepted", "completed", "tombstoned", "cancelled"];
const FAILURE_TYPES = new Set(["lease.expired", "message.rejected", "input.rejected", "job.tombstoned", "effect.failed"]);
const AGENT_TYPES_PREFIX = "agent.";
const MAX_CARDS_PER_COLUMN = 200;

const state = { position: 0, jobs: new Map(), openJob: null, refreshTimer: null };

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
    location.reload();
  });
}

class Unauthorized extends Error {}

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json", ...authHeaders() } });
  if (response.status === 401) {
    askForToken(sessionStorage.getItem(TOKEN_KEY) ? "that token was refused" : "this API needs a token");
    throw new Unauthorized(`${path}: 401`);
  }
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
    onclick: () => openJob(job.job_id),
  },
    el("div", {}, el("span", { class: "kind" }, job.kind), " ", el("span", { class: "id" }, shortId(job.job_id))),
    el("div", { class: "muted" }, agent, ` · ${job.attempts}/${job.max_attempts}`));
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
        el("td", {}, a.name),
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
          item.job_id ? el("a", { href: "#", onclick: (e) => { e.preventDefault(); openJob(item.job_id); } }, shortId(item.job_id)) : "",
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

async function openJob(jobId) {
  state.openJob = jobId;
  const job = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
  if (state.openJob !== jobId) return;
  const section = (title, rows) => rows.length ? [el("h3", {}, title), ...rows] : [];
  document.getElementById("detail-body").replaceChildren(
    el("h2", {}, `${job.kind} `, el("span", { class: "muted" }, job.job_id)),
    el("p", { "data-detail-state": job.state }, `state ${job.state} · attempts ${job.attempts}/${job.max_attempts}`,
      job.reason ? ` · ${job.reason}` : ""),
    ...section("Leases", job.leases.map((l) =>
      el("div", {}, `epoch ${l.epoch} · ${l.agent} · granted ${when(l.granted_at)} · ${l.ended || "live"} ${when(l.ended_at)}`))),
    ...section("Proposals", job.proposals.map((p) =>
      el("div", {}, `${shortId(p.proposal_id)} · ${p.verdict} · ${p.checks.map((c) => `${c.invariant}: ${c.verdict}`).join(", ")}`))),
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

// --- loading and live updates -----------------------------------------------------------

async function refreshPanels() {
  const [summary, agents, failures, revocations, latency] = await Promise.all([
    api("/api/metrics/summary"),
    api("/api/agents?limit=500"),
    api("/api/failures?limit=40"),
    api("/api/revocations?limit=40"),
    api("/api/metrics/detection-latency?limit=300"),
  ]);
  renderSummary(summary);
  renderAgents(agents);
  renderFeed(failures, revocations);
  renderChart(latency, summary);
  return summary;
}

function scheduleRefresh() {
  if (state.refreshTimer) return;
  state.refreshTimer = setTimeout(async () => {
    state.refreshTimer = null;
    try { await refreshPanels(); } catch (err) { console.warn(err); }
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
  document.getElementById("close-detail").addEventListener("click", () => {
    state.openJob = null;
    document.getElementById("detail").hidden = true;
  });
  const summary = await refreshPanels();
  state.position = summary.position;
  document.getElementById("position").textContent = `position ${state.position}`;
  const jobs = await api("/api/jobs?limit=500");
  for (const job of jobs.items.slice().reverse()) placeJob(job);
  document.body.dataset.ready = "true";
  follow();
}

start().catch((err) => {
  if (err instanceof Unauthorized) return;  // the login field is showing
  console.error(err);
  const connection = document.getElementById("connection");
  connection.textContent = `error: ${err.message}`;
});
