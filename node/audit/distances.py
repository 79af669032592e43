"""Nearest-neighbour distances as chunked matrix products (docs/DESIGN.md 3.5)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


def pixels01(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] -> float32 [N,H*W] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).reshape(len(images), -1).float() / 255.0


def min_sq_dist(a: torch.Tensor, b: torch.Tensor, *, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a [N,D], the smallest squared Euclidean distance to a row of b [M,D] and
    its index: ([N], [N]). ||a||^2 + ||b||^2 - 2 a.b, in float64 to keep near-duplicates (the
    distances that matter most) from cancelling to noise; chunks of `chunk` rows of a."""
    if len(b) == 0:
        raise ValueError("nearest neighbour in an empty set")
    a, b = a.double(), b.double()
    bb = b.square().sum(1)
    mins, args = [], []
    for i in range(0, len(a), chunk):
        x = a[i : i + chunk]
        d = (x.square().sum(1)[:, None] + bb[None] - 2 * x @ b.T).clamp_min_(0)
        m, j = d.min(1)
        mins.append(m)
        args.append(j)
    if not mins:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(mins), torch.cat(args)


def nearest_sq(q: torch.Tensor, r: torch.Tensor, *, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of q [N,D] the smallest ||q - r_j||^2 over rows of r [M,D] and its j:
    ([N] float32, [N] long). ||q||^2 + ||r||^2 - 2 q.r, one [chunk,M] product at a time, in float32:
    for unit-scale rows (LPIPS features, normalised pixels) the expansion's rounding is ~1e-6, far
    under anything these distances are compared with."""
    rr = r.square().sum(1)
    mins, args = [], []
    for i in range(0, len(q), chunk):
        a = q[i : i + chunk]
        d = torch.addmm(rr[None], a, r.T, alpha=-2.0).add_(a.square().sum(1)[:, None]).clamp_min_(0)
        m, j = d.min(1)
        mins.append(m)
        args.append(j)
    if not mins:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(mins), torch.cat(args)


# Narrower rows are faster in float32 alone: the screen's elementwise work on the [chunk,M] matrix
# outweighs what bfloat16 saves in the products (a sweep of D on the development VM: 2.8x slower at
# D = 256, even at ~2k, 1.2x faster at 4k with half the rows lacking a clear nearest neighbour).
SCREEN_MIN_DIM = 4096


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX-512 BF16 or AMX: 2.2x float32 on
    the development VM); elsewhere bfloat16 products are emulated and slower than float32."""
    # private probes of torch.cpu (2.x); a torch without them gets the float32 path
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


@dataclass(frozen=True)
class ScreenRefs:
    """Reference rows prepared once for nearest_sq_screened (centred on their mean; norms; bfloat16
    copy), so that many query blocks against the same references pay for it once."""

    mean: torch.Tensor  # [D]
    rows: torch.Tensor  # [M,D] float32, centred
    norms: torch.Tensor  # [M]
    bf16: torch.Tensor  # [M,D]

    @classmethod
    def of(cls, r: torch.Tensor) -> ScreenRefs:
        if len(r) == 0:
            raise ValueError("nearest neighbour in an empty set")
        mean = r.mean(0)
        rows = r - mean
        return cls(mean, rows, torch.linalg.vector_norm(rows, dim=1), rows.bfloat16())


def search_refs(r: torch.Tensor) -> torch.Tensor | ScreenRefs:
    """Reference rows r [M,D] as the fastest exact search wants them: prepared for the bfloat16
    screen (ScreenRefs) where it pays (rows on a CPU with native bfloat16, at least SCREEN_MIN_DIM
    wide), else r itself. Prepare once, search many times with nearest_sq_fast."""
    if r.device.type == "cpu" and r.shape[1] >= SCREEN_MIN_DIM and cpu_bf16_is_fast():
        return ScreenRefs.of(r)
    return r


def nearest_sq_fast(
    q: torch.Tensor, r: torch.Tensor | ScreenRefs, *, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_sq's answer by the faster of its two exact paths (search_refs decides; pass r
    through it once when searching the same references many times)."""
    ref = r if isinstance(r, ScreenRefs) else search_refs(r)
    if isinstance(ref, ScreenRefs):
        return nearest_sq_screened(q, ref, chunk=chunk)
    return nearest_sq(q, ref, chunk=chunk)


def nearest_sq_screened(
    q: torch.Tensor, r: torch.Tensor | ScreenRefs, *, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_sq's answer (for each row of q [N,D] the smallest ||q - r_j||^2 over rows of r [M,D]
    and its j: [N] float32, [N] long), with the [chunk,M] products in bfloat16 to screen and float32
    only for the pairs the screen cannot rule out. `r` may be prepared once with ScreenRefs.of.

    Exact, not approximate: a bfloat16 dot product of x and y is within c*|x|*|y| of the true one
    (inputs rounded to 8 significant bits, float32 accumulation over D terms, output rounded;
    `c` below), so every j whose screened distance minus its error bound exceeds the row's smallest
    screened distance plus its bound is farther than the nearest and is dropped; the rest are
    recomputed in float32. Both sides are first centred on r's mean, which leaves every distance
    unchanged and shrinks |x|*|y| from the features' full norms to their spread, so the bound is
    a small fraction of the gaps between neighbours and few pairs survive the screen."""
    ref = r if isinstance(r, ScreenRefs) else ScreenRefs.of(r)
    qc, rc, rn = q - ref.mean, ref.rows, ref.norms
    u = 2.0**-8  # bfloat16's unit roundoff
    c = 3 * u + 4 * u * u + 2 * q.shape[1] * 2.0**-24  # the last term: float32 summation, worst case
    rr = rn.square()
    mins, args = [], []
    for i in range(0, len(qc), chunk):
        a = qc[i : i + chunk]
        an = torch.linalg.vector_norm(a, dim=1)
        aa = an.square()
        d = (a.bfloat16() @ ref.bf16.T).float().mul_(-2.0).add_(rr[None]).add_(aa[:, None])
        # the products' bound, and the float32 rounding of the sums around them
        err = (2 * c) * an[:, None] * rn[None] + 2.0**-20 * (aa[:, None] + rr[None])
        keep = d - err <= (d + err).min(1, keepdim=True).values  # every row keeps its own minimum
        # a survivor's product costs ~14x its share of a dense one: a row where many survive (no
        # clear nearest, as in isotropic high-dimensional noise) gets its whole row in float32
        dense = keep.sum(1) > len(rc) // 16
        keep[dense] = False
        dots = _sampled_products(keep, a, rc)
        rows = torch.repeat_interleave(torch.arange(len(a)), dots.crow_indices().diff())
        cols = dots.col_indices()
        exact = (aa[rows] + rr[cols] - 2 * dots.values()).clamp_min_(0)
        best = torch.full((len(a),), float("inf")).scatter_reduce_(0, rows, exact, "amin")
        hit = exact == best[rows]  # the first survivor at the minimum, as min() would pick it
        first = torch.full((len(a),), len(rc), dtype=torch.long).scatter_reduce_(0, rows[hit], cols[hit], "amin")
        if dense.any():
            full = torch.addmm(rr[None], a[dense], rc.T, alpha=-2.0).add_(aa[dense, None]).clamp_min_(0)
            best[dense], first[dense] = full.min(1)
        if (first == len(rc)).any():  # only a row whose distances are all NaN keeps no survivor
            raise ValueError(f"non-finite feature rows among queries {i}..{i + len(a) - 1}: no nearest neighbour")
        mins.append(best)
        args.append(first)
    if not mins:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(mins), torch.cat(args)


def _sampled_products(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in float32 at the True entries of keep [N,M] only, as a sparse CSR [N,M]: each
    survivor's dot product read straight from the two rows (gathering the rows first costs more
    than the products)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's notice that sparse CSR is in beta
        return torch.sparse.sampled_addmm(keep.float().to_sparse_csr(), a, b.T, beta=0.0)


def min_pixel_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each image of a (uint8 [N,H,W]) the mean squared error on [0,1] to its nearest image in b: [N]."""
    pa, pb = pixels01(a), pixels01(b)
    return (min_sq_dist(pa, pb)[0] / pa.shape[1]).numpy()


@torch.no_grad()
def embed(model, images: np.ndarray, *, device: torch.device | str, batch_size: int = 512) -> torch.Tensor:
    """model.features on uint8 images [N,H,W] -> [N,F] on the CPU, computed once per image."""
    from node.site.pixels import to_tensor

    model.to(device).eval()
    x = to_tensor(images, device)
    return torch.cat([model.features(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])
