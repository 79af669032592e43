"""Inversion, k-same and the walk."""

import numpy as np
import pytest
import torch

from node.plan.classifiers import SmallCNN
from node.plan.gan import Generator
from node.plan.invert import project, reconstruction_mse
from node.plan.ksame import anchors, ksame_clusters
from node.plan.walk import linear_paths, path_loss, plan_paths


def _G():
    torch.manual_seed(0)
    return Generator(z_dim=8, w_dim=8, mapping_layers=1, image_size=16, channels=16)


def test_inversion_reduces_reconstruction_error():
    G = _G()
    with torch.no_grad():
        target = G.synthesis(torch.randn(6, 8))
    start = reconstruction_mse(G, G.w_avg[None].repeat(6, 1), target, device="cpu")
    w = project(G, target, num_steps=40, lr=0.1, device="cpu")
    assert w.shape == (6, 8)
    assert reconstruction_mse(G, w, target, device="cpu").mean() < 0.5 * start.mean()


def test_ksame_cluster_sizes():
    w = np.random.default_rng(0).normal(size=(23, 4))
    cl = ksame_clusters(w, 5)
    assert all(len(c) >= 5 for c in cl) and len(cl) == 4
    assert sorted(np.concatenate(cl).tolist()) == list(range(23))  # every code in exactly one cluster
    assert anchors(w, cl).shape == (4, 4)
    assert np.allclose(anchors(w, cl)[0], w[cl[0]].mean(0))
    assert [len(c) for c in ksame_clusters(w[:3], 5)] == [3]
    assert len(ksame_clusters(w, 1)) == 23


def test_ksame_groups_neighbours():
    w = np.concatenate([np.zeros((3, 2)), np.full((3, 2), 10.0)]) + np.random.default_rng(0).normal(0, 0.1, (6, 2))
    cl = ksame_clusters(w, 3)
    assert sorted(map(sorted, (c.tolist() for c in cl))) == [[0, 1, 2], [3, 4, 5]]


def test_linear_paths():
    s, e = torch.zeros(4, 3), torch.ones(4, 3)
    p = linear_paths(s, e, points=5)
    assert p.shape == (4, 5, 3) and torch.equal(p[:, 0], s) and torch.equal(p[:, -1], e)
    assert torch.allclose(p[:, 2], torch.full((4, 3), 0.5))


def test_plan_walk_keeps_endpoints_and_lowers_the_loss():
    G = _G()
    torch.manual_seed(1)
    phi_id, phi_class = SmallCNN(6, width=4, image_size=16), SmallCNN(2, width=4, image_size=16)
    start, end = torch.randn(3, 8), torch.randn(3, 8)
    labels = torch.tensor([0, 1, 0])
    res = plan_paths(
        G, phi_id, phi_class, start, end, labels, points=6, iters=30, lr=0.05, weight_identity=1.0, device="cpu"
    )
    assert res.paths.shape == (3, 6, 8)
    assert torch.equal(res.paths[:, 0], start) and torch.equal(res.paths[:, -1], end)
    assert res.loss.sum() < res.initial_loss.sum()
    line_loss, _ = path_loss(
        G,
        phi_id,
        phi_class,
        linear_paths(start, end, points=6),
        labels,
        weight_identity=1.0,
        weight_smooth=1.0,
        weight_class=1.0,
    )
    assert torch.allclose(line_loss, res.initial_loss)


def test_anchor_pairs_skip_a_class_short_of_two_anchors_and_name_the_fix_when_none_has_two():
    from node.plan.candidates import anchor_pairs

    # class 0: 7 patients, class 1: 3 patients, two images each
    patients = np.repeat(np.arange(10), 2)
    labels = (patients >= 7).astype(int)
    w = torch.randn(len(patients), 4, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    pairs = anchor_pairs(w, labels, patients.astype(str), k=3, n_paths=4, rng=rng)
    assert pairs.anchors_per_class == {0: 2, 1: 1} and pairs.classes_skipped == [1]
    assert (pairs.labels == 0).all() and len(pairs.start) >= 1
    with pytest.raises(ValueError, match=r"synth.k = 4\); that needs at least 8 .*\(the largest has 7\): add patients"):
        anchor_pairs(w, labels, patients.astype(str), k=4, n_paths=4, rng=rng)


def test_a_class_too_rare_for_a_path_gets_none_and_is_not_called_short_of_anchors():
    from node.plan.candidates import anchor_pairs, choose_pairs

    assert choose_pairs(5, 0, rng=np.random.default_rng(0)).shape == (0, 2)
    # class 1 holds 6 of 66 patients: 2 anchors at k 3, but 1 path in 40 falls to it by its share of
    # the images at most, and with 4 paths none does
    patients = np.arange(66)
    labels = (patients >= 60).astype(int)
    w = torch.randn(len(patients), 4, generator=torch.Generator().manual_seed(0))
    pairs = anchor_pairs(w, labels, patients.astype(str), k=3, n_paths=4, rng=np.random.default_rng(0))
    assert pairs.anchors_per_class == {0: 20, 1: 2} and pairs.classes_skipped == []
    assert len(pairs.start) == 4 and (pairs.labels == 0).all()
