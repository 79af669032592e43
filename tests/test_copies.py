"""The per-sample copy detector (node.audit.copies), the holdout halves and distinct candidates
(node.audit.release_filter), and the audit-attempt counter (node.site.attempts)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from node.audit.copies import PIXEL_VIEWS, Warp, calibrate, copy_distances, noise_variance, warp, warp_family
from node.audit.release_filter import distinct, holdout_halves


def textures(n: int, *, seed: int, size: int = 32) -> np.ndarray:
    """n random smooth textures uint8 [n,size,size]: every one its own identity, and unlike the
    phantom's bodies no two are a shift or a rotation of each other."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    k = torch.exp(-(torch.arange(-4, 5, dtype=torch.float32) ** 2) / 4.5)
    k = (k[:, None] * k[None]) / (k.sum() ** 2)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (4, 4, 4, 4), mode="circular"), k[None, None])
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    return (x[:, 0] * 40 + 128).clamp(0, 255).round().to(torch.uint8).numpy()


def _pil(img: np.ndarray, f) -> np.ndarray:
    return np.asarray(f(Image.fromarray(img)))


def _shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    p = max(abs(dy), abs(dx))
    return np.pad(img, p, mode="edge")[p - dy : p - dy + img.shape[0], p - dx : p - dx + img.shape[1]]


EDITS = {
    "shift": lambda x, r: _shift(x, 2, -3),
    "far_shift": lambda x, r: _shift(x, -5, 6),
    "flip": lambda x, r: x[:, ::-1],
    "brightness_contrast": lambda x, r: np.clip(x.astype(float) * 0.8 + 30, 0, 255).astype(np.uint8),
    "blur": lambda x, r: _pil(x, lambda im: im.filter(ImageFilter.GaussianBlur(0.8))),
    "noise": lambda x, r: np.clip(x + r.normal(0, 5, x.shape), 0, 255).astype(np.uint8),
    "strong_noise": lambda x, r: np.clip(x + r.normal(0, 15, x.shape), 0, 255).astype(np.uint8),
    # sd 0.12 of the range, the texture's own sd 0.16: caught only through the noise correction
    "heavy_noise": lambda x, r: np.clip(x + r.normal(0, 30, x.shape), 0, 255).astype(np.uint8),
    "shift_and_noise": lambda x, r: np.clip(_shift(x, 1, 3) + r.normal(0, 20, x.shape), 0, 255).astype(np.uint8),
    "rotation": lambda x, r: _pil(x, lambda im: im.rotate(6, resample=Image.BILINEAR, fillcolor=128)),
    "large_rotation": lambda x, r: _pil(x, lambda im: im.rotate(-27, resample=Image.BILINEAR, fillcolor=128)),
    "rescale_crop": lambda x, r: _pil(x, lambda im: im.resize((35, 35), Image.BILINEAR).crop((1, 2, 33, 34))),
}


@pytest.fixture(scope="module")
def textured():
    train, nonmembers, fresh = textures(120, seed=1), textures(60, seed=2), textures(200, seed=3)
    d_cal = copy_distances(nonmembers, train)
    return train, fresh, {k: calibrate(d, fpr=0.02) for k, (d, _) in d_cal.items()}


def test_fresh_images_are_kept(textured):
    """Three views at 2% each flag at most ~6% of fresh images; 200 of them keep the estimate within
    about 2 points."""
    train, fresh, thr = textured
    d_fresh = copy_distances(fresh, train)
    kept = np.all([d_fresh[k][0] >= thr[k] for k in PIXEL_VIEWS], axis=0)
    assert kept.mean() >= 0.9


@pytest.mark.parametrize("kind", sorted(EDITS))
def test_an_edited_copy_is_flagged(textured, kind):
    train, _, thr = textured
    rng = np.random.default_rng(0)
    src = [3, 40, 77, 101]
    copies = np.stack([EDITS[kind](train[i], rng) for i in src])
    d = copy_distances(copies, train)
    # at least one view flags every copy, and finds the image it was made from
    assert any((d[space][1] == src).all() for space in PIXEL_VIEWS), (kind, {k: d[k][1] for k in PIXEL_VIEWS})
    flagged = np.any([d[k][0] < thr[k] for k in PIXEL_VIEWS], axis=0)
    assert flagged.all(), (kind, {k: d[k][0] for k in PIXEL_VIEWS}, thr)


