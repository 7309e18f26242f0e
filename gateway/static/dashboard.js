// The stagemesh dashboard. The gateway renders the page with the current values and embeds the three
// documents (#initial-data); this script draws the charts and the timeline from them at once, then
// polls /api/status (the `stagemesh status --json` document) and /api/timeline every second and
// /api/history every two seconds, and redraws. Charts: charts.js; timeline: timeline.js.
// Plain DOM, no framework, no build step. Every value is set with textContent (never innerHTML).
"use strict";

const PARAMS = new URLSearchParams(location.search);
const POLL_MS = Number(PARAMS.get("poll_ms")) || 1000;
const TIMELINE_S = Number(PARAMS.get("timeline_s")) || 1;
const STALE_S = 5; // a worker whose last heartbeat is older than this shows DOWN even if still listed healthy

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "title") node.title = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

const fmt = {
  num: (x, digits = 1) => (typeof x === "number" ? x.toFixed(digits) : "–"),
  pct: (x) => (typeof x === "number" ? `${(100 * x).toFixed(0)}%` : "–"),
  ms: (s) => (typeof s === "number" && s > 0 ? `${(1000 * s).toFixed(s < 0.01 ? 2 : 1)} ms` : "–"),
  age: (s) => (typeof s === "number" ? `${s.toFixed(1)} s ago` : "–"),
  bytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
};

function meter(fraction, text) {
  const bar = el("span");
  bar.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  const cell = el("td", {}, el("span", { class: "meter" }, bar), text);
  return cell;
}

function isUp(worker) {
  return Boolean(worker.healthy) && !(worker.heartbeat_age_s > STALE_S);
}

function workerName(worker) {
  if (worker.role === "stage") return `stage c${worker.chain}-s${worker.stage}`;
  return (worker.id || "expert").replace("-", " ");  // expert-c0-e1 -> "expert c0-e1" (the first dash only)
}

// Experts held: {"<layer>": [ids]} (or a plain list of ids), as "L1: 0 2 · L3: 1 3".
function expertsText(experts) {
  if (Array.isArray(experts)) return experts.join(" ");
  return Object.entries(experts || {}).map(([layer, ids]) => `L${layer}: ${[].concat(ids).join(" ")}`).join(" · ");
}

// Per-expert token load of an expert worker: load.expert_tokens {"<layer>:<expert>": tokens}.
function expertLoad(worker) {
  const load = worker.load && worker.load.expert_tokens;
  return load && typeof load === "object" && Object.keys(load).length ? load : null;
}

function holdings(worker) {
  if (worker.role !== "expert") {
    // Half-open bounds, as `stagemesh status` and the logs write them (stagemesh.config.layer_range):
    // [0, 12) is layers 0..11; x.5 cuts layer x between its attention and its MLP.
    const [start, end] = worker.layers || [0, 0];
    return el("td", { class: "text" }, `layers [${start}, ${end})`);
  }
  const cell = el("td", { class: "experts" }, el("div", {}, `experts ${expertsText(worker.experts)}`));
  const load = expertLoad(worker);
  if (load) {
    const total = Object.values(load).reduce((a, b) => a + (Number(b) || 0), 0) || 1;
    const list = el("div", { class: "expert-load", title: "tokens routed to each expert (layer:expert)" });
    for (const [expert, tokens] of Object.entries(load)) {
      list.append(el("span", { "data-expert": expert }, `${expert} `, el("b", {}, String(tokens)),
        ` (${fmt.pct((Number(tokens) || 0) / total)})`));
    }
    cell.append(list);
  }
  return cell;
}

function workerRow(worker) {
  const up = isUp(worker);
  const load = worker.load || {};
  const kvFraction = load.kv_blocks_total ? load.kv_blocks_used / load.kv_blocks_total : 0;
  return el("tr", { class: up ? "worker up" : "worker down", "data-address": worker.address, "data-role": worker.role,
                    "data-health": up ? "up" : "down" },
    el("td", { class: "text" }, workerName(worker)),
    el("td", { class: "text address" }, worker.address),
    el("td", { class: "text" }, worker.device || "–"),
    holdings(worker),
    el("td", {}, worker.tp_size || 1),
    el("td", { class: `health ${up ? "up" : "down"}` }, up ? "UP" : "DOWN"),
    el("td", { class: "heartbeat" }, fmt.age(worker.heartbeat_age_s)),
    el("td", {}, `${fmt.ms(load.step_latency_p50_s)} / ${fmt.ms(load.step_latency_p99_s)}`),
    el("td", {}, fmt.num(load.micro_batches_per_s)),
    el("td", {}, fmt.num(load.tokens_per_s)),
    el("td", {}, load.queue_depth ?? "–"),
    meter(kvFraction, `${load.kv_blocks_used ?? "–"} / ${load.kv_blocks_total ?? "–"}`),
    meter(load.busy_fraction, fmt.pct(load.busy_fraction)),
    el("td", {}, worker.role === "stage" ? fmt.pct(load.bubble_fraction) : "–"),
    el("td", {}, fmt.bytes(load.bytes_sent)),
  );
}

