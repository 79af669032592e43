"""Benchmark 2 of issue 3: does the PLAN walk keep its images further from the real training
images than the straight line between the same k-same anchors?

For each data set (../shared/data/pneumoniamnist.npz, breastmnist.npz; a default-config site
each, data capped with --max-images) and each anchor pair: render the interior images of the
PLAN path and of the linear path, take for every image the distance to its nearest real training
image, and the minimum along the path. Distances: pixels (MSE on [0,1]), phi_id's penultimate
embedding (the network the walk optimises against; L2), and the independent attacker's
embedding (phi_attack: another width and seed, never seen by the walk; L2). LPIPS (AlexNet) is
reported when its backbone weights are in the model store ($PLAN_MODEL_STORE), else skipped
with the store's reason.

Writes bench/results/path_safety.json: per data set and distance {pairs, plan_safer_share,
min_dist_plan_mean, min_dist_linear_mean}.

    .venv/bin/python -m bench.path_safety                 # 64 pairs, 800 images per data set
    .venv/bin/python -m bench.path_safety --quick         # 16 pairs, 400 images
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench._site import ROOT, command, machine, npz_site, walk_both
from common.fileio import atomic_write_json
from common.modelstore import default_store_dir
from node.audit.distances import embed, min_pixel_mse, min_sq_dist

DATASETS = ("pneumoniamnist", "breastmnist")


def lpips_distance(store_dir: Path):
    """(fn(a uint8 [N,H,W], b uint8 [M,H,W]) -> [N] nearest LPIPS, None) when the AlexNet
    backbone is in the model store, else (None, the store's reason)."""
    from common.modelstore import ModelStoreError
    from node.audit.lpips_matrix import build_lpips, lpips_nearest

    try:
        model = build_lpips("alex", store_dir=store_dir)
    except ModelStoreError as e:
        return None, f"LPIPS skipped: {e}"
    return (lambda a, b: lpips_nearest(model, a, b)[0]), None


def path_minima(per_image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Distances of every interior image [P*(T-2)] -> minimum along each path [P]."""
    return per_image.reshape(shape).min(1)


def summarise(d_plan: np.ndarray, d_lin: np.ndarray) -> dict:
    return {
        "pairs": int(len(d_plan)),
        "plan_safer_share": float((d_plan > d_lin).mean()),
        "min_dist_plan_mean": float(d_plan.mean()),
        "min_dist_linear_mean": float(d_lin.mean()),
        "min_dist_plan_median": float(np.median(d_plan)),
        "min_dist_linear_median": float(np.median(d_lin)),
    }


def run_dataset(name: str, *, pairs: int, max_images: int) -> dict:
    t0 = time.time()
    ws, t_stages = npz_site(name, max_images=max_images)
    wk = walk_both(ws, n_pairs=pairs)
    a = wk.anchors
    P, S = wk.plan.shape[:2]
    plan_imgs, lin_imgs = wk.plan.reshape(P * S, *wk.plan.shape[2:]), wk.linear.reshape(P * S, *wk.linear.shape[2:])
    train = a.train.images
    out: dict = {}
    out["pixel_mse"] = summarise(
        path_minima(min_pixel_mse(plan_imgs, train), (P, S)), path_minima(min_pixel_mse(lin_imgs, train), (P, S))
    )
    for space, model in (("phi_id", a.phi_id), ("attacker", a.phi_attack)):
        e_train = embed(model, train, device="cpu")
        d = {
            k: min_sq_dist(embed(model, imgs, device="cpu"), e_train)[0].sqrt().numpy()
            for k, imgs in (("plan", plan_imgs), ("linear", lin_imgs))
        }
        out[f"{space}_l2"] = summarise(path_minima(d["plan"], (P, S)), path_minima(d["linear"], (P, S)))
    lp, why_not = lpips_distance(default_store_dir(ws.root))
    if lp is not None:
        out["lpips"] = summarise(path_minima(lp(plan_imgs, train), (P, S)), path_minima(lp(lin_imgs, train), (P, S)))
    else:
        out["lpips_skipped"] = why_not
    out["setup"] = {
        "max_images": max_images,
        "n_train": int(len(train)),
        "images_per_path": int(S),
        "walk": wk.walk,
        "train_seconds": t_stages,
        "seconds_total": round(time.time() - t0, 1),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-images", type=int, default=800, help="cap per data set before the 50/25/25 split")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="16 pairs, 400 images")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "path_safety.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.max_images = 16, 400
    if args.threads:
        torch.set_num_threads(args.threads)
    # results of data sets run separately (--datasets X) are merged into one file
    res = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    run = {
        "command": command("bench.path_safety", argv),
        "machine": machine(),
        "config": "default SiteConfig except data.source npz, data.max_images",
    }
    for name in args.datasets:
        res[name] = run_dataset(name, pairs=args.pairs, max_images=args.max_images)
        res[name]["setup"]["run"] = {**run, "load_average_at_end": list(os.getloadavg())}
    res.pop("_meta", None)  # older result files kept the run details apart from the data set
    atomic_write_json(args.out, res)
    print(f"{'data set':<16}{'distance':<12}{'pairs':>6}{'PLAN safer':>12}{'min PLAN':>12}{'min linear':>12}")
    for name in args.datasets:
        for dist, v in res[name].items():
            if isinstance(v, dict) and "pairs" in v:
                print(
                    f"{name:<16}{dist:<12}{v['pairs']:>6}{v['plan_safer_share']:>12.2%}{v['min_dist_plan_mean']:>12.5f}{v['min_dist_linear_mean']:>12.5f}"
                )
        if "lpips_skipped" in res[name]:
            print(f"{name:<16}lpips       skipped: {res[name]['lpips_skipped']}")
    return res


if __name__ == "__main__":
    main()
