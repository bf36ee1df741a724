// blixfs dashboard: four pages drawn from /api/<page>, polled every POLL_MS. No framework,
// no external asset (the Content-Security-Policy allows this origin only). Charts are SVG.
"use strict";

const POLL_MS = 2000;
const SVGNS = "http://www.w3.org/2000/svg";
const state = { page: "overview", image: null, timer: null, busy: false };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function sv(tag, attrs, ...children) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children.flat()) e.append(c instanceof Node ? c : String(c));
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
}
const rate = (n) => (n === null || n === undefined ? "–" : `${bytes(n)}/s`);
const pct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`);
const short = (id) => (id ? id.slice(0, 12) : "");
function secs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
const when = (t) => new Date(t * 1000).toLocaleTimeString();

function card(label, value, sub, extra) {
  return el("div", { class: "card" }, el("div", { class: "label" }, label), el("div", { class: "value" }, value),
    sub ? el("div", { class: "sub" }, sub) : null, extra || null);
}

function barOf(used, total) {
  const frac = total > 0 ? Math.min(1, used / total) : 0;
  const inner = el("div");
  inner.style.width = `${(frac * 100).toFixed(1)}%`;
  return el("div", { class: used > total ? "bar over" : "bar" }, inner);
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "empty" }, empty || "nothing yet");
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map(([h, cls]) => el("th", { class: cls || null }, h)))),
    el("tbody", {}, rows));
}

function section(title, ...body) { return el("section", {}, el("h2", {}, title), ...body); }

// ------------------------------------------------------------------ charts

function lineChart(series, points) {
  // series: [{key, label, color}], points: [{t, key: value}]
  const W = 900, H = 200, L = 70, B = 24, T = 10;
  const svg = sv("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  if (points.length < 2) {
    svg.append(sv("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7385" }, "collecting samples…"));
    return svg;
  }
  const t0 = points[0].t, t1 = points[points.length - 1].t;
  let max = 1;
  for (const p of points) for (const s of series) max = Math.max(max, p[s.key] || 0);
  const x = (t) => L + (W - L - 10) * (t - t0) / Math.max(t1 - t0, 1);
  const y = (v) => H - B - (H - B - T) * v / max;
  for (const f of [0, 0.5, 1]) {
    svg.append(sv("line", { x1: L, x2: W - 10, y1: y(max * f), y2: y(max * f), stroke: "#eceef2" }));
    svg.append(sv("text", { x: L - 6, y: y(max * f) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7385" },
      rate(max * f)));
  }
  svg.append(sv("text", { x: L, y: H - 6, "font-size": 11, fill: "#6b7385" }, when(t0)));
  svg.append(sv("text", { x: W - 10, y: H - 6, "text-anchor": "end", "font-size": 11, fill: "#6b7385" }, when(t1)));
  for (const s of series) {
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[s.key] || 0).toFixed(1)}`).join("");
    const attrs = { d, fill: "none", stroke: s.color, "stroke-width": 2 };
    if (s.dash) attrs["stroke-dasharray"] = s.dash;
    svg.append(sv("path", attrs));
  }
  return svg;
}

function legend(series) {
  return el("div", { class: "legend" }, series.map((s) => {
    const i = el("i");
    i.style.background = s.color;
    return el("span", {}, i, s.label);
  }));
}

// ------------------------------------------------------------------ pages

function overview(d) {
  const st = d.store, c = d.cache, t = d.totals || {};
  const states = Object.entries(d.peers.states).map(([k, v]) => `${v} ${k}`).join(", ") || "none";
  const rep = d.replication;
  const series = [{ key: "fetched", label: "fetched from peers", color: "#2f6fde" },
    { key: "served", label: "served to peers", color: "#2e9d57" },
    { key: "read", label: "read by applications", color: "#d99a00", dash: "6 4" }];
  const warn = d.warnings.length
    ? el("ul", { class: "warnings" }, d.warnings.map((w) => el("li", { class: `w-${w.kind}` }, w.text)))
    : el("p", { class: "ok-msg" }, "No warnings: within budget, every peer reachable, every file durable.");
  return [
    el("div", { class: "grid" },
      card("This node", short(d.node.id), `listening on ${d.node.addr.split("@").pop()}`),
      card("Namespace", short(d.namespace.id_prefix) + "…", `${d.namespace.capability}, ${d.namespace.files} file${d.namespace.files === 1 ? "" : "s"}` +
        (d.namespace.closed ? ", member list" : ", open")),
      card("Store", bytes(st.bytes), `of ${bytes(st.budget)} cache budget`, barOf(st.bytes, st.budget)),
      card("Replicas for others", bytes(st.replica_bytes), `of ${bytes(st.replica_budget)}`,
        barOf(st.replica_bytes, st.replica_budget)),
      card("Cache hit ratio", pct(c.hit_ratio), `${c.chunk_reads} chunk reads, ${c.misses} fetched on demand`),
      card("Peers", String(d.peers.total), states),
      card("Fetched / served", `${bytes(t.fetched)} / ${bytes(t.served)}`, `${bytes(t.read)} read by applications`),
      card("Files written here", `${rep.durable} durable`,
        `${rep.replicating} replicating, ${rep["local-only"]} local only`)),
    section("Rates, last 10 minutes", legend(series), lineChart(series, d.rates)),
    section("Warnings", warn),
  ];
}

