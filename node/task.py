"""Train and evaluate a classifier on uint8 images: the downstream task of the Flower ClientApp,
the local-only baseline, and the node's phi_id / phi_class.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.metrics import classification_metrics
from node.pixels import random_translate, to_tensor


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light augmentation: a shift of up to 1/16 of the side and a small contrast/brightness change."""
    x = random_translate(x, max_shift=1 / 16, generator=g)
    B = x.shape[0]
    scale = (1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=g) * 2 - 1)).to(x.device)
    shift = (0.05 * (torch.rand(B, 1, 1, 1, generator=g) * 2 - 1)).to(x.device)
    return x * scale + shift


def _as_tensors(global_params, model: nn.Module, device) -> list[torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    if isinstance(global_params, Mapping):
        vals = [global_params[n] for n in names]
    else:
        vals = list(global_params)
        if len(vals) != len(names):
            raise ValueError(f"global_params has {len(vals)} arrays; the model has {len(names)} parameters")
    return [torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, dtype=torch.float32).to(device) for v in vals]


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
    augment: bool = True,
) -> float:
    """Train `model` in place with Adam on images uint8 [N,H,W] and labels int [N].

    proximal_mu > 0 adds FedProx's mu/2 * ||theta - theta_global||^2, with theta_global from
    `global_params` (arrays in `model.named_parameters()` order, or a name -> array mapping;
    default: the model's parameters when training starts). Returns the mean cross-entropy of the
    last epoch.
    """
    model.to(device).train()
    x_all = to_tensor(images, device)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    anchor = None
    if proximal_mu > 0:
        anchor = _as_tensors(global_params, model, device) if global_params is not None else [p.detach().clone() for p in model.parameters()]
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=g).to(device)
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = _augment(x_all[idx], g) if augment else x_all[idx]
            loss = F.cross_entropy(model(x), y_all[idx])
            objective = loss
            if anchor is not None:
                objective = loss + proximal_mu / 2 * sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor))
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        last = total / max(seen, 1)
    model.eval()
    return last


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, *, device: torch.device | str, batch_size: int = 512) -> torch.Tensor:
    """images uint8 [N,H,W] -> logits [N,n_out] on the CPU."""
    model.to(device).eval()
    x = to_tensor(images, device)
    return torch.cat([model(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, 0)


def evaluate_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, device: torch.device | str) -> dict:
    """Metrics on images uint8 [N,H,W], labels int [N]: {accuracy, balanced-accuracy, auroc,
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
