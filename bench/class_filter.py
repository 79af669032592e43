"""Should a site drop the PLAN images its own class network gives another class? (issue 14, item 2)

The walk labels every image of a path with its anchors' class, and its class term only pulls the
images towards that class; some end up where phi_class, the site's own class network, sees the other
class. Per data set, bench._site's default-config site (--max-images images) and the default walk
between --pairs k-same anchor pairs (bench._site.walk_both, cached with bench.augment): the share of
PLAN images whose phi_class argmax is their path's class, and the validation utility (the site's
holdout; never the test split; bench.frontier.utility: a DownstreamCNN, --steps steps at batch 32,
--seeds seeds) of
    all        every PLAN image, as a site publishes them now;
    agreeing   only the images phi_class gives their path's class;
    random     as many images as `agreeing`, drawn at random (seed 0): what the smaller set alone does.
Writes bench/results/class_filter.json.

The rule, written here before the first run: the filter goes into synthesis when, averaged over the
data sets, the agreeing set's validation balanced accuracy is at least 0.02 above the full set's and
at least 0.01 above the random subset's (it must be the agreement, not the size); otherwise not.

    OMP_NUM_THREADS=2 python -m bench.class_filter --threads 2
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
from node.federation.task import predict_logits
from node.site.ingest import load_split


def run_dataset(name: str, *, max_images: int, pairs: int, steps: int, seeds: int) -> dict:
    t0 = time.time()
    ws, _ = npz_site(name, max_images=max_images)
    walked = walk_both(ws, n_pairs=pairs)
    train, val = load_split(ws, "train"), load_split(ws, "holdout")
    n_classes = int(max(val.labels.max(), train.labels.max()) + 1)
    images = walked.plan.reshape(-1, *walked.plan.shape[2:])
    labels = walked.anchors.labels.numpy().repeat(walked.plan.shape[1])
    agree = predict_logits(walked.anchors.phi_class, images, device="cpu").argmax(1).numpy() == labels
    random = np.sort(np.random.default_rng(0).choice(len(labels), int(agree.sum()), replace=False))
    lines = walked.linear.reshape(-1, *walked.linear.shape[2:])
    lines_agree = predict_logits(walked.anchors.phi_class, lines, device="cpu").argmax(1).numpy() == labels
    out: dict = {
        "agreeing_share": float(agree.mean()),
        "agreeing_share_per_class": {str(c): float(agree[labels == c].mean()) for c in np.unique(labels)},
        "linear_agreeing_share": float(lines_agree.mean()),
    }
    for kind, idx in (("all", np.arange(len(labels))), ("agreeing", np.flatnonzero(agree)), ("random", random)):
        u = utility(images[idx], labels[idx], val, n_classes=n_classes, steps=steps, batch=32, seeds=seeds)
        out[kind] = {"n_images": int(len(idx)), "utility": u}
        bal = u["balanced-accuracy"]
        print(f"{name:15} {kind:9} {len(idx):4d} {bal['mean']:.3f} ± {bal['std']:.3f} {u['auroc']['mean']:.3f}")
    out["setup"] = {"steps": steps, "seeds": seeds, "seconds": round(time.time() - t0, 1)}
    return out


def choose(res: dict) -> dict:
    """The rule of the module docstring."""

    def mean(kind: str) -> float:
        return float(np.mean([res[d][kind]["utility"]["balanced-accuracy"]["mean"] for d in res]))

    over_all, over_random = mean("agreeing") - mean("all"), mean("agreeing") - mean("random")
    return {"over_all": over_all, "over_random": over_random, "adopt": over_all >= 0.02 and over_random >= 0.01}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--max-images", type=int, default=800)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "class_filter.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {
        d: run_dataset(d, max_images=args.max_images, pairs=args.pairs, steps=args.steps, seeds=args.seeds)
        for d in args.datasets
    }
    verdict = choose(res)
    print(
        f"agreeing minus all {verdict['over_all']:+.3f}, minus random {verdict['over_random']:+.3f}: "
        f"{'adopt' if verdict['adopt'] else 'do not adopt'} the filter"
    )
    out = {**res, "_verdict": verdict, "_meta": run_meta("bench.class_filter", argv)}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
