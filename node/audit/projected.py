"""The nearest reference to a group of query rows, with most pairs ruled out by a cheap lower bound
(docs/DESIGN.md 3.5).

The copy detector asks, for each candidate image, how close any of its T warps comes to any of M
train images: N*T*M pairs of D-wide rows (20,000 x ~1,000 x 20,000 x 324 at 32 px), far too many
to take each pair's full product. Most pairs are nowhere near the nearest, and a bound says so for
a fraction of the cost. Centre everything on the references' mean and take the references' k
leading principal directions, an orthonormal P [k,D]. Any row x splits into its projection Px and
a residual of norm rho(x) = sqrt(|x|^2 - |Px|^2), and

    |x - y|^2 = |Px - Py|^2 + |x_res - y_res|^2 >= |Px - Py|^2 + (rho(x) - rho(y))^2
              = |x|^2 + |y|^2 - 2 <[Px, rho(x)], [Py, rho(y)]>,

a product of (k+1)-wide rows. Per group the bound over all its rows is taken against every
reference; a few references with the smallest bound are measured exactly, and only the references
whose bound is under the best of those (plus a rounding margin) are measured exactly with every
row of the group. On 28-px pneumoniamnist pixel views, with the exact nearest as the cut, k = 16
ruled out all but 0.03-0.05% of (warp, reference) pairs. (Clustering the references' lifted rows
for a bound per cluster was tried: in 17 dimensions the clusters are as wide as the distances, and
99-100% of them survived the exact cut. The same bound for the LPIPS space's 31,872-wide rows was
tried too: the float32 margin, ~D * 2^-24 times the rows' squared norms, exceeds the LPIPS
distances there; with the lift and the survivors in float64 it is exact and tight, but the lift
alone costs what the bfloat16 screen (node.audit.distances) takes for the whole search on a CPU
with native bfloat16: 1.1 s against 1.0 s at k = 256, 3.5 s at k = 64, 1,200 warped queries
against 4,708 references.)

Exact, not approximate: a pair is ruled out only when its bound exceeds a distance already
measured, by more than float32 rounding of either could explain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProjectedRefs:
    """Reference rows prepared once for nearest_in_groups: as given, and lifted to the bound's
    (k+1)-wide rows."""

    rows: torch.Tensor  # [M,D] float32, as given
    sq: torch.Tensor  # [M] float32, |r|^2 of the rows as given
    mean: torch.Tensor  # [D] float32
    basis: torch.Tensor  # [k,D] float32, orthonormal
    low: torch.Tensor  # [M,k+1] float32, [P(r - mean), rho(r - mean)]
    low_sq: torch.Tensor  # [M] float32, |low|^2

    @classmethod
    def of(cls, r: torch.Tensor, *, k: int = 16) -> ProjectedRefs:
        """r [M,D] -> prepared references; k at most D (the leading directions of r's covariance)."""
        if len(r) == 0:
            raise ValueError("nearest neighbour in an empty set")
        r = r.float()
        r64 = r.double()
        mean = r64.mean(0)
        centred = r64 - mean
        _, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        mean, basis = mean.float(), vecs[:, -min(k, r.shape[1]) :].T.float().contiguous()
        low = _lift(r, mean, basis)
        return cls(r, r.square().sum(1), mean, basis, low, low.square().sum(1))


def _lift(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows x [N,D] -> [P(x - mean), |residual|] [N,k+1]. The residual is taken explicitly, not as
    sqrt(|x|^2 - |Px|^2), which loses all its digits when the projection holds nearly all of x."""
    c = x - mean
    p = c @ basis.T
    rho = torch.linalg.vector_norm(c - p @ basis, dim=1)
    return torch.cat([p, rho[:, None]], 1)


def nearest_in_groups(
    q: torch.Tensor,
    refs: ProjectedRefs,
    *,
    group: int,
    offset: torch.Tensor | None = None,
    candidates: int = 8,
    ref_chunk: int = 512,
    block_rows: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each group of `group` consecutive rows of q [G*group, D], the smallest
    |q_t - r_j|^2 + offset_t over its rows t and the references j, with the t (within the group)
    and the j that give it: (float64 [G], long [G], long [G]). offset [G*group] (default 0) shifts
    each row's distances (the copy detector's noise correction). |q - r|^2 is measured as
    nearest_sq measures it (float32, |q|^2 + |r|^2 - 2 q.r, at least 0); ties go to the first row,
    then the first reference, as nearest_sq followed by a minimum over the group's rows would."""
    G, D = len(q) // group, q.shape[1]
    if G * group != len(q):
        raise ValueError(f"{len(q)} query rows are not groups of {group}")
    off = torch.zeros(len(q), dtype=torch.float64) if offset is None else offset.double()
    low_q = _lift(q, refs.mean, refs.basis)
    low_sq_q = low_q.square().sum(1)
    # the bound in the offset's terms as one product: |r|^2 - 2 [low_q, -shift/2] . [low_r, 1]
    shift = (low_sq_q.double() + off).float()
    a = torch.cat([low_q, -shift[:, None] / 2], 1)
    b = torch.cat([refs.low, torch.ones(len(refs.low), 1)], 1)
    bound = torch.empty(G, len(refs.rows))  # per group, its smallest over the group's rows
    # blocks of a couple of groups by a few hundred references stay in cache: 5x faster than big blocks
    step = max(1, block_rows // group)
    for g in range(0, G, step):
        rows = a[g * group : (g + step) * group]
        for c in range(0, len(b), ref_chunk):
            lb = torch.addmm(refs.low_sq[None, c : c + ref_chunk], rows, b[c : c + ref_chunk].T, alpha=-2.0)
            bound[g : g + step, c : c + ref_chunk] = lb.view(-1, group, lb.shape[1]).amin(1)
    # float32 rounding, worst case: of the D-wide products (the exact distances, the projection and
    # the residual) and of the (k+1)-wide bound, on rows of these norms; and of the offset
    q_sq = q.square().sum(1)
    scale = float(q_sq.max() + refs.sq.max() + low_sq_q.max() + refs.low_sq.max())
    margin = 16 * (D + len(refs.basis) + 2) * 2.0**-24 * scale + 2.0**-20 * float(off.abs().max())
    first = bound.topk(min(candidates, bound.shape[1]), dim=1, largest=False).indices
    cut = (_exact(q, q_sq, off, refs, first, group).amin((1, 2)) + margin).float()
    keep = bound <= cut[:, None]
    d, t, j = (torch.empty(G, dtype=torch.float64), torch.empty(G, dtype=torch.long), torch.empty(G, dtype=torch.long))
    for g in range(G):
        rows = slice(g * group, (g + 1) * group)
        cols = keep[g].nonzero()[:, 0]
        # the surviving references' bounds pair by pair: only pairs under the cut are measured
        lb = torch.addmm(refs.low_sq[cols][None], a[rows], b[cols].T, alpha=-2.0)
        ti, ci = (lb <= cut[g]).nonzero(as_tuple=True)  # row-major: the first row, then the first reference
        if len(ti) == 0:  # the candidate that set the cut always survives, unless the rows are not finite
            raise ValueError(f"query group {g}: non-finite rows, no nearest reference")
        ji = cols[ci]
        sq = (q_sq[rows][ti] + refs.sq[ji] - 2 * (q[rows][ti] * refs.rows[ji]).sum(1)).clamp_min_(0)
        exact = sq.double() + off[rows][ti]
        k = int(exact.argmin())
        d[g], t[g], j[g] = exact[k], ti[k], ji[k]
    return d, t, j


def _exact(
    q: torch.Tensor, q_sq: torch.Tensor, off: torch.Tensor, refs: ProjectedRefs, cols: torch.Tensor, group: int
) -> torch.Tensor:
    """|q_t - r_j|^2 + offset_t for every row of each group (q [G*group,D], q_sq = |q|^2 [G*group])
    and the references cols [G,c]: float64 [G,group,c]."""
    G = len(cols)
    dots = torch.bmm(q.view(G, group, -1), refs.rows[cols].transpose(1, 2))  # [G,group,c]
    sq = dots.mul_(-2.0).add_(refs.sq[cols][:, None, :]).add_(q_sq.view(G, group, 1)).clamp_min_(0)
    return sq.double() + off.view(G, group, 1)
