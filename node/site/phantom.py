"""The procedural "phantom clinic" (docs/DESIGN.md 3.2): a labelled data set with several
images per patient, so demos and tests run anywhere and re-identification has a ground truth.

Each patient has a stable anatomy: an elliptical body with its own size, placement and tilt,
three organ blobs, a texture of a few plane waves and (for classes > 0) a finding of the
patient's class at a patient-specific place. Each image of a patient is another acquisition of
that anatomy: a small shift and rotation, a contrast / brightness change and sensor noise.
The acquisition changes are smaller than the anatomical differences between patients, so two
images of one patient look more alike than images of two patients.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_phantom(
    *, n_patients: int, images_per_patient: int, n_classes: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make the phantom data set.

    Returns (images uint8 [N,size,size], labels int64 [N], patient ids str [N]) with
    N = n_patients * images_per_patient, images grouped by patient. Patient p has class
    p mod n_classes (balanced classes) and id "P0000"-style. Deterministic from `seed`.

    Findings by class: 0 none, 1 a bright lesion, 2 a bright ring, 3 a dark cyst, and for
    more classes the same three kinds again at a larger size.
    """
    rng = np.random.default_rng(seed)
    P, K, N = n_patients, images_per_patient, n_patients * images_per_patient
    cls = np.arange(P) % n_classes

    # ---- patient anatomy, one row per patient; coordinates on [-1, 1]
    body_c = rng.uniform(-0.12, 0.12, (P, 2))
    body_ax = rng.uniform(0.55, 0.85, (P, 2))
    body_tilt = rng.uniform(-0.6, 0.6, P)
    body_level = rng.uniform(0.30, 0.45, P)
    organ_c = rng.uniform(-0.45, 0.45, (P, 3, 2))
    organ_s = rng.uniform(0.08, 0.20, (P, 3))
    organ_a = rng.uniform(-0.25, 0.35, (P, 3))
    tex_f = rng.uniform(2.0, 7.0, (P, 4, 1)) * np.stack([np.cos(t := rng.uniform(0, np.pi, (P, 4))), np.sin(t)], -1)
    tex_ph = rng.uniform(0, 2 * np.pi, (P, 4))
    find_c = rng.uniform(-0.3, 0.3, (P, 2))
    find_scale = 1.0 + 0.5 * ((cls - 1) // 3).clip(min=0)

    # ---- acquisition, one row per image
    pid = np.repeat(np.arange(P), K)
    shift = rng.normal(0, 0.04, (N, 2))
    rot = rng.normal(0, 0.05, N)
    contrast = rng.uniform(0.9, 1.1, N)
    bright = rng.normal(0, 0.02, N)

    g = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(g, g, indexing="ij")  # [H,W]
    # image coordinates -> patient coordinates: undo this acquisition's rotation and shift
    c, s = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    x0, y0 = xx[None] - shift[:, 0, None, None], yy[None] - shift[:, 1, None, None]
    u, v = c * x0 + s * y0, -s * x0 + c * y0  # [N,H,W]

    def at(a: np.ndarray) -> np.ndarray:  # per-patient parameter -> per-image, broadcastable over [H,W]
        return a[pid].reshape((N,) + a.shape[1:] + (1, 1)) if a.ndim == 1 else a[pid][..., None, None]

    # body: soft-edged tilted ellipse
    bc, ax, tl = at(body_c), at(body_ax), at(body_tilt)
    du, dv = u - bc[:, 0], v - bc[:, 1]
    ct, st = np.cos(tl), np.sin(tl)
    r = np.sqrt(((ct * du + st * dv) / ax[:, 0]) ** 2 + ((-st * du + ct * dv) / ax[:, 1]) ** 2)
    body = _sigmoid((1.0 - r) * 25.0)
    img = body * at(body_level)

    # texture inside the body
    tf, tp = at(tex_f), at(tex_ph)  # [N,4,2,1,1], [N,4,1,1]
    phase = tf[:, :, 0] * u[:, None] + tf[:, :, 1] * v[:, None] + tp
    img += body * 0.05 * np.cos(phase).sum(1)

    # organs
    oc, os_, oa = at(organ_c), at(organ_s), at(organ_a)  # [N,3,2,1,1], [N,3,1,1]
    d2 = (u[:, None] - oc[:, :, 0]) ** 2 + (v[:, None] - oc[:, :, 1]) ** 2
    img += body * (oa * np.exp(-d2 / (2 * os_**2))).sum(1)

    # class-dependent finding
    kind = np.where(cls == 0, -1, (cls - 1) % 3)[pid][:, None, None]
    fc, fs = at(find_c), find_scale[pid][:, None, None]
    fd = np.sqrt((u - fc[:, 0]) ** 2 + (v - fc[:, 1]) ** 2) / fs
    # Findings span a few pixels even at 32x32: a finding a small generator cannot draw at
    # all would leave no class signal for synthetic data to carry.
    lesion = 0.6 * np.exp(-(fd**2) / (2 * 0.12**2))
    ring = 0.45 * np.exp(-((fd - 0.22) ** 2) / (2 * 0.05**2))
    cyst = -0.35 * _sigmoid((0.18 - fd) * 40.0)
    img += np.where(kind == 0, lesion, 0) + np.where(kind == 1, ring, 0) + np.where(kind == 2, cyst, 0)

    img = (img - 0.3) * contrast[:, None, None] + 0.3 + bright[:, None, None]
    img += rng.normal(0, 0.025, img.shape)
    images = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    labels = cls[pid].astype(np.int64)
    ids = np.array([f"P{p:04d}" for p in range(P)])[pid]
    return images, labels, ids
