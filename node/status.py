"""What a site has done so far, read from its workspace only."""

from __future__ import annotations

import json

from node.workspace import Workspace


def _read_json(path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def site_status(ws: Workspace) -> dict:
    stages = {}
    if ws.ledger.exists():
        for line in ws.ledger.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                stages[entry["stage"]] = {"seconds": entry["seconds"], "finished": entry["started"] + entry["seconds"]}
    latest = _read_json(ws.synth / "latest.json")
    audit = _read_json(ws.synth / latest["run_id"] / "audit.json") if latest else None
    return {
        "site": ws.config().name,
        "stages": stages,
        "audit": {k: audit.get(k) for k in ("passed", "mia_auc", "reid_rate", "n_candidates", "n_accepted")} if audit else None,
        "published": _read_json(ws.bundles / "published.json"),
        "pool": _read_json(ws.pool / "index.json"),
        "local_only": _read_json(ws.reports / "local_only.json"),
    }
