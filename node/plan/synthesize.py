"""Stage `synthesize` (PLAN route): invert the train images into W (node.plan.invert), then
k-same anchors, walks between anchors of a class and the rendered paths
(node.plan.candidates.plan_candidates). The stage loads, calls and saves.

Outputs, under synth/<run_id>/: candidates.npz (images uint8 [M,H,W], labels int64 [M], path
int64 [M]) and synth.json; and synth/latest.json {"run_id"}. run_id is a digest of the synth
config and the G_ema weights, so a rerun with both unchanged reuses the run.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import torch

from common.config import SynthConfig
from common.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes
from node.plan.candidates import plan_candidates
from node.plan.invert import project, reconstruction_mse
from node.plan.train import load_models
from node.site.checkpoint import config_digest, read_sidecar
from node.site.device import pick_device
from node.site.ingest import load_split
from node.site.pixels import to_tensor
from node.site.workspace import Workspace

log = logging.getLogger(__name__)


def run_id_for(ws: Workspace) -> str:
    """The run id the current synth config and G_ema weights give: 12 hex digits of a sha256."""
    g_side = read_sidecar(ws.models / "G_ema.safetensors")
    return sha256_bytes((config_digest(ws.config().synth) + g_side["weights_sha256"]).encode())[:12]


def invert(G, phi_class, target: torch.Tensor, sc: SynthConfig, *, device: torch.device | str) -> torch.Tensor:
    """Train images [N,1,H,W] in [-1,1] -> codes w [N,D]: node.plan.invert.project with the synth
    config's steps, lr and perceptual weight (phi_class's features), seeded by synth.seed; the
    caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sc.seed)
        return project(
            G,
            target,
            num_steps=sc.invert_steps,
            lr=sc.invert_lr,
            features=phi_class.features,
            perceptual_weight=sc.invert_perceptual,
            device=device,
        )


def synthesize(ws: Workspace) -> str:
    cfg = ws.config()
    sc = cfg.synth
    if sc.route != "plan":
        raise NotImplementedError(f"synth.route {sc.route!r}: only the PLAN route is implemented in this stage")
    device = pick_device(cfg.device)
    g_side = read_sidecar(ws.models / "G_ema.safetensors")
    run_id = run_id_for(ws)
    out_dir = ws.synth / run_id
    if (out_dir / "candidates.npz").exists() and (out_dir / "synth.json").exists():
        atomic_write_json(ws.synth / "latest.json", {"run_id": run_id})
        return run_id

    t0 = time.time()
    G, phi_id, phi_class = load_models(ws, device)
    train_set = load_split(ws, "train")
    target = to_tensor(train_set.images)
    w = invert(G, phi_class, target, sc, device=device)
    rec_mse = reconstruction_mse(G, w, target, device=device)
    with torch.no_grad():
        rec_class = torch.cat(
            [
                phi_class(G.synthesis(w[i : i + 512].to(device)).clamp(-1, 1)).argmax(1).cpu()
                for i in range(0, len(w), 512)
            ]
        )
    class_kept = float((rec_class.numpy() == train_set.labels).mean()) if len(w) else float("nan")
    t_invert = time.time() - t0

    t1 = time.time()
    c = plan_candidates(
        G,
        phi_id,
        phi_class,
        w,
        train_set.labels,
        train_set.patient_ids,
        k=sc.k,
        target_size=sc.target_size,
        walk=sc.walk,
        seed=sc.seed,
        device=device,
    )
    t_walk = time.time() - t1
    for y in c.pairs.classes_skipped:
        # k-same will not make an anchor of fewer than k patients: a small class gets no synthetic images
        log.warning("class %d has under %d train patients (2 x synth.k): no synthetic images of it", y, 2 * sc.k)

    buf = io.BytesIO()
    np.savez(buf, images=c.images, labels=c.labels, path=c.path)
    atomic_write_bytes(out_dir / "candidates.npz", buf.getvalue())
    atomic_write_json(
        out_dir / "synth.json",
        {
            "run_id": run_id,
            "config": sc.model_dump(mode="json"),
            "config_sha256": config_digest(sc),
            "g_ema_sha256": g_side["weights_sha256"],
            "counts": {
                "n_train": len(train_set),
                "n_paths": len(c.pairs.start),
                "points_per_path": sc.walk.points,
                "images_per_path": sc.walk.points - 2,
                "n_candidates": len(c.images),
                "per_class": {int(y): int((c.labels == y).sum()) for y in np.unique(train_set.labels)},
                "anchors_per_class": c.pairs.anchors_per_class,
                "classes_skipped": c.pairs.classes_skipped,
            },
            "anchors_rendered": False,
            "inversion": {
                "steps": sc.invert_steps,
                "mean_mse": float(rec_mse.mean()),
                "max_mse": float(rec_mse.max()),
                "class_kept": class_kept,
                "perceptual_weight": sc.invert_perceptual,
            },
            "walk": c.walk,
            "seconds": {"invert": round(t_invert, 2), "walk": round(t_walk, 2), "total": round(time.time() - t0, 2)},
        },
    )
    atomic_write_json(ws.synth / "latest.json", {"run_id": run_id})
    return run_id
