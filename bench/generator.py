"""How good is the generator, seen by a network it never met? (issue 14, item 1)

For each data set (bench._site's cached default-config workspaces): a judge network, a
DownstreamCNN trained on the site's real train split for the class labels (its own seed; not
phi_class, not phi_id, never used by training or the walk), and in its penultimate features:
- FD: the Frechet distance between each image set and the real train split;
- precision and recall (Kynkaanniemi et al. 2019, k = 3 nearest neighbours): the share of a set's
  images inside the real images' k-NN balls, and the share of real images inside the set's.
Sets: the real holdout (the floor: real images the judge never saw), G_ema's random samples,
the k-same anchors, the straight lines and the PLAN paths between --pairs anchor pairs (the
site's walk), all rendered and clamped as a release would be. Writes bench/results/generator.json.

    python -m bench.generator --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from bench._site import ROOT, npz_site, run_meta, walk_both
from common.config import DownstreamConfig
from common.fileio import atomic_write_json
from common.models import DownstreamCNN
from node.federation.task import train_classifier
from node.plan.quality import frechet_distance
from node.site.ingest import load_split
from node.site.pixels import to_tensor, to_uint8

K = 3


def judge(train, *, n_classes: int, steps: int, seed: int) -> DownstreamCNN:
    ds = DownstreamConfig()
    torch.manual_seed(seed)
    model = DownstreamCNN(n_classes, width=ds.width, image_size=train.images.shape[-1])
    epochs = max(1, math.ceil(steps * 32 / len(train)))
    train_classifier(model, train.images, train.labels, epochs=epochs, lr=ds.lr, batch_size=32, device="cpu", seed=seed)
    return model.eval()


@torch.no_grad()
def features(model, images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] -> the judge's features float64 [N,F]."""
    x = to_tensor(images)
    return torch.cat([model.features(x[i : i + 512]) for i in range(0, len(x), 512)]).double()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = K) -> tuple[float, float]:
    """Improved precision and recall: real [N,F], fake [M,F] -> (precision, recall)."""

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance of each point to its k-th neighbour in x
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # [M,N]
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def run_dataset(name: str, *, max_images: int, pairs: int, steps: int, seed: int) -> dict:
    t0 = time.time()
    ws, _ = npz_site(name, max_images=max_images)
    train, holdout = load_split(ws, "train"), load_split(ws, "holdout")
    n_classes = int(max(train.labels.max(), holdout.labels.max()) + 1)
    net = judge(train, n_classes=n_classes, steps=steps, seed=seed)
    wk = walk_both(ws, n_pairs=pairs)
    G = wk.anchors.G
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = to_uint8(G(torch.randn(len(train), G.z_dim)).clamp(-1, 1))
    sets = {
        "real_holdout": holdout.images,
        "G_samples": samples,
        "anchors": wk.anchor_images,
        "linear": wk.linear.reshape(-1, *wk.linear.shape[2:]),
        "plan": wk.plan.reshape(-1, *wk.plan.shape[2:]),
    }
    ref = features(net, train.images)
    out = {}
    for s, imgs in sets.items():
        f = features(net, imgs)
        p, r = precision_recall(ref, f)
        out[s] = {"n": int(len(imgs)), "fd": frechet_distance(ref, f), "precision": p, "recall": r}
    out["setup"] = {
        "n_train": int(len(train)),
        "judge": "DownstreamCNN on the train split's class labels",
        "judge_steps": steps,
        "pairs": pairs,
        "k": K,
        "seconds": round(time.time() - t0, 1),
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--max-images", type=int, default=800)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300, help="the judge's optimiser steps (batch 32)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generator.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(max_images=args.max_images, pairs=args.pairs, steps=args.steps, seed=args.seed)
    res = {n: run_dataset(n, **kw) for n in args.datasets}
    res["_meta"] = run_meta("bench.generator", argv)
    atomic_write_json(args.out, res)
    print(f"{'data set':<16}{'set':<14}{'n':>6}{'FD':>10}{'precision':>11}{'recall':>8}")
    for n in args.datasets:
        for s, v in res[n].items():
            if s != "setup":
                print(f"{n:<16}{s:<14}{v['n']:>6}{v['fd']:>10.3f}{v['precision']:>11.3f}{v['recall']:>8.3f}")
    return res


if __name__ == "__main__":
    main()
