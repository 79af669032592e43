"""The CVAE route's generator (node.cvae.generator) and its k-same baseline (node.cvae.ksame)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.config import CvaeConfig
from common.models import CVAE, EmbeddingHead
from node.cvae.checkpoint import load_cvae, save_cvae
from node.cvae.generator import stratified_split, train_cvae
from node.cvae.ksame import ksame_embeddings
from node.cvae.losses import kl_standard_normal, residual_rms
from node.cvae.sampling import sample_cvae, sample_labels
from node.cvae.scaling import fit_minmax, scale, unscale


def _blobs(n: int = 300, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of correlated Gaussian embeddings, class means apart; float32 [n,d], int [n]."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(np.int64)  # imbalanced, 1/3 class 1
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    x = rng.normal(size=(n, d)) @ mix + 3.0 * y[:, None] * np.linspace(-1, 1, d)
    return x.astype(np.float32), y


def test_shapes_and_decoder_range():
    m = CVAE(12, 3, hidden=32, latent=5)
    x, c = torch.rand(7, 12), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0]), 3).float()
    recon, mu, logvar = m(x, c)
    assert recon.shape == (7, 12) and mu.shape == (7, 5) and logvar.shape == (7, 5)
    assert bool(((recon > 0) & (recon < 1)).all())  # sigmoid: the scaled range
    assert [p.shape for p in m.encoder.parameters()] == [(32, 15), (32,), (10, 32), (10,)]
    assert [p.shape for p in m.decoder.parameters()] == [(32, 8), (32,), (12, 32), (12,)]


def test_standard_kl_known_values():
    # KL(N(1,1) || N(0,1)) = 1/2 per dimension
    assert kl_standard_normal(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(2.0)
    # KL(N(0,2) || N(0,1)) = (2 - 1 - ln 2) / 2 per dimension
    assert kl_standard_normal(torch.zeros(1, 3), torch.full((1, 3), math.log(2.0))).item() == pytest.approx(
        1.5 * (1 - math.log(2))
    )
    mu, logvar = torch.randn(5, 6), torch.randn(5, 6)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(1)
    assert torch.allclose(kl_standard_normal(mu, logvar), ref, atol=1e-5)


def test_minmax_round_trip_and_constant_dimension():
    x = torch.tensor([[0.0, 5.0, 2.0], [4.0, 5.0, -2.0], [2.0, 5.0, 0.0]])
    lo, hi = fit_minmax(x)
    s = scale(x, lo, hi)
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0
    assert torch.allclose(unscale(s, lo, hi), x)


def test_stratified_split_keeps_class_shares():
    y = np.array([0] * 80 + [1] * 20)
    tr, va = stratified_split(y, 0.1, seed=3)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
    assert np.bincount(y[va]).tolist() == [8, 2]
    assert np.array_equal(va, stratified_split(y, 0.1, seed=3)[1])


def test_training_lowers_validation_loss_and_restores_the_best_epoch():
    x, y = _blobs()
    cfg = CvaeConfig(hidden=32, latent_dim=4, batch_size=64, max_epochs=40, patience=40)
    r = train_cvae(x, y, n_classes=2, cfg=cfg, seed=0, device="cpu")
    val = [h["val_loss"] for h in r.history]
    assert r.epochs_trained == len(val) == 40
    assert min(val) < 0.6 * val[0]
    assert r.best_val_loss == pytest.approx(min(val)) and val[r.best_epoch - 1] == r.best_val_loss
    assert r.epsilon is None and r.info["n_val"] == 30 and r.info["n_train"] == 270
    # the same seed trains the same model
    r2 = train_cvae(x, y, n_classes=2, cfg=cfg, seed=0, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), r2.model.state_dict().values()))


def test_early_stopping_stops():
    x, y = _blobs()
    cfg = CvaeConfig(hidden=32, latent_dim=4, batch_size=64, max_epochs=200, patience=2, lr=1e-9)
    r = train_cvae(x, y, n_classes=2, cfg=cfg, seed=0, device="cpu")
    assert r.epochs_trained == 3 and r.best_epoch == 1  # nothing learns at lr 1e-9


def test_samples_have_the_requested_classes_and_stay_in_the_train_range():
    x, y = _blobs()
    r = train_cvae(
        x, y, n_classes=2, cfg=CvaeConfig(hidden=32, latent_dim=4, batch_size=64, max_epochs=40), seed=0, device="cpu"
    )
    labels = sample_labels(y, mode="replicate", target_size=0, seed=1)
    assert np.bincount(labels).tolist() == np.bincount(y).tolist()
    assert not np.array_equal(labels, np.sort(labels))  # shuffled
    s = sample_cvae(r, labels, seed=2)
    assert s.shape == x.shape and s.dtype == np.float32
    assert (s >= x.min(0) - 1e-5).all() and (s <= x.max(0) + 1e-5).all()
    assert np.array_equal(s, sample_cvae(r, labels, seed=2)) and not np.array_equal(s, sample_cvae(r, labels, seed=3))
    # conditioning matters: the class means of the samples follow the data's
    gap_real = x[y == 1].mean(0) - x[y == 0].mean(0)
    gap_synth = s[labels == 1].mean(0) - s[labels == 0].mean(0)
    assert np.corrcoef(gap_real, gap_synth)[0, 1] > 0.8


def test_sampling_noise_restores_the_within_class_spread():
    # At the paper's beta the posterior collapses onto a few latent dimensions: decoded means alone
    # are too narrow. The decoder's observation noise (the train RMS reconstruction error) puts the
    # spread back, and clipping keeps every sample inside the train range.
    x, y = _blobs(n=600, d=16)
    r = train_cvae(
        x, y, n_classes=2, cfg=CvaeConfig(hidden=32, latent_dim=8, batch_size=64, max_epochs=60), seed=0, device="cpu"
    )
    xs = scale(torch.from_numpy(x), r.lo, r.hi)
    c = torch.nn.functional.one_hot(torch.from_numpy(y), 2).float()
    assert r.noise_sd.shape == (16,) and bool((r.noise_sd > 0).all())
    assert torch.allclose(r.noise_sd, residual_rms(r.model, xs, c), rtol=0.2)  # over the train split alone
    labels = sample_labels(y, mode="replicate", target_size=0, seed=1)
    means, noisy = sample_cvae(r, labels, seed=2, noise=False), sample_cvae(r, labels, seed=2)
    real_var = np.stack([x[y == k].var(0) for k in (0, 1)])
    ratio = lambda s: np.stack([s[labels == k].var(0) for k in (0, 1)]) / real_var  # noqa: E731
    assert np.median(ratio(means)) < 0.8  # too narrow without the noise
    assert abs(np.log(np.median(ratio(noisy)))) < abs(np.log(np.median(ratio(means))))
    assert (noisy >= x.min(0) - 1e-5).all() and (noisy <= x.max(0) + 1e-5).all()


def test_target_sampling_keeps_the_class_proportions():
    y = np.array([0] * 70 + [1] * 20 + [2] * 10)
    labels = sample_labels(y, mode="target", target_size=33, seed=0)
    assert len(labels) == 33 and np.bincount(labels).tolist() == [23, 7, 3]  # 23.1, 6.6, 3.3
    with pytest.raises(ValueError, match="unknown sampling mode"):
        sample_labels(y, mode="all", target_size=3, seed=0)


def test_dp_reports_the_epsilon_spent_and_fewer_epochs_spend_less():
    x, y = _blobs()
    base = dict(hidden=16, latent_dim=4, batch_size=64, max_epochs=6, dp=True, dp_epsilon=3.0)
    full = train_cvae(x, y, n_classes=2, cfg=CvaeConfig(**base), seed=0, device="cpu")
    assert full.epochs_trained == 6 and full.info["n_val"] == 0  # dp: no validation split by default
    assert full.delta <= 1 / 3000 * (1 + 1e-9)  # at most 1 / (10 N), every record its own patient here
    assert 0 < full.epsilon <= 3.0 and math.isfinite(full.epsilon)
    assert full.epsilon > 2.5  # a full run spends (nearly) what it was calibrated to
    # early stopping (opt-in with dp) after 2 epochs: the same noise, fewer steps, less spent
    short = train_cvae(
        x, y, n_classes=2, seed=0, device="cpu", cfg=CvaeConfig(**base, dp_early_stopping=True, patience=1, lr=1e-9)
    )
    assert short.epochs_trained == 2
    assert short.info["noise_multiplier"] > 0 and any("validation" in c for c in short.info["dp"]["caveats"])
    assert 0 < short.epsilon < full.epsilon


def test_a_dp_plan_split_over_calls_spends_what_one_call_would():
    x, y = _blobs()
    base = dict(hidden=16, latent_dim=4, batch_size=64, max_epochs=4, dp=True, dp_epsilon=3.0)
    whole = train_cvae(x, y, n_classes=2, cfg=CvaeConfig(**base), seed=0, device="cpu")
    first = train_cvae(x, y, n_classes=2, cfg=CvaeConfig(**base), seed=0, device="cpu", epochs=2, dp_plan_epochs=4)
    assert first.info["noise_multiplier"] == pytest.approx(whole.info["noise_multiplier"])
    rest = train_cvae(
        x,
        y,
        n_classes=2,
        cfg=CvaeConfig(**base),
        seed=1,
        device="cpu",
        init=first.model,
        epochs=2,
        dp_history=first.info["dp_history"],
    )
    assert first.epsilon < rest.epsilon == pytest.approx(whole.epsilon, rel=1e-3)
    assert sum(h[2] for h in rest.info["dp_history"]) == whole.info["steps"]


def test_ksame_means_are_class_consistent_and_over_k_rows():
    rng = np.random.default_rng(0)
    k = 3
    # class 0: 4 tight clumps of exactly k rows far apart; class 1: 2 clumps; class 2: fewer than k rows
    centres = rng.normal(size=(6, 5)) * 100
    x = np.concatenate([c + rng.normal(size=(k, 5)) * 0.01 for c in centres] + [rng.normal(size=(2, 5))])
    y = np.array([0] * 4 * k + [1] * 2 * k + [2] * 2)
    xa, ya = ksame_embeddings(x, y, k=k)
    assert ya.tolist() == [0, 0, 0, 0, 1, 1]  # class 2 (2 < k rows) is left out, not released as a mean of 2
    means = x[: 6 * k].reshape(6, k, 5).mean(1)
    for row, c in zip(xa, ya):
        j = int(np.argmin(((means - row) ** 2).sum(1)))
        assert np.allclose(row, means[j], atol=1e-4) and (j < 4) == (c == 0)
    # general data: never more anchors than n_c // k per class
    x2, y2 = rng.normal(size=(50, 4)), rng.integers(0, 2, 50)
    _, ya2 = ksame_embeddings(x2, y2, k=5)
    assert all((ya2 == c).sum() == (y2 == c).sum() // 5 for c in (0, 1))


def test_save_and_load_round_trip(tmp_path):
    x, y = _blobs(n=120)
    r = train_cvae(
        x, y, n_classes=2, cfg=CvaeConfig(hidden=16, latent_dim=3, batch_size=32, max_epochs=3), seed=0, device="cpu"
    )
    save_cvae(tmp_path / "cvae.safetensors", r, sidecar={"route": "cvae"})
    back = load_cvae(tmp_path / "cvae.safetensors")
    labels = np.array([0, 1, 1, 0])
    assert np.array_equal(sample_cvae(r, labels, seed=5), sample_cvae(back, labels, seed=5))
    assert back.epochs_trained == 3 and back.history == r.history
    assert torch.equal(back.noise_sd, r.noise_sd)


def test_a_checkpoint_without_the_noise_scale_is_refused_by_name(tmp_path):
    x, y = _blobs(n=120)
    r = train_cvae(
        x, y, n_classes=2, cfg=CvaeConfig(hidden=16, latent_dim=3, batch_size=32, max_epochs=1), seed=0, device="cpu"
    )
    path = tmp_path / "cvae.safetensors"
    save_cvae(path, r)
    side = json.loads(path.with_suffix(".json").read_text())
    del side["noise_sd"]  # as written before the noise scale was stored
    path.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match=r"cvae.safetensors: .*before the decoder's noise scale.*train --force"):
        load_cvae(path)


def test_embedding_head_linear_and_mlp():
    assert [p.shape for p in EmbeddingHead(8, 3).parameters()] == [(3, 8), (3,)]
    head = EmbeddingHead(8, 3, hidden=16)
    assert list(head.state_dict()) == ["mean", "std", "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert head(torch.randn(5, 8)).shape == (5, 3)
    # the scaler makes a feature with a tiny spread around a large mean look like any other
    x = 5 + 0.01 * torch.randn(100, 8)
    head.fit_scaler(x)
    z = (x - head.mean) / head.std
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-4) and torch.allclose(z.std(0), torch.ones(8), atol=1e-3)


def test_too_few_records_for_a_validation_split_trains_all_epochs():
    x, y = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), np.array([0, 1, 2])
    r = train_cvae(
        x, y, n_classes=3, cfg=CvaeConfig(hidden=8, latent_dim=2, max_epochs=4, patience=1), seed=0, device="cpu"
    )
    assert r.epochs_trained == 4 and r.best_val_loss is None and r.info["n_val"] == 0
    assert all(math.isfinite(h["train_loss"]) for h in r.history)