def look_alikes(n: int, *, seed: int) -> np.ndarray:
    """n images uint8 [n,32,32] that share 85% of their structure, as chest X-rays share anatomy:
    real non-members are close to the train images, so the copy threshold is tight."""
    shared = textures(1, seed=99)[0].astype(float) - 128
    own = textures(n, seed=seed).astype(float) - 128
    return np.clip(128 + 0.85 * shared + 0.15 * own, 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("sd", [15, 25])
def test_a_noisy_copy_of_a_look_alike_is_flagged_through_the_noise_correction(sd):
    """Without the correction for the candidate's own noise none of these copies is flagged: the
    noise alone lowers their cosine to the source below that of the nearest real non-member."""
    train, nonmembers, fresh = look_alikes(120, seed=1), look_alikes(60, seed=2), look_alikes(40, seed=3)
    thr = {k: calibrate(d, fpr=0.02) for k, (d, _) in copy_distances(nonmembers, train).items()}
    rng = np.random.default_rng(0)
    copies = np.stack([np.clip(train[i] + rng.normal(0, sd, (32, 32)), 0, 255).astype(np.uint8) for i in (3, 40, 77)])
    d = copy_distances(copies, train)
    assert np.any([d[k][0] < thr[k] for k in PIXEL_VIEWS], axis=0).all(), ({k: d[k][0] for k in PIXEL_VIEWS}, thr)
    d_fresh = copy_distances(fresh, train)
    assert np.all([d_fresh[k][0] >= thr[k] for k in PIXEL_VIEWS], axis=0).mean() >= 0.9


def test_the_noise_estimate_reads_the_added_noise_not_the_anatomy():
    x = torch.from_numpy(textures(8, seed=4).astype(np.float64) / 255)[:, None]
    clean = noise_variance(x).sqrt()
    noisy = noise_variance(x + torch.from_numpy(np.random.default_rng(0).normal(0, 0.08, x.shape))).sqrt()
    assert (clean < 0.02).all(), clean
    assert ((noisy - 0.08).abs() < 0.015).all(), noisy


def test_plain_pixel_mse_misses_what_the_family_catches(textured):
    """Why the family: a 2-pixel shift of a train image is, in plain MSE, as far as a fresh image."""
    train, fresh, _ = textured
    shifted = _shift(train[5], 0, 2)[None]
    plain = ((shifted.astype(float) - train.astype(float)) ** 2).mean((1, 2)).min()
    plain_fresh = ((fresh[:1].astype(float) - train.astype(float)) ** 2).mean((1, 2)).min()
    assert plain > 0.3 * plain_fresh
    assert copy_distances(shifted, train)["pixel"][0][0] < 1e-3


def test_larger_images_are_compared_at_the_working_size():
    """A 64-px copy shifted by 8 px is a 4-px shift at the pixel views' 32 px: found, at the cost of a 32-px site."""
    train = np.stack([np.asarray(Image.fromarray(t).resize((64, 64), Image.BILINEAR)) for t in textures(30, seed=5)])
    d = copy_distances(_shift(train[7], 8, 0)[None], train)
    assert d["pixel"][1][0] == 7 and d["pixel"][0][0] < 1e-2


def test_warp_family_is_symmetric_and_starts_with_the_identity():
    fam = warp_family()
    assert fam[0] == Warp()
    keys = {(w.angle, round(w.scale, 6), w.dx, w.dy, w.flip_h, w.flip_v) for w in fam}
    for w in fam:
        if w.angle == 0 and w.scale == 1:  # shifts and flips: the exact inverse is in the family
            assert (
                0.0,
                1.0,
                -w.dx if not w.flip_h else w.dx,
                -w.dy if not w.flip_v else w.dy,
                w.flip_h,
                w.flip_v,
            ) in keys
        else:
            assert (-w.angle, round(1 / w.scale, 6), 0, 0, False, False) in keys or (
                -w.angle,
                round(1 / w.scale, 6),
                0.0,
                0.0,
                False,
                False,
            ) in keys
    x = torch.rand(2, 1, 8, 8)
    shifted = warp(x, [Warp(dx=1)])[:, 0]
    assert torch.allclose(shifted[..., 1:], x[..., :-1], atol=1e-6)  # whole-pixel shifts are exact


def test_calibration_ignores_a_minority_of_near_duplicates():
    rng = np.random.default_rng(0)
    bulk = np.exp(rng.normal(np.log(0.1), 0.3, 90))
    dups = np.full(10, 1e-4)  # 10% of the "non-members" are copies of train images in disguise
    thr = calibrate(np.concatenate([bulk, dups]), fpr=0.02)
    assert 0.02 < thr < 0.08  # near the bulk's low tail, nowhere near the duplicates
    assert np.quantile(np.concatenate([bulk, dups]), 0.02) < 1e-3  # what a plain quantile would have said
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(np.array([0.1]), fpr=0.02)


def test_holdout_halves_split_patients_and_never_overlap():
    ids = np.repeat([f"p{i}" for i in range(11)], 3)
    cal, ev = holdout_halves(ids, seed=0)
    assert len(np.intersect1d(cal, ev)) == 0 and sorted(np.concatenate([cal, ev])) == list(range(len(ids)))
    assert not set(ids[cal]) & set(ids[ev]) and len(set(ids[cal])) == 6
    assert np.array_equal(holdout_halves(ids, seed=0)[0], cal)
    with pytest.raises(ValueError, match="at least 2"):
        holdout_halves(np.array(["a", "a"]), seed=0)


def test_distinct_drops_bitwise_and_near_duplicates():
    x = textures(5, seed=4)
    near = np.clip(x[1].astype(int) + 1, 0, 255).astype(np.uint8)  # 1 grey level: the same picture
    cand = np.stack([x[0], x[1], x[0], near, x[2]])
    assert distinct(cand).tolist() == [True, True, False, False, True]
    assert distinct(cand, near_mse=None).tolist() == [True, True, False, True, True]
    emb = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.5]], dtype=np.float32)
    assert distinct(emb, near_mse=None).tolist() == [True, False, True]


