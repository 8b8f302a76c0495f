// wearfl hub dashboard: polls /api/dashboard and draws plain SVG charts (no library, nothing from the network).
"use strict";

const token = new URLSearchParams(location.search).get("token");
const headers = token ? { Authorization: "Bearer " + token } : {};
const SVG = "http://www.w3.org/2000/svg";
const LOWER_IS_BETTER = new Set(["mae_bpm", "rmse_bpm", "loss"]);
const HEADLINE = ["accuracy", "macro_f1", "mae_bpm", "rmse_bpm"];
const W = 360, H = 200, M = { l: 44, r: 10, t: 10, b: 28 };

function el(name, attrs, parent, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(digits === undefined ? 3 : digits);
}

// Counts: a maximum that four grid steps divide into whole numbers.
function countMax(v) {
  return Math.max(4, 4 * Math.ceil(v / 4));
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// An empty chart with axes over [x0, x1] x [0, ymax]; returns scale functions.
function frame(svg, x0, x1, ymax, xlabel, ticks) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const sx = (x) => M.l + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - M.l - M.r);
  const sy = (y) => H - M.b - (y / ymax) * (H - M.t - M.b);
  for (let i = 0; i <= 4; i++) {
    const y = (ymax * i) / 4;
    el("line", { x1: M.l, x2: W - M.r, y1: sy(y), y2: sy(y), class: "grid" }, svg);
    el("text", { x: M.l - 4, y: sy(y) + 3, "text-anchor": "end" }, svg, fmt(y, ymax <= 2 ? 2 : 0));
  }
  el("line", { x1: M.l, x2: W - M.r, y1: sy(0), y2: sy(0), class: "axis" }, svg);
  for (const t of ticks) el("text", { x: sx(t), y: H - M.b + 12, "text-anchor": "middle" }, svg, String(t));
  el("text", { x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle" }, svg, xlabel);
  return { sx, sy };
}

function empty(svg, text) {
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg, text);
}

function tickSet(lo, hi) {
  const n = hi - lo + 1, step = Math.max(1, Math.ceil(n / 8));
  const out = [];
  for (let t = lo; t <= hi; t += step) out.push(t);
  return out;
}

function headline(metrics) {
  return HEADLINE.find((k) => k in metrics) || Object.keys(metrics).find((k) => !k.startsWith("eval_"));
}

function drawMetric(rounds) {
  const svg = document.getElementById("chart-metric");
  const evaluated = rounds.filter((r) => Object.keys(r.metrics || {}).length);
  const name = evaluated.length ? headline(evaluated[evaluated.length - 1].metrics) : null;
  if (!name) return empty(svg, "no federated evaluation yet");
  const pts = evaluated.filter((r) => name in r.metrics).map((r) => [r.base_version, r.metrics[name]]);
  document.getElementById("metric-title").textContent =
    `${name} of each global model, as the edges evaluated it (${LOWER_IS_BETTER.has(name) ? "lower" : "higher"} is better)`;
  const unit = name === "accuracy" || name === "macro_f1";
  const ymax = unit ? 1 : niceMax(Math.max(...pts.map((p) => p[1])) * 1.1);
  const x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  const { sx, sy } = frame(svg, x0, x1, ymax, "model version (v0: the initial model)", tickSet(x0, x1));
  el("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), class: "line-a" }, svg);
  for (const p of pts) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, class: "dot-a" }, svg)
    .appendChild(el("title", {}, null, `v${p[0]}: ${fmt(p[1], 4)}`));
}

