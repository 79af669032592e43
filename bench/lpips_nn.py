"""Benchmark: LPIPS nearest neighbours of N synthetic among M real 64x64 images by the matrix path
(node.audit.lpips_matrix: one network pass per image, one matrix product per chunk), against

- the `lpips` package called pair by pair (batch 1), a sample of pairs timed and extrapolated to
  N x M;
- the package called on batches of pairs, at the fastest of several batch sizes (the best a user
  of the package can do: each pair still costs two network passes), extrapolated the same way;
- the limit: the (N + M) feature passes alone, which any exact method must make.

AlexNet trunk randomly initialised (no weights here; the cost and the exactness do not depend on
the weights), the package's own linear weights. Writes bench/results/lpips_nn.json.

    .venv/bin/python -m bench.lpips_nn [--n-query 2000] [--n-ref 2000] [--pairs 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from bench._site import ROOT, command, machine
from common.fileio import atomic_write_json
from node.audit.distances import cpu_bf16_is_fast, nearest_sq, nearest_sq_screened
from node.audit.lpips_matrix import build_lpips, lpips_features, lpips_nearest, prepare
from node.site.phantom import make_phantom

BATCHES = (8, 32, 128, 512)  # pairs per package call, for the batched baseline


def seconds_per_pair(model, qp: torch.Tensor, rp: torch.Tensor, *, batch: int) -> float:
    """The package's forward on pairs (qp[i], rp[i]) [P,3,H,W], `batch` pairs per call: s/pair."""
    with torch.no_grad():
        model(qp[:batch], rp[:batch])  # warm-up at this shape
        t0 = time.perf_counter()
        for k in range(0, len(qp), batch):
            model(qp[k : k + batch], rp[k : k + batch])
    return (time.perf_counter() - t0) / len(qp)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-query", type=int, default=2000)
    ap.add_argument("--n-ref", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=200, help="pairs timed one call each (batch-1 baseline)")
    ap.add_argument("--batched-pairs", type=int, default=1024, help="pairs timed per batch size")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lpips_nn.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_lpips("alex", random_backbone=True)
    n_pat = (args.n_query + args.n_ref) // 4 + 1
    x, _, _ = make_phantom(n_patients=n_pat, images_per_patient=4, n_classes=2, size=64, seed=0)
    rng = np.random.default_rng(0)
    x = x[rng.permutation(len(x))]
    query, ref = x[: args.n_query], x[args.n_query : args.n_query + args.n_ref]

    t0 = time.perf_counter()
    d, j = lpips_nearest(model, query, ref)
    seconds_matrix = time.perf_counter() - t0

    # the limit: every image through the network once (what lpips_nearest does before its products)
    t0 = time.perf_counter()
    qf = lpips_features(model, prepare(query))
    rf = lpips_features(model, prepare(ref))
    seconds_features = time.perf_counter() - t0

    # the products alone, both ways, on those features (lpips_nearest screens where bfloat16 is native)
    t0 = time.perf_counter()
    d32, j32 = nearest_sq(qf, rf)
    seconds_products_float32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    d16, j16 = nearest_sq_screened(qf, rf)
    seconds_products_screened = time.perf_counter() - t0
    screened_agrees = bool(torch.equal(j32, j16)) and float((d32 - d16).abs().max()) < 1e-5

    # the package: a random sample of pairs, one call per pair, then in batches of pairs
    n_pairs = max(args.pairs, args.batched_pairs)
    qi, ri = rng.integers(0, args.n_query, n_pairs), rng.integers(0, args.n_ref, n_pairs)
    qp, rp = prepare(query[qi]), prepare(ref[ri])
    per_pair_1 = seconds_per_pair(model, qp[: args.pairs], rp[: args.pairs], batch=1)
    per_pair_b = {
        b: seconds_per_pair(model, qp[: args.batched_pairs], rp[: args.batched_pairs], batch=b) for b in BATCHES
    }
    best_batch = min(per_pair_b, key=per_pair_b.get)

    # exactness: the sampled pairs by the matrix form, and each sampled query's nearest neighbour
    with torch.no_grad():
        pw = model(qp[: args.pairs], rp[: args.pairs]).reshape(-1).double().numpy()
        fq, fr = lpips_features(model, qp[: args.pairs]), lpips_features(model, rp[: args.pairs])
        mat = ((fq.double() - fr.double()) ** 2).sum(1).numpy()
        q50 = qi[:50]
        nn_pkg = model(prepare(query[q50]), prepare(ref[j[q50]])).reshape(-1).double().numpy()
    max_abs_err = float(max(np.abs(mat - pw).max(), np.abs(nn_pkg - d[q50]).max()))

    nm = args.n_query * args.n_ref
    res = {
        "n_query": args.n_query,
        "n_ref": args.n_ref,
        "image_size": 64,
        "backbone": "alex (random init)",
        "seconds_matrix": round(seconds_matrix, 2),
        "seconds_features_alone": round(seconds_features, 2),
        "ratio_to_limit": round(seconds_matrix / seconds_features, 3),
        "bf16_screen_used": cpu_bf16_is_fast(),
        "seconds_products_float32": round(seconds_products_float32, 2),
        "seconds_products_screened": round(seconds_products_screened, 2),
        "screened_agrees_with_float32": screened_agrees,
        "seconds_per_pair": per_pair_1,
        "seconds_pairwise_estimated": round(per_pair_1 * nm, 1),
        "speedup": round(per_pair_1 * nm / seconds_matrix, 1),
        "seconds_per_pair_batched": {str(b): s for b, s in per_pair_b.items()},
        "best_batch": best_batch,
        "seconds_batched_estimated": round(per_pair_b[best_batch] * nm, 1),
        "speedup_vs_batched": round(per_pair_b[best_batch] * nm / seconds_matrix, 1),
        "pairs_timed": args.pairs,
        "batched_pairs_timed": args.batched_pairs,
        "max_abs_err": max_abs_err,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "command": command("bench.lpips_nn", argv),
        "machine": machine(),
        "load_average_at_end": list(os.getloadavg()),
    }
    atomic_write_json(args.out, res)
    print(f"{'method':<44}{'seconds':>12}{'vs matrix':>11}")
    rows = [
        ("package, one pair per call (extrapolated)", res["seconds_pairwise_estimated"], res["speedup"]),
        (
            f"package, {best_batch} pairs per call (extrapolated)",
            res["seconds_batched_estimated"],
            res["speedup_vs_batched"],
        ),
    ]
    for label, seconds, speedup in rows:
        print(f"{label:<44}{seconds:>12.1f}{speedup:>10}x")
    print(f"{'matrix path (node.audit.lpips_matrix)':<44}{res['seconds_matrix']:>12.2f}{1:>10}x")
    print(f"{'limit: the N+M feature passes alone':<44}{res['seconds_features_alone']:>12.2f}")
    print(f"{'  products alone, float32':<44}{res['seconds_products_float32']:>12.2f}")
    print(f"{'  products alone, bfloat16-screened':<44}{res['seconds_products_screened']:>12.2f}")
    print(
        f"{args.n_query} x {args.n_ref}: matrix path {res['ratio_to_limit']}x the limit "
        f"(bfloat16 screen {'on' if res['bf16_screen_used'] else 'off: not native here'}); "
        f"max |error| {max_abs_err:.2e}; screened = float32: {screened_agrees}"
    )
    return res


if __name__ == "__main__":
    main()
