"""How much of a pool+real site's training set its own real images should be (issue 14, item 4):
downstream.real_share, chosen on validation.

On bench.evaluation's sites (the same workspaces: three per data set and partition, trained,
synthesized and audited as there; a later `bench.evaluation` run reuses them), FedAvg with every
site on the PLAN pool plus its own real train split, the real records repeated to at least each
--shares of the set (node.federation.task.with_real_share; 0: each record once), evaluated at
every site on its **validation** split (its holdout; never the test split). FedAvg on the real
splits alone is measured beside it, for reference only.

The rule, fixed before any run: the share with the highest validation accuracy at the weakest
site (the lowest of the three), averaged over panels and seeds; within 0.005 of it, the smallest
such share (the fewest repeats). The weakest site is what the issue's target names: sharing pays
when the site that gains least still gains. Writes bench/results/pool_real.json; a run merges
into it (a share measured before and not run now is kept), and the rule is applied to every share
the file holds for the panels run.

    python -m bench.pool_real --threads 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench._site import ROOT, SHARED_DATA, WORK, run_meta
from bench.evaluation import PARTITIONS, build_sites, published_sets
from bench.fedsim import fedavg, partition
from common.config import DataConfig, DownstreamConfig
from common.fileio import atomic_write_json
from node.federation.task import with_real_share
from node.routes import route as route_named
from node.site.data import load_dataset

TIE = 0.005


def panel(name: str, alpha: float | None, *, work, max_images: int, shares: list[float], seeds: int) -> dict:
    """{"real": [[acc per site] per seed], "<share>": [...]} on the sites' validation splits."""
    data = load_dataset(DataConfig(source="npz", path=SHARED_DATA / f"{name}.npz", max_images=max_images))
    sites = build_sites(data, partition(data.labels, n_sites=3, alpha=alpha, seed=0), work=work, overrides={})
    plan = [published_sets(ws)["plan"] for ws in sites]  # what each site's audit accepts, as in the table
    px, py = np.concatenate([p["images"] for p in plan]), np.concatenate([p["labels"] for p in plan])
    real = [route_named("plan").split_records(ws, "train", device="cpu") for ws in sites]
    val = [route_named("plan").split_records(ws, "holdout", device="cpu") for ws in sites]
    kw = dict(n_classes=int(data.labels.max()) + 1, ds=DownstreamConfig())
    out: dict[str, list] = {"real": [], **{str(s): [] for s in shares}}
    for seed in range(seeds):
        out["real"].append([m["accuracy"] for m in fedavg(real, val, seed=seed, **kw)["sites"]])
        for s in shares:
            mixed = [with_real_share((px, py), r, real_share=s) for r in real]
            out[str(s)].append([m["accuracy"] for m in fedavg(mixed, val, seed=seed, **kw)["sites"]])
            print(f"{name} {alpha} seed {seed} share {s}: {np.round(out[str(s)][-1], 3).tolist()}", flush=True)
    return out


def merge_panels(earlier: dict, new: dict) -> dict:
    """The panels run now, each with its new shares' figures and the earlier ones at shares not run
    now (a run that extends the grid keeps what was measured before; the runs are deterministic)."""
    return {key: {**earlier.get(key, {}), **p} for key, p in new.items()}


def shares_in(panels: dict) -> list[float]:
    """The shares measured in every panel, ascending."""
    return sorted(set.intersection(*({float(k) for k in p if k != "real"} for p in panels.values())))


def choose(panels: dict, shares: list[float]) -> dict:
    """The module docstring's rule: {share: mean weakest-site accuracy}, the chosen share."""
    weakest = {s: float(np.mean([min(a) for p in panels.values() for a in p[str(s)]])) for s in shares}
    best = max(weakest.values())
    return {"weakest_site_accuracy": weakest, "real_share": min(s for s in shares if weakest[s] >= best - TIE)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    ap.add_argument("--shares", nargs="+", type=float, default=[0.0, 1 / 3, 0.5, 2 / 3])
    ap.add_argument("--max-images", type=int, default=1200, help="as bench.evaluation, so its sites are reused")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    panels = {
        f"{name}/{part}": panel(
            name,
            PARTITIONS[part],
            work=WORK / f"eval-{name}-{part}-{args.max_images}",
            max_images=args.max_images,
            shares=args.shares,
            seeds=args.seeds,
        )
        for name in args.datasets
        for part in args.partitions
    }
    out_path = ROOT / "bench" / "results" / "pool_real.json"
    if out_path.exists():
        panels = merge_panels(json.loads(out_path.read_text())["panels"], panels)
    shares = shares_in(panels)
    verdict = choose(panels, shares)
    print(f"{'panel':<30}{'FedAvg real':>12}" + "".join(f"{f'share {s:.2f}':>12}" for s in shares))
    for key, p in panels.items():
        cells = "".join(f"{np.mean([min(a) for a in p[str(s)]]):>12.3f}" for s in shares)
        print(f"{key:<30}{np.mean([min(a) for a in p['real']]):>12.3f}{cells}   (weakest site, validation)")
    print(f"chosen real_share: {verdict['real_share']:.3f}")
    res = {"panels": panels, "verdict": verdict, "_meta": run_meta("bench.pool_real", argv)}
    atomic_write_json(out_path, res)
    return res


if __name__ == "__main__":
    main()
