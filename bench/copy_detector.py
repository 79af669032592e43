"""The audit's copy detector (node.audit.copies.copy_distances): the blur as matrix products against the
one-channel convolution it replaced, in one run, on a demo-sized site.

A demo site's audit measures 120 calibration and 240 candidate images against 240 train images,
each query under the 857 warps of warp_family(size=32), in three pixel views (two of them
blurred). Random uint8 images: the cost does not depend on what they show.

    .venv/bin/python -m bench.copy_detector               # 360 queries, 240 train, 1 thread
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import node.audit.copies
from bench._site import ROOT, command, machine
from common.fileio import atomic_write_json


def convolution_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The blur before: separable one-channel convolutions with reflect padding."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def timed(query: np.ndarray, train: np.ndarray, blur) -> tuple[float, dict]:
    matrix_blur = node.audit.copies.gaussian_blur
    node.audit.copies.gaussian_blur = blur  # pixel_view looks the blur up in its module
    try:
        t0 = time.perf_counter()
        out = node.audit.copies.copy_distances(query, train)
        return time.perf_counter() - t0, out
    finally:
        node.audit.copies.gaussian_blur = matrix_blur


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=360)
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    query = rng.integers(0, 256, (args.queries, 32, 32), dtype=np.uint8)
    train = rng.integers(0, 256, (args.train, 32, 32), dtype=np.uint8)
    before_s, before = timed(query, train, convolution_blur)
    after_s, after = timed(query, train, node.audit.copies.gaussian_blur)
    same = all(np.array_equal(before[k][1], after[k][1]) for k in before)
    max_diff = max(float(np.abs(before[k][0] - after[k][0]).max()) for k in before)
    print(f"{'blur':22} {'seconds':>8}")
    print(f"{'convolution (before)':22} {before_s:8.2f}")
    print(f"{'matrix products':22} {after_s:8.2f}")
    print(
        f"speed-up {before_s / after_s:.1f}x; same nearest train image: {same}; largest distance change {max_diff:.1e}"
    )
    atomic_write_json(
        ROOT / "bench" / "results" / "copy_detector.json",
        {
            "command": command("bench.copy_detector", argv),
            "machine": machine(),
            "queries": args.queries,
            "train": args.train,
            "warps": len(node.audit.copies.warp_family(size=32)),
            "seconds": {"convolution": before_s, "matrix": after_s},
            "speedup": before_s / after_s,
            "same_nearest": same,
            "max_distance_change": max_diff,
        },
    )


if __name__ == "__main__":
    main()
