// The coordinator's dashboard: renders /api/state (server/dashboard_state.py) every 2 s.
"use strict";

const METRICS = ["accuracy", "balanced-accuracy", "auroc"];
let selectedRun = null;  // run_dir the charts show; null: the newest

function section(id) {
  return document.querySelector(`#${id} .body`);
}

function pill(text, kind) {
  return el("span", { class: `pill ${kind}` }, text);
}

function renderFederation(f) {
  document.getElementById("title").textContent = `federation ${f.name}`;
  const floor = f.policy_floor;
  section("federation").replaceChildren(el("dl", { class: "facts" },
    el("dt", {}, "route"), el("dd", {}, `${f.route} (${f.route === "plan" ? `${f.image_size}-px images` : "embeddings"}, ${f.n_classes} classes)`),
    el("dt", {}, "bundle schema"), el("dd", {}, f.schema),
    el("dt", {}, "downstream"), el("dd", {}, `${f.strategy}, ${f.rounds} rounds, on ${f.train_on}; quorum ${f.quorum}`),
    el("dt", {}, "policy floor"), el("dd", { "data-field": "policy-floor" },
      `MIA AUC ≤ ${floor.max_mia_auc}, re-identification ≤ ${floor.max_reid_rate}, closer to train ≤ ${floor.max_closer_to_train}, ` +
      `TPR at low FPR ≤ ${floor.max_tpr_at_low_fpr}, at least ${floor.min_accepted} images, copy FPR ${floor.copy_fpr}`),
    el("dt", {}, "trust document"), el("dd", { "data-field": "trust-version" },
      `version ${f.trust_document.version}, each signed copy valid ${Math.round(f.trust_document.ttl_s / 3600)} h`),
  ));
}