function chainRow(doc, chain) {
  const stages = (doc.workers || []).filter((w) => w.role === "stage" && w.chain === chain.id);
  const sched = ((doc.gateway && doc.gateway.chains) || []).find((c) => c.id === chain.id) || {};
  const last = stages.reduce((a, w) => (a && a.stage > w.stage ? a : w), null);
  const bubble = stages.length ? stages.reduce((a, w) => a + (w.load.bubble_fraction || 0), 0) / stages.length : null;
  const healthy = chain.healthy && stages.every(isUp);
  return el("tr", { "data-chain": chain.id, class: healthy ? "up" : "down" },
    el("td", { class: "text" }, `chain ${chain.id}`),
    el("td", { class: `health ${healthy ? "up" : "down"}` }, healthy ? "UP" : "DOWN"),
    el("td", {}, chain.num_stages),
    el("td", {}, chain.requests_served),
    el("td", {}, chain.requests_running),
    el("td", {}, chain.requests_waiting),
    el("td", {}, `${sched.kv_blocks_reserved ?? "–"} / ${sched.kv_blocks_total ?? "–"}`),
    el("td", {}, sched.steps_in_flight ?? "–"),
    el("td", {}, last ? fmt.num(last.load.tokens_per_s) : "–"),
    el("td", {}, fmt.pct(bubble)),
  );
}

// Workers grouped by chain (stages in order, then that chain's expert workers), shared ones last.
function orderedWorkers(doc) {
  const key = (w) => [w.chain < 0 ? Infinity : w.chain, w.role === "stage" ? 0 : 1, w.stage, w.address];
  return [...(doc.workers || [])].sort((a, b) => {
    const [ka, kb] = [key(a), key(b)];
    for (let i = 0; i < ka.length; i += 1) if (ka[i] !== kb[i]) return ka[i] < kb[i] ? -1 : 1;
    return 0;
  });
}

function render(doc) {
  document.getElementById("model").textContent = `${doc.model || ""} · v${doc.version || "?"}`;
  const ready = doc.gateway && doc.gateway.ready;
  const state = document.getElementById("gateway-state");
  state.textContent = ready ? "gateway ready" : "gateway starting";
  state.className = `badge ${ready ? "up" : "down"}`;
  document.querySelector("#chains tbody").replaceChildren(...(doc.chains || []).map((c) => chainRow(doc, c)));
  const rows = [];
  let chain;
  for (const worker of orderedWorkers(doc)) {
    if (worker.chain !== chain) {
      chain = worker.chain;
      rows.push(el("tr", { class: "chain-row" }, el("td", { colspan: 15 }, chain >= 0 ? `chain ${chain}` : "shared")));
    }
    rows.push(workerRow(worker));
  }
  document.querySelector("#workers tbody").replaceChildren(...rows);
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function getJson(path) {
  const reply = await fetch(path, { cache: "no-store" });
  if (!reply.ok) throw new Error(`${path.split("?")[0]} answered ${reply.status}`);
  return reply.json();
}

let history = null;

function drawHistory() {
  Charts.render(document.getElementById("history"), history);
}

function drawTimeline(doc) {
  Timeline.render(document.getElementById("timeline"), document.getElementById("experts"), doc);
}

async function poll() {
  try {
    const [doc, timeline] = await Promise.all([getJson("/api/status"), getJson(`/api/timeline?window_s=${TIMELINE_S}`)]);
    render(doc);
    drawTimeline(timeline);
    showError(doc.gateway && (doc.gateway.error || doc.gateway.alert));
  } catch (err) {
    const state = document.getElementById("gateway-state");
    state.textContent = "gateway unreachable";
    state.className = "badge down";
    showError(`cannot read the gateway's status: ${err.message}`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function pollHistory() {
  try {
    const since = history && history.now ? `?since=${history.now}` : "";
    history = Charts.merge(history, await getJson(`/api/history${since}`));
    drawHistory();
  } catch (err) {
    // the status poll says when the gateway is unreachable
  } finally {
    setTimeout(pollHistory, 1000 * ((history && history.sample_s) || 2));
  }
}

// First paint: the server's tables are there already; draw the charts and the timeline from the
// documents it embedded, before any request.
const initial = JSON.parse(document.getElementById("initial-data").textContent || "{}");
history = initial.history || null;
if (initial.status) render(initial.status);
drawHistory();
drawTimeline(initial.timeline);
setTimeout(poll, POLL_MS);
setTimeout(pollHistory, 1000 * ((history && history.sample_s) || 2));
