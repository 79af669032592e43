"""The downstream classifier's learning rate, on validation (issue 14, item 3).

Half of the seeds of a DownstreamCNN trained at the default lr 2e-3 on the demo's pooled phantom PLAN
sets never left chance (training loss 0.693 for 210 steps; the end-to-end test's federated model at
0.49 in one CI run of three). Per data set, bench._site's default-config site and the default walk
between --pairs k-same anchor pairs (bench._site.walk_both, cached): a DownstreamCNN trained --steps
steps at DownstreamConfig's batch size with light augmentation on
    real   the site's real train split,
    plan   the site's PLAN paths (what it would publish before its gate),
at each --lrs, measured on the site's **validation** split (its holdout; never the test split),
mean ± sd over --seeds, and how many seeds stayed at chance (validation balanced accuracy < 0.55).
The data sets: pneumoniamnist and breastmnist (--max-images images) and a phantom demo site (the
demo's split, phantom seed 100). Writes bench/results/lr.json.

The rule, written here before the first run: DownstreamConfig.lr becomes the candidate with the
highest validation balanced accuracy averaged over the six sets (three data sets, real and plan) when
that average is at least 0.01 above the current default's; otherwise the default stays.

    OMP_NUM_THREADS=2 python -m bench.lr --threads 2

`--route cvae` asks the same of the CVAE route's downstream model, the EmbeddingHead on embeddings (at
DownstreamConfig.head_hidden), which trained with the images' `lr` until this was measured. Per data
set a CVAE-route site on the same data (the tiny extractor's embeddings, the node's CVAE and its
synthesize stage), and the sets
    real   the site's real train embeddings,
    cvae   the site's CVAE samples (what it would publish before its gate),
each trained --steps steps at batch 16 and measured on the site's holdout embeddings, as above.
Writes bench/results/head_lr.json. The rule, written here before the first run: the head's rate
becomes the candidate with the highest validation balanced accuracy averaged over the six sets when
that is at least 0.01 above 2.5e-4's (the rate it trains with now); otherwise it stays at 2.5e-4.

    OMP_NUM_THREADS=2 python -m bench.lr --threads 2 --route cvae --lrs 2.5e-4 1e-3 2e-3 4e-3 8e-3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bench._site import ROOT, SHARED_DATA, npz_site, run_meta, site, walk_both
from bench.frontier import utility
from common.config import DownstreamConfig, SiteConfig
from common.fileio import atomic_write_json
from deploy.local.launcher import DEMO_SITE
from node.routes import route as route_named
from node.site.ingest import load_split
from node.stages import run_one

CHANCE = 0.55


def phantom_site():
    """The demo's first site (phantom seed 100, the demo's split and policy) as a benchmark site."""
    cfg = SiteConfig(name="phantom-100", data={**DEMO_SITE["data"], "source": "phantom", "phantom": {"seed": 100}})
    return site("phantom-100", cfg)


class Records(NamedTuple):
    images: np.ndarray  # uint8 [N,H,W] images or float32 [N,D] embeddings
    labels: np.ndarray  # int [N]


def plan_sets(name: str, *, max_images: int, pairs: int) -> tuple[dict[str, Records], Records]:
    """The PLAN route's sets {"real", "plan"} for data set `name`, and its validation records."""
    ws, _ = phantom_site() if name == "phantom" else npz_site(name, max_images=max_images)
    walked = walk_both(ws, n_pairs=pairs)
    train, val = load_split(ws, "train"), load_split(ws, "holdout")
    plan = Records(
        walked.plan.reshape(-1, *walked.plan.shape[2:]),
        walked.anchors.labels.numpy().repeat(walked.plan.shape[1]),
    )
    return {"real": Records(train.images, train.labels), "plan": plan}, Records(val.images, val.labels)


