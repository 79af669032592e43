"""k-same clustering of latent codes (Newton et al. 2005, as used by PLAN): groups of at least
k codes whose means replace the individuals as anonymised anchors."""

from __future__ import annotations

import numpy as np


def ksame_clusters(w: np.ndarray, k: int) -> list[np.ndarray]:
    """Greedy k-same: repeatedly take the unassigned code farthest from the centroid of the
    unassigned ones, plus its k-1 nearest unassigned neighbours. Fewer than k left over are
    merged into the cluster whose mean is nearest to each. w [N,D]; returns index arrays, every
    cluster of size >= k when N >= k (one cluster of all N when N < k)."""
    w = np.asarray(w, dtype=np.float64)
    n = len(w)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        return []
    if n < k:
        return [np.arange(n)]
    unassigned = np.ones(n, dtype=bool)
    clusters: list[np.ndarray] = []
    while unassigned.sum() >= k:
        idx = np.flatnonzero(unassigned)
        centroid = w[idx].mean(0)
        far = idx[np.argmax(((w[idx] - centroid) ** 2).sum(1))]
        d = ((w[idx] - w[far]) ** 2).sum(1)
        members = idx[np.argsort(d, kind="stable")[:k]]  # includes `far` itself (distance 0)
        clusters.append(np.sort(members))
        unassigned[members] = False
    for i in np.flatnonzero(unassigned):
        means = np.stack([w[c].mean(0) for c in clusters])
        j = int(np.argmin(((means - w[i]) ** 2).sum(1)))
        clusters[j] = np.sort(np.append(clusters[j], i))
    return clusters


def anchors(w: np.ndarray, clusters: list[np.ndarray]) -> np.ndarray:
    """The mean code of each cluster: [M,D] for M clusters."""
    w = np.asarray(w)
    return np.stack([w[c].mean(0) for c in clusters]) if clusters else np.zeros((0, w.shape[1]), dtype=w.dtype)
