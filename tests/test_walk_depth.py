"""The batched walk against the sequential reference, its stopping rule, and generator quality."""

import pytest
import torch

from bench.walk_reference import reference_objective, reference_walk
from node.plan.classifiers import SmallCNN
from node.plan.gan import Generator
from node.plan.quality import frechet_distance, generator_quality
from node.plan.walk import linear_paths, path_loss, plan_paths, shifted_views


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _models():
    torch.manual_seed(0)
    G = Generator(z_dim=8, w_dim=8, mapping_layers=1, image_size=8, channels=16)
    return G, SmallCNN(6, width=4, image_size=8), SmallCNN(2, width=4, image_size=8)


def _quiet(G):
    # shrink the generator's output so its images stay inside [-1, 1], where the authors' clamp does nothing
    with torch.no_grad():
        for m in [G.synthesis.to_grey0, *G.synthesis.to_grey]:
            m.weight.mul_(0.05)
    return G


def test_batched_walk_moves_every_path_as_it_would_alone():
    G, phi_id, phi_class = _models()
    start, end, labels = torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 1, 1])
    kw = dict(points=7, iters=10, lr=0.05, weight_identity=1.0, weight_smooth=1.0, weight_class=1.0)
    kw.update(patience=None, keep_best=False, device="cpu")
    res = plan_paths(G, phi_id, phi_class, start, end, labels, **kw)
    alone = [
        plan_paths(G, phi_id, phi_class, start[p : p + 1], end[p : p + 1], labels[p : p + 1], **kw) for p in range(3)
    ]
    assert res.iters == 10
    assert torch.allclose(res.paths, torch.cat([a.paths for a in alone]), atol=1e-5)
    assert not torch.allclose(res.paths, linear_paths(start, end, points=7))  # it moved


def test_authors_walk_with_one_chunk_and_no_clamping_is_the_node_walk():
    G, phi_id, phi_class = _models()
    G = _quiet(G)
    start, end, labels = torch.randn(3, 8), torch.randn(3, 8), torch.tensor([0, 1, 1])
    kw = dict(points=7, iters=10, lr=0.05, weight_identity=1.0, weight_smooth=1.0, weight_class=1.0)
    # the batched walk first: it moves the models to channels_last, and the reference then runs in the same
    # layout (Adam turns the rounding of another layout into visible differences within 10 steps)
    res = plan_paths(G, phi_id, phi_class, start, end, labels, patience=None, keep_best=False, device="cpu", **kw)
    ref_paths, ref_loss = reference_walk(G, phi_id, phi_class, start, end, labels, chunk=5, **kw)
    assert G.synthesis(ref_paths[:, 1:-1].reshape(-1, 8)).abs().max() < 1  # the clamp never acted
    assert torch.allclose(res.paths, ref_paths, atol=1e-4)
    assert torch.allclose(res.loss, ref_loss, rtol=1e-4, atol=1e-5)


def test_authors_objective_sums_the_chunk_means():
    G, phi_id, phi_class = _models()
    G = _quiet(G)
    path = linear_paths(torch.randn(1, 8), torch.randn(1, 8), points=10)[0]  # 8 interior points
    w = dict(weight_identity=1.0, weight_smooth=0.0, weight_class=1.0)
    with torch.no_grad():
        chunks = reference_objective(G, phi_id, phi_class, path, 1, chunk=4, **w)
        halves = [reference_objective(G, phi_id, phi_class, path[i : i + 6], 1, chunk=4, **w) for i in (0, 4)]
        node, _ = path_loss(G, phi_id, phi_class, path[None], torch.tensor([1]), **w)
    assert torch.allclose(chunks, halves[0] + halves[1])  # each chunk of 4 adds its own mean
    assert torch.allclose(chunks, 2 * node[0], rtol=1e-5)  # two chunks: twice the node's mean over 8 images


def test_stopping_rule_and_best_iterate():
    G, phi_id, phi_class = _models()
    start, end, labels = torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0, 1])
    kw = dict(points=5, weight_identity=1.0, device="cpu")
    frozen = plan_paths(G, phi_id, phi_class, start, end, labels, iters=100, lr=0.0, patience=7, **kw)
    assert frozen.iters == 7  # nothing can improve: stops after `patience` steps
    assert torch.allclose(frozen.loss, frozen.initial_loss)
    # a large lr overshoots; the best iterate per path is never worse than the straight line or the last iterate
    best = plan_paths(G, phi_id, phi_class, start, end, labels, iters=25, lr=1.0, patience=None, **kw)
    last = plan_paths(G, phi_id, phi_class, start, end, labels, iters=25, lr=1.0, patience=None, keep_best=False, **kw)
    assert (best.loss <= best.initial_loss + 1e-6).all()
    assert (best.loss <= last.loss + 1e-6).all()


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    b = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, b) < 0.02
    assert abs(frechet_distance(a, b + 2.0) - 12.0) < 0.3  # mean shift of 2 in 3 dimensions
    assert abs(frechet_distance(a, 3 * b) - 3 * (3 - 1) ** 2) < 0.6  # std 1 vs 3: tr = 3*(1 + 9 - 2*3)


def test_generator_quality_reports_balance_and_distance():
    G, _, phi_class = _models()
    real = torch.rand(40, 1, 8, 8) * 2 - 1
    q = generator_quality(G, phi_class, real, n=64, seed=0, device="cpu")
    assert len(q["class_balance"]) == 2 and abs(sum(q["class_balance"]) - 1) < 1e-3
    assert q["fd_phi_class"] >= 0 and q["n_generated"] == 64
    assert q == generator_quality(G, phi_class, real, n=64, seed=0, device="cpu")  # deterministic per seed


def test_shifted_views_move_the_image_by_whole_pixels():
    img = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    views = shifted_views(img, 2)
    assert views.shape == (10, 1, 6, 6)
    assert torch.equal(views[:2], img)
    right, left, down, up = (views[2 * v : 2 * v + 2] for v in range(1, 5))
    assert torch.equal(right[..., 2:], img[..., :-2]) and torch.equal(right[..., 0], img[..., 0])
    assert torch.equal(left[..., :-2], img[..., 2:])
    assert torch.equal(down[..., 2:, :], img[..., :-2, :]) and torch.equal(up[..., :-2, :], img[..., 2:, :])
    assert shifted_views(img, 0) is img


def test_class_shift_averages_the_class_term_over_the_shifted_views():
    G, phi_id, phi_class = _models()
    paths = linear_paths(torch.randn(2, 8), torch.randn(2, 8), points=5)
    labels = torch.tensor([0, 1])
    w = dict(weight_identity=1.0, weight_smooth=1.0, weight_class=1.0)
    with torch.no_grad():
        plain, t0 = path_loss(G, phi_id, phi_class, paths, labels, **w)
        shifted, t2 = path_loss(G, phi_id, phi_class, paths, labels, class_shift=0.25, **w)  # 2 of 8 px
        views = shifted_views(G.synthesis(paths[:, 1:-1].reshape(-1, 8)), 2).reshape(5, 2, 3, 1, 8, 8)
        by_hand = torch.stack(
            [
                torch.nn.functional.cross_entropy(phi_class(views[v, p]), labels[p].repeat(3))
                for v in range(5)
                for p in range(2)
            ]
        ).reshape(5, 2)
    assert torch.allclose(t2["class"], by_hand.mean(0), atol=1e-6)
    assert torch.allclose(t2["identity"], t0["identity"]) and torch.allclose(t2["smooth"], t0["smooth"])
    assert not torch.allclose(t2["class"], t0["class"])
    assert torch.allclose(shifted - plain, t2["class"] - t0["class"], atol=1e-6)