def cvae_sets(name: str, *, max_images: int) -> tuple[dict[str, Records], Records]:
    """The CVAE route's sets {"real", "cvae"} (embeddings) for data set `name`, and its validation
    records, from a CVAE-route site on the same data as plan_sets' site, trained and synthesized."""
    if name == "phantom":
        data = {**DEMO_SITE["data"], "source": "phantom", "phantom": {"seed": 100}}
    else:
        data = {"source": "npz", "path": SHARED_DATA / f"{name}.npz", "max_images": max_images}
    cfg = SiteConfig(name=f"{name}-cvae", data=data, synth={"route": "cvae"})
    ws, _ = site(f"{name}-{max_images}-cvae", cfg)
    run_one(ws, "synthesize")
    with np.load(ws.synth / ws.latest_run() / "candidates.npz", allow_pickle=False) as z:
        cvae = Records(z["embeddings"], z["labels"])
    real, val = (Records(*route_named("cvae").split_records(ws, s, device="cpu")) for s in ("train", "holdout"))
    return {"real": real, "cvae": cvae}, val


def run_dataset(
    name: str, *, route: str, lrs: list[float], max_images: int, pairs: int, steps: int, seeds: int
) -> dict:
    t0 = time.time()
    if route == "plan":
        sets, val = plan_sets(name, max_images=max_images, pairs=pairs)
    else:
        sets, val = cvae_sets(name, max_images=max_images)
    n_classes = int(max(val.labels.max(), sets["real"].labels.max()) + 1)
    batch = DownstreamConfig().batch_size
    out: dict = {}
    for kind, (images, labels) in sets.items():
        out[kind] = {"n_images": int(len(labels))}
        for lr in lrs:
            u = utility(images, labels, val, n_classes=n_classes, steps=steps, batch=batch, seeds=seeds, lr=lr)
            u["at_chance"] = sum(r["balanced-accuracy"] < CHANCE for r in u["runs"])
            out[kind][f"{lr:g}"] = u
            bal = u["balanced-accuracy"]
            print(
                f"{name:15} {kind:5} {lr:8g} {bal['mean']:.3f} ± {bal['std']:.3f} {u['auroc']['mean']:.3f} "
                f"at chance {u['at_chance']}/{seeds}",
                flush=True,
            )
    seconds = round(time.time() - t0, 1)
    out["setup"] = {"n_val": int(len(val.labels)), "steps": steps, "batch": batch, "seconds": seconds}
    return out


def choose(res: dict, lrs: list[float], default: float) -> dict:
    """The rule of the module docstring: {lr: mean validation balanced accuracy}, the winner, the verdict."""
    cells = [(d, k) for d in res for k in res[d] if k != "setup"]
    means = {
        f"{lr:g}": float(np.mean([res[d][k][f"{lr:g}"]["balanced-accuracy"]["mean"] for d, k in cells])) for lr in lrs
    }
    best = max(means, key=means.get)
    adopt = means[best] >= means[f"{default:g}"] + 0.01
    return {"mean_balanced_accuracy": means, "best": best, "adopt": adopt, "lr": best if adopt else f"{default:g}"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist", "phantom"])
    ap.add_argument("--route", choices=["plan", "cvae"], default="plan", help="whose downstream model")
    ap.add_argument("--lrs", nargs="+", type=float, default=[2e-3, 1e-3, 5e-4, 2.5e-4])
    ap.add_argument("--max-images", type=int, default=800)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="default: bench/results/lr.json (--route cvae: head_lr.json)")
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "bench" / "results" / ("lr.json" if args.route == "plan" else "head_lr.json")
    torch.set_num_threads(args.threads)
    print(f"{'data set':15} {'set':5} {'lr':>8} {'bal. acc':>13} {'AUROC':>5}")
    sizes = {"max_images": args.max_images, "pairs": args.pairs, "steps": args.steps, "seeds": args.seeds}
    res = {d: run_dataset(d, route=args.route, lrs=args.lrs, **sizes) for d in args.datasets}
    # each route's rate when its rule was written; DownstreamConfig's may have moved since
    default = 2e-3 if args.route == "plan" else 2.5e-4
    verdict = choose(res, args.lrs, default)
    print(f"mean validation balanced accuracy by lr {verdict['mean_balanced_accuracy']}: lr {verdict['lr']}")
    out = {**res, "_verdict": verdict, "_meta": run_meta("bench.lr", argv)}
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
