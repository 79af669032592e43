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
        "audit": {
            k: audit.get(k)
            for k in ("passed", "mia_auc", "mia_auc_upper", "reid_rate", "n_candidates", "n_accepted", "attempt")
        }
        if audit
        else None,
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
