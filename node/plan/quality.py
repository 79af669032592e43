"""Quality of a generator without ImageNet weights (offline sites): a Frechet distance between
real and generated images in an in-domain embedding (phi_class's penultimate layer), and the
class balance of generated images as phi_class labels them."""

from __future__ import annotations

import numpy as np
import torch


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features a [N,F] and b [M,F]:
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64. Uses the
    symmetric form so only symmetric eigendecompositions are needed (no scipy)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    r = _sqrtm_psd(s_a)
    cross = torch.linalg.eigvalsh(r @ s_b @ r).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


@torch.no_grad()
def generator_quality(
    G, phi_class, real: torch.Tensor, *, n: int, seed: int, device: torch.device | str, batch: int = 256
) -> dict:
    """G (z -> image), phi_class (features, logits), real [N,1,H,W] in [-1,1] -> {"fd_phi_class",
    "class_balance" (share of the n generated images per phi_class label), "n_generated", "n_real"}.
    The generated images are clamped to [-1,1], as the released pixels would be."""
    G, phi_class = G.to(device).eval(), phi_class.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    feats, preds = [], []
    for i in range(0, n, batch):
        z = torch.randn(min(batch, n - i), G.z_dim, generator=g).to(device)
        img = G(z).clamp(-1, 1)
        f = phi_class.features(img)
        feats.append(f.cpu())
        preds.append(phi_class.head(f).argmax(1).cpu())
    real_f = torch.cat([phi_class.features(real[i : i + batch].to(device)).cpu() for i in range(0, len(real), batch)])
    counts = np.bincount(torch.cat(preds).numpy(), minlength=phi_class.n_out)
    return {
        "fd_phi_class": frechet_distance(real_f, torch.cat(feats)),
        "class_balance": (counts / counts.sum()).round(4).tolist(),
        "n_generated": int(n),
        "n_real": int(len(real)),
    }
