"""DP claims of the CVAE route that hold (node.cvae.dp, node.cvae.generator with synth.cvae.dp): per-patient
accounting by group privacy, delta at most 1 / (10 N_patients), scaler bounds and a noise scale
that are DP estimates rather than exact train statistics, and the "dp" block synth.json carries
into the signed audit. Tiny data, few epochs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from common.config import CvaeConfig
from node.cvae import dp as cvae_dp
from node.cvae.dp import dp_block
from node.cvae.generator import CvaeResult, train_cvae
from node.cvae.sampling import sample_cvae, sample_labels


def _blobs(n: int = 300, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of correlated Gaussian embeddings; float32 [n,d], int [n]."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 3 == 0).astype(np.int64)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    x = rng.normal(size=(n, d)) @ mix + 3.0 * y[:, None] * np.linspace(-1, 1, d)
    return x.astype(np.float32), y


def _dp(**kw) -> CvaeConfig:
    return CvaeConfig(
        **{"hidden": 16, "latent_dim": 4, "batch_size": 64, "max_epochs": 4, "dp": True, "dp_epsilon": 3.0, **kw}
    )


# ---------------------------------------------------------------- the plan


def test_group_privacy_is_the_standard_bound_and_the_plan_meets_the_patient_target():
    assert cvae_dp.group_privacy(0.5, 1e-6, 1) == (0.5, 1e-6)
    eps, delta = cvae_dp.group_privacy(0.5, 1e-6, 3)
    assert eps == pytest.approx(1.5) and delta == pytest.approx(3 * math.exp(1.0) * 1e-6)
    groups = np.repeat(np.arange(40), 3)  # 40 patients, 3 records each
    plan = cvae_dp.plan_budget(CvaeConfig(dp=True, dp_epsilon=4.0), groups)
    assert (plan.n_patients, plan.n_records, plan.k) == (40, 120, 3)
    # the per-record targets become the patient-level DP-SGD share by group privacy
    assert cvae_dp.group_privacy(*plan.sgd_record, plan.k) == pytest.approx(plan.sgd)
    # basic composition: the parts sum to the targets
    assert plan.scaler[0] + plan.noise_scale[0] + plan.sgd[0] == pytest.approx(4.0)
    assert plan.scaler[1] + plan.noise_scale[1] + plan.sgd[1] == pytest.approx(plan.delta)
    # public bounds spend nothing on the scaler
    public = cvae_dp.plan_budget(CvaeConfig(dp=True, dp_epsilon=4.0, dp_bounds=[-5.0, 5.0]), groups)
    assert public.scaler == (0.0, 0.0) and public.sgd[0] > plan.sgd[0]


def test_default_delta_is_a_tenth_of_one_over_the_patients_and_a_larger_one_is_refused():
    groups = np.repeat(np.arange(25), 4)  # 25 patients, 100 records
    assert cvae_dp.plan_budget(CvaeConfig(dp=True), groups).delta == pytest.approx(1 / 250)  # not 1 / 100 records
    assert cvae_dp.plan_budget(CvaeConfig(dp=True, dp_delta=1e-4), groups).delta == 1e-4
    with pytest.raises(
        ValueError, match=r"synth\.cvae\.dp_delta = 0\.01 is above 1 / \(10 N\) = 0\.004 .* N = 25 patients"
    ):
        cvae_dp.plan_budget(CvaeConfig(dp=True, dp_delta=0.01), groups)
    x, y = _blobs(n=100)
    with pytest.raises(ValueError, match="dp_delta"):  # train_cvae refuses before training
        train_cvae(x, y, n_classes=2, cfg=_dp(dp_delta=0.01), seed=0, device="cpu", groups=groups)


def test_dp_bounds_config_must_be_an_interval():
    with pytest.raises(ValidationError, match="dp_bounds must be"):
        CvaeConfig(dp_bounds=[1.0, -1.0])
    with pytest.raises(ValidationError, match="dp_bounds must be"):
        CvaeConfig(dp_bounds=[0.0, 1.0, 2.0])


# ---------------------------------------------------------------- mechanisms


def test_analytic_gaussian_sigma():
    # Balle & Wang 2018: eps 1, delta 1e-5 needs sigma ~3.73, below the classical sqrt(2 ln(1.25/delta)) / eps = 4.84
    assert cvae_dp.gaussian_sigma(1.0, 1e-5) == pytest.approx(3.73, abs=0.01)
    assert cvae_dp.gaussian_sigma(0.5, 1e-5) > cvae_dp.gaussian_sigma(1.0, 1e-5) > cvae_dp.gaussian_sigma(1.0, 1e-3)


def test_dp_quantile_and_mean_are_close_with_a_large_budget_and_seeded():
    rng = np.random.default_rng(0)
    v = torch.from_numpy(rng.uniform(1.0, 4.0, 500))
    q = cvae_dp.dp_quantile(v, 0.5, 50.0, torch.Generator().manual_seed(0))
    assert abs(q - float(v.median())) < 0.1
    assert q == cvae_dp.dp_quantile(v, 0.5, 50.0, torch.Generator().manual_seed(0))
    rows = torch.from_numpy(rng.normal(2.0, 1.0, (2000, 8)))
    mean, info = cvae_dp.dp_mean(rows, 20.0, 1e-5, torch.Generator().manual_seed(1))
    assert info["noise_sd"] > 0 and torch.allclose(mean, rows.mean(0), atol=0.2)


def test_patient_means_give_one_row_per_patient():
    v = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    assert torch.allclose(
        cvae_dp.patient_means(v, np.array(["b", "a", "b"])).float(), torch.tensor([[3.0, 2.0], [3.0, 2.5]])
    )


# ---------------------------------------------------------------- training


def test_per_patient_accounting_raises_the_noise_to_meet_the_same_patient_target():
    x, y = _blobs()
    single = train_cvae(x, y, n_classes=2, cfg=_dp(), seed=0, device="cpu")  # no ids: every record its own patient
    grouped = train_cvae(x, y, n_classes=2, cfg=_dp(), seed=0, device="cpu", groups=np.arange(300) // 3)
    a, b = single.info["dp"], grouped.info["dp"]
    assert a["unit"] == b["unit"] == "patient" and a["group_size_k"] == 1 and b["group_size_k"] == 3
    assert (a["n_patients"], b["n_patients"]) == (300, 100)
    assert b["budget"]["sgd"]["noise_multiplier"] > 1.5 * a["budget"]["sgd"]["noise_multiplier"]
    for r, d in ((single, a), (grouped, b)):
        assert r.epsilon == d["epsilon"] and r.delta == d["delta"]
        assert 0.85 * 3.0 < r.epsilon <= 3.0 * 1.01  # each spends (nearly) the patient-level target
        assert r.delta <= d["target"]["delta"] * 1.01 and d["target"]["delta"] == pytest.approx(
            1 / (10 * d["n_patients"])
        )
    # per record, the grouped run spends a third, so that k records of a patient spend the target
    assert b["budget"]["sgd"]["epsilon_per_record"] == pytest.approx(b["budget"]["sgd"]["epsilon"] / 3)
    assert b["budget"]["sgd"]["epsilon_per_record"] < a["budget"]["sgd"]["epsilon_per_record"]


def test_dp_bounds_and_samples_do_not_reveal_train_extremes():
    x, y = _blobs()
    r = train_cvae(x, y, n_classes=2, cfg=_dp(dp_epsilon=10.0), seed=0, device="cpu")
    lo, hi = r.lo.numpy(), r.hi.numpy()
    assert not np.isin(lo, x).any() and not np.isin(hi, x).any()  # no bound is a record's value
    assert (lo < x.max(0)).all() and (hi > x.min(0)).all() and (hi > lo).all()
    assert "DP centre" in r.info["dp"]["budget"]["scaler"]["mechanism"]
    assert r.info["dp"]["budget"]["noise_scale"]["epsilon"] > 0 and bool((r.noise_sd > 0).all())
    s = sample_cvae(r, sample_labels(y, mode="replicate", target_size=0, seed=1), seed=2)
    assert not np.isin(s, x.min(0)).any() and not np.isin(s, x.max(0)).any()
    assert (s >= lo - 1e-5).all() and (s <= hi + 1e-5).all()  # clipped into the DP bounds, not the train range
    # without dp nothing changes: the exact train range
    plain = train_cvae(
        x, y, n_classes=2, cfg=CvaeConfig(hidden=16, latent_dim=4, batch_size=64, max_epochs=2), seed=0, device="cpu"
    )
    assert np.array_equal(plain.lo.numpy(), x.min(0)) and plain.info["dp"] == {"enabled": False}


def test_public_bounds_clip_the_records_and_are_named_in_the_caveats():
    x, y = _blobs(n=120)
    r = train_cvae(x, y, n_classes=2, cfg=_dp(max_epochs=2, dp_bounds=[-2.0, 2.0]), seed=0, device="cpu")
    assert torch.equal(r.lo, torch.full((12,), -2.0)) and torch.equal(r.hi, torch.full((12,), 2.0))
    assert r.info["dp"]["budget"]["scaler"]["epsilon"] == 0.0
    assert any("dp_bounds [-2.0, 2.0] are assumed public" in c for c in r.info["dp"]["caveats"])
    s = sample_cvae(r, np.array([0, 1] * 50), seed=0)
    assert s.min() >= -2.0 and s.max() <= 2.0


def test_dp_block_without_dp_and_for_a_model_from_before_per_patient_accounting():
    m = CvaeResult(model=None, lo=torch.zeros(1), hi=torch.ones(1), epochs_trained=1, best_epoch=1, best_val_loss=None)
    assert dp_block(m) == {"enabled": False}
    old = CvaeResult(
        model=None,
        lo=torch.zeros(1),
        hi=torch.ones(1),
        epochs_trained=1,
        best_epoch=1,
        best_val_loss=None,
        epsilon=2.0,
        delta=1e-3,
        info={"dp": True, "dp_caveats": ["the scaler is not DP"]},
    )
    block = dp_block(old)
    assert block["unit"] == "record" and block["epsilon"] == 2.0 and "the scaler is not DP" in block["caveats"]


# ---------------------------------------------------------------- synthesis


def test_synth_json_carries_the_dp_block_with_its_caveats(tiny_workspace):
    from common.config import commented_yaml, load_site_config
    from common.fileio import atomic_write_text
    from node.stages import run_one, run_pipeline

    ws = tiny_workspace
    cfg = load_site_config(ws.config_path)
    cfg.synth.route = "cvae"
    cfg.synth.cvae = CvaeConfig(dp=True, dp_epsilon=4.0, max_epochs=2, hidden=16, latent_dim=4)
    atomic_write_text(ws.config_path, commented_yaml(cfg, title="cvae, dp"))
    run_pipeline(ws, upto="train")
    assert run_one(ws, "synthesize")
    run = json.loads((ws.synth / "latest.json").read_text())["run_id"]
    synth = json.loads((ws.synth / run / "synth.json").read_text())
    dp = synth["dp"]
    assert dp["enabled"] and dp["unit"] == "patient" and dp["group_size_k"] == 3  # the phantom's 3 images per patient
    assert synth["dp_epsilon"] == dp["epsilon"] <= 4.0 * 1.01 and synth["dp_delta"] == dp["delta"]
    assert dp["target"]["delta"] == pytest.approx(1 / (10 * dp["n_patients"]))
    assert set(dp["budget"]) == {"scaler", "noise_scale", "sgd"} and dp["accountant"] == "prv"
    assert dp["composition"].startswith("basic")
    caveats = " ".join(dp["caveats"])
    for what in ("secure_mode off", "models.seed", "patient ids", "class counts"):
        assert what in caveats
