"""The walk's privacy-utility frontier (issue 14, item 2): the identity weight chosen on evidence.

For each data set (bench._site's cached default-config workspaces) and each identity weight in
--weights: PLAN paths between the same k-same anchor pairs (the site's walk config otherwise),
their interior images rendered as a release would; then
- utility on the **validation** split (the site's holdout; never the test split): a fresh
  DownstreamCNN trained on the set for --steps steps (mean over --seeds seeds), its accuracy,
  balanced accuracy and AUROC;
- privacy: the site's full audit of the set (node.audit.run.audit_images with its own phi_id, both
  attackers and D, the default policy): the share of candidates it keeps, the gated upper
  bounds, the verdict.
Rows "linear" (the straight lines between the same anchors) and "real" (the train split) frame
them. Writes bench/results/frontier.json.

The rule that picks the weight, fixed before the first run: among the weights whose sets pass
the site's gate on every data set with at least 80% of the candidates kept, the one with the
highest validation balanced accuracy averaged over the data sets; within 0.01 of it, the larger
weight (the more private walk). Printed as "chosen" and stored under "_chosen".

    python -m bench.frontier --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench._site import ROOT, anchor_pairs, mean_std, npz_site, run_meta, site_audit, walk_pairs
from common.config import DownstreamConfig
from common.fileio import atomic_write_json
from common.models import DownstreamCNN
from node.federation.task import evaluate_classifier, train_classifier
from node.plan.walk import linear_paths
from node.site.ingest import load_split
from node.site.pixels import to_uint8

GATED = ("mia_auc_upper", "closer_to_train_upper", "reid_rate_upper", "tpr_at_low_fpr_upper")


def utility(images, labels, val, *, n_classes: int, steps: int, batch: int, seeds: int) -> dict:
    """Validation metrics of a DownstreamCNN trained ~`steps` steps on uint8 images [N,H,W]."""
    ds = DownstreamConfig()
    runs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = DownstreamCNN(n_classes, width=ds.width, image_size=images.shape[-1])
        epochs = max(1, math.ceil(steps * batch / len(images)))
        train_classifier(model, images, labels, epochs=epochs, lr=ds.lr, batch_size=batch, device="cpu", seed=seed)
        runs.append(evaluate_classifier(model, val.images, val.labels, device="cpu"))
    return {k: mean_std(r[k] for r in runs) for k in ("accuracy", "balanced-accuracy", "auroc")}


def privacy(images, labels, paths, ws) -> dict:
    """The site's own audit of a candidate set: kept share, gated upper bounds, verdict."""
    report, accepted = site_audit(ws, images, labels, paths)
    return {
        "kept_share": float(accepted.mean()),
        "passed": bool(report["passed"]),
        "failed": [c["name"] for c in report["checks"] if not c["passed"]],
        **{k: report.get(k) for k in GATED},
    }


def run_dataset(name: str, *, weights, pairs: int, max_images: int, steps: int, batch: int, seeds: int) -> dict:
    t0 = time.time()
    ws, _ = npz_site(name, max_images=max_images)
    a = anchor_pairs(ws, n_pairs=pairs)
    wc = ws.config().synth.walk
    train, val = a.train, load_split(ws, "holdout")
    n_classes = int(max(val.labels.max(), train.labels.max()) + 1)
    P, T = len(a.start), wc.points
    path_y = a.labels.numpy().repeat(T - 2)
    path_id = np.arange(P).repeat(T - 2)

    @torch.no_grad()
    def render(codes: torch.Tensor) -> np.ndarray:  # [P,T,D] -> uint8 [P*(T-2),H,W], interior points
        flat = codes[:, 1:-1].reshape(-1, codes.shape[-1])
        return np.concatenate([to_uint8(a.G.synthesis(flat[i : i + 512])) for i in range(0, len(flat), 512)])

    def row(images: np.ndarray, **extra) -> dict:
        return {
            **extra,
            "n_images": int(len(images)),
            "utility": utility(images, path_y, val, n_classes=n_classes, steps=steps, batch=batch, seeds=seeds),
            "privacy": privacy(images, path_y, path_id, ws),
        }

    out = {
        "real": {
            "n_images": int(len(train)),
            "utility": utility(
                train.images, train.labels, val, n_classes=n_classes, steps=steps, batch=batch, seeds=seeds
            ),
        },
        "linear": row(render(linear_paths(a.start, a.end, points=T))),
    }
    for w in weights:
        t_walk = time.time()
        res = walk_pairs(a, wc, weight_identity=w)
        out[f"plan_w{w:g}"] = row(
            render(res.paths), weight_identity=w, seconds_walk=round(time.time() - t_walk, 1), iters_run=res.iters
        )
        print(f"{name} w={w:g}: {out[f'plan_w{w:g}']}", flush=True)
    out["setup"] = {
        "pairs": P,
        "points": T,
        "n_train": int(len(train)),
        "n_validation": int(len(val)),
        "steps": steps,
        "seeds": seeds,
        "seconds": round(time.time() - t0, 1),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0, 3.0, 10.0, 30.0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--max-images", type=int, default=800)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "frontier.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(pairs=args.pairs, max_images=args.max_images, steps=args.steps, batch=args.batch, seeds=args.seeds)
    res = {n: run_dataset(n, weights=args.weights, **kw) for n in args.datasets}
    res["_chosen"] = choose(res, args.datasets, args.weights)
    res["_meta"] = run_meta("bench.frontier", argv)
    atomic_write_json(args.out, res)
    print(f"{'data set':<16}{'set':<12}{'bal. acc (val)':>16}{'AUROC (val)':>13}{'kept':>7}{'MIA up':>8}"
          f"{'closer up':>10}{'verdict':>9}")  # fmt: skip
    for n in args.datasets:
        for s, v in res[n].items():
            if s == "setup":
                continue
            u, p = v["utility"], v.get("privacy", {})
            print(
                f"{n:<16}{s:<12}{u['balanced-accuracy']['mean']:>16.3f}{u['auroc']['mean']:>13.3f}"
                f"{p.get('kept_share', float('nan')):>7.2f}{p.get('mia_auc_upper') or float('nan'):>8.3f}"
                f"{p.get('closer_to_train_upper') or float('nan'):>10.3f}{str(p.get('passed', '-')):>9}"
            )
    print(f"chosen: {res['_chosen']}")
    return res


def choose(res: dict, datasets, weights) -> dict:
    """The module docstring's rule: {"weight_identity", "balanced_accuracy", "eligible"}."""
    eligible = {}
    for w in weights:
        rows = [res[n][f"plan_w{w:g}"] for n in datasets]
        if all(r["privacy"]["passed"] and r["privacy"]["kept_share"] >= 0.8 for r in rows):
            eligible[w] = float(np.mean([r["utility"]["balanced-accuracy"]["mean"] for r in rows]))
    if not eligible:
        return {"weight_identity": None, "balanced_accuracy": None, "eligible": {}}
    best = max(eligible.values())
    w = max(w for w, v in eligible.items() if v >= best - 0.01)
    shown = {f"{k:g}": v for k, v in eligible.items()}
    return {"weight_identity": w, "balanced_accuracy": eligible[w], "eligible": shown}


if __name__ == "__main__":
    main()
