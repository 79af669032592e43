"""Benchmark 3 of issue 3: how useful is each synthetic set for the downstream task?

For each data set (the same sites, anchors and paths as bench/path_safety.py, shared through the
cache in bench/work/), train the federation's DownstreamCNN (common.models, width and lr from
DownstreamConfig, node.federation.task.train_classifier with its light augmentation) on
  (a) real: the real train split,
  (b) linear: the interior images of the straight lines between k-same anchor pairs,
  (c) plan: the interior images of the PLAN paths between the same pairs,
  (d) anchors: the k-same anchors only (one image per cluster of k patients),
for the same number of optimiser steps (--steps, batch 32) whatever the set's size, and evaluate
on the real test split: accuracy and AUROC (class 1 vs 0), mean and std over --seeds seeds.
Writes bench/results/utility.json.

    .venv/bin/python -m bench.utility               # 64 pairs, 800 images, 400 steps, 3 seeds
    .venv/bin/python -m bench.utility --quick       # 16 pairs, 400 images, 150 steps, 2 seeds
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench._site import ROOT, mean_std, npz_site, run_meta, walk_both
from common.config import DownstreamConfig
from common.fileio import atomic_write_json
from common.metrics import roc_auc
from common.models import DownstreamCNN
from node.federation.task import predict_logits, train_classifier
from node.site.ingest import load_split

DATASETS = ("pneumoniamnist", "breastmnist")
SETS = ("real", "linear", "plan", "anchors")


def fit_and_score(images, labels, test, *, n_classes: int, steps: int, batch: int, seed: int) -> dict:
    """Train a fresh DownstreamCNN for about `steps` steps on uint8 images [N,H,W]; test metrics."""
    ds = DownstreamConfig()
    torch.manual_seed(seed)
    model = DownstreamCNN(n_classes, width=ds.width, image_size=images.shape[-1])
    epochs = max(1, math.ceil(steps * batch / len(images)))
    train_classifier(model, images, labels, epochs=epochs, lr=ds.lr, batch_size=batch, device="cpu", seed=seed)
    logits = predict_logits(model, test.images, device="cpu")
    p1 = torch.softmax(logits, 1)[:, 1].numpy()
    y = test.labels
    return {
        "accuracy": float((logits.argmax(1).numpy() == y).mean()),
        "auroc": roc_auc(p1[y == 1], p1[y == 0]),
        "epochs": epochs,
    }


def run_dataset(name: str, *, pairs: int, max_images: int, steps: int, seeds: int, batch: int) -> dict:
    t0 = time.time()
    ws, _ = npz_site(name, max_images=max_images)
    wk = walk_both(ws, n_pairs=pairs)
    a = wk.anchors
    per_path = wk.plan.shape[1]
    path_y = a.labels.numpy().repeat(per_path)
    sets = {
        "real": (a.train.images, a.train.labels),
        "linear": (wk.linear.reshape(-1, *wk.linear.shape[2:]), path_y),
        "plan": (wk.plan.reshape(-1, *wk.plan.shape[2:]), path_y),
        "anchors": (wk.anchor_images, a.anchor_labels.numpy()),
    }
    test = load_split(ws, "test")
    n_classes = int(max(test.labels.max(), a.train.labels.max()) + 1)
    out = {}
    for s, (x, y) in sets.items():
        runs = [
            fit_and_score(x, y, test, n_classes=n_classes, steps=steps, batch=batch, seed=seed) for seed in range(seeds)
        ]
        out[s] = {
            "n_train_images": int(len(x)),
            "class_counts": np.bincount(y, minlength=n_classes).tolist(),
            "accuracy": mean_std(r["accuracy"] for r in runs),
            "auroc": mean_std(r["auroc"] for r in runs),
            "epochs": runs[0]["epochs"],
        }
    out["setup"] = {
        "max_images": max_images,
        "n_test": int(len(test)),
        "test_class_counts": np.bincount(test.labels, minlength=n_classes).tolist(),
        "pairs": pairs,
        "steps": steps,
        "batch": batch,
        "seeds": seeds,
        "seconds_total": round(time.time() - t0, 1),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-images", type=int, default=800, help="cap per data set before the 50/25/25 split")
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps per classifier (batch --batch)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="16 pairs, 400 images, 150 steps, 2 seeds")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "utility.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.max_images, args.steps, args.seeds = 16, 400, 150, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {
        n: run_dataset(
            n, pairs=args.pairs, max_images=args.max_images, steps=args.steps, seeds=args.seeds, batch=args.batch
        )
        for n in args.datasets
    }
    res["_meta"] = run_meta("bench.utility", argv)
    atomic_write_json(args.out, res)
    print(f"{'data set':<16}{'train set':<10}{'images':>8}{'accuracy':>18}{'AUROC':>18}")
    for n in args.datasets:
        for s in SETS:
            v = res[n][s]
            print(
                f"{n:<16}{s:<10}{v['n_train_images']:>8}{v['accuracy']['mean']:>11.3f} ± {v['accuracy']['std']:.3f}"
                f"{v['auroc']['mean']:>11.3f} ± {v['auroc']['std']:.3f}"
            )
    return res


if __name__ == "__main__":
    main()
