"""The release gate on a real MedMNIST split: edited copies of training images planted among real
unseen images are all dropped, the unseen images mostly kept, and the set's verdict is right.

Every image is its own patient (MedMNIST has no patient ids). phi_id and the attacker are small
CNNs trained here on the train images' identities, so the attacker's embedding is a real one."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from common.config import PolicyConfig
from node.audit.images import audit_images
from node.federation.task import train_classifier
from node.plan.classifiers import SmallCNN

PNEUMONIA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PNEUMONIA.exists(), reason=f"{PNEUMONIA} absent (the shared MedMNIST data is not part of a fresh clone)"
    ),
]


def _shift(x, d):
    return np.pad(x, d, mode="edge")[: x.shape[0], 2 * d :]


def _pil(x, f):
    return np.asarray(f(Image.fromarray(x)))


EDITS = {
    "exact": lambda x, r: x,
    "shift_2": lambda x, r: _shift(x, 2),
    "flip": lambda x, r: x[:, ::-1].copy(),
    "brighter": lambda x, r: np.clip(x.astype(int) + 25, 0, 255).astype(np.uint8),
    "contrast": lambda x, r: np.clip((x.astype(float) - x.mean()) * 0.8 + x.mean(), 0, 255).astype(np.uint8),
    "noise_0.02": lambda x, r: np.clip(x + r.normal(0, 5, x.shape), 0, 255).astype(np.uint8),
    "noise_0.08": lambda x, r: np.clip(x + r.normal(0, 20, x.shape), 0, 255).astype(np.uint8),
    "blur": lambda x, r: _pil(x, lambda im: im.filter(ImageFilter.GaussianBlur(0.7))),
    "rotate_5": lambda x, r: _pil(x, lambda im: im.rotate(5, resample=Image.BILINEAR, fillcolor=int(np.median(x)))),
    "rotate_25": lambda x, r: _pil(x, lambda im: im.rotate(-25, resample=Image.BILINEAR, fillcolor=int(np.median(x)))),
    "shift+flip+brighter": lambda x, r: np.clip(_shift(x, 1)[:, ::-1].astype(int) + 25, 0, 255).astype(np.uint8),
}


@pytest.fixture(scope="module")
def real_split():
    with np.load(PNEUMONIA) as z:
        x, y = z["train_images"], z["train_labels"][:, 0].astype(np.int64)
        fresh, fresh_y = z["test_images"][:200], z["test_labels"][:200, 0].astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    ti, hi = perm[:300], perm[300:700]
    ids = np.array([f"p{i}" for i in range(len(x))])
    nets = []
    for width, seed in ((4, 0), (6, 1)):  # phi_id and an attacker of another width and seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = SmallCNN(len(ti), width=width, image_size=28)
        train_classifier(
            m, x[ti], np.arange(len(ti)), epochs=8, lr=3e-3, batch_size=32, device="cpu", seed=seed, augment="light"
        )
        nets.append(m)
    return {
        "t": (x[ti], y[ti], ids[ti]),
        "h": (x[hi], y[hi], ids[hi]),
        "f": (fresh, fresh_y),
        "phi_id": nets[0],
        "att": nets[1],
    }


def _audit(s, cand, labels):
    (xt, yt, it), (xh, yh, ih) = s["t"], s["h"]
    return audit_images(
        cand,
        xt,
        xh,
        phi_id=s["phi_id"],
        attacker=s["att"],
        policy=PolicyConfig(),
        device="cpu",
        train_ids=it,
        holdout_ids=ih,
        candidate_labels=labels,
        train_labels=yt,
        holdout_labels=yh,
        n_boot=100,
        downstream_epochs=5,
    )


def test_planted_copies_are_dropped_and_the_verdict_is_right(real_split):
    xt, yt, _ = real_split["t"]
    fresh, fresh_y = real_split["f"]
    rng = np.random.default_rng(1)
    src = rng.choice(len(xt), (len(EDITS), 4), replace=False)
    plants = np.stack([EDITS[k](xt[i], rng) for k, row in zip(EDITS, src) for i in row])
    cand = np.concatenate([fresh, plants])
    labels = np.concatenate([fresh_y, yt[src.reshape(-1)]])
    report, accepted = _audit(real_split, cand, labels)
    published = {k: int(accepted[len(fresh) + 4 * n : len(fresh) + 4 * n + 4].sum()) for n, k in enumerate(EDITS)}
    assert sum(published.values()) == 0, published
    assert accepted[: len(fresh)].mean() >= 0.8, report["dropped"]
    assert report["calibration"]["n_calibration"] + report["calibration"]["n_evaluation"] == 400
    # what is left is real images no model saw: the set passes
    assert report["passed"], [c["message"] for c in report["checks"] if not c["passed"]]
    # the same copies with the per-sample filter off: the set-level attacks see them
    leak, _ = audit_images(
        plants,
        xt,
        real_split["h"][0],
        phi_id=real_split["phi_id"],
        attacker=real_split["att"],
        policy=PolicyConfig(min_pixel_distance=0.0, copy_fpr=0),
        device="cpu",
        train_ids=real_split["t"][2],
        holdout_ids=real_split["h"][2],
        n_boot=100,
        downstream_epochs=0,
    )
    assert not leak["passed"]
