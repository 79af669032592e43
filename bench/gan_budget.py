"""How long the cpu profile's GAN should train (issue 14, item 1): the generator's budget on evidence.

For each data set and each --gan-steps value, a default-config site on the MedMNIST .npz whose
GAN trains that many steps (every other setting the default; its own workspace
bench/work/<data set>-<max images>-g<steps>), and then:
- the train stage's seconds: the cpu profile is to train a site in about 10 minutes on 2 cores;
- the generator seen by a judge it never met (bench.generator): FD, precision and recall of
  G_ema's random samples, the k-same anchors, the straight lines and the PLAN paths;
- the PLAN set of the site's default walk (--images images): its utility on the **validation**
  split and the site's own audit (bench.frontier's measures).

The rule that picks the step count, fixed before the first run: among the step counts whose train
stage took at most --budget seconds on every data set and whose PLAN sets pass the site's gate on
every data set with at least 80% of the candidates kept, the one with the highest validation
balanced accuracy averaged over the data sets; within 0.01 of it, the fewest steps (the cheaper
site). Printed as "chosen" and stored under "_chosen". Writes bench/results/gan_budget.json.

    python -m bench.gan_budget --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench._site import ROOT, npz_site, run_meta, walk_both
from bench.frontier import privacy, utility
from bench.generator import features, judge, precision_recall
from common.fileio import atomic_write_json, sha256_file
from node.plan.quality import frechet_distance
from node.site.ingest import load_split
from node.site.pixels import to_uint8
from node.site.workspace import ledger_lines


def train_seconds(ws) -> float:
    """Seconds the train stage took to make the models on disk, from the workspace's ledger. A
    train stage rerun for a site.yaml edit that leaves the models' config alone finds them up to
    date in a fraction of a second and writes the same outputs: the longest run wins."""
    g_ema = ws.models / "G_ema.safetensors"
    sha = sha256_file(g_ema)
    runs = [r for r in ledger_lines(ws) if r["stage"] == "train" and r["outputs"].get(str(g_ema)) == sha]
    return max(float(r["seconds"]) for r in runs)


def run_site(name: str, *, gan_steps: int, max_images: int, images: int, steps: int, batch: int, seeds: int) -> dict:
    t0 = time.time()
    ws, _ = npz_site(name, max_images=max_images, gan_steps=gan_steps)
    wc = ws.config().synth.walk
    train, val = load_split(ws, "train"), load_split(ws, "holdout")
    n_classes = int(max(val.labels.max(), train.labels.max()) + 1)

    wk = walk_both(ws, n_pairs=images // (wc.points - 2))
    G = wk.anchors.G
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        samples = to_uint8(G(torch.randn(len(train), G.z_dim)).clamp(-1, 1))
    net = judge(train, n_classes=n_classes, steps=steps, seed=7)
    ref = features(net, train.images)
    quality = {}
    for s, imgs in {"G_samples": samples, "anchors": wk.anchor_images, "linear": wk.linear, "plan": wk.plan}.items():
        f = features(net, imgs.reshape(-1, *imgs.shape[-2:]))
        p, r = precision_recall(ref, f)
        quality[s] = {"fd": frechet_distance(ref, f), "precision": p, "recall": r}

    P, inner = wk.plan.shape[:2]
    path_y = wk.anchors.labels.numpy().repeat(inner)
    path_id = np.arange(P).repeat(inner)
    plan = wk.plan.reshape(-1, *wk.plan.shape[2:])
    return {
        "gan_steps": gan_steps,
        "train_seconds": train_seconds(ws),
        "invert_mse": wk.walk["invert_mse"],
        "quality": quality,
        "plan": {
            "n_images": int(len(plan)),
            "pairs": int(P),
            "utility": utility(plan, path_y, val, n_classes=n_classes, steps=steps, batch=batch, seeds=seeds),
            "privacy": privacy(plan, path_y, path_id, ws),
        },
        "seconds": round(time.time() - t0, 1),
    }


def choose(res: dict, datasets, gan_steps, *, budget: float) -> dict:
    """The module docstring's rule: {"gan_steps", "balanced_accuracy", "eligible"}."""
    eligible = {}
    for s in gan_steps:
        rows = [res[n][f"g{s}"] for n in datasets]
        fits = all(r["train_seconds"] <= budget for r in rows)
        safe = all(r["plan"]["privacy"]["passed"] and r["plan"]["privacy"]["kept_share"] >= 0.8 for r in rows)
        if fits and safe:
            eligible[s] = float(np.mean([r["plan"]["utility"]["balanced-accuracy"]["mean"] for r in rows]))
    if not eligible:
        return {"gan_steps": None, "balanced_accuracy": None, "eligible": {}}
    best = max(eligible.values())
    chosen = min(s for s, v in eligible.items() if v >= best - 0.01)
    return {"gan_steps": chosen, "balanced_accuracy": eligible[chosen], "eligible": eligible}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--gan-steps", nargs="+", type=int, default=[600, 2400, 4800])
    ap.add_argument("--budget", type=float, default=600.0, help="most seconds the train stage may take")
    ap.add_argument("--images", type=int, default=384, help="images in each PLAN set")
    ap.add_argument("--max-images", type=int, default=800)
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps of the judge and the utility models")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gan_budget.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(max_images=args.max_images, images=args.images, steps=args.steps, batch=args.batch, seeds=args.seeds)
    res = {n: {f"g{s}": run_site(n, gan_steps=s, **kw) for s in args.gan_steps} for n in args.datasets}
    res["_chosen"] = choose(res, args.datasets, args.gan_steps, budget=args.budget)
    res["_meta"] = run_meta("bench.gan_budget", argv)
    atomic_write_json(args.out, res)
    print(f"{'data set':<16}{'GAN steps':>10}{'train s':>9}{'FD G':>8}{'FD plan':>9}{'prec plan':>10}"
          f"{'rec plan':>9}{'bal. acc (val)':>16}{'kept':>6}{'MIA up':>8}{'verdict':>9}")  # fmt: skip
    for n in args.datasets:
        for r in res[n].values():
            q, u, p = r["quality"], r["plan"]["utility"], r["plan"]["privacy"]
            print(
                f"{n:<16}{r['gan_steps']:>10}{r['train_seconds']:>9.0f}{q['G_samples']['fd']:>8.2f}"
                f"{q['plan']['fd']:>9.2f}{q['plan']['precision']:>10.2f}{q['plan']['recall']:>9.2f}"
                f"{u['balanced-accuracy']['mean']:>16.3f}{p['kept_share']:>6.2f}"
                f"{p.get('mia_auc_upper') or float('nan'):>8.3f}{str(p['passed']):>9}"
            )
    print(f"chosen: {res['_chosen']}")
    return res


if __name__ == "__main__":
    main()
