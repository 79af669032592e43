"""Exact LPIPS, all pairs, as matrix products (docs/DESIGN.md 3.5).

LPIPS(x, y) = sum_l mean_{h,w} sum_c w_lc (f̂_lchw(x) - f̂_lchw(y))^2, with f̂ the backbone's
layer-l activations unit-normalised over channels and w_l >= 0 the package's linear weights. So
LPIPS(x, y) = ||phi(x) - phi(y)||^2 with phi(x) = concat_l flatten(sqrt(w_l) * f̂_l(x) / sqrt(H_l W_l)):
nearest neighbours of N queries among M references are one network pass per image plus one
matrix product per chunk, instead of N x M network calls.

The linear weights ship inside the `lpips` package. The backbone (AlexNet, VGG16 or SqueezeNet
ImageNet weights from torchvision) comes from the local model store, pinned by sha256
(common.modelstore); torchvision is never asked to fetch anything: the network is built with
`pnet_rand=True` (random init) and the stored weights are loaded over it. `random_backbone=True`
keeps the random init (tests, benchmarks of speed and exactness only: not a perceptual metric).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.modelstore import resolve
from node.audit.distances import nearest_sq_fast

# torchvision's published files; torchvision names each by the first 8 hex digits of its sha256,
# which is all that is pinned here (the full digests were not obtainable offline).
BACKBONES = {
    "alex": ("alexnet-owt-7be5be79.pth", "7be5be79", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "397923af", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "squeeze": (
        "squeezenet1_1-b8a52dc0.pth",
        "b8a52dc0",
        "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
    ),
}
MIN_SIDE = 64  # smaller images are upsampled: AlexNet's 11x11 stride-4 stem leaves nothing of a 16x16 image


def build_lpips(net: str = "alex", *, store_dir: Path | None = None, random_backbone: bool = False):
    """An `lpips.LPIPS` in eval mode with the package's own linear weights and the backbone from
    the model store (or random when `random_backbone`). Raises ModelStoreError when the backbone
    file is absent or wrong; never downloads."""
    import lpips

    if net not in BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {sorted(BACKBONES)}")
    path = None
    if not random_backbone:
        if store_dir is None:
            raise ValueError("store_dir is required unless random_backbone=True")
        name, sha, url = BACKBONES[net]
        path = resolve(sha, store_dir=store_dir, name=name, source=url)  # before building: fail fast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes about `pretrained=`
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.net.load_state_dict(_slice_state(model.net, state), strict=True)
    return model.eval().requires_grad_(False)


def _slice_state(net: nn.Module, tv_state: dict) -> dict:
    """torchvision's `features.<i>.<rest>` keys -> lpips's `slice<k>.<i>.<rest>` (same modules)."""
    out = {}
    for key in net.state_dict():
        _, idx, rest = key.split(".", 2)
        out[key] = tv_state[f"features.{idx}.{rest}"]
    return out


def prepare(images: np.ndarray) -> torch.Tensor:
    """uint8 grey [N,H,W] -> float32 [N,3,H',W'] in [-1,1], H' = max(H, MIN_SIDE) (bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)[:, None]
    if min(x.shape[-2:]) < MIN_SIDE and len(x):
        s = MIN_SIDE / min(x.shape[-2:])
        x = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


def _layer_weights(model) -> list[torch.Tensor]:
    ws = []
    for lin in model.lins:
        conv = next(m for m in lin.modules() if isinstance(m, nn.Conv2d))
        w = conv.weight.detach().reshape(-1)
        if (w < 0).any():
            # sqrt(w) is the whole trick; the published weights are non-negative (trained clamped)
            raise ValueError("LPIPS linear weights must be non-negative for the matrix form")
        ws.append(w)
    return ws


@torch.no_grad()
def lpips_features(model, x: torch.Tensor, *, batch_size: int = 128) -> torch.Tensor:
    """phi(x) for images x float [N,3,H,W] in [-1,1] -> float32 [N,D] on the CPU; ||phi(x)-phi(y)||^2 =
    LPIPS(x,y). The network runs on the model's device, one batch at a time."""
    import lpips

    sw = [w.sqrt() for w in _layer_weights(model)]
    device = sw[0].device
    out = []
    for i in range(0, len(x), batch_size):
        feats = model.net.forward(model.scaling_layer(x[i : i + batch_size].to(device)))
        parts = []
        for f, s in zip(feats, sw):
            f = lpips.normalize_tensor(f) * s[None, :, None, None] / float(f.shape[2] * f.shape[3]) ** 0.5
            parts.append(f.flatten(1))
        out.append(torch.cat(parts, 1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def lpips_nearest(
    model, query: np.ndarray, ref: np.ndarray, *, ref_block: int = 4096, chunk: int = 512, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest LPIPS neighbour in `ref` (uint8 [M,H,W]) of each image of `query` (uint8 [N,H,W]):
    (distance float64 [N], index int64 [N]).

    Memory is bounded by `ref_block` reference feature rows plus the query features: with more
    references than that, the references are processed block by block (the query features are
    kept; at 64x64 with AlexNet a feature row is ~32k floats, 128 KB)."""
    if len(ref) == 0:
        raise ValueError("nearest neighbour in an empty set")
    qf = lpips_features(model, prepare(query), batch_size=batch_size)
    best = torch.full((len(query),), float("inf"))
    arg = torch.zeros(len(query), dtype=torch.long)
    for j in range(0, len(ref), ref_block):
        rf = lpips_features(model, prepare(ref[j : j + ref_block]), batch_size=batch_size)
        m, k = nearest_sq_fast(qf, rf, chunk=chunk)
        better = m < best
        best[better], arg[better] = m[better], k[better] + j
    return best.double().numpy(), arg.numpy()


@torch.no_grad()
def lpips_pairwise(model, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LPIPS(a_i, b_i) for paired images uint8 [N,H,W], by the package's own forward: [N]."""
    xa, xb = prepare(a), prepare(b)
    return model(xa, xb).reshape(-1).double().numpy()
