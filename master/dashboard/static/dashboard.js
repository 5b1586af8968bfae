// The fabric dashboard: polls /api/state and redraws. Text goes in as text, never as HTML.
"use strict";

const POLL_MS = 500;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(n) {
  if (n === undefined || n === null || Number.isNaN(n)) return "–";
  if (typeof n !== "number") return String(n);
  return n.toLocaleString("en-US", { maximumFractionDigits: 1 });
}

function ago(seconds) {
  if (seconds === undefined || seconds === null) return "–";
  if (seconds < 1) return "now";
  if (seconds < 90) return `${Math.round(seconds)}s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)}m ago`;
  return `${Math.round(seconds / 3600)}h ago`;
}

function when(ts, now) {
  if (!ts) return "–";
  return ago(now - ts);
}

function pill(state) {
  const s = String(state || "unknown");
  return el("span", { class: `pill ${s}` }, s);
}

function table(headers, rows, empty) {
  if (!rows.length) return el("div", { class: "empty" }, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map(h =>
      el("th", { class: h.num ? "num" : "" }, h.label)))),
    el("tbody", {}, rows));
}

function replace(id, ...children) {
  const target = document.getElementById(id);
  target.replaceChildren(...children.flat().filter(c => c !== null && c !== undefined));
}

function progress(percent, label) {
  const bar = el("div", { class: "progress", role: "progressbar",
                          "aria-valuenow": String(percent), "aria-valuemin": "0",
                          "aria-valuemax": "100" });
  const fill = el("div", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(100, percent))}%`;
  bar.append(fill, el("span", { class: "text" }, label));
  return bar;
}

function drawCards(s) {
  const m = s.master || {};
  const rate = s.throughput.length ? s.throughput[s.throughput.length - 1].completed : null;
  const live = s.nodes.filter(n => !n.dead && n.status !== "offline").length;
  const cards = [
    ["nodes", "Nodes live", `${live} / ${s.nodes.length}`],
    ["queued", "Queued", fmt(m.queued)],
    ["in_flight", "In flight", fmt(m.in_flight)],
    ["completed", "Completed", fmt(m.completed)],
    ["failed", "Failed", fmt(m.failed), (m.failed || 0) > 0],
    ["rate", "Tasks/s now", fmt(rate)],
    ["rejected", "Rejected", fmt(m.rejected), (m.rejected || 0) > 0],
  ];
  replace("cards", cards.map(([key, label, value, bad]) =>
    el("div", { class: bad ? "card bad" : "card", id: `card-${key}` },
      el("div", { class: "label" }, label), el("div", { class: "value", id: `count-${key}` }, value))));
}

function drawMasterLine(s) {
  const m = s.master || {};
  const parts = [];
  if (m.answering) {
    parts.push(el("span", {}, `master ${m.master_id} `), pill(m.status));
    if (m.epoch) parts.push(` epoch ${m.epoch}`);
  } else {
    parts.push(el("span", { class: "err" }, m.error ? `master not answering: ${m.error}` : "waiting for the master"));
  }
  parts.push(el("span", { class: "muted" }, `  ·  ${s.broker}`));
  replace("masterline", parts);
  document.getElementById("root").textContent = s.root;
}

function drawChart(points) {
  const target = document.getElementById("chart");
  const width = 600, height = 170, left = 44, bottom = 22, top = 10;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  const max = Math.max(1, ...points.map(p => Math.max(p.completed, p.failed)));
  const end = points.length ? points[points.length - 1].ts : 0;
  const span = Math.min(300, Math.max(60, points.length ? end - points[0].ts : 60));
  const x = ts => left + (width - left - 4) * (1 - (end - ts) / span);
  const y = v => top + (height - top - bottom) * (1 - v / max);
  for (const frac of [0, 0.5, 1]) {
    add("line", { class: "axis", x1: left, x2: width, y1: y(max * frac), y2: y(max * frac) });
    add("text", { x: left - 6, y: y(max * frac) + 4, "text-anchor": "end" }, fmt(max * frac));
  }
  add("text", { x: left, y: height - 6 }, span >= 120 ? `-${Math.round(span / 60)} min` : `-${Math.round(span)}s`);
  add("text", { x: width - 4, y: height - 6, "text-anchor": "end" }, "now");
  const path = key => points.filter(p => end - p.ts <= span)
    .map((p, i) => `${i ? "L" : "M"}${x(p.ts).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
  if (points.length > 1) {
    add("path", { class: "done", d: path("completed") });
    add("path", { class: "fail", d: path("failed") });
  } else {
    add("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "collecting samples…");
  }
  target.replaceChildren(svg);
}

function drawNodes(s) {
  const headers = [{ label: "Node" }, { label: "Status" }, { label: "Kind" }, { label: "Codec" },
    { label: "Capacity", num: true }, { label: "Workload", num: true }, { label: "In flight", num: true },
    { label: "Done", num: true }, { label: "Failed", num: true }, { label: "Last seen" }];
  const rows = s.nodes.map(n => el("tr", { class: n.dead ? "dead" : "", "data-node": n.node_id },
    el("td", {}, el("strong", {}, n.node_id)),
    el("td", {}, pill(n.silent ? "dead" : n.status), n.silent ? el("span", { class: "muted" }, " silent") : null),
    el("td", {}, n.kind || "–"), el("td", {}, n.codec || "–"),
    el("td", { class: "num" }, fmt(n.capacity)), el("td", { class: "num" }, fmt(n.workload)),
    el("td", { class: "num" }, fmt(n.in_flight)), el("td", { class: "num" }, fmt(n.tasks_done)),
    el("td", { class: "num" }, fmt(n.tasks_failed)), el("td", {}, ago(n.age))));
  replace("nodes", table(headers, rows, "no node has reported yet"));
  document.getElementById("nodecount").textContent = `${s.nodes.length} known`;
}

function drawQueue(s) {
  const q = s.queue;
  if (!q) {
    const total = (s.master || {}).queued;
    replace("queue", el("div", {}, `${fmt(total)} queued in all`),
      el("div", { class: "note" }, s.queue_note || "queue by priority not known"));
    return;
  }
  const max = Math.max(1, ...q.by_priority.map(p => p.queued + p.running));
  const rows = q.by_priority.map(p => {
    const bar = el("div", { class: "b" });
    bar.style.width = `${(180 * (p.queued + p.running)) / max}px`;
    return el("div", { class: "qbar", "data-priority": String(p.priority) },
      el("span", { class: "p" }, `P${p.priority}`),
      el("span", { class: "c" }, `${fmt(p.queued)} queued, ${fmt(p.running)} running`), bar);
  });
  const names = q.by_name.length
    ? el("div", { class: "note" }, "waiting: " + q.by_name.map(n => `${n.name} ${fmt(n.queued)}`).join(", "))
    : null;
  replace("queue", el("div", {}, `${fmt(q.queued)} queued, ${fmt(q.running)} running`),
    rows.length ? rows : el("div", { class: "empty" }, "nothing queued"), names);
}

function drawMasters(s) {
  const parts = [];
  const lease = s.lease;
  if (lease) {
    parts.push(el("div", {}, "lease: ", el("strong", {}, lease.holder), " ", pill(lease.state),
      ` epoch ${lease.epoch}, ttl ${fmt(lease.ttl)}s, renewed ${when(lease.ts, s.now)}`));
  } else {
    parts.push(el("div", { class: "muted" }, "no lease: a single master (not replicated)"));
  }
  const rows = s.masters.map(m => el("tr", { "data-master": m.master_id },
    el("td", {}, m.master_id), el("td", {}, pill(m.role)), el("td", { class: "num" }, fmt(m.epoch)),
    el("td", { class: "num" }, `${m.journal_epoch}:${m.journal_seq}`), el("td", {}, when(m.ts, s.now))));
  if (rows.length) {
    parts.push(table([{ label: "Master" }, { label: "Role" }, { label: "Epoch", num: true },
      { label: "Journal", num: true }, { label: "Seen" }], rows, ""));
  }
  const m = s.master || {};
  parts.push(el("div", { class: "note" },
    `answering master: ${m.answering ? m.master_id : "none"}; duplicates ${fmt(m.duplicates)}; ` +
    `nodes ready ${fmt(m.nodes_ready)} of ${fmt(m.nodes_total)}`));
  replace("masters", parts);
}

function drawJobs(s) {
  const headers = [{ label: "Job" }, { label: "State" }, { label: "Progress" },
    { label: "Rate /s", num: true }, { label: "Shards", num: true }, { label: "Found", num: true },
    { label: "Elapsed", num: true }];
  const rows = s.jobs.map(j => el("tr", { "data-job": j.job_id },
    el("td", {}, j.job_id), el("td", {}, pill(j.state)),
    el("td", {}, progress(j.percent, `${fmt(j.percent)}%`)),
    el("td", { class: "num" }, fmt(j.live_rate !== null && j.live_rate !== undefined ? j.live_rate : j.rate)),
    el("td", { class: "num" }, j.shards_done === undefined ? "–"
      : `${fmt(j.shards_done)} / ${j.shards_total ? fmt(j.shards_total) : "?"}`),
    el("td", { class: "num" }, fmt(j.primes)),
    el("td", { class: "num" }, j.elapsed === undefined ? "–" : `${fmt(j.elapsed)}s`)));
  replace("jobs", table(headers, rows, "no job has reported progress"));
}

function drawPipelines(s) {
  const headers = [{ label: "Pipeline" }, { label: "State" }, { label: "Run" },
    { label: "Jobs", num: true }, { label: "Last run" }, { label: "Finished" }, { label: "Next run" }];
  const rows = s.pipelines.map(p => el("tr", { "data-pipeline": p.name },
    el("td", {}, p.name), el("td", {}, pill(p.state)), el("td", {}, p.run_id || "–"),
    el("td", { class: "num" }, `${fmt(p.jobs_done)} / ${fmt(p.jobs_total)}` +
      (p.jobs_failed ? ` (${fmt(p.jobs_failed)} failed)` : "")),
    el("td", {}, p.last_result ? pill(p.last_result) : "–",
      p.last_error ? el("span", { class: "err" }, ` ${p.last_error}`) : null),
    el("td", {}, when(p.last_finished_at, s.now)),
    el("td", {}, p.next_run_at ? (p.next_run_at > s.now ? `in ${Math.round(p.next_run_at - s.now)}s` : "due") : "–")));
  replace("pipelines", table(headers, rows, "no pipeline (serve --pipelines FILE runs some)"));
}

function drawFailures(s) {
  const headers = [{ label: "When" }, { label: "Node" }, { label: "Task" }, { label: "Kind" }, { label: "Reason" }];
  const rows = s.failures.map(f => el("tr", {},
    el("td", {}, when(f.ts, s.now)), el("td", {}, f.node_id), el("td", {}, f.task_id),
    el("td", {}, el("span", { class: "err" }, f.kind)), el("td", {}, f.message)));
  replace("failures", table(headers, rows, "no failure seen"));
}

function drawEvents(s) {
  const headers = [{ label: "When" }, { label: "Event" }, { label: "Pipeline" }, { label: "Job" }, { label: "Detail" }];
  const rows = s.events.map(e => el("tr", {},
    el("td", {}, when(e.ts, s.now)), el("td", {}, e.event), el("td", {}, e.pipeline || ""),
    el("td", {}, e.job || ""), el("td", {}, e.error || e.run_id || "")));
  replace("events", table(headers, rows, "no event yet"));
}

let lastOk = 0;

function draw(s) {
  drawMasterLine(s);
  drawCards(s);
  drawChart(s.throughput);
  drawNodes(s);
  drawQueue(s);
  drawMasters(s);
  drawJobs(s);
  drawPipelines(s);
  drawFailures(s);
  drawEvents(s);
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const state = await response.json();
    draw(state);
    lastOk = Date.now();
    const live = document.getElementById("live");
    live.className = state.broker_connected ? "live" : "live stale";
    live.textContent = state.broker_connected ? "live" : "broker connection lost";
  } catch (error) {
    const live = document.getElementById("live");
    live.className = "live stale";
    live.textContent = `dashboard unreachable (${error.message})`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
