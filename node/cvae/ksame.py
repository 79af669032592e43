"""The k-same baseline of the CVAE route, in embedding space: the PLAN route's k-same clustering
(node.plan.ksame) applied to each class's embeddings, each cluster released as its mean."""

from __future__ import annotations

import numpy as np

from node.plan.ksame import anchors, ksame_clusters


def ksame_embeddings(x: np.ndarray, y: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, greedy k-same clusters of the rows of x float [N,D]; returns their means
    float32 [M,D] and classes int64 [M], classes in ascending order. Every mean is over at least
    k rows of one class; a class with fewer than k rows is left out, since the mean of its few
    rows would not be k-anonymous (node.plan.ksame would make them one undersized cluster)."""
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"expected x [N,D] and y [N], got {x.shape} and {y.shape}")
    out_x, out_y = [], []
    for c in np.unique(y):
        xc = x[y == c]
        if len(xc) < k:
            continue
        a = anchors(xc, ksame_clusters(xc, k))
        out_x.append(a.astype(np.float32))
        out_y.append(np.full(len(a), c, dtype=np.int64))
    if not out_x:
        return np.zeros((0, x.shape[1]), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(out_x), np.concatenate(out_y)
