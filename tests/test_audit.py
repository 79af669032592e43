import numpy as np
import pytest
import torch

from common.config import PolicyConfig
from common.metrics import roc_auc
from node.audit.distances import min_pixel_mse, min_sq_dist, nearest_sq_screened
from node.audit.figures import membership_attack, nearest_record, reid_rate, reid_threshold, tpr_at_fpr
from node.audit.images import audit_images
from node.plan.classifiers import SmallCNN
from node.site.phantom import make_phantom


def test_roc_auc_known_values():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1], [2, 3]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5
    assert roc_auc([0.8, 0.4], [0.6, 0.2]) == 0.75  # 3 of 4 pairs ordered
    rng = np.random.default_rng(0)
    assert abs(roc_auc(rng.normal(size=4000), rng.normal(size=4000)) - 0.5) < 0.03


def test_tpr_at_fpr_and_reid():
    neg = np.arange(100.0)  # 0..99
    pos = np.array([99.5, 98.5, 50.0])
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(2 / 3)  # threshold 98: one negative (99) above
    assert tpr_at_fpr(pos, neg, 0.0) == pytest.approx(1 / 3)  # threshold 99: no negative above
    thr = reid_threshold(np.linspace(0, 1, 101))
    assert thr == pytest.approx(0.95)
    assert reid_rate(np.array([0.1, 0.96, 0.99, 0.5]), thr) == 0.5


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    a, b = torch.from_numpy(rng.normal(size=(37, 5))), torch.from_numpy(rng.normal(size=(11, 5)))
    m, j = min_sq_dist(a, b, chunk=8)
    full = ((a[:, None] - b[None]) ** 2).sum(-1)
    assert torch.allclose(m, full.min(1).values) and torch.equal(j, full.argmin(1))
    x = rng.integers(0, 255, (4, 6, 6), dtype=np.uint8)
    assert np.allclose(min_pixel_mse(x, x), 0)


def test_bf16_screened_nearest_neighbours_are_exact():
    """The bfloat16 screen drops only pairs its error bound proves farther: the answer is the float64
    brute force's, on features shaped like LPIPS rows (a large shared mean, small spread, D ~ 4k),
    with near-copies a bfloat16 product alone cannot tell apart, ties, and chunks of 7 rows."""
    g = torch.Generator().manual_seed(0)
    shared = torch.rand(4096, generator=g)
    r = shared + 0.01 * torch.randn(60, 4096, generator=g)
    q = torch.cat(
        [
            r[:20] + 1e-5 * torch.randn(20, 4096, generator=g),  # near-copies: gaps far under bfloat16's rounding
            shared + 0.01 * torch.randn(20, 4096, generator=g),  # fresh rows, no clear nearest: whole rows in float32
            r[30:33],  # exact copies
        ]
    )
    # a tie (row 30 twice; the first index wins, as with min()), and for each near-copy a second
    # reference closer to it than bfloat16's rounding of the products can resolve
    r = torch.cat([r, r[30:31], r[:20] + 5e-4 * torch.randn(20, 4096, generator=g)])
    full = ((q[:, None].double() - r[None].double()) ** 2).sum(-1)
    d, j = nearest_sq_screened(q, r, chunk=7)
    assert torch.equal(j, full.argmin(1))
    assert torch.allclose(d.double(), full.min(1).values, atol=1e-5)
    # the screen is doing the work: a bfloat16 product alone picks a wrong neighbour for some near-copy
    mu = r.mean(0)
    rough = -2 * ((q - mu).bfloat16() @ (r - mu).bfloat16().T).float() + (r - mu).square().sum(1)[None]
    assert (rough[:20].argmin(1) != full[:20].argmin(1)).any()


def test_nearest_record_and_membership_figures():
    nr = nearest_record(np.array([0.1, 0.5, 0.2]), np.array([0.2, 0.4, 0.3]))
    assert nr["closer_to_train"] == pytest.approx(2 / 3) and nr["min_train"] == pytest.approx(0.1)
    t, h = torch.zeros(5, 2), torch.full((5, 2), 5.0)
    assert membership_attack(t + 0.01, t, h)["auc"] == 1.0


@pytest.fixture(scope="module")
def phantom_split():
    """24 train patients, 40 holdout (20 calibrate the per-sample filter, 20 measure the set) and
    20 fresh ones (in neither), 4 images each."""
    x, y, p = make_phantom(n_patients=84, images_per_patient=4, n_classes=2, size=16, seed=0)
    pid = np.unique(p, return_inverse=True)[1]
    train, hold, fresh = pid < 24, (pid >= 24) & (pid < 64), pid >= 64
    torch.manual_seed(0)
    return (
        x[train],
        p[train],
        x[hold],
        p[hold],
        SmallCNN(24, width=4, image_size=16),
        SmallCNN(24, width=4, image_size=16),
        x[fresh],
    )


