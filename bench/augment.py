"""Which augmentation the downstream classifier trains with (issue 14, item 3), on evidence.

Per data set, bench._site's default-config site (--max-images images), the default walk between
--pairs k-same anchor pairs (bench._site.walk_both: the PLAN paths and the straight lines between
the same pairs, interior images as a release renders them) and the real train split. A DownstreamCNN
is trained on each for --steps steps at batch 32 with each augmentation in --augments
(node.federation.task.AUGMENTATIONS), and measured on the site's validation split (its holdout; the
test split is never used): accuracy, balanced accuracy and AUROC, mean and sd over --seeds seeds.
Writes bench/results/augment.json.

The rule, written here before the first run: another augmentation replaces "light" (the image
route's downstream augmentation, node.routes) when, averaged over the data sets, its validation
balanced accuracy on the PLAN sets is at least 0.02 above light's and on the real train split at
most 0.01 below light's (the same augmentation also trains on real data: local-only, FedAvg on real,
pool+real); of several, the one with the larger PLAN gain. Otherwise "light" stays.

    OMP_NUM_THREADS=2 python -m bench.augment --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench._site import ROOT, npz_site, run_meta, walk_both
from bench.frontier import utility
from common.fileio import atomic_write_json
from node.site.ingest import load_split

SETS = ("real", "plan", "linear")


def run_dataset(name: str, *, max_images: int, pairs: int, augments, steps: int, seeds: int) -> dict:
    """{set: {augment: validation metrics}} for one data set, and its setup."""
    t0 = time.time()
    ws, _ = npz_site(name, max_images=max_images)
    walked = walk_both(ws, n_pairs=pairs)
    train, val = load_split(ws, "train"), load_split(ws, "holdout")
    n_classes = int(max(val.labels.max(), train.labels.max()) + 1)
    path_labels = walked.anchors.labels.numpy().repeat(walked.plan.shape[1])
    sets = {
        "real": (train.images, train.labels),
        "plan": (walked.plan.reshape(-1, *walked.plan.shape[2:]), path_labels),
        "linear": (walked.linear.reshape(-1, *walked.linear.shape[2:]), path_labels),
    }
    out: dict = {}
    for kind, (images, labels) in sets.items():
        out[kind] = {}
        for aug in augments:
            u = utility(images, labels, val, n_classes=n_classes, steps=steps, batch=32, seeds=seeds, augment=aug)
            out[kind][aug] = u
            bal, auroc = u["balanced-accuracy"], u["auroc"]["mean"]
            print(f"{name:15} {kind:7} {aug:7} {bal['mean']:.3f} ± {bal['std']:.3f} {auroc:.3f}", flush=True)
    out["setup"] = {
        "n_train": int(len(train)),
        "n_validation": int(len(val)),
        "n_synthetic": int(len(path_labels)),
        "steps": steps,
        "seeds": seeds,
        "seconds": round(time.time() - t0, 1),
    }
    return out


def choose(res: dict, augments) -> dict:
    """The rule of the module docstring: {"gains": {augment: (plan gain, real change)}, "chosen"}."""

    def mean(kind: str, aug: str) -> float:
        return float(np.mean([res[d][kind][aug]["balanced-accuracy"]["mean"] for d in res]))

    gains = {a: (mean("plan", a) - mean("plan", "light"), mean("real", a) - mean("real", "light")) for a in augments}
    eligible = {a: g for a, g in gains.items() if a != "light" and g[0] >= 0.02 and g[1] >= -0.01}
    chosen = max(eligible, key=lambda a: eligible[a][0]) if eligible else "light"
    return {"gains": gains, "chosen": chosen}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--augments", nargs="+", default=["light", "strong", "wide"])
    ap.add_argument("--max-images", type=int, default=800)
    ap.add_argument("--pairs", type=int, default=64, help="anchor pairs: 64 of the default 8 points are 384 images")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "augment.json")
    args = ap.parse_args(argv)
    if "light" not in args.augments:
        ap.error("--augments must include light, the default the others are measured against")
    torch.set_num_threads(args.threads)
    res = {
        d: run_dataset(
            d, max_images=args.max_images, pairs=args.pairs, augments=args.augments, steps=args.steps, seeds=args.seeds
        )
        for d in args.datasets
    }
    verdict = choose(res, args.augments)
    for a, (plan, real) in verdict["gains"].items():
        print(f"{a:7} minus light: PLAN sets {plan:+.3f}, real {real:+.3f}")
    print(f"the rule keeps {verdict['chosen']!r}")
    out = {**res, "_verdict": verdict, "_meta": run_meta("bench.augment", argv)}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
