"""The audit in depth (issue 4): exact LPIPS as matrix products, the model store, calibration of
the attacks (a leaky set must fail, fresh real images must pass), the policy as a pure function
and the coordinator's floor check.

LPIPS tests use a randomly initialised AlexNet backbone (`pnet_rand=True`) with the lpips
package's own linear weights: enough to test that the matrix form is exact, not a perceptual
metric. Nothing here downloads."""

import json
import time

import numpy as np
import pytest
import torch

from common.config import PolicyConfig
from common.metrics import roc_auc
from common.modelstore import ModelStoreError, resolve
from common.policy import check_audit, evaluate
from node.audit.attacks import bootstrap_ci, density_ratio_scores, discriminator_scores, roc_points
from node.audit.images import audit_images
from node.audit.lpips_matrix import build_lpips, lpips_features, lpips_nearest, lpips_pairwise, prepare
from node.audit.report import render
from node.plan.classifiers import SmallCNN
from node.site.phantom import make_phantom


@pytest.fixture(scope="module")
def lpips_random():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_lpips("alex", random_backbone=True)


def test_lpips_matrix_equals_pairwise_calls(lpips_random):
    x, _, _ = make_phantom(n_patients=6, images_per_patient=3, n_classes=2, size=32, seed=3)
    rng = np.random.default_rng(0)
    q = np.concatenate(
        [x[:8], np.clip(x[8:10].astype(int) + rng.integers(-3, 4, x[8:10].shape), 0, 255).astype(np.uint8)]
    )
    r = x[8:]  # includes the originals of the two near-copies
    # the package's own forward on every (q_i, r_j) pair (one pair per batch row)
    ii, jj = np.meshgrid(np.arange(len(q)), np.arange(len(r)), indexing="ij")
    pw = lpips_pairwise(lpips_random, q[ii.ravel()], r[jj.ravel()]).reshape(len(q), len(r))
    assert pw[0, 1] == pytest.approx(lpips_pairwise(lpips_random, q[:1], r[1:2])[0], abs=1e-6)
    qf, rf = lpips_features(lpips_random, prepare(q)), lpips_features(lpips_random, prepare(r))
    matrix = ((qf[:, None].double() - rf[None].double()) ** 2).sum(-1).numpy()
    assert np.abs(matrix - pw).max() < 1e-4
    assert pw.max() - pw.min() > 1e-3  # the comparison is not between constants
    # the chunked, blocked nearest-neighbour path agrees too (blocks smaller than the reference set)
    d, j = lpips_nearest(lpips_random, q, r, ref_block=3, chunk=4)
    assert np.abs(d - pw.min(1)).max() < 1e-4 and np.array_equal(j, pw.argmin(1))
    assert d[-2:].max() < np.sort(pw[:8], 1)[:, 0].min()  # near-copies are the closest pairs


def test_model_store_names_file_digest_and_folder(tmp_path):
    with pytest.raises(ModelStoreError) as e:
        resolve("7be5be79", store_dir=tmp_path, name="alexnet-owt-7be5be79.pth", source="https://example/alex.pth")
    msg = str(e.value)
    assert (
        "alexnet-owt-7be5be79.pth" in msg
        and "7be5be79" in msg
        and str(tmp_path) in msg
        and "nothing is downloaded" in msg
    )
    (tmp_path / "w.bin").write_bytes(b"weights")
    import hashlib

    sha = hashlib.sha256(b"weights").hexdigest()
    assert resolve(sha, store_dir=tmp_path, name="w.bin") == tmp_path / "w.bin"
    with pytest.raises(ModelStoreError, match="expected"):
        resolve("0" * 64, store_dir=tmp_path, name="w.bin")
    t0 = time.monotonic()
    with pytest.raises(ModelStoreError):  # the real pinned backbone is absent: fails at once
        build_lpips("alex", store_dir=tmp_path)
    assert time.monotonic() - t0 < 5


