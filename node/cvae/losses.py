"""The CVAE's objective and its fit, measured: the per-sample loss (squared error plus beta times
the KL to the standard normal prior), the validation loss at fixed noise, and the reconstruction
residuals whose RMS is the decoder's sampling noise (optionally under DP, node.cvae.dp).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.models import CVAE
from node.cvae import dp as cvae_dp


def one_hot(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """int [B] -> float32 [B,n_classes]."""
    return F.one_hot(y.long(), n_classes).float()


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed over the latent dimensions: [B].

    The standard closed form -0.5 * sum(1 + logvar - mu^2 - exp(logvar)). The authors' published
    code uses a non-standard variant of this term; we do not, so beta here means what it means in
    the beta-VAE literature.
    """
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def cvae_loss(
    recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Per-sample loss [B]: squared error summed over the D scaled dimensions + beta * KL.

    Per sample rather than reduced so that DP-SGD can clip it sample by sample.
    """
    return (recon - x).pow(2).sum(1) + beta * kl_standard_normal(mu, logvar)


@torch.no_grad()
def eval_loss(model: CVAE, x: torch.Tensor, c: torch.Tensor, eps: torch.Tensor, beta: float) -> float:
    """Mean per-record loss of scaled embeddings x [N,D] with one-hot labels c [N,C], at fixed
    reparameterisation noise eps [N,latent] (so that two evaluations differ by the weights alone)."""
    model.eval()
    recon, mu, logvar = model(x, c, eps)
    return float(cvae_loss(recon, x, mu, logvar, beta=beta).mean())


@torch.no_grad()
def squared_residuals(model: CVAE, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared errors [N,D] of reconstructing scaled embeddings x [N,D] (one-hot labels c [N,C])
    through their posterior means."""
    model.eval()
    mu, _ = model.encode(x, c)
    return (x - model.decode(mu, c)).pow(2)


@torch.no_grad()
def residual_rms(model: CVAE, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per-dimension root-mean-square error [D] of reconstructing scaled embeddings x [N,D] (one-hot
    labels c [N,C]) through their posterior means: the maximum-likelihood standard deviation of a
    Gaussian decoder with this mean, the noise `sample_cvae` adds. Zeros for N = 0."""
    if len(x) == 0:
        return torch.zeros(x.shape[1], device=x.device)
    return squared_residuals(model, x, c).mean(0).sqrt()


def dp_residual_rms(
    model: CVAE, x: torch.Tensor, c: torch.Tensor, groups: np.ndarray, plan: cvae_dp.DpPlan, *, seed: int
) -> tuple[torch.Tensor, dict]:
    """`residual_rms` with DP per patient (ids groups [N]) at the plan's noise_scale budget
    (node.cvae.dp.dp_noise_scale): sd [D] on x's device, and the mechanism's details. x must lie in
    [0,1] (scaled and clipped). Seeded, so that recomputing it (every federated round) redraws the
    same noise rather than averaging fresh draws away."""
    sq = squared_residuals(model, x, c).double().cpu()
    gen = torch.Generator().manual_seed(seed + cvae_dp.SEED_OFFSET["noise_scale"])
    sd, info = cvae_dp.dp_noise_scale(sq, groups, *plan.noise_scale, gen)
    return sd.to(x.device), info
