"""Benchmark: LPIPS nearest neighbours of N synthetic among M real 64x64 images, by the matrix
path (node.lpips_matrix: one network pass per image, one matrix product per chunk) and by the
`lpips` package called pair by pair (a sample of pairs timed in the same run, extrapolated to
N x M). Writes bench/results/lpips_nn.json.

AlexNet trunk randomly initialised (pnet_rand=True, no weights here; the cost and the exactness
do not depend on the weights), the package's own linear weights.

    .venv/bin/python bench/lpips_nn.py [--n-query 2000] [--n-ref 2000] [--pairs 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.lpips_matrix import build_lpips, lpips_nearest, prepare  # noqa: E402
from node.phantom import make_phantom  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-query", type=int, default=2000)
    ap.add_argument("--n-ref", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=200, help="pairs timed one call each, for the extrapolation")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lpips_nn.json")
    a = ap.parse_args()

    torch.manual_seed(0)
    model = build_lpips("alex", random_backbone=True)
    n_pat = (a.n_query + a.n_ref) // 4 + 1
    x, _, _ = make_phantom(n_patients=n_pat, images_per_patient=4, n_classes=2, size=64, seed=0)
    rng = np.random.default_rng(0)
    x = x[rng.permutation(len(x))]
    query, ref = x[: a.n_query], x[a.n_query : a.n_query + a.n_ref]

    t0 = time.perf_counter()
    d, j = lpips_nearest(model, query, ref)
    seconds_matrix = time.perf_counter() - t0

    # the package, pair by pair: one forward per (query, ref) pair, as a naive N x M loop would
    qi, ri = rng.integers(0, a.n_query, a.pairs), rng.integers(0, a.n_ref, a.pairs)
    qp, rp = prepare(query[qi]), prepare(ref[ri])
    with torch.no_grad():
        model(qp[:2], rp[:2])  # warm-up
        t0 = time.perf_counter()
        pw = np.array([float(model(qp[k : k + 1], rp[k : k + 1])) for k in range(a.pairs)])
        per_pair = (time.perf_counter() - t0) / a.pairs
    # exactness: the sampled pairs by the matrix form (features of just these images)
    from node.lpips_matrix import lpips_features

    fq, fr = lpips_features(model, qp), lpips_features(model, rp)
    mat = ((fq.double() - fr.double()) ** 2).sum(1).numpy()
    # and each sampled query's nearest neighbour against the package on that pair
    with torch.no_grad():
        nn_pkg = np.array([float(model(prepare(query[k : k + 1]), prepare(ref[j[k] : j[k] + 1]))) for k in qi[:50]])
    max_abs_err = float(max(np.abs(mat - pw).max(), np.abs(nn_pkg - d[qi[:50]]).max()))

    est = per_pair * a.n_query * a.n_ref
    res = {
        "n_query": a.n_query,
        "n_ref": a.n_ref,
        "image_size": 64,
        "backbone": "alex (random init)",
        "seconds_matrix": round(seconds_matrix, 2),
        "seconds_pairwise_estimated": round(est, 1),
        "seconds_per_pair": per_pair,
        "pairs_timed": a.pairs,
        "speedup": round(est / seconds_matrix, 1),
        "max_abs_err": max_abs_err,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": (
            f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
            f"{platform.python_version()}, torch {torch.__version__}"
        ),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
