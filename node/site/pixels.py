"""Conversions between stored pixels (uint8 [N,H,W]) and network tensors ([N,1,H,W] in [-1,1])."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N,H,W] -> float32 [N,1,H,W] in [-1,1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32)
    return (x / 127.5 - 1.0)[:, None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,1,H,W], nominally in [-1,1] (clamped) -> uint8 [N,H,W]."""
    x = ((x.detach().float()[:, 0].clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).cpu().numpy()


def random_translate(x: torch.Tensor, *, max_shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of x [B,C,H,W] by up to `max_shift` (fraction of the side), zero padding
    (black, i.e. -1) outside. Differentiable, so it also serves as DiffAugment for the GAN."""
    B = x.shape[0]
    t = (torch.rand(B, 2, generator=generator, device="cpu") * 2 - 1).to(x.device) * (2 * max_shift)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = t
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    # shift by whole pixels would need "nearest"; bilinear keeps it smooth and differentiable
    return torch.nn.functional.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
