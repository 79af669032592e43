"""A class network that knows the minority class, on the privacy-utility frontier (issue 14, item 2).

What prompted it (session 18, after bench/gan_balance.py): at the table's label-skewed sites the
site's own phi_class, trained with every image weighted alike, is a majority-class model: on two
of them it recognised 0.07 and 0.31 of the minority class's validation images. The walk's class
term (CE of phi_class on each path image) and the inversion's class features (invert_perceptual)
are then no guide for the minority's paths.

`models.classifier.class_weighting: balanced` trains phi_class with every class the same total
weight (node.federation.task.balanced_class_weights). bench/gan_balance.py moved the GAN to balanced
sampling first, so this runs on top of that: beside each of the twelve table sites it trained
(bench/work/gan-balanced; balanced G, plain phi_class; the same seed, epochs and width), it trains a
balanced phi_class, inverts the train split with it, and runs exactly what bench.gan_balance ran at
k 8 (the same anchor-pair draw, the site's walk with the new phi_class, 240 images; its "balanced"
rows in bench/results/gan_balance.json are the baseline): the PLAN set's validation utility (the
holdout split; 300 steps at batch 32, 3 seeds) and the site's full audit. Beside it, not used to
choose: each phi_class's recall of every class on the validation split.

The rule, fixed before the run (the same as bench/gan_balance.py's): balanced becomes the default
when its PLAN sets publish (pass the gate keeping at least 80% of the candidates) on at least as
many of the twelve sites as the plain phi_class's do, and its mean validation balanced accuracy
over the twelve sites is at least 0.01 above theirs; otherwise none stays.

    python -m bench.phi_class_balance --threads 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench._site import ROOT, WORK, anchor_pairs, run_meta, walk_pairs
from bench.frontier import privacy, publishes, render_interior, utility
from bench.gan_balance import BASELINES, choose, per_class_recall
from common.fileio import atomic_write_json
from node.federation.task import balanced_class_weights
from node.plan.train import load_model, train_small_cnn
from node.site.ingest import load_split
from node.site.workspace import Workspace


def balanced_phi_class(ws: Workspace, train, n_classes: int):
    """The site's phi_class as its train stage makes it, but with balanced class weights."""
    cfg = ws.config()
    cc = cfg.models.classifier
    model, _ = train_small_cnn(
        n_classes,
        train.images,
        train.labels,
        width=cc.width,
        image_size=cfg.data.image_size,
        cc=cc,
        epochs=cc.epochs,
        augment="light",
        seed=cfg.models.seed + 3,
        device="cpu",
        class_weights=balanced_class_weights(train.labels, n_classes),
    )
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--partitions", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    ap.add_argument("--k", type=int, default=8, help="the baseline's k (bench.gan_balance ran k 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "phi_class_balance.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict = {}
    base = json.loads((ROOT / "bench" / "results" / "gan_balance.json").read_text())
    for part in args.partitions:
        for name in args.datasets:
            for i in range(3):
                key = f"{name}/site{i}"
                ws = Workspace(WORK / "gan-balanced" / f"eval-{name}-{part}-1200" / f"site{i}")
                train, val = load_split(ws, "train"), load_split(ws, "holdout")
                n_classes = int(max(val.labels.max(), train.labels.max()) + 1)
                phi = balanced_phi_class(ws, train, n_classes)
                a = anchor_pairs(ws, n_pairs=240 // (ws.config().synth.walk.points - 2), k=args.k, phi_class=phi)
                T = ws.config().synth.walk.points
                path_y, path_id = a.labels.numpy().repeat(T - 2), np.arange(len(a.start)).repeat(T - 2)
                imgs = render_interior(a.G, walk_pairs(a, ws.config().synth.walk).paths)
                res[f"{part}/{key}"] = {
                    "none": base[f"{part}/{key}"]["balanced"],
                    "balanced": {
                        "k": args.k,
                        "anchors": int(len(a.anchor_codes)),
                        "pairs": int(len(a.start)),
                        "n_images": int(len(imgs)),
                        "utility": utility(imgs, path_y, val, n_classes=n_classes, steps=300, batch=32, seeds=3),
                        "privacy": privacy(imgs, path_y, path_id, ws),
                    },
                    "phi_class_recall": {
                        "none": per_class_recall(load_model(ws, "phi_class", "cpu"), val.images, val.labels),
                        "balanced": per_class_recall(phi, val.images, val.labels),
                    },
                }
                r = res[f"{part}/{key}"]
                print(
                    f"{part}/{key}: bal. acc. none {r['none']['utility']['balanced-accuracy']['mean']:.3f} "
                    f"balanced {r['balanced']['utility']['balanced-accuracy']['mean']:.3f}; publishes "
                    f"{publishes(r['none'])} / {publishes(r['balanced'])}; phi_class recall {r['phi_class_recall']}",
                    flush=True,
                )
    rows = {s: r for s, r in res.items() if not s.startswith("_")}
    res["_chosen"] = choose(rows, base="none", new="balanced")
    res["_meta"] = run_meta("bench.phi_class_balance", argv)
    atomic_write_json(args.out, res)
    print(f"chosen: {res['_chosen']}")
    return res


if __name__ == "__main__":
    main()
