"""The grouped nearest-reference search with its projected lower bound (node.audit.projected)."""

import numpy as np
import pytest
import torch

from node.audit.projected import ProjectedRefs, nearest_in_groups


def _brute(q: torch.Tensor, r: torch.Tensor, group: int, offset: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64, every pair: the smallest |q_t - r_j|^2 + offset_t per group, and its (t, j)."""
    d = torch.cdist(q.double(), r.double()).square() + offset.double()[:, None]
    d = d.view(len(q) // group, -1)
    return d.min(1).values.numpy(), np.stack(np.unravel_index(d.argmin(1).numpy(), (group, len(r))), 1)


def _structured(n: int, dim: int, *, seed: int) -> torch.Tensor:
    """Rows with most of their energy in a few directions, as images' pixel views have."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, dim, generator=g)
    x = torch.randn(n, 6, generator=g) @ basis + 0.3 * torch.randn(n, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("k", [1, 4, 16, 64])
def test_the_pruned_search_finds_the_brute_force_nearest(k):
    refs = _structured(300, 64, seed=0)
    q = _structured(5 * 40, 64, seed=1)
    q[7] = refs[123]  # an exact copy in group 0, and a near one in group 3
    q[3 * 40 + 5] = refs[17] + 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(2))
    offset = 1 - q.square().sum(1).double() + 0.05 * torch.rand(len(q), dtype=torch.float64)
    d, t, j = nearest_in_groups(q, ProjectedRefs.of(refs, k=k), group=40, offset=offset)
    want_d, want_tj = _brute(q, refs, 40, offset)
    np.testing.assert_allclose(d.numpy(), want_d, atol=2e-6)
    np.testing.assert_array_equal(np.stack([t.numpy(), j.numpy()], 1), want_tj)
    assert (t[0], j[0]) == (7, 123) and (t[3], j[3]) == (5, 17)


def test_ties_go_to_the_first_row_then_the_first_reference():
    refs = _structured(50, 32, seed=3)
    refs = torch.cat([refs, refs[10:11], refs[10:11]])  # 50 and 51 repeat 10
    q = _structured(8, 32, seed=4)
    q[2] = q[5] = refs[10]  # two rows of the group equally close to three equal references
    d, t, j = nearest_in_groups(q, ProjectedRefs.of(refs, k=8), group=8)
    assert (float(d[0]), int(t[0]), int(j[0])) == (pytest.approx(0, abs=1e-6), 2, 10)


def test_rows_that_are_not_finite_are_refused_and_groups_must_divide():
    refs = _structured(20, 16, seed=5)
    q = _structured(6, 16, seed=6)
    with pytest.raises(ValueError, match="groups of 4"):
        nearest_in_groups(q, ProjectedRefs.of(refs), group=4)
    q[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        nearest_in_groups(q, ProjectedRefs.of(refs), group=3)
    with pytest.raises(ValueError, match="empty"):
        ProjectedRefs.of(torch.zeros(0, 16))
