// The site's dashboard: renders /api/state (node/dashboard.py) every 2 s.
"use strict";

function body(id) {
  return document.querySelector(`#${id} .body`);
}

function table(headers, rows, attrs) {
  return rows.length ? sortable(el("table", attrs || {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))), el("tbody", {}, rows)))
    : el("p", { class: "muted" }, "nothing yet");
}

function renderStages(st) {
  document.getElementById("title").textContent = `site ${st.site}`;
  const stages = Object.entries(st.stages).map(([name, s]) => el("tr", { "data-stage": name },
    el("td", {}, name), el("td", {}, fmt(s.seconds, 1)), el("td", {}, when(s.finished))));
  const lo = st.local_only;
  body("stages").replaceChildren(table(["stage", "seconds", "finished"], stages),
    lo ? el("p", { "data-field": "local-only" }, `local-only baseline on this site's real data (test split): ` +
      `accuracy ${fmt((lo.test || {}).accuracy)}, balanced accuracy ${fmt((lo.test || {})["balanced-accuracy"])}, AUROC ${fmt((lo.test || {}).auroc)}`) : "");
}

function renderAudits(state) {
  const rows = state.audits.map((a) => el("tr", { "data-run": a.run_id },
    el("td", {}, a.run_id),
    el("td", { class: a.passed ? "pass" : "fail" }, a.passed ? "passed" : `failed: ${a.failed.join(", ")}` + (a.control ? `; ${a.control}` : "")),
    el("td", {}, a.attempt ? `${a.attempt.number ?? "–"} (${a.attempt.failed_before ?? 0} failed before)` : "–"),
    el("td", {}, a.n_candidates ?? "–"), el("td", {}, a.n_accepted ?? "–"), el("td", {}, a.n_paths ?? "–"),
    el("td", {}, fmt(a.mia_auc_upper)), el("td", {}, fmt(a.reid_rate_upper)),
    el("td", {}, state.reports.includes(`audit-${a.run_id}.html`)
      ? el("a", { href: `/report?name=audit-${a.run_id}.html`, target: "_blank", rel: "noopener" }, "report") : "–")));
  body("audits").replaceChildren(table(["run", "verdict", "attempt", "candidates", "accepted", "paths", "MIA AUC (upper)", "re-id (upper)", "report"], rows));
}

function renderPublished(pub) {
  const rows = ((pub || {}).bundles || []).map((b) => el("tr", { "data-bundle": b.bundle_id },
    el("td", { title: b.bundle_id }, b.bundle_id.slice(0, 12)), el("td", {}, b.sequence), el("td", {}, b.run_id),
    el("td", {}, b.n_samples), el("td", {}, b.status), el("td", {}, (b.uploaded_at || b.built_at || "").slice(0, 19))));
  body("published").replaceChildren(table(["bundle", "sequence", "run", "samples", "status", "when"], rows));
}

function renderPulled(pool) {
  const rows = Object.entries(pool || {}).map(([id, b]) => el("tr", { "data-bundle": id },
    el("td", { title: id }, id.slice(0, 12)), el("td", {}, b.site), el("td", {}, b.sequence), el("td", {}, b.route),
    el("td", {}, b.n_samples), el("td", {}, (b.pulled_at || "").slice(0, 19))));
  body("pulled").replaceChildren(table(["bundle", "from site", "sequence", "route", "samples", "pulled"], rows));
}

function renderRounds(rounds) {
  const runs = [...new Set(rounds.map((r) => r.run_id))];
  const charts = runs.slice(-3).map((run) => {
    const ev = rounds.filter((r) => r.run_id === run && r.phase === "evaluate" && r.metrics);
    const series = ["accuracy", "balanced-accuracy", "auroc"].map((m) => ({ name: m, points: ev.map((r) => [r.round, r.metrics[m] ?? null]) }));
    const lo = ev.length ? ev[ev.length - 1].metrics["local-only-accuracy"] : null;
    return lineChart({ title: `run ${run}`, series, marks: lo !== null && lo !== undefined ? [{ name: "local-only accuracy", y: lo }] : [] });
  });
  const rows = rounds.slice().reverse().map((r) => el("tr", {},
    el("td", {}, String(r.run_id)), el("td", {}, r.round), el("td", {}, r.phase),
    el("td", {}, fmt((r.metrics || {}).accuracy)), el("td", {}, fmt((r.metrics || {}).auroc)),
    el("td", {}, fmt((r.metrics || {})["train-loss"])), el("td", {}, when(r.at))));
  body("rounds").replaceChildren(el("div", { class: "charts" }, charts),
    table(["run", "round", "phase", "accuracy", "AUROC", "train loss", "when"], rows));
}

function renderLedger(ledger) {
  const rows = ledger.map((e) => el("tr", {}, el("td", {}, e.stage), el("td", {}, when(e.started ?? e.time)),
    el("td", {}, fmt(e.seconds, 1)), el("td", {}, e.run_id ?? ""), el("td", {}, e.passed === undefined || e.passed === null ? "" : e.passed ? "passed" : "failed")));
  body("ledger").replaceChildren(table(["stage", "when", "seconds", "run", "verdict"], rows));
}

poll((state) => {
  if (changed("stages", state.status)) renderStages(state.status);
  if (changed("audits", [state.audits, state.reports])) renderAudits(state);
  if (changed("published", state.status.published)) renderPublished(state.status.published);
  if (changed("pulled", state.status.pool)) renderPulled(state.status.pool);
  if (changed("rounds", state.rounds)) renderRounds(state.rounds);
  if (changed("ledger", state.ledger)) renderLedger(state.ledger);
});
