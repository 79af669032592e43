"""What the coordinator dashboard shows, read from the coordinator directory (server/coordinator.py).

`snapshot(cd)` is one JSON-ready dict: the federation, its sites, the pool, the runs and the
events. It reads files and databases the coordinator already keeps; it writes nothing and holds
no state, so the page shows what is on disk at the moment it asks. It carries signed figures and
the coordinator's own records only: no site data (no image, no embedding) is ever read.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.bundle import PREDICATE_TYPE, read_predicate
from common.eventlog import read_events
from common.policy import evaluate
from server.coordinator import CoordinatorDir
from server.fleet_gateway import node_key_der
from server.store import BundleStore

# the figures a pooled bundle's signed audit carries that the pool table shows
AUDIT_FIGURES = ("n_accepted", "mia_auc_upper", "reid_rate_upper", "closer_to_train_upper", "tpr_at_low_fpr_upper")
METRICS = ("accuracy", "balanced-accuracy", "auroc")


def snapshot(cd: CoordinatorDir, *, now: float | None = None) -> dict:
    """{"federation", "sites", "pool", "runs", "events", "generated_at"} for the dashboard."""
    now = time.time() if now is None else now
    fed = cd.config()
    store = BundleStore(cd.store)
    try:
        pool = [_bundle(store, rec, fed.policy) for rec in store.list()]
    finally:
        store.close()
    return {
        "generated_at": now,
        "federation": _federation(cd, fed),
        "sites": _sites(cd, pool, fed.site_quota_bytes, now),
        "pool": pool,
        "runs": _runs(cd),
        "events": read_events(cd.events),
    }


def _federation(cd: CoordinatorDir, fed) -> dict:
    version, _ = cd.trust().snapshot()
    return {
        "name": fed.name,
        "route": fed.route,
        "schema": PREDICATE_TYPE,
        "image_size": fed.image_size,
        "n_classes": fed.n_classes,
        "quorum": fed.quorum,
        "rounds": fed.downstream.rounds,
        "strategy": fed.downstream.strategy,
        "train_on": fed.downstream.train_on,
        "policy_floor": fed.policy.model_dump(mode="json"),
        "trust_document": {"version": version, "ttl_s": fed.trust_document_ttl_s},
    }


def _bundle(store: BundleStore, rec, policy) -> dict:
    """A pooled bundle, its signed audit's figures and each gated figure's check against the floor."""
    with store.open(rec.bundle_id) as f:
        audit = read_predicate(f).get("audit") or {}
    checks = {c["name"]: c["passed"] for c in evaluate(audit, policy)}
    return {
        "bundle_id": rec.bundle_id,
        "site": rec.site,
        "sequence": rec.sequence,
        "size": rec.size,
        "n_samples": rec.n_samples,
        "stored_at": rec.stored_at,
        "passed": audit.get("passed"),
        "n_paths": audit.get("n_paths"),
        "figures": {k: audit.get(k) for k in AUDIT_FIGURES},
        "checks": {k: checks.get(k) for k in AUDIT_FIGURES if k in checks},
    }


def _sites(cd: CoordinatorDir, pool: list[dict], quota: int | None, now: float) -> list[dict]:
    """Every site the coordinator knows: its keys, SuperNode, certificate and pool share."""
    entries = cd.trust().entries()
    names = sorted({e.site for e in entries} | {p.stem for p in cd.node_keys.glob("*.pub")})
    nodes = _supernodes(cd, now)
    out = []
    for site in names:
        mine = [e for e in entries if e.site == site]
        keys = [{"key_id": e.key_id[:16], "status": e.status, "added_at": e.added_at} for e in mine]
        statuses = {k["status"] for k in keys}
        used = sum(b["size"] for b in pool if b["site"] == site)
        out.append(
            {
                "site": site,
                "key_status": "revoked" if statuses == {"revoked"} else "current" if "current" in statuses else "none",
                "keys": keys,
                "supernode": nodes.get(site, {"admitted": (cd.node_keys / f"{site}.pub").exists(), "state": "unknown"}),
                "certificate_not_after": _cert_expiry(cd.root / "clients" / f"{site}.crt"),
                "bundles": sum(1 for b in pool if b["site"] == site),
                "bytes_used": used,
                "quota_bytes": quota,
            }
        )
    return out


def _cert_expiry(path: Path) -> str | None:
    if not path.exists():
        return None
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.isoformat()


def _supernodes(cd: CoordinatorDir, now: float) -> dict[str, dict]:
    """site -> {"admitted", "state" ("online" / "offline"), "last_seen"} from the SuperLink's node
    table, matched to sites by the SuperNode keys the Fleet gateway admits. The table is Flower's
    (1.41); when it is absent or shaped otherwise every site reads "unknown"."""
    keys = {}
    for folder, admitted in ((cd.node_keys, True), (cd.revoked_node_keys, False)):
        for pub in folder.glob("*.pub"):
            try:
                der = node_key_der(serialization.load_ssh_public_key(pub.read_bytes().strip()))
            except ValueError:
                continue
            keys[der] = (pub.stem, admitted)
    db = cd.root / "superlink.db"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
            rows = conn.execute("SELECT public_key, online_until, last_activated_at FROM node").fetchall()
    except sqlite3.Error:
        return {}
    out = {}
    for pem, online_until, last_activated in rows:
        try:
            der = node_key_der(serialization.load_pem_public_key(pem))
        except (ValueError, TypeError):
            continue
        if der not in keys:
            continue
        site, admitted = keys[der]
        online = online_until is not None and float(online_until) > now
        out[site] = {
            "admitted": admitted,
            "state": "online" if online and admitted else "offline",
            "last_seen": _last_seen(online_until, last_activated),
        }
    return out


def _last_seen(online_until, last_activated) -> float | None:
    """Unix seconds of the node's last heartbeat: Flower keeps `online_until` = last heartbeat +
    a grace, so this is approximate (to the heartbeat interval); else its last activation."""
    if online_until is not None:
        return float(online_until)
    if last_activated:
        try:
            return dt.datetime.fromisoformat(last_activated).timestamp()
        except ValueError:
            return None
    return None


def _runs(cd: CoordinatorDir) -> dict:
    """{"current": latest.json + progress, "history": every run folder, newest first, each with its
    per-round aggregate and per-site metrics, baselines, errors and missed rounds}."""
    current = None
    latest = cd.runs / "latest.json"
    if latest.exists():
        current = json.loads(latest.read_text())
        progress = cd.runs / current.get("run_dir", "") / "progress.json"
        current["progress"] = json.loads(progress.read_text()) if progress.exists() else None
    history = []
    for folder in sorted((p for p in cd.runs.glob("*") if p.is_dir()), reverse=True):
        history.append(_run(folder))
    return {"current": current, "history": history}


def _run(folder: Path) -> dict:
    path = folder / "results.json"
    r = json.loads(path.read_text()) if path.exists() else {}
    rounds = sorted(int(k) for k in r.get("evaluate", {}))
    per_site: dict[str, dict[str, list]] = {}
    for rnd in rounds:
        for site, m in r.get("per_site", {}).get(str(rnd), {}).get("evaluate", {}).items():
            series = per_site.setdefault(site, {k: [] for k in METRICS})
            for k in METRICS:
                series[k].append([rnd, m.get(k)])
    baselines = r.get("baselines") or {}
    return {
        "run_dir": folder.name,
        "run_id": r.get("run_id"),
        "status": r.get("status", "running" if not path.exists() else None),
        "failure": r.get("failure"),
        "completed": r.get("completed"),
        "degraded": r.get("degraded"),
        "rounds": r.get("rounds"),
        "rounds_completed": r.get("rounds_completed"),
        "strategy": r.get("strategy"),
        "train_on": r.get("train_on"),
        "seconds": r.get("seconds"),
        "pool": r.get("pool"),
        "aggregate": {k: [[rnd, r["evaluate"][str(rnd)].get(k)] for rnd in rounds] for k in METRICS},
        "per_site": per_site,
        "per_site_final": r.get("per_site_final", {}),
        "baselines": {
            "fedavg_real": (baselines.get("fedavg_real") or {}).get("per_site", {}),
            "local_only": (baselines.get("local_only") or {}).get("per_site", {}),
        },
        "errors": r.get("errors", []),
        "missed": r.get("missed", {}),
    }
