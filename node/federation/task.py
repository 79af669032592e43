"""Train and evaluate a classifier on uint8 images [N,H,W] or on embeddings float32 [N,D] (the
CVAE route): the downstream task of the Flower ClientApp,
the local-only baseline, and the node's phi_id / phi_class.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.metrics import classification_metrics
from node.site.pixels import random_translate, to_tensor
from node.site.progress import progress


def _augment_light(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A shift of up to 1/16 of the side and a small contrast/brightness change."""
    x = random_translate(x, max_shift=1 / 16, generator=g)
    B = x.shape[0]
    scale = (1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=g) * 2 - 1)).to(x.device)
    shift = (0.05 * (torch.rand(B, 1, 1, 1, generator=g) * 2 - 1)).to(x.device)
    return x * scale + shift


def _augment_strong(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For the re-identification networks, which must know a patient from one or a few images: for
    3 in 4 images a rotation of up to 10 degrees, zoom 0.9-1.1 and a shift of up to 1/8 of the side; contrast +-30%,
    brightness +-0.15, Gaussian noise (sigma up to 0.05) and, for half the images, a blacked-out square of
    up to a quarter of the side. x [B,1,H,W] in [-1,1] -> same shape."""
    B, _, H, W = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731 - uniform in [-1,1] on the CPU generator
    # a quarter of the images keep their geometry: generated images, which phi_id judges in the
    # walk and the audit, have no black borders, and a network that only ever saw borders does worse on them
    moved = (torch.rand(B, generator=g) < 0.75).float()
    angle, zoom, t = moved * u(B) * math.radians(10), 1 + moved * 0.1 * u(B), moved[:, None] * u(B, 2) * (2 / 8)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / zoom, -torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / zoom, torch.cos(angle) / zoom
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x), [B, 1, H, W], align_corners=False)
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    x = x * (1 + 0.3 * u(B, 1, 1, 1)).to(x) + (0.15 * u(B, 1, 1, 1)).to(x)
    # noise of a random strength, so a clean image is not out of distribution
    x = x + (0.05 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).to(x)
    side = (torch.rand(B, generator=g) * (H / 4)).long() + 1
    top = (torch.rand(B, generator=g) * H).long()
    left = (torch.rand(B, generator=g) * W).long()
    erase = torch.rand(B, generator=g) < 0.5
    rows, cols = torch.arange(H)[None, :, None], torch.arange(W)[None, None, :]
    box = (
        (rows >= top[:, None, None])
        & (rows < (top + side)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + side)[:, None, None])
        & erase[:, None, None]
    )
    return torch.where(box[:, None].to(x.device), torch.full_like(x, -1.0), x)


def _augment_wide(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For the second attacker, which must know a patient's image under the edits the copy
    detector's pixel views lose it to: for 3 in 4 images a rotation of up to 25 degrees, zoom
    0.85-1.15 and a shift of up to a quarter of the side (edges repeated, as an export tool would
    fill them), for 1 in 4 a horizontal flip; contrast +-30%, brightness +-0.2 and Gaussian noise of
    sigma up to 0.25 (0.125 on a [0,1] scale). No occlusion: it is phi_id's and the first attacker's.
    x [B,1,H,W] in [-1,1] -> same shape."""
    B, _, H, W = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731 - uniform in [-1,1] on the CPU generator
    moved = (torch.rand(B, generator=g) < 0.75).float()
    angle, zoom, t = moved * u(B) * math.radians(25), 1 + moved * 0.15 * u(B), moved[:, None] * u(B, 2) * (2 / 4)
    flip = torch.where(torch.rand(B, generator=g) < 0.25, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    # output -> input coordinates: rotate and zoom, then negate the input's x for a flip
    theta[:, 0, 0], theta[:, 0, 1] = flip * torch.cos(angle) / zoom, -flip * torch.sin(angle) / zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / zoom, torch.cos(angle) / zoom
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x), [B, 1, H, W], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * (1 + 0.3 * u(B, 1, 1, 1)).to(x) + (0.2 * u(B, 1, 1, 1)).to(x)
    return x + (0.25 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).to(x)


AUGMENTATIONS = {"none": lambda x, g: x, "light": _augment_light, "strong": _augment_strong, "wide": _augment_wide}


def to_inputs(data: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A model's input batch: images uint8 [N,H,W] -> [N,1,H,W] in [-1,1]; embeddings float [N,D]
    -> float32 [N,D] as they are."""
    if data.dtype == np.uint8 and data.ndim == 3:
        return to_tensor(data, device)
    if np.issubdtype(data.dtype, np.floating) and data.ndim == 2:
        return torch.as_tensor(data, dtype=torch.float32, device=device)
    raise ValueError(f"expected images uint8 [N,H,W] or embeddings float [N,D], got {data.dtype} {list(data.shape)}")


def _as_tensors(global_params, model: nn.Module, device) -> list[torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    if isinstance(global_params, Mapping):
        vals = [global_params[n] for n in names]
    else:
        vals = list(global_params)
        if len(vals) != len(names):
            raise ValueError(f"global_params has {len(vals)} arrays; the model has {len(names)} parameters")
    return [
        torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, dtype=torch.float32).to(device) for v in vals
    ]


def epochs_for(n: int, *, epochs: int, min_steps: int, batch_size: int) -> int:
    """Epochs over `n` records that give at least `epochs` epochs and `min_steps` optimiser steps
    of `batch_size` (the last batch of an epoch may be short). Sizing training by steps keeps a
    small site from stopping before its model has learnt anything."""
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Weights [n_classes] that give every class present in labels int [N] the same total weight:
    N / (classes present * records of the class); 0 for a class absent. Without them a small
    site's classifier can settle on its majority class (breastmnist: 73% one class)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32)


def class_weights_for(labels: np.ndarray, n_classes: int, weighting: str) -> torch.Tensor | None:
    """The loss's class weights that DownstreamConfig.class_weighting names, for labels int [N]:
    None for "none", balanced_class_weights for "balanced"."""
    if weighting not in ("none", "balanced"):
        raise ValueError(f"class_weighting must be 'none' or 'balanced', got {weighting!r}")
    return balanced_class_weights(labels, n_classes) if weighting == "balanced" else None


def with_real_share(
    pool: tuple[np.ndarray, np.ndarray], real: tuple[np.ndarray, np.ndarray], *, real_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """The pool's (records [P,...], labels [P]) and a site's real ones ([R,...], [R]) as one
    training set in which the real records, repeated whole r times, make at least `real_share` of
    it (r >= 1; 0: each record once). In an epoch over pool and real alike, a site whose pool
    outnumbers its own images would see them less often than it does training on them alone."""
    (px, py), (rx, ry) = pool, real
    repeat = 1
    if real_share > 0 and len(ry):
        repeat = max(1, math.ceil(real_share / (1 - real_share) * len(py) / len(ry) - 1e-9))
    return np.concatenate([px, *[rx] * repeat]), np.concatenate([py, *[ry] * repeat])


def site_round_seed(site: str, server_round: int) -> int:
    """The training seed for one site in one round. Each site draws its own order and augmentations:
    with one seed for all, sites holding the same pool would send identical updates and FedAvg would
    be centralised training under another name."""
    return zlib.crc32(f"{site}/round-{server_round}".encode())


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    proximal_mu: float = 0.0,
    global_params: Sequence | Mapping | None = None,
    augment: str = "light",
    class_weights: torch.Tensor | None = None,
) -> float:
    """Train `model` in place with Adam on images uint8 [N,H,W] (or embeddings float [N,D], with
    augment "none") and labels int [N].

    proximal_mu > 0 adds FedProx's mu/2 * ||theta - theta_global||^2, with theta_global from
    `global_params` (arrays in `model.named_parameters()` order, or a name -> array mapping;
    default: the model's parameters when training starts). `augment` is "none", "light",
    "strong" or "wide" (see AUGMENTATIONS). `class_weights` [n_classes] weighs each record's
    cross-entropy by its class (balanced_class_weights); None weighs all alike. Returns the mean
    (weighted) cross-entropy of the last epoch.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}, got {augment!r}")
    model.to(device).train()
    x_all = to_inputs(images, device)
    if x_all.ndim == 2 and augment != "none":
        raise ValueError(f"augment {augment!r} is for images; embeddings train with augment='none'")
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    anchor = None
    if proximal_mu > 0:
        anchor = (
            _as_tensors(global_params, model, device)
            if global_params is not None
            else [p.detach().clone() for p in model.parameters()]
        )
    last = float("nan")
    with progress(f"train {type(model).__name__}", total=epochs) as update:
        for _ in range(epochs):
            last = _epoch(
                model,
                opt,
                x_all,
                y_all,
                g,
                batch_size=batch_size,
                augment=augment,
                proximal_mu=proximal_mu,
                anchor=anchor,
                class_weights=None if class_weights is None else class_weights.to(device),
            )
            update(1, info=f"loss {last:.4f}")
    model.eval()
    return last


def _epoch(
    model, opt, x_all, y_all, g, *, batch_size: int, augment: str, proximal_mu: float, anchor, class_weights
) -> float:
    """One pass over the data in a seeded random order; the mean cross-entropy."""
    order = torch.randperm(len(y_all), generator=g).to(x_all.device)
    total, seen = 0.0, 0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        x = AUGMENTATIONS[augment](x_all[idx], g)
        loss = F.cross_entropy(model(x), y_all[idx], weight=class_weights)
        objective = loss
        if anchor is not None:
            objective = loss + proximal_mu / 2 * sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor))
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, *, device: torch.device | str, batch_size: int = 512
) -> torch.Tensor:
    """images uint8 [N,H,W] or embeddings float [N,D] -> logits [N,n_out] on the CPU."""
    model.to(device).eval()
    x = to_inputs(images, device)
    return (
        torch.cat([model(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])
        if len(x)
        else torch.zeros(0, 0)
    )


def evaluate_classifier(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, device: torch.device | str
) -> dict:
    """Metrics on images uint8 [N,H,W] (or embeddings float [N,D]), labels int [N]: {accuracy, balanced-accuracy, auroc,
    recall-<c> for every class the model has, loss (mean cross-entropy), n}."""
    n = len(labels)
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    logits = predict_logits(model, images, device=device)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    probs = torch.softmax(logits, 1).numpy()
    return {
        **classification_metrics(probs, np.asarray(labels), probs.shape[1]),
        "loss": float(F.cross_entropy(logits, y)),
        "n": int(n),
    }
