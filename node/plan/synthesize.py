"""Stage `synthesize` (PLAN route): invert the train images into W, average k same-class codes
into anchors (k-same), walk between anchors of a class and render the codes along the paths.

k-same runs over patients (their mean codes), so each anchor mixes k distinct patients.
Only the interior points of each path are rendered: the endpoints are the anchors, shared by
several paths (rendering them would duplicate images) and each the mean of only k real codes,
the closest a candidate could come to a real patient. Every candidate is therefore at least one
walk step away from an anchor.

Outputs, under synth/<run_id>/: candidates.npz (images uint8 [M,H,W], labels int64 [M], path
int64 [M]) and synth.json; and synth/latest.json {"run_id"}. run_id is a digest of the synth
config and the G_ema weights, so a rerun with both unchanged reuses the run.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch

from common.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes
from node.plan.invert import project, reconstruction_mse
from node.plan.ksame import anchors, ksame_clusters
from node.plan.train import load_models
from node.plan.walk import linear_paths, plan_paths
from node.site.checkpoint import config_digest, read_sidecar
from node.site.device import pick_device
from node.site.ingest import load_split
from node.site.pixels import to_tensor, to_uint8
from node.site.workspace import Workspace


def choose_pairs(n_anchors: int, n_paths: int, *, rng: np.random.Generator) -> np.ndarray:
    """n_paths (start, end) index pairs [n_paths,2] among n_anchors, start != end: every
    unordered pair once, in random order, before any pair repeats."""
    if n_anchors < 2:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = np.triu_indices(n_anchors, k=1)
    pairs = np.stack([i, j], 1)
    reps = math.ceil(n_paths / len(pairs))
    out = np.concatenate([pairs[rng.permutation(len(pairs))] for _ in range(reps)])[:n_paths]
    flip = rng.random(len(out)) < 0.5  # direction is irrelevant to the walk; randomise it anyway
    out[flip] = out[flip][:, ::-1]
    return out.astype(np.int64)


def paths_per_class(counts: np.ndarray, n_paths: int) -> np.ndarray:
    """Split n_paths over classes in proportion to `counts` (largest remainders), [C] int."""
    share = counts / counts.sum() * n_paths
    out = np.floor(share).astype(np.int64)
    out[np.argsort(-(share - out), kind="stable")[: n_paths - out.sum()]] += 1
    return out


def patient_codes(w: np.ndarray, patient_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean code of each patient among the images selected by `mask`: [P,D].

    k-same groups k *patients*, not k images: the codes of one patient's acquisitions lie close
    together in W, so image-level clusters would be filled by a single patient and the anchor
    would be that patient's face (here: anatomy) again. Averaging per patient first makes every
    anchor a mix of k distinct people."""
    ids = np.asarray(patient_ids)[mask]
    uniq, inv = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(uniq), w.shape[1]))
    np.add.at(sums, inv, w[mask])
    return (sums / np.bincount(inv)[:, None]).astype(np.float32)


def run_id_for(ws: Workspace) -> str:
    """The run id the current synth config and G_ema weights give: 12 hex digits of a sha256."""
    g_side = read_sidecar(ws.models / "G_ema.safetensors")
    return sha256_bytes((config_digest(ws.config().synth) + g_side["weights_sha256"]).encode())[:12]


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sc.seed)
        w = project(
            G,
            target,
            num_steps=sc.invert_steps,
            lr=sc.invert_lr,
            features=phi_class.features,
            perceptual_weight=sc.invert_perceptual,
            device=device,
        )
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

    wc = sc.walk
    per_path = wc.points - 2
    n_paths = math.ceil(sc.target_size / per_path)
    classes = np.unique(train_set.labels)
    counts = np.array([(train_set.labels == c).sum() for c in classes])
    rng = np.random.default_rng(sc.seed)
    starts, ends, labels, n_anchors, skipped = [], [], [], {}, []
    for c, n_c in zip(classes, paths_per_class(counts, n_paths)):
        pc = patient_codes(w.numpy(), train_set.patient_ids, train_set.labels == c)
        a = torch.from_numpy(anchors(pc, ksame_clusters(pc, sc.k))).float()
        n_anchors[int(c)] = len(a)
        pairs = choose_pairs(len(a), int(n_c), rng=rng)
        if len(pairs) == 0:
            skipped.append(int(c))  # fewer than 2k patients of this class: no two anchors to walk between
            continue
        starts.append(a[pairs[:, 0]])
        ends.append(a[pairs[:, 1]])
        labels.append(torch.full((len(pairs),), int(c), dtype=torch.long))
    if not starts:
        raise ValueError(
            f"no class has two k-same anchors (k={sc.k}); need at least {2 * sc.k} train patients of one class"
        )
    start, end, y = torch.cat(starts), torch.cat(ends), torch.cat(labels)

    t1 = time.time()
    walk_info: dict = {"method": wc.method}
    if wc.method == "plan":
        res = plan_paths(
            G,
            phi_id,
            phi_class,
            start,
            end,
            y,
            points=wc.points,
            iters=wc.iters,
            lr=wc.lr,
            weight_identity=wc.weight_identity,
            weight_smooth=wc.weight_smooth,
            weight_class=wc.weight_class,
            device=device,
        )
        paths = res.paths
        walk_info.update(
            iters_run=res.iters,
            mean_initial_loss=float(res.initial_loss.mean()),
            mean_final_loss=float(res.loss.mean()),
            mean_terms={k: float(v.mean()) for k, v in res.terms.items()},
        )
    else:
        paths = linear_paths(start, end, points=wc.points)
    t_walk = time.time() - t1

    codes = paths[:, 1:-1].reshape(-1, paths.shape[-1])
    with torch.no_grad():
        G.to(device)
        images = np.concatenate(
            [to_uint8(G.synthesis(codes[i : i + 512].to(device))) for i in range(0, len(codes), 512)]
        )
    cand_labels = y.repeat_interleave(per_path).numpy().astype(np.int64)
    path_idx = np.repeat(np.arange(len(paths)), per_path).astype(np.int64)

    buf = io.BytesIO()
    np.savez(buf, images=images, labels=cand_labels, path=path_idx)
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
                "n_paths": len(paths),
                "points_per_path": wc.points,
                "images_per_path": per_path,
                "n_candidates": len(images),
                "per_class": {int(c): int((cand_labels == c).sum()) for c in classes},
                "anchors_per_class": n_anchors,
                "classes_skipped": skipped,
            },
            "anchors_rendered": False,
            "inversion": {
                "steps": sc.invert_steps,
                "mean_mse": float(rec_mse.mean()),
                "max_mse": float(rec_mse.max()),
                "class_kept": class_kept,
                "perceptual_weight": sc.invert_perceptual,
            },
            "walk": walk_info,
            "seconds": {"invert": round(t_invert, 2), "walk": round(t_walk, 2), "total": round(time.time() - t0, 2)},
        },
    )
    atomic_write_json(ws.synth / "latest.json", {"run_id": run_id})
    return run_id
