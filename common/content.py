"""What a federation's bundles must hold, beyond being well-formed and signed: its image size and
mode, its classes, its embedding length. A bundle can verify and still poison every site's round
(PNGs of another size, labels outside the classes); the coordinator refuses such a bundle with
reason "content" (server/store.py), and a site's loader quarantines one that slipped into its pool
(node/release/pull.py). Both run after the signature and the digests were checked: this parses verified
data only.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.bundle import BundleError
from common.tarscan import iter_tar, short

_DATA = "bag/data/"


@dataclass(frozen=True)
class ContentSpec:
    """The federation's data: labels 0..n_classes-1; on the PLAN route grey 8-bit PNGs of
    image_size x image_size pixels; on the CVAE route embeddings of embedding_dim values."""

    n_classes: int
    image_size: int | None = None
    embedding_dim: int | None = None


def check_admission(vb, *, route: str | None, extractor: dict | None) -> None:
    """Refuse (BundleError, reason "policy") a verified bundle (common.bundle.VerifiedBundle) of
    another route than the federation's, or embeddings made by another feature extractor than the
    one it pins: embeddings of another network live in another space, and pooled they would be
    noise. None admits any route / extractor. The coordinator's store and a site's pull both ask this."""
    if route is not None and vb.route != route:
        raise BundleError(f"bundle holds {vb.route!r}-route data; this federation pools route {route!r}", "policy")
    if extractor is not None and vb.route == "cvae" and vb.datacard.get("extractor") != extractor:
        raise BundleError(
            f"embeddings made by extractor {vb.datacard.get('extractor')!r}; this federation pins {extractor!r}",
            "policy",
        )


def check_bundle_content(tar: Path, spec: ContentSpec, *, route: str, embedding_dim: int | None = None) -> None:
    """Refuse (BundleError, reason "content") a verified bundle tar whose images do not all decode
    as grey image_size x image_size PNGs, or whose labels or embedding length are not the
    federation's. route and embedding_dim: as verification found them (VerifiedBundle)."""
    if route == "cvae" and spec.embedding_dim is not None and embedding_dim != spec.embedding_dim:
        raise BundleError(
            f"embeddings are {embedding_dim}-dimensional; this federation's are {spec.embedding_dim}", "content"
        )
    with open(tar, "rb") as f:
        for entry, body in iter_tar(f):
            name = entry.name.removeprefix("./")
            if not entry.isreg() or not name.startswith(_DATA):
                continue
            if name == f"{_DATA}labels.csv":
                check_labels(_labels_csv(body.read()), spec, where=name)
            elif route == "plan" and spec.image_size is not None:
                _check_png(body.read(), spec.image_size, name)


def check_labels(labels: np.ndarray, spec: ContentSpec, *, where: str) -> None:
    """Every label in 0..n_classes-1; BundleError("content") naming the first that is not."""
    bad = labels[(labels < 0) | (labels >= spec.n_classes)]
    if bad.size:
        raise BundleError(
            f"{where}: label {int(bad[0])} is outside this federation's {spec.n_classes} classes "
            f"(0..{spec.n_classes - 1}); is federation.yaml's n_classes right?",
            "content",
        )


def check_arrays(
    route: str, data: np.ndarray, labels: np.ndarray, spec: ContentSpec, *, route_expected: str, where: str
) -> None:
    """A loaded bundle's records (images uint8 [N,H,W] or embeddings float32 [N,D]) and labels [N]
    against the federation's; BundleError("content") naming `where` otherwise."""
    if route != route_expected:
        raise BundleError(
            f"{where}: holds {route!r}-route data; this federation trains on {route_expected!r}", "content"
        )
    if route == "plan" and spec.image_size is not None and data.shape[1:] != (spec.image_size, spec.image_size):
        raise BundleError(
            f"{where}: images are {tuple(data.shape[1:])}, this federation's {(spec.image_size, spec.image_size)}",
            "content",
        )
    if route == "cvae" and spec.embedding_dim is not None and data.shape[1:] != (spec.embedding_dim,):
        raise BundleError(
            f"{where}: embeddings are {tuple(data.shape[1:])}, this federation's ({spec.embedding_dim},)", "content"
        )
    check_labels(labels, spec, where=where)


def _labels_csv(raw: bytes) -> np.ndarray:
    """The label column of a verified labels.csv (`file,label` or `index,label`)."""
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    return np.asarray([int(r[1]) for r in rows[1:]], dtype=np.int64)


def _check_png(raw: bytes, size: int, name: str) -> None:
    try:
        with Image.open(io.BytesIO(raw)) as im:
            kind = (im.format, im.mode, im.size)
            # the size from the header first: nothing larger than the federation's is decoded
            if kind == ("PNG", "L", (size, size)):
                im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BundleError(f"{short(name)}: does not decode as an image ({type(e).__name__}: {e})", "content") from None
    if kind != ("PNG", "L", (size, size)):
        raise BundleError(
            f"{short(name)}: a {kind[0]} {kind[1]} image of {kind[2][0]}x{kind[2][1]} pixels; this "
            f"federation's are grey 8-bit PNGs (mode L) of {size}x{size}",
            "content",
        )