def test_attempts_are_counted_and_survive_a_restart(tmp_path):
    from node.site.attempts import AttemptRefused, next_attempt, record_attempt
    from node.site.workspace import Workspace

    ws = Workspace(tmp_path)
    ws.data.mkdir(parents=True)
    (ws.data / "dataset.npz").write_bytes(b"data")
    (ws.data / "splits.json").write_text("{}")
    for i in range(3):
        a = next_attempt(ws, seed=0, max_attempts=3, note=None)
        assert a["number"] == i + 1 and a["failed_before"] == i
        record_attempt(ws, a, run_id="r0", passed=False)
    ws = Workspace(tmp_path)  # a new process reads the same ledger
    with pytest.raises(AttemptRefused, match="synthesis seed not used before.*and a note"):
        next_attempt(ws, seed=0, max_attempts=3, note=None)
    with pytest.raises(AttemptRefused, match="a note"):
        next_attempt(ws, seed=7, max_attempts=3, note="  ")
    with pytest.raises(AttemptRefused, match="synthesis seed"):
        next_attempt(ws, seed=0, max_attempts=3, note="new walk settings")
    a = next_attempt(ws, seed=7, max_attempts=3, note="new walk settings")
    assert a == {"number": 4, "failed_before": 3, "seed": 7, "note": "new walk settings", "max_attempts": 3}
    record_attempt(ws, a, run_id="r1", passed=True)
    lines = [json.loads(x) for x in ws.ledger.read_text().splitlines()]
    assert [e["passed"] for e in lines] == [False, False, False, True] and all(
        e["stage"] == "audit_attempt" for e in lines
    )
    # new training data starts a new count
    (ws.data / "dataset.npz").write_bytes(b"other data")
    assert next_attempt(ws, seed=0, max_attempts=3, note=None)["number"] == 1


def test_the_matrix_blur_is_the_reflect_padded_convolution():
    """gaussian_blur as two matrix products equals the separable convolution with reflect padding."""
    import math

    import torch
    import torch.nn.functional as F

    from node.audit.copies import gaussian_blur

    def convolved(x, sigma):
        r = max(1, int(math.ceil(3 * sigma)))
        k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma * sigma))
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))

    g = torch.Generator().manual_seed(0)
    for shape, sigma in (((7, 1, 32, 32), 1.0), ((7, 1, 32, 32), 2.0), ((3, 1, 16, 24), 2.0)):
        x = torch.randn(shape, generator=g)
        assert torch.allclose(gaussian_blur(x, sigma), convolved(x, sigma), atol=1e-5)


