"""Stage `publish`: sign the audited accepted set as a bundle and upload it to the coordinator.

Reads (workspace-relative):
    synth/latest.json            {"run_id": ...}: the synthesis run to publish
    synth/<run>/audit.json       the audit result; nothing is published unless "passed" is true
    synth/<run>/accepted.npz     images uint8 [M,H,W] (PLAN route) or embeddings float32 [M,D]
                                 (CVAE route), labels int64 [M]: the accepted set
    keys/signing.key             the site's Ed25519 key (registered at the coordinator)
Writes:
    bundles/<bundle_id>/ and bundles/<bundle_id>.tar    the signed bundle (common.bundle)
    bundles/published.json       {"site", "last_sequence", "bundles": [{bundle_id, sequence,
                                 accepted_digest, run_id, sha256, size, n_samples, status
                                 ("built" | "uploaded"), built_at, uploaded_at}]}

The sequence number is per site and only grows: it is reserved in published.json before the
upload, so a crash never reuses one. An accepted set already uploaded (same digest) is not
uploaded again; one built but not uploaded (crash, network) is re-sent as the same bundle.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from common import errors
from common.bundle import build_bundle, bundle_id_for, code_version, pack_bundle
from common.fileio import atomic_write_json, sha256_file
from common.signing import load_private_key
from node.cvae.embedder import extractor_digest
from node.release.exchange_client import ExchangeClient, ExchangeError, site_client
from node.site.checkpoint import config_digest
from node.site.workspace import Workspace

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The inputs of the publish stage are missing or invalid; the message names the file."""

    exit_code = errors.DATA


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PublishError(f"{path}: not found (run the synthesis and audit stages first)") from None
    except json.JSONDecodeError as e:
        raise PublishError(f"{path}: not valid JSON ({e})") from None


def load_accepted(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data, labels int64 [M]) from an accepted-set .npz (no pickles): data is images uint8
    [M,H,W] or embeddings float32 [M,D], whichever array the file holds."""
    try:
        with np.load(path, allow_pickle=False) as z:
            key = "embeddings" if "embeddings" in z.files else "images"
            data, labels = z[key], z["labels"]
    except FileNotFoundError:
        raise PublishError(f"{path}: not found (run the audit stage first)") from None
    except (KeyError, ValueError, OSError) as e:
        raise PublishError(f"{path}: expected arrays 'images' or 'embeddings', and 'labels' ({e})") from None
    if key == "images" and (data.dtype != np.uint8 or data.ndim != 3):
        raise PublishError(f"{path}: 'images' must be uint8 [M,H,W], got {data.dtype} {data.shape}")
    if key == "embeddings" and (data.dtype != np.float32 or data.ndim != 2):
        raise PublishError(f"{path}: 'embeddings' must be float32 [M,D], got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise PublishError(f"{path}: 'labels' must be int [M] with M={len(data)}, got {labels.dtype} {labels.shape}")
    return data, labels.astype(np.int64)


def accepted_digest(data: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the accepted set's shape, values and labels (independent of npz compression)."""
    head = [list(data.shape), list(labels.shape)] + ([] if data.dtype == np.uint8 else [data.dtype.str])
    h = hashlib.sha256(json.dumps(head).encode())
    h.update(np.ascontiguousarray(data).tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


def _ledger_path(ws: Workspace) -> Path:
    return ws.bundles / "published.json"


def _load_ledger(ws: Workspace, site: str) -> dict:
    path = _ledger_path(ws)
    if not path.exists():
        return {"site": site, "last_sequence": 0, "bundles": []}
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("bundles"), list):
        raise PublishError(f"{path}: not a publish record")
    return data


def _upload(ws: Workspace, cfg, client: ExchangeClient | None, tar: Path, entry: dict) -> None:
    own = client is None
    if own:
        client = site_client(ws)
    try:
        try:
            client.upload(tar, site=cfg.name)
        except ExchangeError as e:
            # A reply lost after the server stored it: the retry is refused as a replay. The
            # bundle is published if the pool holds exactly these bytes under this id.
            if e.code != "ALREADY_EXISTS" or not any(
                r["bundle_id"] == entry["bundle_id"] and r["sha256"] == entry["sha256"] for r in client.list(cfg.name)
            ):
                raise
            log.info("bundle %s was already stored by the coordinator", entry["bundle_id"])
    finally:
        if own:
            client.close()


