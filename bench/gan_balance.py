"""Class-balanced GAN training on the privacy-utility frontier (issue 14, item 1).

What prompted it (session 18, the table's cached k-3 sets): an independent judge (a DownstreamCNN
trained on a site's real train split, bench.generator.judge) gave the minority class's k-same
anchors their own label on only 0.44-0.78 of four of the twelve table sites, and the PLAN images
of those classes 0.17-0.57, while the same judge labels the site's real train images of that
class 0.79-1.00. The GAN is unconditional and D sees the classes in the site's proportions, so G
renders a minority class poorly and its inverted codes and anchors drift towards the majority's
look: sets whose minority images read as the majority teach a majority-class model.

`models.gan.sampling: balanced` draws D's real batches so that every class has the same share.
This runs it on the twelve sites of the evaluation table (bench.evaluation.table_sites: iid and
Dirichlet(0.5), three sites per data set, 1,200 images a data set), trained afresh in a work
folder of their own with that one override, at the default synth.k (8), and measures exactly what
bench.ksame measured of the same sites with uniform sampling (bench/results/ksame_table.json and
ksame_table_dirichlet.json, the plan_k8 rows): the PLAN set's validation utility (the holdout
split; 300 steps at batch 32, 3 seeds) and the site's full audit of it. Beside it, not used to
choose: the independent judge's per-class agreement with the anchors' labels under both samplings.

The rule, fixed before the run: balanced becomes the default when its PLAN sets publish (pass the
gate keeping at least 80% of the candidates) on at least as many of the twelve sites as uniform's
do, and its mean validation balanced accuracy over the twelve sites is at least 0.01 above
uniform's; otherwise uniform stays (the simpler, and what every earlier figure was measured with).

    python -m bench.gan_balance --threads 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench._site import ROOT, WORK, anchor_pairs, run_meta
from bench.evaluation import table_sites
from bench.frontier import publishes
from bench.generator import judge
from bench.ksame import run_site
from common.fileio import atomic_write_json
from node.plan.candidates import render
from node.site.ingest import load_split
from node.site.pixels import to_tensor
from node.site.workspace import Workspace

BASELINES = {"iid": "ksame_table.json", "dirichlet0.5": "ksame_table_dirichlet.json"}
OVERRIDES = {"models": {"gan": {"sampling": "balanced"}}}


@torch.no_grad()
def per_class_recall(net, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{class: share of `images` (uint8 [N,H,W]) of that class that `net` gives their own class}."""
    pred = net(to_tensor(images)).argmax(1).numpy()
    return {str(int(c)): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


@torch.no_grad()
def anchor_agreement(ws: Workspace, net, *, k: int) -> dict[str, float]:
    """per_class_recall of `net` on the site's k-same anchors, rendered."""
    a = anchor_pairs(ws, n_pairs=1, k=k)
    return per_class_recall(net, render(a.G, a.anchor_codes, device="cpu"), a.anchor_labels.numpy())


def choose(rows: dict, *, base: str, new: str) -> dict:
    """The module docstring's rule over {site: {base: plan row, new: plan row}}: {base: {"publishing",
    "balanced_accuracy"}, new: {...}, "adopt": whether `new` wins}."""
    out = {}
    for s in (base, new):
        out[s] = {
            "publishing": sum(publishes(r[s]) for r in rows.values()),
            "balanced_accuracy": float(np.mean([r[s]["utility"]["balanced-accuracy"]["mean"] for r in rows.values()])),
        }
    adopt = (
        out[new]["publishing"] >= out[base]["publishing"]
        and out[new]["balanced_accuracy"] >= out[base]["balanced_accuracy"] + 0.01
    )
    return {**out, "adopt": adopt}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    ap.add_argument("--partitions", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    ap.add_argument("--k", type=int, default=8, help="synth.k of both sides (the baselines hold k 3 and 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gan_balance.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict = {}
    for part in args.partitions:
        base = json.loads((ROOT / "bench" / "results" / BASELINES[part]).read_text())
        for name in args.datasets:
            balanced = table_sites(name, part, work=WORK / "gan-balanced", overrides=OVERRIDES, stage="train")
            for i, ws in enumerate(balanced):
                key = f"{name}/site{i}"
                kw = dict(images=240, steps=300, batch=32, seeds=3, plan_only=True, audit_test=False)
                row = run_site(ws, ks=[args.k], **kw)
                uniform_ws = Workspace(WORK / f"eval-{name}-{part}-1200" / f"site{i}")
                train = load_split(ws, "train")
                net = judge(train, n_classes=int(train.labels.max()) + 1, steps=300, seed=123)
                res[f"{part}/{key}"] = {
                    "uniform": base[key][f"plan_k{args.k}"],
                    "balanced": row[f"plan_k{args.k}"],
                    "real": {"uniform": base[key]["real"], "balanced": row["real"]},
                    "anchor_agreement": {
                        "uniform": anchor_agreement(uniform_ws, net, k=args.k),
                        "balanced": anchor_agreement(ws, net, k=args.k),
                    },
                }
                r = res[f"{part}/{key}"]
                print(
                    f"{part}/{key}: bal. acc. uniform {r['uniform']['utility']['balanced-accuracy']['mean']:.3f} "
                    f"balanced {r['balanced']['utility']['balanced-accuracy']['mean']:.3f}; publishes "
                    f"{publishes(r['uniform'])} / {publishes(r['balanced'])}; anchors agree {r['anchor_agreement']}",
                    flush=True,
                )
    res["_chosen"] = choose({s: r for s, r in res.items() if not s.startswith("_")}, base="uniform", new="balanced")
    res["_meta"] = run_meta("bench.gan_balance", argv)
    atomic_write_json(args.out, res)
    print(f"chosen: {res['_chosen']}")
    return res


if __name__ == "__main__":
    main()