function renderSites(sites, now) {
  const rows = sites.map((s) => {
    const node = s.supernode || {};
    const nodeText = node.state === "online" ? pill("online", "good") : node.admitted === false ? pill("revoked", "bad")
      : pill(node.state || "unknown", "neutral");
    const seen = node.state !== "online" && node.last_seen ? `last seen ${ago(node.last_seen, now)}` : "";
    const keyKind = s.key_status === "current" ? "good" : s.key_status === "revoked" ? "bad" : "neutral";
    const quota = s.quota_bytes ? `${(100 * s.bytes_used / s.quota_bytes).toFixed(2)}% of ${(s.quota_bytes / 2 ** 30).toFixed(1)} GiB` : "no quota";
    return el("tr", { "data-site": s.site },
      el("td", {}, s.site),
      el("td", {}, pill(s.key_status, keyKind), " ", el("span", { class: "muted" }, s.keys.map((k) => `${k.key_id.slice(0, 8)} ${k.status}`).join(", "))),
      el("td", { "data-field": "supernode" }, nodeText, " ", el("span", { class: "muted" }, seen)),
      el("td", {}, s.certificate_not_after ? s.certificate_not_after.slice(0, 10) : "–"),
      el("td", { "data-sort": s.bundles }, s.bundles),
      el("td", { "data-sort": s.bytes_used }, quota));
  });
  section("sites").replaceChildren(sortable(el("table", {},
    el("thead", {}, el("tr", {}, ["site", "signing key", "SuperNode", "certificate until", "bundles", "quota used"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows))));
}

const POOL_FIGURES = [
  ["n_accepted", "images"], ["mia_auc_upper", "MIA AUC (upper)"], ["reid_rate_upper", "re-id (upper)"],
  ["closer_to_train_upper", "closer to train (upper)"], ["tpr_at_low_fpr_upper", "TPR@low FPR (upper)"],
];

function renderPool(pool) {
  const rows = pool.map((b) => el("tr", { "data-bundle": b.bundle_id },
    el("td", { title: b.bundle_id }, b.bundle_id.slice(0, 12)),
    el("td", {}, b.site),
    el("td", { "data-sort": b.sequence }, b.sequence),
    el("td", { "data-sort": b.size }, `${(b.size / 1024).toFixed(0)} KiB`),
    el("td", { "data-sort": b.n_samples }, b.n_samples),
    el("td", {}, b.n_paths ?? "–"),
    POOL_FIGURES.map(([k]) => el("td", {
      "data-figure": k, "data-sort": b.figures[k] ?? "",
      class: b.checks[k] === true ? "pass" : b.checks[k] === false ? "fail" : null,
    }, k === "n_accepted" ? fmt(b.figures[k], 0) : fmt(b.figures[k]))),
    el("td", { "data-sort": b.stored_at }, when(b.stored_at))));
  section("pool").replaceChildren(pool.length ? sortable(el("table", {},
    el("thead", {}, el("tr", {}, ["bundle", "site", "sequence", "size", "samples", "paths", ...POOL_FIGURES.map((f) => f[1]), "stored"].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows))) : el("p", { class: "muted" }, "no bundle pooled yet"));
}

function mean(xs) {
  const v = xs.filter((x) => x !== null && x !== undefined);
  return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
}

function renderRuns(runs) {
  const cur = runs.current;
  const phase = document.getElementById("phase");
  if (cur) {
    const p = cur.progress || {};
    phase.textContent = cur.status === "running" ? `run ${cur.run_id}: ${cur.label}, round ${p.round ?? "–"} ${p.phase ?? ""}` : `last run ${cur.status}`;
  }
  const history = runs.history;
  if (!history.length) {
    section("runs").replaceChildren(el("p", { class: "muted" }, "no run yet"));
    return;
  }
  const shown = history.find((r) => r.run_dir === selectedRun) || history[0];
  const sites = Object.keys(shown.per_site).sort();
  const charts = METRICS.map((m) => lineChart({
    title: `${m} per round (${shown.run_dir})`,
    series: [
      ...sites.map((s) => ({ name: s, points: shown.per_site[s][m] })),
      { name: "mean", points: shown.aggregate[m], dashed: true, color: "#111" },
    ],
    marks: [
      { name: "FedAvg real", y: mean(Object.values(shown.baselines.fedavg_real).map((v) => v[m])), color: "#b45309" },
      { name: "local-only", y: mean(Object.values(shown.baselines.local_only).map((v) => v[m])), color: "#6b7280" },
    ].filter((x) => x.y !== null),
  }));
  const finals = el("table", { id: "finals" },
    el("thead", {}, el("tr", {}, ["site", ...METRICS.map((m) => `${m}: federated`), "FedAvg on real", "local-only"].map((h) => el("th", {}, h)))),
    el("tbody", {}, sites.map((s) => el("tr", { "data-site": s },
      el("td", {}, s),
      METRICS.map((m) => el("td", { "data-metric": m, "data-site": s }, fmt((shown.per_site_final[s] || {})[m]))),
      el("td", {}, fmt((shown.baselines.fedavg_real[s] || {}).accuracy)),
      el("td", {}, fmt((shown.baselines.local_only[s] || {}).accuracy))))));
  const problems = [
    ...shown.errors.map((e) => el("li", {}, `round ${e.round} ${e.phase}: ${e.site} failed: ${e.error}`)),
    ...Object.entries(shown.missed).flatMap(([site, ms]) => ms.map((x) => el("li", {}, `round ${x.round} ${x.phase}: ${site} sent nothing`))),
  ];
  const past = el("table", { id: "history" },
    el("thead", {}, el("tr", {}, ["run", "status", "rounds", "strategy", "on", "mean accuracy", "seconds"].map((h) => el("th", {}, h)))),
    el("tbody", {}, history.map((r) => el("tr", {
      class: `clickable${r.run_dir === shown.run_dir ? " selected" : ""}`, "data-run": r.run_dir,
      onclick: () => { selectedRun = r.run_dir; shownJson.runs = null; renderRuns(runs); },
    },
      el("td", {}, r.run_dir),
      el("td", {}, r.failure ? pill("failed", "bad") : r.degraded ? pill("degraded", "bad") : pill(r.status || "–", r.completed ? "good" : "neutral")),
      el("td", {}, `${r.rounds_completed ?? "–"}/${r.rounds ?? "–"}`),
      el("td", {}, r.strategy ?? "–"), el("td", {}, r.train_on ?? "–"),
      el("td", {}, fmt(mean(Object.values(r.per_site_final).map((v) => v.accuracy)))),
      el("td", {}, fmt(r.seconds, 0))))));
  section("runs").replaceChildren(
    el("div", { class: "charts" }, charts),
    el("h2", {}, "Final round per site"), finals,
    problems.length ? el("div", {}, el("h2", {}, "Missed rounds and errors"), el("ul", {}, problems)) : el("p", { class: "muted" }, "no missed round, no error"),
    el("h2", {}, "All runs (click one to show it)"), past);
}

function eventText(e) {
  switch (e.kind) {
    case "upload_accepted": return `bundle ${e.bundle_id.slice(0, 12)} (sequence ${e.sequence}, ${e.n_samples} samples)`;
    case "upload_refused": return `${e.reason}: ${e.message}`;
    case "key_rotated": return `new key ${String(e.key_id).slice(0, 16)} after sequence ${e.last_sequence}`;
    case "key_revoked": return `${e.whole_site ? "whole site" : "key"} revoked; ${e.bundles_removed.length} bundle(s) left the pool`;
    case "run_started": return `run ${e.run_id}: ${e.label}`;
    case "run_ended": return `run ${e.run_id}: ${e.status}, ${e.rounds_completed}/${e.rounds} rounds${e.failure ? `; FAILED: ${e.failure}` : ""}`;
    case "kit_issued": return `site kit issued, certificate until ${String(e.client_cert_not_after).slice(0, 10)}`;
    case "site_registered": return "site registered";
    default: return JSON.stringify(e);
  }
}

function renderEvents(events) {
  section("events").replaceChildren(events.length ? el("table", {},
    el("thead", {}, el("tr", {}, ["time", "event", "site", "detail"].map((h) => el("th", {}, h)))),
    el("tbody", {}, events.map((e) => el("tr", { "data-kind": e.kind },
      el("td", {}, when(e.time)),
      el("td", { class: e.kind === "upload_refused" || e.kind === "key_revoked" ? "fail" : null }, e.kind.replace("_", " ")),
      el("td", {}, e.site ?? "–"),
      el("td", {}, eventText(e)))))) : el("p", { class: "muted" }, "no event recorded yet"));
}

poll((state) => {
  if (changed("federation", state.federation)) renderFederation(state.federation);
  // "last seen ... ago" moves with the clock: redrawn at least every half minute
  if (changed("sites", [state.sites, Math.floor(state.generated_at / 30)])) renderSites(state.sites, state.generated_at);
  if (changed("pool", state.pool)) renderPool(state.pool);
  if (changed("runs", [state.runs, selectedRun])) renderRuns(state.runs);
  if (changed("events", state.events)) renderEvents(state.events);
});
