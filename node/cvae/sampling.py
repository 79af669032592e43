"""Sampling the CVAE route's generator: the labels to sample, and synthetic embeddings for them."""

from __future__ import annotations

import numpy as np
import torch

from node.cvae.generator import CvaeResult
from node.cvae.losses import one_hot
from node.cvae.scaling import unscale


@torch.no_grad()
def sample_cvae(
    result: CvaeResult, labels: np.ndarray, *, seed: int, noise: bool = True, batch_size: int = 4096
) -> np.ndarray:
    """Synthetic embeddings float32 [M,D] for labels int [M]: z ~ N(0,I), decoded, plus (noise)
    N(0, result.noise_sd^2) per dimension, clipped to [0,1], unscaled. noise=False: the decoded
    means alone."""
    model = result.model.eval()
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= model.n_classes):
        raise ValueError(f"labels must lie in [0, {model.n_classes})")
    if noise and result.noise_sd is None:
        raise ValueError("sample_cvae: noise=True, but this CVAE has no noise_sd")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), model.latent, generator=gen)
    e = torch.randn(len(labels), model.d_in, generator=gen) if noise else None
    c = one_hot(torch.from_numpy(labels), model.n_classes)
    out = np.empty((len(labels), model.d_in), dtype=np.float32)
    for i in range(0, len(labels), batch_size):
        s = model.decode(z[i : i + batch_size].to(device), c[i : i + batch_size].to(device))
        if e is not None:
            s = (s + result.noise_sd.to(device) * e[i : i + batch_size].to(device)).clamp(0, 1)
        out[i : i + len(s)] = unscale(s, result.lo.to(device), result.hi.to(device)).float().cpu().numpy()
    return out


def sample_labels(train_labels: np.ndarray, *, mode: str, target_size: int, seed: int) -> np.ndarray:
    """Labels int64 [M] to sample, shuffled (seeded). "replicate": the train class counts
    (M = len(train_labels)); "target": M = target_size in the train class proportions, rounded
    by largest remainder so that the counts sum to target_size exactly."""
    classes, counts = np.unique(np.asarray(train_labels).astype(np.int64), return_counts=True)
    if mode == "replicate":
        n = counts
    elif mode == "target":
        exact = counts / counts.sum() * target_size
        n = np.floor(exact).astype(np.int64)
        # the largest fractional parts get the remainder; ties go to the smaller class index
        order = np.argsort(-(exact - n), kind="stable")
        n[order[: target_size - int(n.sum())]] += 1
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; expected 'replicate' or 'target'")
    return np.random.default_rng(seed).permutation(np.repeat(classes, n))
