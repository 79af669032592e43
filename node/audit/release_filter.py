"""What the per-sample release filter needs besides the copy detector (node.audit.copies): the holdout's
calibration and evaluation halves, and distinct candidates.

The holdout is split by patient: the calibration half sets every per-sample threshold (copy
distances, re-identification scores) and is the DOMIAS reference; the evaluation half is where
the set-level figures are measured. Judging the set on the images that chose its thresholds would
flatter it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# Pixel MSE on [0,1] under which two candidates count as one image: 1e-4 is an RMS difference of
# 2.6 grey levels, below what a viewer can tell apart.
NEAR_DUPLICATE_MSE = 1e-4


def holdout_halves(holdout_ids: np.ndarray, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (calibration [A], evaluation [B]) into the holdout records: whole patients, half of
    them (rounded up) to calibration, in a seeded random order. Never overlapping, together all
    records. Raises when there are fewer than 2 patients (each half needs one)."""
    ids = np.asarray(holdout_ids)
    patients = np.unique(ids)
    if len(patients) < 2:
        raise ValueError(
            f"the holdout split has {len(patients)} patient(s); the audit needs at least 2 "
            "(one for calibration, one for evaluation): give the site more data or a larger split.holdout"
        )
    order = np.random.default_rng(seed).permutation(patients)
    cal = np.isin(ids, order[: (len(order) + 1) // 2])
    return np.flatnonzero(cal), np.flatnonzero(~cal)


def distinct(records: np.ndarray, *, near_mse: float | None = NEAR_DUPLICATE_MSE, chunk: int = 1024) -> np.ndarray:
    """Boolean mask [N]: True for the first of each group of duplicate records (uint8 images
    [N,H,W] or float embeddings [N,D]). Bitwise-equal records are duplicates; with `near_mse`, so
    is a record whose mean squared difference (pixels on [0,1]) to an earlier one is below it."""
    records = np.ascontiguousarray(records)
    keep = np.ones(len(records), dtype=bool)
    seen: set[bytes] = set()
    for i, r in enumerate(records):
        h = hashlib.sha256(r.tobytes()).digest()
        keep[i] = h not in seen
        seen.add(h)
    if near_mse is None or len(records) < 2:
        return keep
    x = torch.from_numpy(records.reshape(len(records), -1)).double()
    if records.dtype == np.uint8:
        x = x / 255.0
    sq = x.square().sum(1)
    for i in range(0, len(x), chunk):
        q = x[i : i + chunk]
        d = (sq[i : i + chunk, None] + sq[None] - 2 * q @ x.T).clamp_min_(0) / x.shape[1]  # [c,N]
        rows = torch.arange(i, i + len(q))[:, None]
        earlier = torch.arange(len(x))[None] < rows
        keep[i : i + len(q)] &= ~((d < near_mse) & earlier).any(1).numpy()
    return keep
