"""GAN inversion: find w with G.synthesis(w) close to a real image (the PLAN route's first step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from node.gan import Generator
from node.progress import progress


def project(
    G: Generator,
    target: torch.Tensor,
    *,
    num_steps: int,
    lr: float,
    device: torch.device | str,
    chunk: int = 512,
) -> torch.Tensor:
    """Optimise one code per image so that G.synthesis(w) reproduces target [N,1,H,W] in [-1,1].

    All images of a chunk are one batch: each code only affects its own image, so the summed
    per-image MSE gives every code the gradient it would get alone. Starts from G.w_avg, Adam
    with a cosine-decayed learning rate `lr`. Pixel MSE only: a perceptual feature loss would
    need a pretrained network that offline sites may not have. Returns w [N,w_dim] (CPU).
    """
    G = G.to(device).eval().requires_grad_(False)
    out = []
    with progress("invert", total=num_steps * ((len(target) + chunk - 1) // chunk)) as update:
        for i in range(0, len(target), chunk):
            tgt = target[i : i + chunk].to(device)
            w = G.w_avg.detach().clone()[None].repeat(len(tgt), 1).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=num_steps)
            for _ in range(num_steps):
                loss = F.mse_loss(G.synthesis(w), tgt, reduction="none").mean(dim=(1, 2, 3)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                update(1)
            out.append(w.detach().cpu())
    return torch.cat(out) if out else torch.zeros(0, G.w_dim)


@torch.no_grad()
def reconstruction_mse(G: Generator, w: torch.Tensor, target: torch.Tensor, *, device: torch.device | str) -> torch.Tensor:
    """Per-image MSE [N] between G.synthesis(w) (clamped to [-1,1]) and target, both mapped to [0,1]."""
    G = G.to(device).eval()
    rec = G.synthesis(w.to(device)).clamp(-1, 1)
    return ((rec - target.to(device)) / 2).square().mean(dim=(1, 2, 3)).cpu()
