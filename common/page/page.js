// Shared by the coordinator's and the site's dashboards: DOM building without innerHTML (every
// string from the server is text, never markup) and a small SVG line chart. No library, no CDN.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

// el("td", {class: "x", "data-site": s}, "text", child, ...): an element with attributes and children
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : typeof x === "number" ? x.toFixed(digits) : String(x);
}

function when(unixSeconds) {
  if (!unixSeconds) return "–";
  return new Date(unixSeconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function ago(unixSeconds, now) {
  if (!unixSeconds) return "never";
  const s = Math.max(0, Math.round(now - unixSeconds));
  return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

// lineChart({title, series: [{name, points: [[x, y], ...], dashed}], marks: [{name, y, color}], yMin, yMax})
// -> an <svg>. Every point has a <title> (hover shows its value); clicking a legend entry hides
// or shows its line.
function lineChart(spec) {
  const W = 480, H = 240, L = 44, R = 140, T = 24, B = 30;
  const all = spec.series.flatMap((s) => s.points).filter((p) => p[1] !== null);
  const xs = all.map((p) => p[0]);
  const xMin = Math.min(...xs, 1), xMax = Math.max(...xs, 2);
  const yMin = spec.yMin ?? 0, yMax = spec.yMax ?? 1;
  const X = (x) => L + ((x - xMin) / (xMax - xMin || 1)) * (W - L - R);
  const Y = (y) => T + (1 - (y - yMin) / (yMax - yMin || 1)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": spec.title });
  root.append(svg("text", { x: L, y: 14, class: "chart-title" }, spec.title));
  for (let i = 0; i <= 4; i++) {
    const v = yMin + ((yMax - yMin) * i) / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" }));
    root.append(svg("text", { x: L - 6, y: Y(v) + 4, class: "tick", "text-anchor": "end" }, v.toFixed(2)));
  }
  for (let x = Math.ceil(xMin); x <= xMax; x++) {
    root.append(svg("text", { x: X(x), y: H - 10, class: "tick", "text-anchor": "middle" }, `round ${x}`));
  }
  const groups = {};
  spec.series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const g = svg("g", { "data-series": s.name });
    const pts = s.points.filter((p) => p[1] !== null);
    if (pts.length) {
      g.append(svg("polyline", {
        points: pts.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "),
        fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": s.dashed ? "5 4" : null,
      }));
      for (const p of pts) {
        g.append(svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: color },
          svg("title", {}, `${s.name}, round ${p[0]}: ${fmt(p[1])}`)));
      }
    }
    groups[s.name] = g;
    root.append(g);
  });
  (spec.marks || []).forEach((m, i) => {
    const g = svg("g", { "data-series": m.name });
    const color = m.color || "#777";
    // a baseline is a short bar just right of the last round, clear of the lines and the legend
    g.append(svg("line", { x1: X(xMax) + 4, x2: X(xMax) + 18, y1: Y(m.y), y2: Y(m.y), stroke: color, "stroke-width": 3 },
      svg("title", {}, `${m.name}: ${fmt(m.y)}`)));
    groups[m.name] = g;
    root.append(g);
  });
  const legend = [...spec.series.map((s, i) => [s.name, s.color || PALETTE[i % PALETTE.length], s.dashed]),
    ...(spec.marks || []).map((m) => [m.name, m.color || "#777", false])];
  legend.forEach(([name, color, dashed], i) => {
    const y = T + 4 + i * 16;
    const item = svg("g", { class: "legend", transform: `translate(${W - R + 26},${y})` },
      svg("line", { x1: 0, x2: 16, y1: 0, y2: 0, stroke: color, "stroke-width": 3, "stroke-dasharray": dashed ? "4 3" : null }),
      svg("text", { x: 20, y: 4 }, name));
    item.addEventListener("click", () => {
      const g = groups[name];
      const hidden = g.getAttribute("visibility") === "hidden";
      g.setAttribute("visibility", hidden ? "visible" : "hidden");
      item.setAttribute("opacity", hidden ? 1 : 0.35);
    });
    root.append(item);
  });
  return root;
}

// sortable(table): clicking a header sorts the body's rows by that column (numbers as numbers)
function sortable(table) {
  const heads = table.querySelectorAll("th");
  heads.forEach((th, col) => {
    th.classList.add("sortable");
    th.addEventListener("click", () => {
      const body = table.tBodies[0];
      const dir = th.dataset.dir === "asc" ? "desc" : "asc";
      heads.forEach((h) => delete h.dataset.dir);
      th.dataset.dir = dir;
      const key = (tr) => {
        const cell = tr.children[col];
        const v = cell.dataset.sort ?? cell.textContent;
        const n = parseFloat(v);
        return Number.isNaN(n) ? v : n;
      };
      const rows = [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0));
      if (dir === "desc") rows.reverse();
      body.append(...rows);
    });
  });
  return table;
}

// changed(name, data): true the first time and whenever `data` differs from the last call's for
// `name`. A section is redrawn only then, so a chosen sort order or a hidden chart line stays put
// between polls.
const shownJson = {};

function changed(name, data) {
  const json = JSON.stringify(data);
  if (shownJson[name] === json) return false;
  shownJson[name] = json;
  return true;
}

// poll(render): call render(state) with /api/state now and every `ms`; show errors in #status
function poll(render, ms = 2000) {
  const status = document.getElementById("status");
  async function tick() {
    try {
      const reply = await fetch("/api/state", { credentials: "same-origin", cache: "no-store" });
      if (!reply.ok) throw new Error(`${reply.status} ${await reply.text()}`);
      render(await reply.json());
      status.textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC`;
      status.className = "ok";
    } catch (e) {
      status.textContent = `cannot update: ${e.message}`;
      status.className = "bad";
    }
  }
  tick();
  setInterval(tick, ms);
}