def test_lpips_backbone_loads_from_store(tmp_path, lpips_random):
    """A torchvision-format AlexNet checkpoint in the store is loaded into the LPIPS trunk. The
    real file cannot be fetched here, so the pin is pointed at a file written by the test."""
    import torchvision

    from node.audit import lpips_matrix

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        state = torchvision.models.alexnet().state_dict()
    path = tmp_path / "alex.pth"
    torch.save(state, path)
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    old = lpips_matrix.BACKBONES["alex"]
    lpips_matrix.BACKBONES["alex"] = ("alex.pth", sha, "test")
    try:
        m = build_lpips("alex", store_dir=tmp_path)
    finally:
        lpips_matrix.BACKBONES["alex"] = old
    assert torch.equal(getattr(m.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(m.net.slice5, "10").bias, state["features.10.bias"])


# ---------------------------------------------------------------- calibration


@pytest.fixture(scope="module")
def clinic():
    """One phantom clinic at 16x16: 60 train patients, 200 holdout, 60 fresh (in neither), 3 images
    each. The audit measures the set on half of the holdout (100 patients, the size the default
    policy's upper bounds are set for) and gates the upper ends of 95% intervals: at 60 patients
    a chance set's two-sided AUC reached 0.656 > 0.65 for want of evidence."""
    x, y, p = make_phantom(n_patients=320, images_per_patient=3, n_classes=2, size=16, seed=9)
    pid = np.unique(p, return_inverse=True)[1]
    tr, ho, fr = pid < 60, (pid >= 60) & (pid < 260), pid >= 260
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        phi_id, att = SmallCNN(60, width=4, image_size=16), SmallCNN(60, width=6, image_size=16)
    return {
        "t": (x[tr], y[tr], p[tr]),
        "h": (x[ho], y[ho], p[ho]),
        "f": (x[fr], y[fr], p[fr]),
        "phi_id": phi_id,
        "att": att,
    }


def _audit(c, cand, labels, policy, **kw):
    (xt, yt, pt), (xh, yh, ph) = c["t"], c["h"]
    return audit_images(
        cand,
        xt,
        xh,
        phi_id=c["phi_id"],
        attacker=c["att"],
        policy=policy,
        device="cpu",
        train_ids=pt,
        holdout_ids=ph,
        candidate_labels=labels,
        train_labels=yt,
        holdout_labels=yh,
        n_boot=50,
        downstream_epochs=1,
        **kw,
    )


def test_leaky_set_fails_with_high_auc(clinic):
    xt, yt, _ = clinic["t"]
    rng = np.random.default_rng(1)
    leaky = np.clip(xt.astype(int) + rng.integers(-4, 5, xt.shape), 0, 255).astype(np.uint8)
    # the per-sample filter off, so the set-level attacks must see the leak by themselves
    report, _ = _audit(clinic, leaky, yt, PolicyConfig(min_pixel_distance=0.0, copy_fpr=0, min_accepted=1))
    assert not report["passed"]
    assert report["membership"]["pixel"]["auc"] >= 0.9 and report["mia_auc"] >= 0.9
    assert report["tpr_at_low_fpr"] > 0.5 and report["mia_auc_two_sided"] >= report["mia_auc"]
    failed = {c["name"]: c for c in report["checks"] if not c["passed"]}
    assert "mia_auc_upper" in failed and "by" in failed["mia_auc_upper"]["message"]
    # with the default filter every copy is dropped and the gate fails on the set size
    report, accepted = _audit(clinic, leaky, yt, PolicyConfig())
    assert not accepted.any() and not report["passed"]


def test_fresh_real_images_pass_with_chance_auc(clinic):
    xf, yf, _ = clinic["f"]
    details = {}
    report, accepted = _audit(clinic, xf, yf, PolicyConfig(max_reid_rate=0.2), details=details)
    assert report["passed"], [c["message"] for c in report["checks"] if not c["passed"]]
    for space, m in report["membership"].items():
        assert 0.4 <= m["auc"] <= 0.6 and not m["degenerate"], (space, m["auc"])
        lo, hi = m["auc_ci"]
        assert lo <= m["auc"] <= hi and hi - lo < 0.4
    for name in ("density_ratio", "downstream_loss"):
        assert 0.35 <= report["attacks"][name]["auc"] <= 0.65, (name, report["attacks"][name]["auc"])
    assert set(report["reid"]) == {"phi_id", "attacker"} and report["reid"]["attacker"]["rate_ci"][0] is not None
    assert report["lpips"] == {"available": False, "reason": None}
    page = render(json.loads(json.dumps(report)), details, images=(xf, clinic["t"][0]))
    assert (
        "<svg" in page
        and "data:image/png;base64," in page
        and "PASSED" in page
        and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    )


def test_lpips_space_in_the_audit(clinic, lpips_random):
    xt, yt, _ = clinic["t"]
    cand = np.concatenate([clinic["f"][0][:20], xt[:4]])
    report, _ = _audit(
        clinic,
        cand,
        np.concatenate([clinic["f"][1][:20], yt[:4]]),
        PolicyConfig(min_pixel_distance=0.0, copy_fpr=0, min_accepted=1, min_mmL=1e-6),
        lpips_model=lpips_random,
    )
    assert report["lpips"]["available"] and "lpips" in report["membership"]
    assert report["min_lpips_to_train"] == pytest.approx(0.0, abs=1e-5)  # exact copies are in the set
    assert report["mmL"] > 0 and {c["name"] for c in report["checks"]} >= {"mmL"}


# ---------------------------------------------------------------- pieces


def test_lpips_space_gives_the_same_answers_with_and_without_its_feature_cache(clinic, lpips_random):
    from node.audit.images import lpips_space

    xs, xt, xh = clinic["f"][0][:12], clinic["t"][0][:10], clinic["h"][0][:8]
    cached = lpips_space(lpips_random, (xs, xt, xh))  # a few images: always within a third of the RAM
    recomputed = lpips_space(lpips_random, (xs, xt, xh), max_bytes=0)  # every query runs lpips_nearest
    for a, b, ia, ib in (("s", "t", [0, 3, 5], np.arange(10)), ("h", "s", np.arange(8), [1, 2, 11])):
        (d1, j1), (d2, j2) = cached(a, b, np.array(ia), np.array(ib)), recomputed(a, b, np.array(ia), np.array(ib))
        assert np.array_equal(j1, j2) and np.abs(d1 - d2).max() < 1e-4 and d1.min() > 0


def test_remembered_rows_are_searched_once_and_answer_as_a_fresh_search():
    from node.audit.figures import memo_rows, space_fn

    rng = np.random.default_rng(0)
    feats = tuple(torch.from_numpy(rng.normal(size=(n, 6)).astype(np.float32)) for n in (30, 20, 10))
    plain, asked = space_fn(feats), []

    def counted(a, b, ia, ib):
        asked.append((a, b, len(ia)))
        return plain(a, b, ia, ib)

    nn = memo_rows(counted)
    ib = np.arange(0, 20, 2)
    for ia in (np.array([3, 7, 1]), np.array([29, 1, 3, 0, 7]), np.arange(30)[::-1].copy(), np.array([5, 5, 2])):
        d, j = nn("s", "t", ia, ib)
        d0, j0 = plain("s", "t", ia, ib)
        assert np.array_equal(d, d0) and np.array_equal(j, j0) and d.dtype == d0.dtype
    # 3 rows, then the 2 new ones, then the 25 left; the last query was all known
    assert asked == [("s", "t", 3), ("s", "t", 2), ("s", "t", 25)]
    nn("s", "t", np.array([3]), np.arange(20))  # other references: searched afresh
    nn("t", "s", np.array([3]), ib)  # another direction too
    assert asked[3:] == [("s", "t", 1), ("t", "s", 1)]


def test_density_ratio_detects_a_set_concentrated_on_members():
    rng = np.random.default_rng(0)
    t, h, ref = rng.normal(size=(150, 5)), rng.normal(size=(150, 5)), rng.normal(size=(150, 5))
    leak = t + 0.05 * rng.normal(size=t.shape)
    pos, neg = density_ratio_scores(leak, t, h, reference=ref)
    # Scott's-rule KDEs are smooth: copies show, but less sharply than to a nearest-neighbour attack (0.79 here)
    assert roc_auc(pos, neg) > 0.75
    fresh = rng.normal(size=(150, 5))
    pos, neg = density_ratio_scores(fresh, t, h, reference=ref)
    assert 0.3 < roc_auc(pos, neg) < 0.7


def test_discriminator_scores_do_not_depend_on_batch_company():
    from node.plan.gan import Discriminator

    torch.manual_seed(0)
    D = Discriminator(image_size=16, channels=32)
    x = np.random.default_rng(0).integers(0, 255, (10, 16, 16), dtype=np.uint8)
    ctx = x[7:]
    a = discriminator_scores(D, x[:6], ctx, batch_size=4)
    b = discriminator_scores(D, x[:6][::-1], ctx, batch_size=6)[::-1]
    assert np.allclose(a, b, atol=1e-5)


def test_roc_points_and_bootstrap():
    r = roc_points(np.array([3.0, 2.0]), np.array([1.0, 0.0]))
    assert r["fpr"][0] == 0 and r["tpr"][-1] == 1 and (0.0, 1.0) in set(zip(r["fpr"], r["tpr"]))
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    lo, hi = bootstrap_ci(np.mean, [(a, np.arange(400))], n=200)
    assert lo < a.mean() < hi and 0.1 < hi - lo < 0.3  # ~ 4 standard errors of 0.05
    # resampling by groups widens the interval when records of a group are alike
    g = np.repeat(np.arange(40), 10)
    b = np.repeat(rng.normal(size=40), 10)
    lo2, hi2 = bootstrap_ci(np.mean, [(b, g)], n=200)
    lo3, hi3 = bootstrap_ci(np.mean, [(b, np.arange(400))], n=200)
    assert hi2 - lo2 > 2 * (hi3 - lo3)


def test_policy_checks_say_by_how_much_and_federation_floor():
    audit = {
        "passed": True,
        "mia_auc_upper": 0.8,
        "mia_auc_two_sided_upper": 0.6,
        "tpr_at_low_fpr_upper": 0.05,
        "reid_rate_upper": 0.02,
        "closer_to_train_upper": 0.5,
        "n_degenerate": 0,
        "n_accepted": 100,
        "min_pixel_mse_to_train": 0.01,
        "mmL": None,
        "dp_epsilon": None,
        "policy": {"copy_fpr": 0.02},
    }
    fails = check_audit(audit, PolicyConfig(max_mia_auc=0.75))
    assert fails == ["mia_auc_upper 0.8 > max 0.75 (by 0.05)"]
    # members given away by being the ones nothing resembles (AUC 0.2, two-sided 0.8) fail too
    assert check_audit(
        {**audit, "mia_auc_upper": 0.3, "mia_auc_two_sided_upper": 0.8}, PolicyConfig(max_mia_auc=0.75)
    ) == ["mia_auc_two_sided_upper 0.8 > max 0.75 (by 0.05)"]
    ok = {**audit, "mia_auc_upper": 0.6}
    assert check_audit(ok, PolicyConfig()) == []
    # a degenerate attack space, or a copy detector run laxer than the floor, fails whatever the figures
    assert check_audit({**ok, "n_degenerate": 1}, PolicyConfig()) == ["n_degenerate 1 > max 0 (by 1)"]
    assert check_audit({**ok, "policy": {"copy_fpr": 0.0}}, PolicyConfig()) == [
        "audit ran its copy detector at copy_fpr 0.0 below the floor's 0.02"
    ]
    assert any("mmL not evaluated" in f for f in check_audit(ok, PolicyConfig(min_mmL=0.1)))
    eps = check_audit({**ok, "dp_epsilon": 8.0}, PolicyConfig(max_dp_epsilon=4.0))
    assert eps == ["dp_epsilon 8 > max 4 (by 4)"]
    # point estimates alone (an audit from before upper bounds were gated) are refused
    assert check_audit(
        {"passed": True, "mia_auc": 0.5, "n_accepted": 100, "policy": {"copy_fpr": 0.02}}, PolicyConfig()
    )
    site = PolicyConfig(max_mia_auc=0.9, max_tpr_at_low_fpr=0.1, copy_fpr=0.01, max_attempts=5)
    floor = PolicyConfig(max_mia_auc=0.7, max_dp_epsilon=3.0, copy_fpr=0.05, max_attempts=2)
    both = site.stricter(floor)
    assert both.max_mia_auc == 0.7 and both.max_tpr_at_low_fpr == 0.1 and both.max_dp_epsilon == 3.0
    assert both.copy_fpr == 0.05 and both.max_attempts == 2
    assert {c["name"] for c in evaluate(audit, both)} >= {
        "mia_auc_upper",
        "tpr_at_low_fpr_upper",
        "n_degenerate",
        "min_pixel_mse_to_train",
    }


def test_store_refuses_bundle_under_the_federation_floor(tmp_path):
    from server.store import BundleStore, StoreRefused
    from tests.helpers_exchange import make_bundle, site_key

    priv, pub = site_key(tmp_path, "a")
    good = {
        "passed": True,
        "mia_auc_upper": 0.6,
        "mia_auc_two_sided_upper": 0.6,
        "tpr_at_low_fpr_upper": 0.05,
        "reid_rate_upper": 0.02,
        "closer_to_train_upper": 0.5,
        "n_degenerate": 0,
        "n_accepted": 12,
        "min_pixel_mse_to_train": 0.01,
        "policy": {"copy_fpr": 0.02},
    }
    floor = PolicyConfig(min_accepted=10, max_mia_auc=0.65)
    store = BundleStore(tmp_path / "store", policy=floor)
    lax = make_bundle(tmp_path / "b1", priv, sequence=1, audit={**good, "mia_auc_upper": 0.7})
    with pytest.raises(StoreRefused) as e:
        store.put(lax, verify={"a": [pub]})
    assert e.value.reason == "policy" and "mia_auc_upper 0.7 > max 0.65" in str(e.value)
    assert store.list() == []
    rec = store.put(make_bundle(tmp_path / "b2", priv, sequence=2, audit=good), verify={"a": [pub]})
    assert rec.sequence == 2 and len(store.list()) == 1


BREAST = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "breastmnist.npz"


@pytest.mark.skipif(
    not BREAST.exists(), reason=f"{BREAST} absent (the shared MedMNIST data is not part of a fresh clone)"
)
def test_calibration_on_breastmnist():
    """Real ultrasound images (every image its own identity): unseen images of the same pool pass
    at chance AUC, noisy copies of train images fail."""
    with np.load(BREAST) as z:
        x, y = z["train_images"], z["train_labels"][:, 0].astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    ti, hi, fi = perm[:200], perm[200:400], perm[400:]  # train, holdout, fresh: one pool, split at random
    ids = np.array([f"b{i}" for i in range(len(x))])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        phi_id, att = SmallCNN(200, width=4, image_size=28), SmallCNN(200, width=6, image_size=28)
    kw = dict(
        phi_id=phi_id,
        attacker=att,
        device="cpu",
        train_ids=ids[ti],
        holdout_ids=ids[hi],
        train_labels=y[ti],
        holdout_labels=y[hi],
        n_boot=50,
        downstream_epochs=1,
    )
    fresh, _ = audit_images(x[fi], x[ti], x[hi], policy=PolicyConfig(), candidate_labels=y[fi], **kw)
    assert fresh["passed"], [c["message"] for c in fresh["checks"] if not c["passed"]]
    # BUSI has several images per patient and MedMNIST splits by image, so some unseen images are
    # near-copies of train images: the copy criteria drop them, and the rest stays near chance
    assert fresh["dropped"]["either"] > 0 and sum(fresh["calibration"]["copy_calibration_flagged"].values()) > 0
    assert all(0.35 <= m["auc"] <= 0.65 for m in fresh["membership"].values()), fresh["membership"]
    rng = np.random.default_rng(1)
    leaky = np.clip(x[ti].astype(int) + rng.integers(-4, 5, (200, 28, 28)), 0, 255).astype(np.uint8)
    leak, _ = audit_images(
        leaky, x[ti], x[hi], policy=PolicyConfig(min_pixel_distance=0.0, copy_fpr=0), candidate_labels=y[ti], **kw
    )
    assert not leak["passed"] and leak["membership"]["pixel"]["auc"] >= 0.9
