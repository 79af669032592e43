"""Loading the payload of a verified bundle: images or embeddings, with their labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import SafetensorError, safe_open

from common.bundle.format import BAG, EMBEDDINGS, EMBEDDINGS_TENSOR, MAX_IMAGE_SIDE, BundleError
from common.bundle.parsers import _read_index_labels, _read_labels, _read_safetensors_header


def _data_dir(dir: Path) -> Path:
    """data/ of a bundle folder (holding bag/) or of the bag itself."""
    dir = Path(dir)
    return (dir / BAG if (dir / BAG).is_dir() else dir) / "data"


def bundle_route(dir: Path) -> str:
    """ "cvae" if the bundle (folder or bag) holds embeddings, else "plan": the layout decides."""
    return "cvae" if os.path.lexists(_data_dir(dir) / EMBEDDINGS) else "plan"


def load_bundle_images(dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,H,W], labels int64 [N]) of a verified bundle, in labels.csv order.

    `dir` is a bundle folder (holding bag/) or the bag itself. Paths come from labels.csv only
    after matching `images/<label>/<i>.png`; images must all be grey and of one size.
    """
    data_dir = _data_dir(dir)
    if bundle_route(dir) != "plan":
        raise BundleError(
            f"{data_dir / EMBEDDINGS}: the bundle holds embeddings (CVAE route), not images; "
            f"use load_bundle_embeddings or load_bundle_data"
        )
    rows = _read_labels(data_dir)
    images, labels, shape = [], [], None
    for rel, y in rows:
        path = data_dir / rel
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "L":
                raise BundleError(f"{path}: expected a grey 8-bit PNG, got {im.format} {im.mode}")
            if max(im.size) > MAX_IMAGE_SIDE:
                raise BundleError(f"{path}: {im.size} exceeds {MAX_IMAGE_SIDE} pixels a side")
            arr = np.asarray(im, dtype=np.uint8)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise BundleError(f"{path}: size {arr.shape} differs from the first image's {shape}")
        images.append(arr)
        labels.append(y)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_bundle_embeddings(dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [N,D], labels int64 [N]) of a verified bundle, row i labelled by
    labels.csv's index i.

    `dir` is a bundle folder (holding bag/) or the bag itself. The header is checked with the
    verifier's own bounded parser before the safetensors library reads the file (numpy
    framework: nothing is unpickled); shape, dtype and finiteness are checked again after.
    """
    data_dir = _data_dir(dir)
    path = data_dir / EMBEDDINGS
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{path}: missing; the bundle holds no embeddings (an image bundle? use load_bundle_data)")
    n, d, _ = _read_safetensors_header(path, str(path))
    labels = _read_index_labels(data_dir / "labels.csv", n, str(data_dir / "labels.csv"))
    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
            if names != [EMBEDDINGS_TENSOR]:
                raise BundleError(f"{path}: must hold exactly one tensor {EMBEDDINGS_TENSOR!r}, holds {names}")
            x = f.get_tensor(EMBEDDINGS_TENSOR)
    except SafetensorError as e:
        raise BundleError(f"{path}: the safetensors library cannot read it ({e})") from None
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (n, d):
        raise BundleError(
            f"{path}: loaded {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', None)}, expected float32 [{n},{d}]"
        )
    if not np.isfinite(x).all():
        raise BundleError(f"{path}: holds non-finite values")
    return np.require(x, np.float32, ["C", "W"]), labels


def load_bundle_data(dir: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(route, data, labels int64 [N]) of a verified bundle, by its layout: ("plan", images
    uint8 [N,H,W], labels) or ("cvae", embeddings float32 [N,D], labels)."""
    if bundle_route(dir) == "cvae":
        return ("cvae", *load_bundle_embeddings(dir))
    return ("plan", *load_bundle_images(dir))
