"""How long must a site's downstream classifier train? Local-only on real data, by training length.

The federation's DownstreamCNN (common.models, DownstreamConfig's width, lr and batch) trained on
one site's real train split alone and tested on its real test split, for:
  - "6 epochs": the schedule before min_local_steps (rounds * local_epochs = 3 * 2 epochs),
  - "300 steps": the default now (3 rounds of at least min_local_steps = 100 steps, node.federation.task.epochs_for),
  - "600 steps": twice that,
on the three phantom demo sites (seeds 100-102, the demo's 40% train split) and a site-sized
subset (270 train, 200 test images) of pneumoniamnist and breastmnist. Mean and std over --seeds.
Writes bench/results/downstream.json.

    .venv/bin/python -m bench.downstream

With --weighting, the class weighting of the loss instead (issue 14, item 3): at the default schedule,
"plain" cross-entropy against "balanced" (node.federation.task.balanced_class_weights: every class
the same total weight), on the same sites, measured on each site's **validation** split (its
holdout; the test split is not used). Writes bench/results/downstream_weighting.json. The rule,
written here before the first run: "balanced" becomes DownstreamConfig's default when, over the
two MedMNIST sites, its mean validation balanced accuracy is at least 0.02 above plain's and its
mean validation AUROC at most 0.01 below; otherwise "plain" stays.

    .venv/bin/python -m bench.downstream --weighting --seeds 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench._site import ROOT, SHARED_DATA, command, machine, mean_std
from common.config import DataConfig, DownstreamConfig
from common.fileio import atomic_write_json
from common.models import DownstreamCNN
from node.federation.task import class_weights_for, epochs_for, evaluate_classifier, train_classifier
from node.site.data import load_dataset
from node.site.splits import split_by_patient

SCHEDULES = {"6 epochs": None, "300 steps": 300, "600 steps": 600}


def site_splits(evaluate_on: str = "test") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """{site: (train images, train labels, images, labels of the `evaluate_on` split: "test" or
    "holdout")}."""
    out = {}
    for i in range(3):
        d = load_dataset(DataConfig(source="phantom", phantom={"seed": 100 + i}))
        sp = split_by_patient(d.patient_ids, train=0.4, holdout=0.4, seed=0, labels=d.labels)
        out[f"phantom-{'abc'[i]}"] = (
            d.images[sp["train"]],
            d.labels[sp["train"]],
            d.images[sp[evaluate_on]],
            d.labels[sp[evaluate_on]],
        )
    for name in ("pneumoniamnist", "breastmnist"):
        d = load_dataset(DataConfig(source="npz", path=SHARED_DATA / f"{name}.npz"))
        sp = split_by_patient(d.patient_ids, train=0.45, holdout=0.3, seed=0, labels=d.labels)
        rng = np.random.default_rng(0)
        tr, te = rng.permutation(sp["train"])[:270], rng.permutation(sp[evaluate_on])[:200]
        out[name] = (d.images[tr], d.labels[tr], d.images[te], d.labels[te])
    return out


def fit(x, y, xt, yt, *, total_steps: int | None, seed: int, class_weighting: str = "none") -> dict:
    ds = DownstreamConfig()
    y, yt = y.astype(np.int64), yt.astype(np.int64)
    n_classes = int(max(y.max(), yt.max())) + 1
    if total_steps is None:
        epochs = ds.rounds * ds.local_epochs
    else:
        epochs = epochs_for(len(y), epochs=1, min_steps=total_steps, batch_size=ds.batch_size)
    torch.manual_seed(seed)
    model = DownstreamCNN(n_classes, width=ds.width, image_size=x.shape[-1])
    train_classifier(
        model,
        x,
        y,
        epochs=epochs,
        lr=ds.lr,
        batch_size=ds.batch_size,
        device="cpu",
        seed=seed,
        class_weights=class_weights_for(y, n_classes, class_weighting),
    )
    return evaluate_classifier(model, xt, yt, device="cpu")


def weighting(seeds: int) -> dict:
    """{site: {"plain"|"balanced": metrics on the validation split}} at the default schedule, and the
    rule's verdict (the module docstring)."""
    ds = DownstreamConfig()
    sites: dict = {}
    print(f"{'site':15} {'weighting':9} {'accuracy':>13} {'bal. acc':>14} {'AUROC':>6}")
    for site, (x, y, xv, yv) in site_splits("holdout").items():
        steps = ds.rounds * ds.min_local_steps
        sites[site] = {"n_train": len(y), "n_val": len(yv), "majority": float(np.bincount(yv).max() / len(yv))}
        for name in ("plain", "balanced"):
            weighting = "balanced" if name == "balanced" else "none"
            runs = [fit(x, y, xv, yv, total_steps=steps, seed=s, class_weighting=weighting) for s in range(seeds)]
            row = {k: mean_std([r[k] for r in runs]) for k in ("accuracy", "balanced-accuracy", "auroc")}
            sites[site][name] = row
            acc, bal = row["accuracy"], row["balanced-accuracy"]
            print(
                f"{site:15} {name:9} {acc['mean']:.3f} ± {acc['std']:.3f} {bal['mean']:.3f} ± {bal['std']:.3f} "
                f"{row['auroc']['mean']:6.3f}",
                flush=True,
            )

    def mean(name: str, k: str) -> float:
        return float(np.mean([sites[s][name][k]["mean"] for s in ("pneumoniamnist", "breastmnist")]))

    gain = mean("balanced", "balanced-accuracy") - mean("plain", "balanced-accuracy")
    auroc_change = mean("balanced", "auroc") - mean("plain", "auroc")
    verdict = "balanced" if gain >= 0.02 and auroc_change >= -0.01 else "plain"
    print(f"balanced - plain: balanced accuracy {gain:+.3f}, AUROC {auroc_change:+.3f} -> the rule keeps {verdict!r}")
    return {"sites": sites, "balanced_accuracy_gain": gain, "auroc_change": auroc_change, "verdict": verdict}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weighting", action="store_true", help="plain against class-balanced loss, on validation")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.weighting:
        out = ROOT / "bench" / "results" / "downstream_weighting.json"
        res = weighting(args.seeds)
        atomic_write_json(out, {"command": command("bench.downstream", argv), "machine": machine(), **res})
        print(f"wrote {out}")
        return
    results: dict = {"command": command("bench.downstream", argv), "machine": machine(), "sites": {}}
    print(f"{'site':15} {'n_train':>7} {'majority':>8} {'schedule':10} {'accuracy':>13} {'bal. acc':>8} {'AUROC':>6}")
    for site, (x, y, xt, yt) in site_splits().items():
        majority = float(np.bincount(yt).max() / len(yt))
        results["sites"][site] = {"n_train": len(y), "n_test": len(yt), "majority": majority, "schedules": {}}
        for name, steps in SCHEDULES.items():
            t0 = time.time()
            runs = [fit(x, y, xt, yt, total_steps=steps, seed=s) for s in range(args.seeds)]
            row = {k: mean_std([r[k] for r in runs]) for k in ("accuracy", "balanced-accuracy", "auroc")}
            row["seconds"] = round(time.time() - t0, 1)
            results["sites"][site]["schedules"][name] = row
            acc = row["accuracy"]
            print(
                f"{site:15} {len(y):7d} {majority:8.3f} {name:10} {acc['mean']:.3f} ± {acc['std']:.3f} "
                f"{row['balanced-accuracy']['mean']:8.3f} {row['auroc']['mean']:6.3f}",
                flush=True,
            )
    out = ROOT / "bench" / "results" / "downstream.json"
    atomic_write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