def publish(ws: Workspace, *, client: ExchangeClient | None = None) -> str | None:
    """Build, sign and upload the latest accepted set; return its bundle id, or None if the
    audit did not pass. Raises PublishError for bad inputs and ExchangeError if the upload fails.
    """
    cfg = ws.config()
    latest = _read_json(ws.synth / "latest.json")
    run_id = latest.get("run_id") if isinstance(latest, dict) else None
    if not isinstance(run_id, str) or not run_id or "/" in run_id or run_id.startswith("."):
        raise PublishError(f"{ws.synth / 'latest.json'}: 'run_id' must name a folder in synth/, got {run_id!r}")
    run_dir = ws.synth / run_id
    audit = _read_json(run_dir / "audit.json")
    if not isinstance(audit, dict):
        raise PublishError(f"{run_dir / 'audit.json'}: expected a JSON object")
    if audit.get("passed") is not True:
        log.warning("not publishing run %s: the audit did not pass (passed=%r)", run_id, audit.get("passed"))
        return None
    data, labels = load_accepted(run_dir / "accepted.npz")
    digest = accepted_digest(data, labels)

    record = _load_ledger(ws, cfg.name)
    entry = next((b for b in record["bundles"] if b["accepted_digest"] == digest), None)
    if entry is not None and entry["status"] == "uploaded":
        log.info("accepted set of run %s already published as bundle %s", run_id, entry["bundle_id"])
        return entry["bundle_id"]

    tar = ws.bundles / f"{entry['bundle_id']}.tar" if entry else None
    if entry is None or not tar.exists() or sha256_file(tar) != entry["sha256"]:
        # Anything on disk for this set now was never uploaded (uploads follow the record):
        # leftovers of a crash. Rebuild under a fresh sequence number.
        stale = ws.bundles / bundle_id_for(cfg.name, data, labels)
        shutil.rmtree(stale, ignore_errors=True)
        stale.with_name(stale.name + ".tar").unlink(missing_ok=True)
        sequence = int(record["last_sequence"]) + 1
        images = data.dtype == np.uint8
        card = {
            "route": "plan" if images else "cvae",
            "run_id": run_id,
            "code_version": code_version(),
            "description": (
                f"synthetic {'images' if images else 'embeddings'} released by site {cfg.name!r} "
                "after a passed privacy audit"
            ),
        }
        if not images:
            # the coordinator and every receiver check it against the federation's pin
            card["extractor"] = cfg.synth.extractor.model_dump(mode="json")
            card["extractor_digest"] = extractor_digest(cfg.synth.extractor)
        bundle_id = build_bundle(
            ws.bundles,
            **({"images": data} if images else {"embeddings": data}),
            labels=labels,
            audit=audit,
            datacard=card,
            dp_epsilon=audit.get("dp_epsilon"),
            site=cfg.name,
            sequence=sequence,
            signing_key=load_private_key(ws.signing_key),
            config_digest=config_digest(cfg),
            policy=audit.get("policy", cfg.policy.model_dump(mode="json")),
        )
        tar = pack_bundle(ws.bundles / bundle_id)
        entry = {
            "bundle_id": bundle_id,
            "sequence": sequence,
            "accepted_digest": digest,
            "run_id": run_id,
            "sha256": sha256_file(tar),
            "size": tar.stat().st_size,
            "n_samples": int(len(labels)),
            "status": "built",
            "built_at": _now(),
            "uploaded_at": None,
        }
        record["bundles"] = [b for b in record["bundles"] if b["accepted_digest"] != digest] + [entry]
        record["last_sequence"] = sequence
        atomic_write_json(_ledger_path(ws), record)  # the sequence is spent from here on

    _upload(ws, cfg, client, tar, entry)
    entry["status"], entry["uploaded_at"] = "uploaded", _now()
    atomic_write_json(_ledger_path(ws), record)
    log.info("published bundle %s (sequence %d, %d samples)", entry["bundle_id"], entry["sequence"], entry["n_samples"])
    return entry["bundle_id"]
