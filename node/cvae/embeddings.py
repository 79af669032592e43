"""The site's embedding cache (CVAE route; docs/DESIGN.md 3.4: feature extraction once per
image): every split's images embedded once by the federation's extractor, kept in
`data/embeddings-<extractor digest>.safetensors` beside the data set they came from.

The file holds, for each split in node.site.ingest.SPLITS, `<split>.embeddings` float32 [N,D],
`<split>.labels` int64 [N] and `<split>.index` int64 [N] (rows of data/dataset.npz, in the order
of splits.json, so patient ids come from node.site.ingest.load_split in the same order), and in its
metadata the sha256 of dataset.npz and splits.json it was made from. A new data set or a new
split makes it stale; it is then rebuilt, whole, and replaces the old one atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from common.config import ExtractorConfig
from common.fileio import atomic_write_bytes, sha256_file
from common.modelstore import default_store_dir
from node.cvae.embedder import build_extractor, embed_images, extractor_digest
from node.site.ingest import SPLITS, read_splits
from node.site.workspace import Workspace


def cache_path(ws: Workspace, cfg: ExtractorConfig) -> Path:
    """Where the embeddings of `ws`'s splits by extractor `cfg` are cached."""
    return ws.data / f"embeddings-{extractor_digest(cfg)}.safetensors"


def _source_key(ws: Workspace, cfg: ExtractorConfig) -> dict[str, str]:
    return {
        "extractor_digest": extractor_digest(cfg),
        "dataset_sha256": sha256_file(ws.data / "dataset.npz"),
        "splits_sha256": sha256_file(ws.data / "splits.json"),
    }


def _read_meta(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("json", "null"))
    except (OSError, ValueError, json.JSONDecodeError):  # unreadable or not ours: rebuild
        return None


def _build(ws: Workspace, cfg: ExtractorConfig, key: dict[str, str], path: Path, device: torch.device | str) -> None:
    splits = read_splits(ws)
    index = {s: np.asarray(splits[s], dtype=np.int64) for s in SPLITS}
    with np.load(ws.data / "dataset.npz", allow_pickle=False) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    # one pass over every image in some split, whichever splits share it
    rows = np.unique(np.concatenate(list(index.values())))
    extractor = build_extractor(cfg, store_dir=default_store_dir(ws.root))
    emb = embed_images(extractor, images[rows], device=device)
    where = np.searchsorted(rows, np.arange(len(images)))  # row r of the data set -> its line in emb
    tensors: dict[str, torch.Tensor] = {}
    for s, idx in index.items():
        tensors[f"{s}.embeddings"] = torch.from_numpy(np.ascontiguousarray(emb[where[idx]]))
        tensors[f"{s}.labels"] = torch.from_numpy(labels[idx])
        tensors[f"{s}.index"] = torch.from_numpy(idx)
    meta = {**key, "extractor": cfg.model_dump(mode="json"), "dim": int(extractor.dim), "splits": list(SPLITS)}
    atomic_write_bytes(path, st_save(tensors, metadata={"json": json.dumps(meta, sort_keys=True)}))


def split_embeddings(
    ws: Workspace, cfg: ExtractorConfig, split: str, *, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings float32 [N,D] and labels int64 [N] of one ingested split ("train", "holdout",
    "test"), in splits.json order. The first call embeds every split and caches them; later calls
    read the cache while dataset.npz, splits.json and the extractor are unchanged."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = cache_path(ws, cfg)
    key = _source_key(ws, cfg)
    meta = _read_meta(path) if path.exists() else None
    if meta is None or any(meta.get(k) != v for k, v in key.items()):
        _build(ws, cfg, key, path, device)
    with safe_open(str(path), framework="np") as f:
        return f.get_tensor(f"{split}.embeddings"), f.get_tensor(f"{split}.labels")
