import numpy as np
import pytest
import torch

from common.models import DownstreamCNN
from node.federation.task import (
    balanced_class_weights,
    class_weights_for,
    epochs_for,
    evaluate_classifier,
    site_round_seed,
    train_classifier,
    with_real_share,
)
from node.plan.classifiers import SmallCNN


def _data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (64, 16, 16)).astype(np.uint8)
    y = np.arange(64) % 2
    x[y == 1, 4:12, 4:12] = 250  # a bright square marks class 1
    return x, y.astype(np.int64)


def test_small_cnn_shapes():
    m = SmallCNN(5, width=4, image_size=32)
    x = torch.randn(3, 1, 32, 32)
    assert m.features(x).shape == (3, 16) and m(x).shape == (3, 5)


def test_train_and_evaluate_learns_an_easy_task():
    x, y = _data()
    torch.manual_seed(0)
    m = DownstreamCNN(2, width=4, image_size=16)
    loss = train_classifier(m, x, y, epochs=8, lr=3e-3, batch_size=16, device="cpu", seed=0)
    ev = evaluate_classifier(m, x, y, device="cpu")
    assert loss < 0.5 and ev["accuracy"] > 0.9 and ev["n"] == 64


def test_proximal_term_keeps_weights_near_global():
    x, y = _data()
    torch.manual_seed(0)
    start = DownstreamCNN(2, width=4, image_size=16)
    glob = [p.detach().clone() for p in start.parameters()]
    drift = {}
    for mu in (0.0, 10.0):
        m = DownstreamCNN(2, width=4, image_size=16)
        m.load_state_dict(start.state_dict())
        train_classifier(
            m,
            x,
            y,
            epochs=3,
            lr=3e-3,
            batch_size=16,
            device="cpu",
            seed=0,
            proximal_mu=mu,
            global_params=[g.numpy() for g in glob],
        )
        drift[mu] = sum((p.detach() - g).square().sum().item() for p, g in zip(m.parameters(), glob))
    assert drift[10.0] < drift[0.0]


def test_strong_augmentation_is_seeded_and_changes_more_than_light():
    from node.federation.task import AUGMENTATIONS

    # smooth images, like scans: on white noise any shift changes everything
    x = torch.nn.functional.interpolate(torch.rand(32, 1, 4, 4) * 2 - 1, size=16, mode="bilinear", align_corners=False)
    strong = lambda seed: AUGMENTATIONS["strong"](x, torch.Generator().manual_seed(seed))  # noqa: E731
    light = AUGMENTATIONS["light"](x, torch.Generator().manual_seed(0))
    assert strong(0).shape == x.shape and torch.equal(strong(0), strong(0)) and not torch.equal(strong(0), strong(1))
    assert (strong(0) - x).abs().mean() > 1.5 * (light - x).abs().mean()
    # the occluding square is black (-1), and hits some images but not all
    blacked = ((strong(0) == -1).flatten(1).sum(1) > 0).float().mean()
    assert 0.2 < blacked < 1.0


def test_wide_augmentation_is_seeded_moves_further_and_adds_noise():
    from node.federation.task import AUGMENTATIONS

    x = torch.nn.functional.interpolate(torch.rand(64, 1, 4, 4) * 2 - 1, size=16, mode="bilinear", align_corners=False)
    wide = lambda seed: AUGMENTATIONS["wide"](x, torch.Generator().manual_seed(seed))  # noqa: E731
    strong = AUGMENTATIONS["strong"](x, torch.Generator().manual_seed(0))
    assert wide(0).shape == x.shape and torch.equal(wide(0), wide(0)) and not torch.equal(wide(0), wide(1))
    assert (wide(0) - x).abs().mean() > (strong - x).abs().mean()
    # no occlusion and border-repeating warps: no image gets a patch of pure black
    assert not ((wide(0) == -1).flatten(1).sum(1) > 4).any()
    # on a flat grey image only the noise varies: its typical size (median absolute deviation, which
    # the strong augmentation's occluding squares do not move) is several times the strong one's
    flat = torch.zeros(64, 1, 16, 16)

    def spread(t):
        return (t - t.flatten(1).median(1).values[:, None, None, None]).abs().flatten(1).median(1).values.mean()

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert spread(AUGMENTATIONS["wide"](flat, g())) > 3 * spread(AUGMENTATIONS["strong"](flat, g()))


