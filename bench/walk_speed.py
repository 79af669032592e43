"""The batched PLAN walk (node.plan.walk.plan_paths, all paths as one [P,T,D] tensor) against the
authors' method (bench.walk_reference: one path at a time, one generator call per path and step,
the classifiers in chunks of 4, the chunk losses summed, one backward pass).

Same trained G_ema, phi_id, phi_class (a default-config phantom site, trained through the node's
stages), same k-same anchors and pairs, same weights, same Adam lr, same number of steps, no early
stopping, and both return their last iterate. Each method optimises its own objective (the
authors' sums the chunk means, the node's averages over the path), so the final loss of each is
reported under its own objective, and both paths under the node's. Writes
bench/results/walk_speed.json.

    .venv/bin/python -m bench.walk_speed            # 32 paths x 14 points x 60 steps
    .venv/bin/python -m bench.walk_speed --quick    # 8 paths x 14 points x 20 steps
    .venv/bin/python -m bench.walk_speed --quick --site-yaml tiny.yaml --work /tmp/w   # a smaller site
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml

from bench._site import ROOT, WORK, anchor_pairs, command, machine, site
from bench.walk_reference import AUTHORS_CHUNK, reference_walk
from common.config import SiteConfig, deep_merge
from common.fileio import atomic_write_json
from node.plan.walk import path_loss, plan_paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", type=int, default=32)
    ap.add_argument("--points", type=int, default=14, help="codes per path, endpoints included")
    ap.add_argument("--iters", type=int, default=60, help="Adam steps, for both methods")
    ap.add_argument("--repeats", type=int, default=1, help="time each method this many times, keep the fastest")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--quick", action="store_true", help="8 paths, 20 steps")
    ap.add_argument("--site-yaml", type=Path, help="YAML merged into the phantom site's config (e.g. smaller models)")
    ap.add_argument("--work", type=Path, default=WORK, help="where the site's workspace lives")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "walk_speed.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.paths, args.iters = 8, 20
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = yaml.safe_load(args.site_yaml.read_text()) if args.site_yaml else {}
    base = {"name": "phantom100", "data": {"source": "phantom", "phantom": {"seed": 100}}}
    cfg = SiteConfig(**deep_merge(base, overrides))
    ws, _ = site("phantom100", cfg, root=args.work)
    a = anchor_pairs(ws, n_pairs=args.paths, seed=0)
    wc = cfg.synth.walk
    kw = dict(
        points=args.points,
        iters=args.iters,
        lr=wc.lr,
        weight_identity=wc.weight_identity,
        weight_smooth=wc.weight_smooth,
        weight_class=wc.weight_class,
    )
    models = (a.G, a.phi_id, a.phi_class)

    def reference(layout: torch.memory_format) -> tuple[float, torch.Tensor, torch.Tensor]:
        for m in models:
            m.to(memory_format=layout)
        t0 = time.perf_counter()
        paths, loss = reference_walk(*models, a.start, a.end, a.labels, **kw, device="cpu")
        return time.perf_counter() - t0, paths, loss

    t_ref, t_ref_cl, t_bat = [], [], []
    for _ in range(args.repeats):
        # alternate the methods so a change in machine load hits all of them. The reference runs
        # in PyTorch's default layout, as the authors' code does; plan_paths switches the models
        # to channels_last, so the reference is also timed in that layout, to separate what
        # batching buys from what the layout buys.
        t, paths_ref, loss_ref = reference(torch.contiguous_format)
        t_ref.append(t)
        t_ref_cl.append(reference(torch.channels_last)[0])
        t0 = time.perf_counter()
        res = plan_paths(*models, a.start, a.end, a.labels, **kw, patience=None, keep_best=False, device="cpu")
        t_bat.append(time.perf_counter() - t0)
    loss_bat = res.loss
    with torch.no_grad():  # the authors' paths under the node's objective, for a like-for-like comparison
        weights = {k: kw[k] for k in ("weight_identity", "weight_smooth", "weight_class")}
        loss_ref_node, _ = path_loss(*models, paths_ref, a.labels, **weights)

    out = {
        "paths": int(len(a.start)),
        "steps": args.points,
        "iters": args.iters,
        "reference": "bench/walk_reference.py, the authors' get_privacy_path in behaviour",
        "reference_chunk": AUTHORS_CHUNK,
        "seconds_reference": round(min(t_ref), 3),
        "seconds_batched": round(min(t_bat), 3),
        "speedup": round(min(t_ref) / min(t_bat), 2),
        "seconds_reference_channels_last": round(min(t_ref_cl), 3),
        "speedup_from_batching_alone": round(min(t_ref_cl) / min(t_bat), 2),
        "final_loss_reference_own_objective": float(loss_ref.mean()),
        "final_loss_batched_own_objective": float(loss_bat.mean()),
        "final_loss_reference_node_objective": float(loss_ref_node.mean()),
        "initial_loss_node_objective": float(res.initial_loss.mean()),
        "batched_vs_reference_node_objective_pct": round(
            100 * (float(loss_bat.mean()) / float(loss_ref_node.mean()) - 1), 3
        ),
        "all_seconds_reference": [round(t, 3) for t in t_ref],
        "all_seconds_reference_channels_last": [round(t, 3) for t in t_ref_cl],
        "all_seconds_batched": [round(t, 3) for t in t_bat],
        "site": "default SiteConfig, phantom seed 100 (G_ema, phi_id, phi_class trained by the node's train stage)",
        "command": command("bench.walk_speed", argv),
        "machine": machine(),
        "load_average_at_end": list(os.getloadavg()),
    }
    atomic_write_json(args.out, out)
    print(f"{'method':<30}{'seconds':>10}{'final loss, own':>17}{'final loss, node':>18}")
    print(
        f"{'authors (one path at a time)':<30}{out['seconds_reference']:>10.2f}"
        f"{out['final_loss_reference_own_objective']:>17.5f}{out['final_loss_reference_node_objective']:>18.5f}"
    )
    print(f"{'authors, channels_last':<30}{out['seconds_reference_channels_last']:>10.2f}")
    print(
        f"{'batched [P,T,D]':<30}{out['seconds_batched']:>10.2f}"
        f"{out['final_loss_batched_own_objective']:>17.5f}{out['final_loss_batched_own_objective']:>18.5f}"
    )
    print(
        f"paths {out['paths']}, points {args.points}, iters {args.iters}: speedup {out['speedup']}x "
        f"(initial loss {out['initial_loss_node_objective']:.5f} under the node's objective)"
    )
    return out


if __name__ == "__main__":
    main()
