"""Stage `ingest`: the configured data source -> data/dataset.npz and data/splits.json."""

from __future__ import annotations

import io
import json

import numpy as np

from common.config import DataConfig
from common.fileio import atomic_write_bytes, atomic_write_json
from node.site.data import DataError, ImageSet, load_dataset, n_classes_of
from node.site.splits import split_by_patient
from node.site.workspace import Workspace

SPLITS = ("train", "holdout", "test")


def ingest(ws: Workspace) -> None:
    """Load and check the site's data, split it by patient, write dataset.npz + splits.json.

    dataset.npz: images uint8 [N,H,W], labels int64 [N], patient_ids str [N] (no pickle).
    splits.json: {"seed", "train", "holdout", "test" (image indices), "n_classes"}.
    """
    cfg = ws.config().data
    data = load_dataset(cfg)
    sp = cfg.split
    splits = split_by_patient(data.patient_ids, train=sp.train, holdout=sp.holdout, seed=sp.seed, labels=data.labels)
    for name in SPLITS:
        if len(splits[name]) == 0:
            raise DataError(
                f"{cfg.path or 'phantom'}: the {name} split is empty ({len(np.unique(data.patient_ids))} patients, "
                f"fractions train {sp.train}, holdout {sp.holdout}); more patients are needed"
            )
    check_schema(data.labels, cfg)
    if cfg.n_classes is not None:  # the federation's schema, from the site kit
        n_classes = cfg.n_classes
    else:
        n_classes = max(n_classes_of(data), cfg.phantom.n_classes if cfg.source == "phantom" else 0)
    buf = io.BytesIO()
    np.savez(buf, images=data.images, labels=data.labels.astype(np.int64), patient_ids=data.patient_ids.astype(str))
    atomic_write_bytes(ws.data / "dataset.npz", buf.getvalue())
    atomic_write_json(
        ws.data / "splits.json",
        {"seed": sp.seed, "n_classes": n_classes, **{k: splits[k].tolist() for k in SPLITS}},
    )


def check_schema(labels: np.ndarray, cfg: DataConfig) -> None:
    """DataError unless every label [N] lies within the federation's classes (cfg.n_classes, from
    the site kit; None: nothing to check)."""
    if cfg.n_classes is None:
        return
    bad = np.flatnonzero(labels >= cfg.n_classes)
    if bad.size:
        raise DataError(
            f"{cfg.path or 'phantom'}: {bad.size} image(s) have labels "
            f"outside this federation's {cfg.n_classes} classes "
            f"(0..{cfg.n_classes - 1}{_names(cfg.class_names)}), the first at image {int(bad[0])} with label "
            f"{int(labels[bad[0]])}; relabel them or ask the coordinator whether data.n_classes is right"
        )


def _names(class_names: list[str] | None) -> str:
    return "" if not class_names else ": " + ", ".join(f"{i} {n}" for i, n in enumerate(class_names))


def read_splits(ws: Workspace) -> dict:
    return json.loads((ws.data / "splits.json").read_text())


def load_split(ws: Workspace, name: str) -> ImageSet:
    """The images of one split ("train", "holdout", "test") from the ingested data set."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    idx = np.asarray(read_splits(ws)[name], dtype=np.int64)
    with np.load(ws.data / "dataset.npz", allow_pickle=False) as z:
        return ImageSet(z["images"][idx], z["labels"][idx].astype(np.int64), z["patient_ids"][idx])
