"""Patient-level train / holdout / test split (docs/DESIGN.md 3.2): no patient in two splits."""

from __future__ import annotations

import numpy as np


def split_by_patient(
    patient_ids: np.ndarray, *, train: float, holdout: float, seed: int, labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Split image indices by patient.

    patient_ids: str [N]. labels: optional int [N]; when given, patients are stratified by
    their (most frequent) class, so each split keeps roughly the class balance.
    Returns {"train", "holdout", "test"} -> sorted int64 image indices. Deterministic from
    `seed`; the rest after train and holdout is test.
    """
    patient_ids = np.asarray(patient_ids)
    uniq, inv = np.unique(patient_ids, return_inverse=True)
    if labels is not None:
        counts = np.zeros((len(uniq), int(np.max(labels)) + 1), dtype=np.int64)
        np.add.at(counts, (inv, np.asarray(labels)), 1)
        patient_class = counts.argmax(1)
    else:
        patient_class = np.zeros(len(uniq), dtype=np.int64)
    rng = np.random.default_rng(seed)
    which = np.empty(len(uniq), dtype=np.int64)  # 0 train, 1 holdout, 2 test
    for c in np.unique(patient_class):
        members = rng.permutation(np.flatnonzero(patient_class == c))
        # each patient's position in its class on (0,1): a stratified, near-exact share per split
        q = (np.arange(len(members)) + 0.5) / len(members)
        which[members] = np.where(q < train, 0, np.where(q < train + holdout, 1, 2))
    split_of_image = which[inv]
    return {
        name: np.flatnonzero(split_of_image == i).astype(np.int64)
        for i, name in enumerate(("train", "holdout", "test"))
    }
