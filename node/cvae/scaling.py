"""The CVAE's per-dimension min-max scaler: embeddings to [0,1] and back, its bounds fitted on the
train records, or with dp public or DP-estimated (node.cvae.dp)."""

from __future__ import annotations

import numpy as np
import torch

from common.config import CvaeConfig
from node.cvae import dp as cvae_dp


def fit_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension minimum and maximum of x [N,D]: lo [D], hi [D]."""
    return x.min(0).values, x.max(0).values


def _span(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant dimension scales to 0 and back to lo


def scale(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x [N,D] -> (x - lo) / (hi - lo): the fitted data in [0,1]; other data may fall outside."""
    return (x - lo) / _span(lo, hi)


def unscale(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The inverse of `scale`: s [N,D] in [0,1] -> embeddings in [lo, hi]."""
    return lo + s * _span(lo, hi)


def fit_scaler(
    x: torch.Tensor, groups: np.ndarray, cfg: CvaeConfig, plan: cvae_dp.DpPlan | None, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The scaler's bounds lo [D], hi [D] for embeddings x [N,D] (patient ids groups [N]) and how
    they were made. Without dp: the train minimum and maximum (`fit_minmax`). With dp: the public
    cfg.dp_bounds for every dimension, or DP estimates at the plan's scaler budget
    (node.cvae.dp.dp_bounds); the exact train extremes would put a record's value in every sample
    clipped to them."""
    if not cfg.dp:
        lo, hi = fit_minmax(x)
        return lo, hi, {"mechanism": "train minimum and maximum (no DP)"}
    if cfg.dp_bounds is not None:
        lo, hi = (torch.full((x.shape[1],), float(b)) for b in cfg.dp_bounds)
        return lo, hi, {"mechanism": f"public bounds synth.cvae.dp_bounds {list(cfg.dp_bounds)}"}
    gen = torch.Generator().manual_seed(seed + cvae_dp.SEED_OFFSET["scaler"])
    return cvae_dp.dp_bounds(x, groups, *plan.scaler, gen)
