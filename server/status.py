"""The coordinator's state for `plan-server status`: registered sites, pooled bundles with the
audit figures their attestations carry, and the current or last federation run."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from common.bundle import read_predicate
from server.coordinator import CoordinatorDir
from server.store import BundleStore


def _bundle_row(store: BundleStore, record) -> dict:
    """A pooled bundle with the audit figures its attestation carries (verified when it was stored)."""
    with store.open(record.bundle_id) as f:
        audit = read_predicate(f).get("audit") or {}
    return {
        **record.as_dict(),
        "audit": {k: audit.get(k) for k in ("passed", "mia_auc", "reid_rate", "closer_to_train", "n_accepted")},
    }


def run_status(cd: CoordinatorDir) -> dict | None:
    """The current or last federation run: status, round reached, the last round's aggregated
    metrics, and the baselines once they ran."""
    latest = cd.runs / "latest.json"
    if not latest.exists():
        return None
    info = json.loads(latest.read_text())
    run_dir = cd.runs / info["run_dir"]
    for name in ("progress.json", "results.json"):
        path = run_dir / name
        info[name.removesuffix(".json")] = json.loads(path.read_text()) if path.exists() else None
    results = info.pop("results") or {}
    evaluate = results.get("evaluate", {})
    info["last_metrics"] = evaluate[max(evaluate, key=int)] if evaluate else None
    info["baselines"] = results.get("baselines")
    info["degraded"], info["errors"] = results.get("degraded"), results.get("errors")
    return info


def coordinator_status(cd: CoordinatorDir) -> dict:
    """{"sites", "bundles", "run"}: what `plan-server status --json` prints."""
    store = BundleStore(cd.store)
    return {
        "sites": sorted(cd.trust().all()),
        "bundles": [_bundle_row(store, b) for b in store.list()],
        "run": run_status(cd),
    }


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_status(info: dict, out: Console) -> None:
    """coordinator_status's figures as a table and a few lines."""
    out.print(f"sites registered: {', '.join(info['sites']) or 'none'}")
    table = Table("bundle", "site", "samples", "MIA AUC", "re-id rate", "stored")
    for b in info["bundles"]:
        a = b["audit"]
        table.add_row(
            str(b["bundle_id"])[:12],
            str(b["site"]),
            str(b["n_samples"]),
            _num(a["mia_auc"]),
            _num(a["reid_rate"]),
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(b["stored_at"])),
        )
    out.print(table)
    run = info["run"]
    if run is None:
        out.print("run: none yet")
        return
    progress = run["progress"] or {}
    out.print(
        f"run {run['run_id']} ({run.get('label', '')}): {run['status']}, "
        f"round {progress.get('round', '-')} {progress.get('phase', '')}" + (" [DEGRADED]" if run["degraded"] else "")
    )
    if run.get("failure"):
        out.print(f"[red]FAILED[/red]: {run['failure']}")
    if run["last_metrics"]:
        out.print(
            "last round: "
            + ", ".join(f"{k} {_num(v)}" for k, v in sorted(run["last_metrics"].items()) if k != "num-examples")
        )
    for e in run["errors"] or []:
        out.print(f"  round {e['round']} {e['phase']}: {e['site']} failed: {e['error']}")