function transfers(d) {
  const live = d.live.map((t) => el("tr", { "data-path": t.path },
    el("td", {}, t.path), el("td", { class: "num live-bytes" }, bytes(t.bytes)), el("td", { class: "num" }, rate(t.rate)),
    el("td", { class: "num" }, t.held_fraction === null ? "–" : pct(t.held_fraction)),
    el("td", { class: "num" }, secs(t.seconds_left)),
    el("td", {}, Object.entries(t.peers).map(([p, b]) => el("span", { class: "chip mono" }, `${short(p)} ${bytes(b)}`)))));
  const livePeers = d.live_peers.map((p) => el("tr", {}, el("td", { class: "mono" }, short(p.id)),
    el("td", { class: "num" }, bytes(p.bytes)), el("td", { class: "num" }, rate(p.rate))));
  const hist = d.history.map((h) => el("tr", { "data-path": h.path },
    el("td", {}, h.path), el("td", {}, when(h.ended)), el("td", { class: "num" }, secs(h.ended - h.started)),
    el("td", { class: "num hist-bytes" }, bytes(h.bytes)), el("td", { class: "num" }, String(h.chunks)),
    el("td", { class: "num" }, bytes(h.ahead_bytes)),
    el("td", {}, Object.entries(h.peers).map(([p, b]) => el("span", { class: "chip mono" }, `${short(p)} ${bytes(b)}`)))));
  const imgs = d.top_images.map((i) => el("tr", {}, el("td", {}, i.path), el("td", { class: "num" }, bytes(i.bytes_read)),
    el("td", { class: "num" }, bytes(i.fetched)), el("td", { class: "num" }, pct(i.hit_ratio)),
    el("td", { class: "num" }, `${pct(i.ahead_efficiency)} of ${bytes(i.ahead)}`)));
  const peers = d.top_peers.map((p) => el("tr", {}, el("td", { class: "mono" }, short(p.id)),
    el("td", { class: "num" }, bytes(p.fetched)), el("td", { class: "num" }, bytes(p.served))));
  const t = d.totals, ra = d.read_ahead;
  const most = Math.max(t.fetched || 0, t.served || 0, 1);
  return [
    section("Live transfers", table([["image"], ["received", "num"], ["rate", "num"], ["held here", "num"],
      ["time left", "num"], ["from peers"]], live, "no transfer under way")),
    el("div", { class: "two" },
      section("Live, per peer", table([["peer"], ["bytes", "num"], ["rate", "num"]], livePeers, "no peer sending")),
      section("Served vs fetched (since analytics began)",
        el("div", { class: "row" }, `fetched ${bytes(t.fetched)}`), barOf(t.fetched || 0, most),
        el("div", { class: "row" }, `served ${bytes(t.served)}`), barOf(t.served || 0, most),
        el("p", { class: "key" }, `Read-ahead: ${bytes(ra.fetched)} fetched ahead, ${bytes(ra.used)} used, ` +
          `${bytes(ra.wasted)} wasted (efficiency ${pct(ra.efficiency)}).`))),
    section("Top images", table([["image"], ["read", "num"], ["fetched", "num"], ["cache hit ratio", "num"],
      ["read-ahead used", "num"]], imgs)),
    section("Top peers", table([["peer"], ["fetched from", "num"], ["served to", "num"]], peers)),
    section("History (last transfers, kept across restarts)", table([["image"], ["ended"], ["took", "num"],
      ["bytes", "num"], ["chunks", "num"], ["read ahead", "num"], ["from peers"]], hist, "no transfer finished yet")),
  ];
}

