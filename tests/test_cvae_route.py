"""The CVAE route through the node and the coordinator: the embedding audit's calibration, the
route-aware policy, embedding bundles published and refused by route and extractor, the stages
on a phantom site. Fast (no processes)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from common.bundle import build_bundle, pack_bundle
from common.config import ExtractorConfig, PolicyConfig
from common.models import EmbeddingHead
from common.policy import evaluate
from node.audit.embeddings import audit_embeddings
from node.federation.task import train_classifier
from tests.helpers_exchange import PASSED_AUDIT, site_key

D = 16


def _patients(n: int, *, seed: int, per: int = 3, centres: np.ndarray | None = None):
    """Embeddings of `n` patients, `per` records each, around per-patient centres (two classes
    shifted apart): (x float32 [n*per,D], labels, patient ids)."""
    rng = np.random.default_rng(seed)
    y_pat = np.arange(n) % 2
    c = rng.normal(0, 1, (n, D)) + 1.5 * y_pat[:, None] if centres is None else centres
    x = np.repeat(c, per, 0) + rng.normal(0, 0.3, (n * per, D))
    return x.astype(np.float32), np.repeat(y_pat, per), np.repeat([f"p{seed}-{i}" for i in range(n)], per)


def _reid(x, ids, hidden, seed):
    uniq, lab = np.unique(ids, return_inverse=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = EmbeddingHead(D, len(uniq), hidden=hidden).fit_scaler(torch.from_numpy(x))
    train_classifier(m, x, lab, epochs=60, lr=3e-3, batch_size=32, device="cpu", seed=seed, augment="none")
    return m


@pytest.fixture(scope="module")
def clinic():
    # 60 holdout patients: 30 calibrate the filter, 30 measure the set
    t, h, f = _patients(40, seed=1), _patients(60, seed=2), _patients(40, seed=3)
    return {"t": t, "h": h, "f": f, "phi_id": _reid(t[0], t[2], 32, 0), "att": _reid(t[0], t[2], 48, 1)}


def _audit(clinic, cand, labels, **policy):
    t, h = clinic["t"], clinic["h"]
    return audit_embeddings(
        cand,
        t[0],
        h[0],
        phi_id=clinic["phi_id"],
        attacker=clinic["att"],
        policy=PolicyConfig(**policy),
        device="cpu",
        train_ids=t[2],
        holdout_ids=h[2],
        candidate_labels=labels,
        train_labels=t[1],
        holdout_labels=h[1],
        n_boot=20,
        downstream_epochs=5,
    )


def test_leaky_embeddings_fail_and_fresh_records_pass(clinic):
    t, f = clinic["t"], clinic["f"]
    leaky = t[0] + np.random.default_rng(9).normal(0, 0.01, t[0].shape).astype(np.float32)
    report, accepted = _audit(clinic, leaky, t[1], min_accepted=10)
    # every copy is far closer to its source than any real non-member is to a train record
    assert report["route"] == "cvae" and report["dropped"]["too_close"] == len(leaky) and not accepted.any()
    assert not report["passed"] and report["candidates"]["membership"]["embedding"]["auc"] > 0.9
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert "n_accepted" in failed and "min_pixel_mse_to_train" not in {c["name"] for c in report["checks"]}

    # a loose policy: 40 patients of 3 tightly clustered records leave wide intervals (upper bounds are gated)
    fresh, _ = _audit(clinic, f[0], f[1], min_accepted=10, max_mia_auc=0.8, max_tpr_at_low_fpr=0.4)
    assert fresh["passed"], fresh["checks"]
    assert 0.3 < fresh["membership"]["embedding"]["auc"] < 0.7
    assert fresh["min_embedding_distance_ratio"] >= 0.5


def test_policy_checks_the_route_s_own_per_sample_distance():
    cvae = {**PASSED_AUDIT, "route": "cvae", "min_embedding_distance_ratio": 0.3}
    checks = {c["name"]: c for c in evaluate(cvae, PolicyConfig())}
    assert "min_pixel_mse_to_train" not in checks
    assert not checks["min_embedding_distance_ratio"]["passed"]
    assert "0.3 < min 0.5" in checks["min_embedding_distance_ratio"]["message"]
    assert "min_pixel_mse_to_train" in {c["name"] for c in evaluate(PASSED_AUDIT, PolicyConfig())}
    assert PolicyConfig(min_embedding_distance_ratio=0.2).stricter(PolicyConfig()).min_embedding_distance_ratio == 0.5


def _embedding_bundle(tmp_path, priv, *, sequence: int, extractor: ExtractorConfig):
    x = np.random.default_rng(sequence).normal(size=(20, D)).astype(np.float32)
    audit = {**PASSED_AUDIT, "route": "cvae", "min_embedding_distance_ratio": 0.9}
    bid = build_bundle(
        tmp_path / f"b{sequence}",
        embeddings=x,
        labels=np.arange(20) % 2,
        audit=audit,
        datacard={"route": "cvae", "extractor": extractor.model_dump(mode="json")},
        site="a",
        sequence=sequence,
        signing_key=priv,
        config_digest="0" * 64,
    )
    return pack_bundle(tmp_path / f"b{sequence}" / bid)


def test_store_refuses_the_other_route_and_another_extractor(tmp_path):
    from server.store import BundleStore, StoreRefused

    priv, pub = site_key(tmp_path, "a")
    pinned = ExtractorConfig(seed=0)
    plan_store = BundleStore(tmp_path / "plan", route="plan")
    with pytest.raises(StoreRefused) as e:
        plan_store.put(_embedding_bundle(tmp_path, priv, sequence=1, extractor=pinned), verify={"a": [pub]})
    assert e.value.reason == "policy" and "'cvae'-route" in str(e.value) and plan_store.list() == []

    store = BundleStore(tmp_path / "cvae", route="cvae", extractor=pinned.model_dump(mode="json"))
    with pytest.raises(StoreRefused) as e:
        store.put(_embedding_bundle(tmp_path, priv, sequence=2, extractor=ExtractorConfig(seed=7)), verify={"a": [pub]})
    assert "extractor" in str(e.value) and store.list() == []
    rec = store.put(_embedding_bundle(tmp_path, priv, sequence=3, extractor=pinned), verify={"a": [pub]})
    assert rec.sequence == 3 and len(store.list()) == 1


def test_publish_reads_an_accepted_embedding_set(tmp_path):
    from node.release.publish import PublishError, accepted_digest, load_accepted

    x, y = np.ones((4, D), np.float32), np.array([0, 1, 0, 1])
    buf = io.BytesIO()
    np.savez(buf, embeddings=x, labels=y)
    (tmp_path / "ok.npz").write_bytes(buf.getvalue())
    data, labels = load_accepted(tmp_path / "ok.npz")
    assert data.dtype == np.float32 and labels.tolist() == [0, 1, 0, 1]
    assert accepted_digest(data, labels) != accepted_digest(data.astype(np.float64), labels)
    buf = io.BytesIO()
    np.savez(buf, embeddings=x.astype(np.float64), labels=y)
    (tmp_path / "bad.npz").write_bytes(buf.getvalue())
    with pytest.raises(PublishError, match="float32"):
        load_accepted(tmp_path / "bad.npz")


def test_cvae_stages_on_a_phantom_site(tiny_workspace):
    """ingest -> train -> synthesize -> audit -> local_only with synth.route cvae, through the ledger."""
    from common.config import commented_yaml, load_site_config
    from common.fileio import atomic_write_text
    from node.stages import run_pipeline

    ws = tiny_workspace
    cfg = load_site_config(ws.config_path)
    cfg.synth.route = "cvae"
    cfg.synth.cvae.max_epochs = 30
    atomic_write_text(ws.config_path, commented_yaml(cfg, title="cvae"))
    ran = run_pipeline(ws)
    assert all(ran.values())
    assert sorted(p.name for p in ws.models.glob("*.safetensors")) == [
        "cvae.safetensors",
        "phi_attack.safetensors",
        "phi_id.safetensors",
    ]
    run = json.loads((ws.synth / "latest.json").read_text())["run_id"]
    with np.load(ws.synth / run / "candidates.npz") as z:
        assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape[1] == 128 and "images" not in z.files
    audit = json.loads((ws.synth / run / "audit.json").read_text())
    assert audit["route"] == "cvae" and "embedding" in audit["membership"]
    local = json.loads((ws.reports / "local_only.json").read_text())
    assert local["route"] == "cvae" and 0 <= local["test_accuracy"] <= 1
    assert not any(run_pipeline(ws).values())  # up to date: nothing reruns