def test_unknown_augmentation_is_refused():
    x, y = _data()
    m = DownstreamCNN(2, width=4, image_size=16)
    try:
        train_classifier(m, x, y, epochs=1, lr=1e-3, batch_size=16, device="cpu", seed=0, augment="heavy")
    except ValueError as e:
        assert "heavy" in str(e) and "strong" in str(e)
    else:
        raise AssertionError("augment='heavy' was accepted")


def test_sites_holding_the_same_pool_send_different_updates():
    """One seed per site and round: two sites training the same global model on the same data
    must not send the same update (else FedAvg is centralised training), and a rerun repeats."""
    assert site_round_seed("site-a", 1) == site_round_seed("site-a", 1)
    assert len({site_round_seed(s, r) for s in ("site-a", "site-b", "site-c") for r in (1, 2, 3)}) == 9
    x, y = _data()
    torch.manual_seed(0)
    start = DownstreamCNN(2, width=4, image_size=16).state_dict()
    updates = {}
    for site in ("site-a", "site-b", "site-a"):
        m = DownstreamCNN(2, width=4, image_size=16)
        m.load_state_dict(start)
        train_classifier(m, x, y, epochs=1, lr=3e-3, batch_size=16, device="cpu", seed=site_round_seed(site, 1))
        updates.setdefault(site, []).append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(updates["site-a"][0], updates["site-a"][1])
    assert not torch.allclose(updates["site-a"][0], updates["site-b"][0])


def test_small_data_trains_for_at_least_the_minimum_steps():
    # 240 records at batch 16: 15 steps an epoch, so 100 steps need 7 epochs; large data keeps its epochs
    assert epochs_for(240, epochs=2, min_steps=100, batch_size=16) == 7
    assert epochs_for(5000, epochs=2, min_steps=100, batch_size=16) == 2
    assert epochs_for(240, epochs=2, min_steps=0, batch_size=16) == 2
    assert epochs_for(3, epochs=1, min_steps=10, batch_size=16) == 10  # one short batch an epoch


def test_balanced_class_weights_give_each_present_class_the_same_total_weight():
    w = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0, 0.0]))  # 3 x 4/6 = 1 x 2; class 2 is absent
    assert class_weights_for(np.array([0, 1]), 2, "none") is None
    with pytest.raises(ValueError, match="class_weighting"):
        class_weights_for(np.array([0, 1]), 2, "inverse")


def test_balanced_weights_recall_a_minority_class_the_plain_loss_gives_up():
    # one record in ten is class 1, marked by a faint square under heavy noise
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (200, 16, 16)).astype(np.uint8)
    y = (np.arange(200) % 10 == 0).astype(np.int64)
    x[y == 1, 4:12, 4:12] = np.clip(x[y == 1, 4:12, 4:12].astype(int) + 40, 0, 255).astype(np.uint8)
    recall = {}
    for name in ("none", "balanced"):
        torch.manual_seed(0)
        m = DownstreamCNN(2, width=4, image_size=16)
        train_classifier(
            m, x, y, epochs=3, lr=2e-3, batch_size=16, device="cpu", seed=0, class_weights=class_weights_for(y, 2, name)
        )
        recall[name] = evaluate_classifier(m, x, y, device="cpu")["recall-1"]
    assert recall["balanced"] > recall["none"] + 0.3, recall


def test_real_share_repeats_the_real_records_whole_to_at_least_the_share():
    pool = (np.zeros((7, 4, 4), np.uint8), np.zeros(7, np.int64))
    real = (np.arange(3 * 16, dtype=np.uint8).reshape(3, 4, 4), np.array([1, 2, 1]))
    x, y = with_real_share(pool, real, real_share=0.0)  # each record once
    assert len(y) == 10 and y[7:].tolist() == [1, 2, 1]
    for share, repeat in ((0.3, 1), (0.5, 3), (0.75, 7)):
        x, y = with_real_share(pool, real, real_share=share)
        assert len(y) == 7 + 3 * repeat and (y > 0).mean() >= share
        np.testing.assert_array_equal(x[7:], np.concatenate([real[0]] * repeat))  # records and labels stay paired
        assert y[7:].tolist() == [1, 2, 1] * repeat