function drawSpread(personalization) {
  const svg = document.getElementById("chart-spread");
  const rows = Object.entries(personalization || {})
    .map(([c, p]) => [c, p.global || {}, p.personalized || {}, p.adapted || {}])
    .filter(([, g]) => Object.keys(g).length);
  if (!rows.length) return empty(svg, "no per-edge evaluations yet");
  const name = headline(rows[0][1]);
  const vals = rows.flatMap(([, g, p, a]) => [g[name], p[name], a[name]]).filter((v) => v !== undefined);
  const unit = name === "accuracy" || name === "macro_f1";
  const ymax = unit ? 1 : niceMax(Math.max(...vals) * 1.1);
  const adapted = rows.some(([, , , a]) => a[name] !== undefined);
  const legend = adapted ? `${name}: global (blue), personalized (orange), adapted (green)`
    : `${name} per edge: global (blue), personalized (orange)`;
  const { sx, sy } = frame(svg, -0.5, rows.length - 0.5, ymax, legend, []);
  rows.forEach(([c, g, p, a], i) => {
    if (rows.length <= 6 || i % Math.ceil(rows.length / 6) === 0)
      el("text", { x: sx(i), y: H - M.b + 12, "text-anchor": "middle" }, svg, c);
    el("circle", { cx: sx(i) - 4, cy: sy(g[name]), r: 3.5, class: "dot-a" }, svg).appendChild(el("title", {}, null, `${c} global ${fmt(g[name], 4)}`));
    if (p[name] !== undefined) el("circle", { cx: sx(i), cy: sy(p[name]), r: 3.5, class: "dot-b" }, svg).appendChild(el("title", {}, null, `${c} personalized ${fmt(p[name], 4)}`));
    if (a[name] !== undefined) el("circle", { cx: sx(i) + 4, cy: sy(a[name]), r: 3.5, class: "dot-c" }, svg).appendChild(el("title", {}, null, `${c} adapted ${fmt(a[name], 4)}${a.kept_global === 1 ? " (not adapted: the gateway's checks kept the global model)" : ""}`));
  });
}

function bars(svg, series, labels, ymax, xlabel, classes) {
  const n = labels.length;
  const { sy } = frame(svg, 0, 1, ymax, xlabel, []);
  const slot = (W - M.l - M.r) / Math.max(n, 1), bw = Math.max(2, (slot * 0.8) / series.length);
  labels.forEach((label, i) => {
    series.forEach((s, j) => {
      const v = s[i] || 0, x = M.l + i * slot + slot * 0.1 + j * bw;
      el("rect", { x, y: sy(v), width: bw - 1, height: Math.max(0, sy(0) - sy(v)), class: classes[j] }, svg)
        .appendChild(el("title", {}, null, `${label}: ${fmt(v)}`));
    });
    if (n <= 12 || i % Math.ceil(n / 12) === 0)
      el("text", { x: M.l + i * slot + slot / 2, y: H - M.b + 12, "text-anchor": "middle" }, svg, String(label));
  });
  return sy;
}

function drawParticipation(rounds) {
  const svg = document.getElementById("chart-participation");
  if (!rounds.length) return empty(svg, "no round closed yet");
  const last = rounds.slice(-40);
  const acc = last.map((r) => r.participants), rej = last.map((r) => r.updates_rejected), str = last.map((r) => r.stragglers || 0);
  bars(svg, [acc, rej, str], last.map((r) => r.round), countMax(Math.max(...acc, ...rej, ...str)),
       "round: edges accepted (blue), rejected (red), stragglers (orange)", ["bar-a", "bar-b", "bar-c"]);
}

function drawRejections(rejected) {
  const svg = document.getElementById("chart-rejections");
  const rows = Object.entries(rejected).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
  if (!rows.length) return empty(svg, "no update rejected");
  bars(svg, [rows.map((r) => r[1])], rows.map((r) => r[0]), countMax(Math.max(...rows.map((r) => r[1]))), "reason",
       ["bar-b"]);
}

function drawBytes(rounds, parameters) {
  const svg = document.getElementById("chart-bytes");
  const last = rounds.slice(-40).filter((r) => r.participants + r.updates_rejected > 0);
  if (!last.length) return empty(svg, "no update received yet");
  const per = last.map((r) => r.bytes_up / (r.participants + r.updates_rejected));
  const f32 = parameters ? parameters * 4 : 0;
  const sy = bars(svg, [per], last.map((r) => r.round), niceMax(Math.max(...per, f32) * 1.05),
                  "round: bytes per update (blue); float32 size (dashed)", ["bar-a"]);
  if (f32) el("line", { x1: M.l, x2: W - M.r, y1: sy(f32), y2: sy(f32), class: "ref" }, svg)
    .appendChild(el("title", {}, null, `float32: ${fmt(f32)} bytes`));
}

