"""How many PLAN images a site makes (synth.target_size), on the privacy-utility frontier (issue 14, item 2).

The walk's shape and weights were chosen at a fixed 384 images a set (bench/frontier.py); the number
of paths, and so the set's size, never was. For each data set (bench._site's cached default-config
workspace, --max-images images) and each size in --sizes: PLAN paths at the site's walk config (its
points per path and weights) between size / (points - 2) k-same anchor pairs, every unordered pair
once before any repeats, their interior images rendered as a release would. Then
- utility on the **validation** split (the site's holdout; never the test split): a fresh
  DownstreamCNN trained with the federation's schedule for a set of that size (DownstreamConfig's
  rounds, local epochs, min_local_steps, batch and lr: a bigger pool trains more steps, as it would in
  the federation), mean ± sd over --seeds seeds;
- privacy: the site's full audit of the set (bench.frontier.privacy): kept share, gated upper bounds,
  verdict.

The rule, written here before the first run: among the sizes whose sets pass the site's gate on every
data set with at least 80% of the candidates kept, take the best mean validation balanced accuracy
over the data sets; the chosen size is the smallest within 0.01 of it (fewer images out). The default
(240) changes only when the chosen size's mean is at least 0.01 above 240's (eligible or not).
Printed as "chosen" and stored under "_chosen".

    OMP_NUM_THREADS=2 python -m bench.set_size --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench._site import ROOT, anchor_pairs, npz_site, run_meta, walk_pairs
from bench.fedsim import federation_steps
from bench.frontier import privacy, utility
from common.config import DownstreamConfig
from common.fileio import atomic_write_json
from node.plan.candidates import render
from node.site.ingest import load_split

DEFAULT = 240  # synth.target_size when the rule was written


def run_dataset(name: str, *, sizes: list[int], max_images: int, seeds: int) -> dict:
    t0 = time.time()
    ws, _ = npz_site(name, max_images=max_images)
    wc = ws.config().synth.walk
    val = load_split(ws, "holdout")
    ds = DownstreamConfig()
    out: dict = {}
    for size in sizes:
        a = anchor_pairs(ws, n_pairs=math.ceil(size / (wc.points - 2)))  # as node.plan.candidates
        t_walk = time.time()
        res = walk_pairs(a, wc)
        images = render(a.G, res.paths[:, 1:-1].reshape(-1, res.paths.shape[-1]), device="cpu")
        labels = a.labels.numpy().repeat(wc.points - 2)
        path_id = np.arange(len(a.start)).repeat(wc.points - 2)
        steps = federation_steps([len(images)], ds)  # one site's whole run on a set this size
        n_classes = int(max(val.labels.max(), labels.max()) + 1)
        out[str(size)] = {
            "n_images": int(len(images)),
            "pairs": int(len(a.start)),
            "steps": steps,
            "seconds_walk": round(time.time() - t_walk, 1),
            "utility": utility(
                images, labels, val, n_classes=n_classes, steps=steps, batch=ds.batch_size, seeds=seeds, lr=ds.lr
            ),
            "privacy": privacy(images, labels, path_id, ws),
        }
        r = out[str(size)]
        print(
            f"{name:15} {size:6d} {r['pairs']:5d} {r['utility']['balanced-accuracy']['mean']:.3f} "
            f"± {r['utility']['balanced-accuracy']['std']:.3f} kept {r['privacy']['kept_share']:.2f} "
            f"passed {r['privacy']['passed']} {r['privacy']['failed']}",
            flush=True,
        )
    out["setup"] = {"n_validation": int(len(val)), "seeds": seeds, "seconds": round(time.time() - t0, 1)}
    return out


def choose(res: dict, datasets: list[str], sizes: list[int]) -> dict:
    """The module docstring's rule: {"eligible": {size: mean balanced accuracy}, "size", "adopt"}."""
    eligible = {}
    for s in sizes:
        rows = [res[n][str(s)] for n in datasets]
        if all(r["privacy"]["passed"] and r["privacy"]["kept_share"] >= 0.8 for r in rows):
            eligible[s] = float(np.mean([r["utility"]["balanced-accuracy"]["mean"] for r in rows]))
    if not eligible:
        return {"eligible": {}, "size": DEFAULT, "adopt": False}
    best = max(eligible.values())
    size = min(s for s, v in eligible.items() if v >= best - 0.01)
    base = float(np.mean([res[n][str(DEFAULT)]["utility"]["balanced-accuracy"]["mean"] for n in datasets]))
    adopt = size != DEFAULT and eligible[size] >= base + 0.01
    return {"eligible": {str(k): v for k, v in eligible.items()}, "size": size if adopt else DEFAULT, "adopt": adopt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[DEFAULT, 480, 960, 1920])
    ap.add_argument("--max-images", type=int, default=800)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "set_size.json"))
    args = ap.parse_args(argv)
    if DEFAULT not in args.sizes:
        raise SystemExit(f"--sizes must include the default {DEFAULT}: the rule compares against it")
    torch.set_num_threads(args.threads)
    print(f"{'data set':15} {'size':>6} {'pairs':>5} bal. acc (val)")
    res = {n: run_dataset(n, sizes=args.sizes, max_images=args.max_images, seeds=args.seeds) for n in args.datasets}
    res["_chosen"] = choose(res, args.datasets, args.sizes)
    res["_meta"] = run_meta("bench.set_size", argv)
    atomic_write_json(args.out, res)
    print(f"chosen: {res['_chosen']}")
    return res


if __name__ == "__main__":
    main()
