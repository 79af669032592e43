"""Nearest-neighbour distances as chunked matrix products (docs/DESIGN.md 3.5)."""

from __future__ import annotations

import numpy as np
import torch


def pixels01(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] -> float32 [N,H*W] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).reshape(len(images), -1).float() / 255.0


def min_sq_dist(a: torch.Tensor, b: torch.Tensor, *, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a [N,D], the smallest squared Euclidean distance to a row of b [M,D] and
    its index: ([N], [N]). ||a||^2 + ||b||^2 - 2 a.b, in float64 to keep near-duplicates (the
    distances that matter most) from cancelling to noise; chunks of `chunk` rows of a."""
    if len(b) == 0:
        raise ValueError("nearest neighbour in an empty set")
    a, b = a.double(), b.double()
    bb = b.square().sum(1)
    mins, args = [], []
    for i in range(0, len(a), chunk):
        x = a[i : i + chunk]
        d = (x.square().sum(1)[:, None] + bb[None] - 2 * x @ b.T).clamp_min_(0)
        m, j = d.min(1)
        mins.append(m)
        args.append(j)
    if not mins:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(mins), torch.cat(args)


def nearest_sq(q: torch.Tensor, r: torch.Tensor, *, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of q [N,D] the smallest ||q - r_j||^2 over rows of r [M,D] and its j:
    ([N] float32, [N] long). ||q||^2 + ||r||^2 - 2 q.r, one [chunk,M] product at a time, in float32:
    for unit-scale rows (LPIPS features, normalised pixels) the expansion's rounding is ~1e-6, far
    under anything these distances are compared with."""
    rr = r.square().sum(1)
    mins, args = [], []
    for i in range(0, len(q), chunk):
        a = q[i : i + chunk]
        d = torch.addmm(rr[None], a, r.T, alpha=-2.0).add_(a.square().sum(1)[:, None]).clamp_min_(0)
        m, j = d.min(1)
        mins.append(m)
        args.append(j)
    if not mins:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(mins), torch.cat(args)


def min_pixel_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each image of a (uint8 [N,H,W]) the mean squared error on [0,1] to its nearest image in b: [N]."""
    pa, pb = pixels01(a), pixels01(b)
    return (min_sq_dist(pa, pb)[0] / pa.shape[1]).numpy()


@torch.no_grad()
def embed(model, images: np.ndarray, *, device: torch.device | str, batch_size: int = 512) -> torch.Tensor:
    """model.features on uint8 images [N,H,W] -> [N,F] on the CPU, computed once per image."""
    from node.site.pixels import to_tensor

    model.to(device).eval()
    x = to_tensor(images, device)
    return torch.cat([model.features(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])