def test_the_wide_attacker_keeps_a_heavily_noised_copy_near_its_source():
    """A network trained to know each image under the `wide` augmentation (noise up to sd 0.125 on
    [0,1]) puts a copy under noise of sd 0.12 nearest its source, closer than most real
    non-members come to any train image, and flags no more fresh images than its threshold allows."""
    from node.audit.images import features_embedder
    from node.federation.task import train_classifier
    from node.plan.classifiers import SmallCNN

    train, nonmembers, fresh = (textures(n, seed=s, size=16) for n, s in ((48, 1), (40, 2), (30, 3)))
    torch.manual_seed(0)
    net = SmallCNN(len(train), width=8, image_size=16)
    train_classifier(
        net, train, np.arange(len(train)), epochs=60, lr=3e-3, batch_size=32, device="cpu", seed=0, augment="wide"
    )
    emb = {"attacker_wide": features_embedder(net, "cpu")}
    d_nonmembers = copy_distances(nonmembers, train, embedders=emb)["attacker_wide"][0]
    thr = calibrate(d_nonmembers, fpr=0.02)
    rng = np.random.default_rng(0)
    src = np.arange(0, 48, 4)
    noisy = np.clip(train[src] + rng.normal(0, 30, train[src].shape), 0, 255).astype(np.uint8)
    d, nearest = copy_distances(noisy, train, embedders=emb)["attacker_wide"]
    assert (nearest == src).mean() >= 0.75 and (d < np.median(d_nonmembers)).mean() >= 0.75, (nearest, d, thr)
    assert (copy_distances(fresh, train, embedders=emb)["attacker_wide"][0] >= thr).mean() >= 0.9


def test_the_bfloat16_screen_changes_no_copy_distance(monkeypatch):
    """The copy detector screens the products of its wide spaces (LPIPS) in bfloat16 where the CPU
    has them natively: every space's copy distances and nearest train images are those of the
    float32 products."""
    import node.audit.distances as distances
    from node.audit.images import lpips_embedder
    from node.audit.lpips_matrix import build_lpips

    train, query = textures(40, seed=1), textures(6, seed=4)
    query = np.concatenate([query, _shift(train[3], 1, 2)[None], train[5:6, :, ::-1]])  # two near-copies
    torch.manual_seed(0)
    emb = {"lpips": lpips_embedder(build_lpips("alex", random_backbone=True))}
    runs = {}
    for screen in (True, False):
        monkeypatch.setattr(distances, "cpu_bf16_is_fast", lambda screen=screen: screen)
        runs[screen] = copy_distances(query, train, embedders=emb, chunk=3)
    assert set(runs[True]) == set(PIXEL_VIEWS) | {"lpips"}
    for k, (d, j) in runs[False].items():
        assert np.array_equal(runs[True][k][1], j), k
        # atol: the float32 expansion's own rounding (a few 1e-5); centred, the screen's is smaller
        assert np.allclose(runs[True][k][0], d, rtol=1e-4, atol=5e-5), k


def test_the_projected_bound_changes_no_pixel_copy_distance(monkeypatch):
    """On a CPU the pixel views search through the projected lower bound (node.audit.projected):
    every copy distance and nearest train image is that of taking every product."""
    import node.audit.copies as copies

    train, query = textures(60, seed=1), textures(10, seed=4)
    edits = [_shift(train[3], 1, 2), train[5, :, ::-1], EDITS["rotation"](train[8], None), train[9], train[9] // 2]
    query = np.concatenate([query, np.stack(edits)])
    pruned = copy_distances(query, train, chunk=4)

    class Dense:  # references as plain rows: copy_distances then takes every product
        of = staticmethod(lambda r: r)

    monkeypatch.setattr(copies, "ProjectedRefs", Dense)
    dense = copy_distances(query, train, chunk=4)
    for k, (d, j) in dense.items():
        assert np.array_equal(pruned[k][1], j), k
        assert np.allclose(pruned[k][0], d, rtol=1e-5, atol=2e-6), k
    assert (dense["pixel"][1][10:14] == [3, 5, 8, 9]).all()  # the edits' sources, found by both