function topology(d) {
  const images = d.images;
  if (state.image === null && images.length) state.image = images[0].path;
  const chosen = images.find((i) => i.path === state.image) || null;
  const holds = new Map((chosen ? chosen.holders : []).map((h) => [h.id, h.fraction]));
  const W = 900, H = 520, cx = W / 2, cy = H / 2;
  const svg = sv("svg", { class: "graph", viewBox: `0 0 ${W} ${H}` });
  const peers = d.nodes.filter((n) => n.role === "peer"), far = d.nodes.filter((n) => n.role === "peer-of-peer");
  const pos = new Map([[d.self, [cx, cy]]]);
  peers.forEach((n, i) => {
    // Two peers sit left and right of this node, not on its label below it.
    const a = 2 * Math.PI * i / Math.max(peers.length, 1);
    pos.set(n.id, [cx + 220 * Math.cos(a), cy + 150 * Math.sin(a)]);
  });
  far.forEach((n, i) => {
    const a = -Math.PI / 2 + Math.PI / Math.max(far.length, 1) + 2 * Math.PI * i / Math.max(far.length, 1);
    pos.set(n.id, [cx + 330 * Math.cos(a), cy + 215 * Math.sin(a)]);
  });
  for (const l of d.links) {
    const [x1, y1] = pos.get(l.from), [x2, y2] = pos.get(l.to);
    svg.append(sv("line", { class: `link ${l.state}`, x1, y1, x2, y2 }));
    if (l.rtt_ms !== null) {
      svg.append(sv("text", { class: "rtt", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 8, "text-anchor": "middle" },
        `RTT ${l.rtt_ms} ms`));
    }
  }
  for (const n of d.nodes) {
    const [x, y] = pos.get(n.id);
    const g = sv("g", { class: `node ${n.role}`, "data-id": n.id, "data-role": n.role,
      "data-holds": holds.has(n.id) ? String(holds.get(n.id)) : "0" });
    if (holds.has(n.id)) {
      const whole = holds.get(n.id) >= 1;
      g.append(sv("circle", { class: whole ? "hold-whole" : "hold-part", cx: x, cy: y, r: 27 }));
    }
    g.append(sv("circle", { class: "body", cx: x, cy: y, r: 20 }));
    g.append(sv("text", { class: "id", x, y: y + 40, "text-anchor": "middle" },
      n.role === "self" ? `${short(n.id)} (this node)` : short(n.id)));
    const held = holds.has(n.id) ? (holds.get(n.id) >= 1 ? "holds it whole" : `holds ${pct(holds.get(n.id))}`) : "";
    const info = n.role === "self" ? held : [n.state, held].filter(Boolean).join(" · ");
    g.append(sv("text", { class: "info", x, y: y + 54, "text-anchor": "middle" }, info));
    g.append(sv("title", {}, `${n.id}\n${(n.addrs || []).join(", ")}\nstate ${n.state}, session ${n.session}`));
    svg.append(g);
  }
  const select = el("select", { id: "image-select" }, images.map((i) =>
    el("option", { value: i.path }, i.path)));
  select.value = state.image || "";
  select.addEventListener("change", () => { state.image = select.value; refresh(); });
  const holderRows = (chosen ? chosen.holders : []).map((h) => el("tr", { "data-id": h.id },
    el("td", { class: "mono" }, short(h.id) + (h.self ? " (this node)" : "")),
    el("td", {}, h.fraction >= 1 ? "whole" : `part: ${pct(h.fraction)}`)));
  return [
    section(`Nodes of the namespace as this node knows them (${d.nodes.length})`,
      el("div", { class: "row" }, el("label", { for: "image-select" }, "Who holds "), select),
      el("div", { class: "legend" },
        ["connected", "degraded", "unreachable", "unknown", "hearsay"].map((s) =>
          el("span", {}, el("i", { class: `c-${s}` }), s === "hearsay" ? "peer of a peer (from holdings)" : s)),
        el("span", {}, "green ring: holds the image whole; orange: in part")),
      svg),
    section(chosen ? `Holders of ${chosen.path}` : "Holders",
      table([["node"], ["holds"]], holderRows, "no node is known to hold it")),
  ];
}

function images(d) {
  const rows = d.images.map((i) => el("tr", { "data-path": i.path },
    el("td", {}, i.path), el("td", { class: "num" }, bytes(i.size)),
    el("td", {}, Object.entries(i.meta).map(([k, v]) => el("span", { class: "chip" }, `${k}: ${v}`))),
    el("td", { class: "num copies" }, `${i.copies_held} / ${i.copies_wanted ?? "–"}`),
    el("td", {}, i.state || "–"),
    el("td", { class: "holders" }, i.holders.map((h) => el("span", {
      class: `chip mono ${h.fraction >= 1 ? "whole" : "part"}${h.self ? " self" : ""}`, "data-id": h.id,
    }, `${short(h.id)} ${h.fraction >= 1 ? "whole" : pct(h.fraction)}`))),
    el("td", { class: "num" }, i.access ? pct(i.access.hit_ratio) : "–"),
    el("td", {}, new Date(i.modified * 1000).toLocaleString())));
  const note = d.total > d.shown ? el("p", { class: "key" }, `${d.shown} of ${d.total} files shown`) : null;
  return [section(`Images (${d.total})`, note, table([["path"], ["size", "num"], ["metadata"],
    ["copies held / wanted", "num"], ["replication (if written here)"], ["where held"], ["hit ratio", "num"], ["modified"]], rows,
  "the namespace has no files"))];
}

const PAGES = { overview, transfers, topology, images };

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  const status = document.getElementById("status");
  try {
    const page = state.page;
    const r = await fetch(`/api/${page}`, { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const data = await r.json();
    if (page !== state.page) return;
    const main = document.getElementById("main");
    main.replaceChildren(...PAGES[page](data));
    main.setAttribute("data-page", page);
    main.setAttribute("data-updated", String(Date.now()));
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.className = "status";
  } catch (e) {
    status.textContent = `cannot reach the daemon (${e.message}); retrying`;
    status.className = "status error";
  } finally {
    state.busy = false;
  }
}

function route() {
  const page = (location.hash || "#overview").slice(1);
  state.page = PAGES[page] ? page : "overview";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === state.page);
  document.getElementById("main").replaceChildren();
  refresh();
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  route();
  state.timer = setInterval(refresh, POLL_MS);
});
