"""A split's records as the federation's downstream model sees them: images on the PLAN route,
embeddings by the pinned extractor on the CVAE route (node.cvae.embeddings caches them)."""

from __future__ import annotations

import numpy as np
import torch

from node.cvae.embeddings import split_embeddings
from node.site.ingest import load_split
from node.site.workspace import Workspace


def split_records(
    ws: Workspace, split: str, *, route: str, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """(data, labels int64 [N]) of split "train", "holdout" or "test": images uint8 [N,H,W] for
    route "plan", embeddings float32 [N,D] for route "cvae"."""
    if route == "cvae":
        return split_embeddings(ws, ws.config().synth.extractor, split, device=device)
    if route != "plan":
        raise ValueError(f"unknown route {route!r}; expected 'plan' or 'cvae'")
    s = load_split(ws, split)
    return s.images, np.asarray(s.labels, dtype=np.int64)