function drawPrivacy(privacy) {
  const svg = document.getElementById("chart-privacy");
  if (!privacy) return empty(svg, "differential privacy is off");
  const budget = privacy.budget_epsilon;
  const labels = budget ? ["spent", "budget"] : ["spent"];
  const values = budget ? [privacy.epsilon, budget] : [privacy.epsilon];
  bars(svg, [values], labels, niceMax(Math.max(...values) * 1.05),
       `epsilon after ${privacy.rounds} round(s) at δ=${privacy.delta} (${privacy.accountant})`, ["bar-a"]);
}

function ago(t, now) {
  if (t === null || t === undefined) return "–";
  const s = Math.max(0, now - t);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function drawClients(status, live) {
  const body = document.querySelector("#clients tbody");
  const online = new Set(live.online);
  const waiting = (status.waiting && status.waiting.edges) || {};
  const ids = [...new Set([...Object.keys(status.clients), ...live.online, ...Object.keys(live.doing)])].sort();
  const now = Date.now() / 1000;
  body.replaceChildren();
  for (const id of ids) {
    const c = status.clients[id] || { accepted: 0, rejected: 0, declined: 0, last_seen: null };
    const tr = document.createElement("tr");
    const doing = waiting[id] || live.doing[id] || "";
    const declined = live.declined[id] ? ` (declined this round: ${live.declined[id]})` : "";
    const cells = [id, online.has(id) ? "online" : "offline", ago(c.last_seen, now), c.accepted, c.rejected || 0,
                   c.declined || 0, doing + declined];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      td.textContent = String(v);
      if (i >= 3 && i <= 5) td.className = "num";
      if (i === 1) td.className = online.has(id) ? "on" : "off";
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
}

function render(data) {
  const { status, rounds, live } = data;
  document.getElementById("federation").textContent = `· ${live.federation}${live.task ? " · " + live.task : ""}`;
  document.getElementById("model-version").textContent = fmt(status.model_version);
  document.getElementById("rounds-completed").textContent = fmt(status.rounds_completed);
  document.getElementById("updates-accepted").textContent = fmt(status.updates_accepted);
  document.getElementById("updates-rejected").textContent =
    fmt(Object.values(status.updates_rejected).reduce((a, b) => a + b, 0));
  document.getElementById("clients-online").textContent = fmt(live.online.length);
  const g = status.global_metrics;
  const name = g ? headline(g.metrics) : null;
  document.getElementById("global-metric").textContent = name ? `${name} ${fmt(g.metrics[name], 4)}` : "–";
  const r = live.round;
  document.getElementById("round-now").textContent = r
    ? `round ${r.round} open: ${r.updates} update(s) in, deadline ${new Date(r.deadline * 1000).toLocaleTimeString()}` +
      (status.waiting && Object.keys(status.waiting.edges || {}).length
        ? `; waiting for ${Object.keys(status.waiting.edges).join(", ")}` : "")
    : "no round open";
  document.getElementById("ledger").textContent = live.ledger
    ? `${live.ledger.entries} entries, head ${live.ledger.head} (model v${live.ledger.version})` : "no ledger";
  drawMetric(rounds);
  drawSpread(status.personalization);
  drawParticipation(rounds);
  drawRejections(status.updates_rejected);
  drawBytes(rounds, live.parameters);
  drawPrivacy(status.privacy);
  drawClients(status, live);
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.body.dataset.rendered = String(status.rounds_completed);
}

async function refresh() {
  try {
    const response = await fetch("api/dashboard", { headers, cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    render(await response.json());
  } catch (err) {
    document.getElementById("updated").textContent = "cannot reach the hub: " + err.message;
  }
}

if (token) for (const id of ["metrics-link", "status-link"]) {
  const a = document.getElementById(id);
  a.href += "?token=" + encodeURIComponent(token);
}
refresh();
setInterval(refresh, 2000);
