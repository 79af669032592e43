"""GAN inversion: find w with G.synthesis(w) close to a real image (the PLAN route's first step)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from node.plan.gan import Generator
from node.site.progress import progress


def project(
    G: Generator,
    target: torch.Tensor,
    *,
    num_steps: int,
    lr: float,
    device: torch.device | str,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    perceptual_weight: float = 0.0,
    chunk: int = 512,
) -> torch.Tensor:
    """Optimise one code per image so that G.synthesis(w) reproduces target [N,1,H,W] in [-1,1].

    Loss per image: pixel MSE, plus `perceptual_weight` x the squared distance between the
    unit-normalised `features` ([B,1,H,W] -> [B,F]; the node passes phi_class's penultimate
    layer, an in-domain network, since offline sites may have no ImageNet weights) of the
    reconstruction and of the target. All images of a chunk are one batch: each code only affects
    its own image, so the summed per-image loss gives every code the gradient it would get alone.
    Starts from G.w_avg, Adam with a cosine-decayed learning rate `lr`. Returns w [N,w_dim] (CPU).
    """
    G = G.to(device).eval().requires_grad_(False)
    use_features = features is not None and perceptual_weight > 0
    out = []
    with progress("invert", total=num_steps * ((len(target) + chunk - 1) // chunk)) as update:
        for i in range(0, len(target), chunk):
            tgt = target[i : i + chunk].to(device)
            if use_features:
                with torch.no_grad():
                    f_tgt = F.normalize(features(tgt), dim=1)
            w = G.w_avg.detach().clone()[None].repeat(len(tgt), 1).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_steps)
            for _ in range(num_steps):
                img = G.synthesis(w)
                loss = F.mse_loss(img, tgt, reduction="none").mean(dim=(1, 2, 3))
                if use_features:
                    loss = loss + perceptual_weight * (F.normalize(features(img), dim=1) - f_tgt).square().sum(1)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                sched.step()
                update(1)
            out.append(w.detach().cpu())
    return torch.cat(out) if out else torch.zeros(0, G.w_dim)


@torch.no_grad()
def reconstruction_mse(
    G: Generator, w: torch.Tensor, target: torch.Tensor, *, device: torch.device | str
) -> torch.Tensor:
    """Per-image MSE [N] between G.synthesis(w) (clamped to [-1,1]) and target, both mapped to [0,1]."""
    G = G.to(device).eval()
    rec = G.synthesis(w.to(device)).clamp(-1, 1)
    return ((rec - target.to(device)) / 2).square().mean(dim=(1, 2, 3)).cpu()
