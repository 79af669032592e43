"""Per-sample copy detection: is a candidate an edited copy of a training image?

A copy of a training image survives the edits a generator, a careless export or an adversary
would make: a shift of a few pixels, a flip, a small rotation or rescale, brightness and contrast,
mild blur or noise. Plain pixel MSE misses all of them. So each candidate x is compared with every
training image y under a family of geometric edits t of the candidate, and its copy distance is

    d(x) = min over t, y of || v(t(x)) - v(y) ||^2

in a view v (for the pixel views, d = 2 - 2 cos' with the corrected cosine below, at least 0):
- "pixel": the centre crop (the border a warp fills in is left out) normalised per image to zero
  mean and unit norm, so brightness and contrast changes vanish exactly; d = 2 - 2 cos in [0, 4];
- "pixel_smooth", "pixel_coarse": the same after a Gaussian blur of both sides (sigma 1 and 2
  pixels), so blur and most of the noise vanish (sigma 1 keeps fine anatomy for copies that are
  also rotated or zoomed; sigma 2 removes more noise);
  in every pixel view the candidate's norm is corrected for its own estimated noise (Spearman's
  correction for attenuation): for x = y + n the plain cosine to y is |y| / sqrt(|y|^2 + |n|^2),
  below 1 by the noise alone, so a noisy copy would look as far from its source as a different
  image; dividing by sqrt(|x|^2 - E|n|^2) instead gives it a cosine near 1, and a clean image
  (estimated noise near 0) is unchanged;
- an embedding space (the independent attacker's features, LPIPS features when the backbone is
  present): squared Euclidean distance between features of the warped candidate and of y.

The family is symmetric (it holds each edit's inverse), so a copy made by one of its edits is
matched exactly, up to the border and interpolation. Distances have no natural unit: a candidate
is judged against the same distance for real non-members (holdout images the models never saw),
and flagged when it is closer to a training image than a chosen small share of them
(`calibrate`). Everything is batched: warps are one grid_sample per chunk, nearest neighbours one
matrix product per chunk (node.audit.distances.nearest_sq).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from node.audit.distances import ScreenRefs, nearest_sq_fast, search_refs
from node.audit.projected import ProjectedRefs, nearest_in_groups
from node.site.pixels import to_tensor

# view -> Gaussian blur sigma in pixels. A blur of sigma s keeps about 1 / (4 pi s^2) of the power of
# per-pixel noise (8% at 1, 2% at 2) and most of the anatomy's.
PIXEL_VIEWS = {"pixel": 0.0, "pixel_smooth": 1.0, "pixel_coarse": 2.0}
# The pixel views work at this side (larger images are area-averaged down first): a copy stays a
# copy at 32 px, the warp family is in pixels of this size, and the cost stays that of a 32-px site
# (the family's shifts grow with the square of the side).
PIXEL_VIEW_SIZE = 32


@dataclass(frozen=True)
class Warp:
    """One geometric edit: rotate by `angle` degrees and scale by `scale` about the centre, shift
    by (dx, dy) pixels, after an optional horizontal / vertical flip."""

    angle: float = 0.0
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    flip_h: bool = False
    flip_v: bool = False


def warp_family(
    *,
    size: int = PIXEL_VIEW_SIZE,
    max_shift: int | None = None,
    fine_shift: int | None = None,
    angles: tuple[float, ...] = tuple(float(a) for a in range(-32, 33, 4) if a),
    scales: tuple[float, ...] = (0.85, 0.9, 0.95, 1 / 0.95, 1 / 0.9, 1 / 0.85),
) -> list[Warp]:
    """The default family for images of side `size` (pixels of the working size): every whole-pixel
    shift up to `max_shift` (default 3/16 of the side: 6 px at 32, the largest shift whose centre
    crop still holds most of the image) with and without each flip; every rotation and every
    scale with shifts up to `fine_shift` (default 1/16 of the side: a rotated copy is rarely also
    shifted far). Rotations go to 32 degrees in steps of 4: a copy turned 20 or 30 degrees is still
    a copy, and on real non-members the wider range moved no threshold enough to drop more genuine
    images (bench/canary.py). Symmetric: each edit's inverse is in it (up to a 1-pixel shift for
    rotations and scales). The identity is the first member."""
    max_shift = round(size * 3 / 16) if max_shift is None else max_shift
    fine_shift = round(size / 16) if fine_shift is None else fine_shift
    shifts = range(-max_shift, max_shift + 1)
    fine = range(-fine_shift, fine_shift + 1)
    out = [Warp(dx=dx, dy=dy) for dy in shifts for dx in shifts]
    out.sort(key=lambda w: w.dx != 0 or w.dy != 0)  # identity first
    out += [Warp(dx=dx, dy=dy, flip_h=True) for dy in shifts for dx in shifts]
    out += [Warp(dx=dx, dy=dy, flip_v=True) for dy in shifts for dx in shifts]
    out += [Warp(angle=a, dx=dx, dy=dy) for a in angles for dy in fine for dx in fine]
    out += [Warp(scale=s, dx=dx, dy=dy) for s in scales for dy in fine for dx in fine]
    return out


def embed_warp_family() -> list[Warp]:
    """The family for embedding spaces: no shifts, only flips, rotations and zooms (a network pass
    per warp costs ~100x a pixel view, and a CNN's pooled features give little weight to a shift)."""
    return warp_family(max_shift=0, fine_shift=0)


def warp(x: torch.Tensor, family: list[Warp]) -> torch.Tensor:
    """Every edit of `family` applied to every image: x float [N,1,H,W] -> [N,T,1,H,W]
    (bilinear, border pixels repeated outside; whole-pixel shifts are exact).

    One sampling grid per edit, shared by all images: the images ride as channels of one input,
    so the T grids are computed once, not N x T times."""
    N, C, H, W = x.shape
    rows = []
    for w in family:
        # affine_grid maps output coordinates to input ones, so this is the inverse edit
        a = math.radians(w.angle)
        cos, sin = math.cos(a) / w.scale, math.sin(a) / w.scale
        rows.append(
            [[cos * (-1 if w.flip_h else 1), -sin, -2 * w.dx / W], [sin, cos * (-1 if w.flip_v else 1), -2 * w.dy / H]]
        )
    theta = torch.tensor(rows, dtype=x.dtype, device=x.device)  # [T,2,3]
    T = len(theta)
    grid = F.affine_grid(theta, [T, N * C, H, W], align_corners=False)  # [T,H,W,2]
    src = x.reshape(1, N * C, H, W).expand(T, -1, -1, -1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)  # [T,N*C,H,W]
    return out.reshape(T, N, C, H, W).transpose(0, 1)


def _blur_matrix(n: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """[n,n]: a 1-D Gaussian (radius 3 sigma, cut at n-1) with reflect padding, as a matrix:
    row i holds the weights output pixel i takes from each input pixel."""
    r = min(max(1, int(math.ceil(3 * sigma))), n - 1)
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    i = torch.arange(n).repeat_interleave(2 * r + 1)  # [n(2r+1)]: output pixel i, tap o, in that order
    j = (i + torch.arange(-r, r + 1).repeat(n)).abs()  # reflect at 0: -1 -> 1
    j = torch.where(j > n - 1, 2 * (n - 1) - j, j)  # and at n-1: n -> n-2
    m = torch.zeros(n, n, dtype=torch.float64).index_put_((i, j), k.repeat(n), accumulate=True)
    return m.to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x [B,1,H,W] (reflect padding, radius 3 sigma), as two matrix
    products: on the tens of thousands of warped images of a chunk, about 20x faster on a CPU
    than a one-channel convolution."""
    H, W = x.shape[-2:]
    return _blur_matrix(H, sigma, x.dtype).to(x.device) @ x @ _blur_matrix(W, sigma, x.dtype).to(x.device).T


# The Laplacian-of-differences mask: zero on constant and linear ramps, so on smooth anatomy its
# response is mostly the noise; for white noise of variance s^2 it has variance 36 s^2.
_NOISE_MASK = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
# The noise correction removes at most this share of an image's energy (its cosine at most doubles):
# an image that is mostly noise is not a copy of anything the estimate can vouch for.
MAX_NOISE_SHARE = 0.75


def noise_variance(x: torch.Tensor) -> torch.Tensor:
    """Per-image variance of additive white noise, x float [B,1,H,W] -> [B] (units of x squared):
    the median absolute response to _NOISE_MASK / (0.6745 * 6), squared. The median, not the
    mean, so edges (a minority of pixels) do not count as noise; on anatomy with no noise added
    it reads near the quantisation and acquisition noise, a few 1e-5 on [-1, 1]."""
    r = F.conv2d(x, _NOISE_MASK.to(x)[None, None]).flatten(1).abs()
    return (r.median(1).values / (0.6745 * 6)).square()


def view_noise_gain(side: int, *, margin: int, sigma: float) -> float:
    """Expected energy of unit-variance white noise in pixel_view's vector before normalisation:
    the blur's squared weights summed over the centre crop, less the crop mean's share."""
    B = torch.eye(side, dtype=torch.float64) if sigma == 0 else _blur_matrix(side, sigma, torch.float64)
    B = B[margin : side - margin]  # the crop's rows of the (row or column) blur
    P = len(B) ** 2
    return float(B.square().sum() ** 2 - B.sum(0).square().sum() ** 2 / P)


def pixel_view(
    x: torch.Tensor, *, margin: int, sigma: float = 0.0, noise_energy: torch.Tensor | None = None
) -> torch.Tensor:
    """x float [B,1,H,W] -> [B,(H-2m)(W-2m)]: (optionally blurred) centre crop, zero mean, divided
    by its norm; with `noise_energy` [B] (noise_variance x view_noise_gain), by the norm its noise-free
    part would have (at least (1 - MAX_NOISE_SHARE) of the energy kept), so the row's norm may exceed 1.
    A constant crop stays all zeros (distance 0 to another constant crop, 1 to anything else)."""
    if sigma > 0:
        x = gaussian_blur(x, sigma)
    H, W = x.shape[-2:]
    v = x[..., margin : H - margin, margin : W - margin].flatten(1)
    v = v - v.mean(1, keepdim=True)
    energy = v.square().sum(1)
    if noise_energy is not None:
        energy = torch.maximum(energy - noise_energy, (1 - MAX_NOISE_SHARE) * energy)
    return v / energy.sqrt().clamp_min(1e-8)[:, None]


def working_size(x: torch.Tensor) -> torch.Tensor:
    """x float [B,1,H,W] -> [B,1,h,w], area-averaged so that the longer side is at most PIXEL_VIEW_SIZE."""
    H, W = x.shape[-2:]
    if max(H, W) <= PIXEL_VIEW_SIZE:
        return x
    f = PIXEL_VIEW_SIZE / max(H, W)
    return F.interpolate(x, size=(max(1, round(H * f)), max(1, round(W * f))), mode="area")


def crop_margin(family: list[Warp], size: int) -> int:
    """Pixels to leave out at each side: the largest shift plus one, at most a quarter of the side.
    Rotations and zooms also fill in corners; those few pixels weigh the same on copies and on
    the non-members that calibrate the threshold, so a wider crop is not worth the content it loses."""
    shift = max((max(abs(w.dx), abs(w.dy)) for w in family), default=0)
    return int(min(size // 4, math.ceil(shift) + 1))


Embedder = Callable[[torch.Tensor], torch.Tensor]  # float [B,1,H,W] in [-1,1] -> [B,F]


def copy_distances(
    query: np.ndarray,
    train: np.ndarray,
    *,
    embedders: dict[str, Embedder] | None = None,
    family: list[Warp] | None = None,
    embed_family: list[Warp] | None = None,
    chunk: int = 32,
    device: torch.device | str = "cpu",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Copy distance of each query image (uint8 [N,H,W]) to the train images (uint8 [M,H,W]) in
    the pixel views (PIXEL_VIEWS) and in each embedding space of `embedders`:
    {space: (distance float64 [N], index of the nearest train image int64 [N])}.

    The pixel views see both sides at PIXEL_VIEW_SIZE (area-averaged when larger); the embedders
    see the images as given. Train images are taken as they are; only the query is warped (the family is
    symmetric) and only its noise corrected (an edit adds noise to the copy, not to its source). The
    embedding spaces use `embed_family` (default: no shifts, only flips, rotations and zooms): a
    network pass per warp costs ~100x a pixel view, and a CNN's pooled features already give
    little weight to a shift of a few pixels. Memory: `chunk` query images x len(family) warps.
    The warps and the pixel-view products run on `device` (the bulk of the work: on a GPU, give a
    larger `chunk`); each embedder takes and returns tensors on `device`."""
    t = to_tensor(train, device)
    t_small = working_size(t)
    family = family or warp_family(size=t_small.shape[-1])
    embed_family = embed_family or embed_warp_family()
    embedders = embedders or {}
    margin = crop_margin(family, t_small.shape[-1])
    best: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def keep(k: str, i: int, v: torch.Tensor, ref: torch.Tensor | ScreenRefs | ProjectedRefs, T: int) -> None:
        # pixel views: 2 - 2 cos', the unit-norm reference against the noise-corrected query
        offset = 1 - v.square().sum(1).double() if k in PIXEL_VIEWS else None
        if isinstance(ref, ProjectedRefs):  # the nearest over the image's warps at once, most pairs ruled out
            d, _, j = nearest_in_groups(v, ref, group=T, offset=offset)
        else:  # float32 expansion: its rounding (a few 1e-5 of the distances) is far under any threshold
            d, j = nearest_sq_fast(v, ref, chunk=4096 if offset is not None else 512)
            d = d.double() + (0 if offset is None else offset)
            d, t_best = d.reshape(len(v) // T, T).min(1)
            j = j.reshape(len(v) // T, T).gather(1, t_best[:, None])[:, 0]
        d = d.clamp_min(0)
        best[k][0][i : i + len(d)], best[k][1][i : i + len(d)] = d.cpu().numpy(), j.cpu().numpy()

    with torch.no_grad():
        side = t_small.shape[-1]
        gains = {k: view_noise_gain(side, margin=margin, sigma=sigma) for k, sigma in PIXEL_VIEWS.items()}
        refs: dict = {k: pixel_view(t_small, margin=margin, sigma=sigma) for k, sigma in PIXEL_VIEWS.items()}
        if t.device.type == "cpu":  # the bound's per-image work suits a CPU; a GPU takes every product
            refs = {k: ProjectedRefs.of(r) for k, r in refs.items()}
        refs.update({k: search_refs(f(t).float()) for k, f in embedders.items()})  # LPIPS: prepared for the screen
        best.update({k: (np.full(len(query), np.inf), np.zeros(len(query), dtype=np.int64)) for k in refs})
        for i in range(0, len(query), chunk):
            x = to_tensor(query[i : i + chunk], device)
            small = working_size(x)
            q = warp(small, family).flatten(0, 1)  # [n*T,1,h,w], warp k of image n at n*T+k
            # estimated once per image and used for every warp: interpolating warps average the noise
            # down, so this over-corrects them, which can only flag more
            noise = noise_variance(small).repeat_interleave(len(family))
            for k, sigma in PIXEL_VIEWS.items():
                v = pixel_view(q, margin=margin, sigma=sigma, noise_energy=noise * gains[k])
                keep(k, i, v, refs[k], len(family))
            if embedders:
                qe = warp(x, embed_family).flatten(0, 1)
                for k, f in embedders.items():
                    keep(k, i, f(qe).float(), refs[k], len(embed_family))
    return best


def calibrate(nonmember: np.ndarray, *, fpr: float) -> float:
    """The copy threshold of one space from real non-members' copy distances [M]: the `fpr`
    quantile of an extreme-value law fitted to them (a non-member is flagged with probability
    about `fpr`).

    A copy distance is a minimum over many train images and warps, so its logarithm follows the
    Gumbel law for minima, whose lower tail is longer than a normal's: log d ~ mu + beta * G with
    P(G <= g) = 1 - exp(-exp(g)). It is fitted to the upper half of the non-members alone (their
    median and 75th percentile), on purpose: real data sets hold near-duplicates across patients
    (BUSI, behind BreastMNIST, has several frames per patient, split by image), so up to half of
    the "non-members" may in effect be copies of train images. A plain low quantile would sit
    among them and let every copy at their distance through."""
    x = np.asarray(nonmember, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"need at least 2 non-member images to calibrate a copy threshold, got {len(x)}")
    q50, q75 = np.quantile(np.log(np.maximum(x, 1e-12)), [0.5, 0.75])
    if q75 <= q50:  # no spread: a dead space tells copies from nothing (the set-level check fails it as degenerate)
        return 0.0
    # Gumbel-min quantiles: Q(p) = mu + beta * ln(-ln(1 - p)); ln ln 2 = -0.3665, ln ln 4 = 0.3266
    beta = (q75 - q50) / (math.log(math.log(4)) - math.log(math.log(2)))
    mu = q50 - beta * math.log(math.log(2))
    return float(np.exp(mu + beta * math.log(-math.log(1 - fpr))))
