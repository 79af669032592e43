"""What a site has done so far, read from its workspace only."""

from __future__ import annotations

import json

from rich.console import Console

from node.site.workspace import Workspace, ledger_lines


def read_json(path) -> dict | list | None:
    """The JSON in `path`, or None when there is no such file yet."""
    return json.loads(path.read_text()) if path.exists() else None


def latest_audit(ws: Workspace) -> dict | None:
    """audit.json of the latest synthesis run; None until that run has been audited."""
    latest = read_json(ws.synth / "latest.json")
    return read_json(ws.synth / latest["run_id"] / "audit.json") if latest else None


def control_message(report: dict) -> str | None:
    """One line for the site on a failed audit's control (node.audit.run.control), or None without one."""
    c = report.get("control")
    if not c:
        return None
    if c["passed"]:
        return f"control: {c['n']} real unseen records pass the same gate, so the synthetic set is what failed"
    return (
        f"control: {c['n']} real unseen records fail the same gate too ({', '.join(c['failed'])}): at this "
        "holdout size the gate cannot tell private data from leaking; more holdout patients (split.holdout) "
        "narrow its bounds"
    )


def audit_headline(audit: dict) -> dict:
    """The figures of an audit report that `plan-node status` and `audit` lead with."""
    keys = ("passed", "mia_auc", "mia_auc_upper", "reid_rate", "n_candidates", "n_accepted", "attempt")
    return {k: audit.get(k) for k in keys}


def site_status(ws: Workspace) -> dict:
    stages = {
        entry["stage"]: {"seconds": entry["seconds"], "finished": entry["started"] + entry["seconds"]}
        for entry in ledger_lines(ws)
        if "seconds" in entry  # audit attempts (node.site.attempts) share the ledger
    }
    audit = latest_audit(ws)
    return {
        "site": ws.config().name,
        "stages": stages,
        "audit": audit_headline(audit) if audit else None,
        "published": read_json(ws.bundles / "published.json"),
        "pool": read_json(ws.pool / "index.json"),
        "local_only": read_json(ws.reports / "local_only.json"),
        "federation": read_json(ws.reports / "federation.json"),  # the last round this site took part in
    }


def print_status(info: dict, out: Console) -> None:
    """site_status's figures, a few lines for `plan-node status`."""
    out.print(f"[bold]{info['site']}[/bold]")
    for stage, s in info["stages"].items():
        out.print(f"  {stage:<12} done in {s['seconds']:.1f} s")
    out.print(f"  audit: {info['audit']}")
    out.print(f"  published: {info['published']}")
    out.print(f"  pool: {len(info['pool'] or [])} bundle(s)")
    fed = info["federation"]
    if fed:
        shown = {k: round(v, 3) for k, v in (fed["metrics"] or {}).items() if k in ("accuracy", "auroc", "train-loss")}
        out.print(f"  federation: run {fed['run_id']}, round {fed['round']} {fed['phase']} {shown}")


def print_audit(ws: Workspace, out: Console) -> bool:
    """The latest audit for `plan-node audit`: its headline figures, each failed check, the control's
    verdict on a failed set (control_message), where the site-only report is.
    Returns whether the set passed."""
    run = ws.latest_run()
    full = json.loads((ws.synth / run / "audit.json").read_text())
    print(json.dumps(audit_headline(full), indent=2))
    for c in full.get("checks", []):
        if not c.get("passed"):
            out.print(f"gate: {c.get('message') or c.get('name')}", style="red", markup=False)
    if line := control_message(full):
        out.print(line, style="yellow", markup=False)
    if not (full.get("lpips") or {}).get("available", True):
        out.print(f"LPIPS not computed: {full['lpips'].get('reason')}", style="yellow", markup=False)
    keep = "shows real images" if full.get("route", "plan") == "plan" else "describes real records"
    out.print(f"report: {ws.reports / f'audit-{run}.html'} ({keep}: keep it at the site)")
    return bool(full.get("passed"))