def _audit(cand, split, policy):
    xt, pt, xh, ph, phi_id, att, _ = split
    return audit_images(
        cand, xt, xh, phi_id=phi_id, attacker=att, policy=policy, device="cpu", train_ids=pt, holdout_ids=ph
    )


def test_leaky_set_fails_the_default_gate(phantom_split):
    xt = phantom_split[0]
    rng = np.random.default_rng(0)
    leaky = np.clip(xt.astype(int) + rng.integers(-2, 3, xt.shape), 0, 255).astype(np.uint8)
    report, accepted = _audit(leaky, phantom_split, PolicyConfig(min_accepted=1))
    assert not report["passed"] and report["n_accepted"] == 0 and report["dropped"]["too_close"] == len(xt)
    # even with the per-sample filter off, the set-level attacks see the leak
    report, _ = _audit(leaky, phantom_split, PolicyConfig(min_pixel_distance=0.0, copy_fpr=0, min_accepted=1))
    assert not report["passed"] and report["mia_auc"] > 0.95
    assert {c["name"]: c["passed"] for c in report["checks"]}["mia_auc_upper"] is False


def test_gate_drops_near_duplicates_only(phantom_split):
    xt = phantom_split[0]
    # fresh patients of the same clinic plus three copies of train images
    fresh = phantom_split[6]
    cand = np.concatenate([fresh, xt[:3]])
    report, accepted = _audit(cand, phantom_split, PolicyConfig(min_accepted=10))
    assert not accepted[-3:].any()
    # the phantom's patients differ by body position, size and tilt, i.e. by the very warps the copy
    # detector undoes, so it drops more fresh patients here than on real images (>= 90% kept there)
    assert accepted[:-3].mean() > 0.7
    assert report["n_candidates"] == 83 and report["dropped"]["too_close"] >= 3
    assert set(report) >= {
        "passed",
        "checks",
        "mia_auc",
        "reid_rate",
        "n_candidates",
        "n_accepted",
        "policy",
        "nearest_record",
    }
    assert all(set(c) >= {"name", "value", "threshold", "passed"} for c in report["checks"])


def test_the_second_attacker_is_one_more_copy_space(phantom_split):
    xt, pt, xh, ph, phi_id, att, fresh = phantom_split
    wide = SmallCNN(24, width=4, image_size=16)
    report, accepted = audit_images(
        np.concatenate([fresh, xt[:3]]),
        xt,
        xh,
        phi_id=phi_id,
        attacker=att,
        attacker_wide=wide,
        policy=PolicyConfig(min_accepted=1),
        device="cpu",
        train_ids=pt,
        holdout_ids=ph,
    )
    spaces = {"pixel", "pixel_smooth", "pixel_coarse", "attacker", "attacker_wide"}
    assert set(report["calibration"]["copy_thresholds"]) == spaces
    assert set(report["dropped"]["copy"]) == spaces
    assert not accepted[-3:].any()


def test_empty_accepted_set_fails_cleanly(phantom_split):
    report, accepted = _audit(phantom_split[0][:2], phantom_split, PolicyConfig())
    assert report["n_accepted"] == 0 and not report["passed"] and report["mia_auc"] != report["mia_auc"]  # nan


def test_a_degenerate_attack_space_fails_the_gate(phantom_split):
    """An attacker whose features are dead (every image embeds to the same point) scores every
    record alike: AUC 0.5 by ties alone, which proves nothing, so the gate fails."""
    xt, pt, xh, ph, phi_id, att, fresh = phantom_split
    dead = SmallCNN(24, width=4, image_size=16)
    with torch.no_grad():
        for prm in dead.parameters():
            prm.zero_()
    report, _ = audit_images(
        fresh,
        xt,
        xh,
        phi_id=phi_id,
        attacker=dead,
        device="cpu",
        train_ids=pt,
        holdout_ids=ph,
        policy=PolicyConfig(
            min_accepted=1, max_mia_auc=1.0, max_tpr_at_low_fpr=1.0, max_reid_rate=1.0, max_closer_to_train=1.0
        ),
    )
    assert "black_box/attacker" in report["degenerate"] and not report["passed"]
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["n_degenerate"]
