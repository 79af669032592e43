"""Building a bundle: the payload (PNGs or one safetensors file), the bag, the data card and the
signed attestation.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import bagit
import numpy as np
from PIL import Image
from safetensors.numpy import save_file as save_safetensors

from common.bundle.format import (
    ATTESTATION,
    BAG,
    DATA_FORMATS,
    EMBEDDINGS,
    EMBEDDINGS_TENSOR,
    MAX_IMAGE_SIDE,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    TAG_FILES,
    TAGMANIFEST,
    BundleError,
)
from common.bundle.parsers import _read_safetensors_header
from common.dsse import sign_envelope
from common.fileio import sha256_file
from common.signing import key_id


def code_version() -> str:
    """The installed plan-node version, or "unknown" when running from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("plan-node")
    except PackageNotFoundError:
        return "unknown"


def bundle_id_for(site: str, data: np.ndarray, labels: np.ndarray) -> str:
    """The content-derived bundle id (see the module docstring).

    data: uint8 images [N,H,W] or float32 embeddings [N,D]; labels: int [N]. The two kinds hash
    under different domain strings, so an image set and an embedding set never share an id.
    """
    h = hashlib.sha256()
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        # Unchanged since v1: existing bundles keep their ids.
        h.update(b"plan-node-bundle-v1\0" + site.encode() + b"\0")
        h.update(json.dumps(list(data.shape)).encode() + b"\0")
        h.update(np.ascontiguousarray(data, dtype=np.uint8).tobytes())
    elif isinstance(data, np.ndarray) and data.dtype == np.float32 and data.ndim == 2:
        h.update(b"plan-node-bundle-embeddings-v1\0" + site.encode() + b"\0")
        h.update(json.dumps({"dtype": "<f4", "shape": list(data.shape)}, sort_keys=True).encode() + b"\0")
        h.update(np.ascontiguousarray(data, dtype="<f4").tobytes())
    else:
        raise BundleError(
            f"bundle_id_for: expected uint8 images [N,H,W] or float32 embeddings [N,D], got "
            f"{getattr(data, 'dtype', type(data))} shape {getattr(data, 'shape', None)}"
        )
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()[:32]


def _check_labels(labels: np.ndarray, n: int, what: str) -> None:
    """labels: int [n] class indices 0..99, one per sample of the `n` `what` (at least one)."""
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise BundleError(
            f"labels must be int64 [N], got {getattr(labels, 'dtype', type(labels))} "
            f"shape {getattr(labels, 'shape', None)}"
        )
    if n != len(labels) or n == 0:
        raise BundleError(f"need as many labels as {what}, at least one: {n} {what}, {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 99:
        raise BundleError(f"labels must be class indices in 0..99, got range {labels.min()}..{labels.max()}")


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise BundleError(
            f"images must be uint8 [N,H,W], got {getattr(images, 'dtype', type(images))} "
            f"shape {getattr(images, 'shape', None)}"
        )
    _check_labels(labels, len(images), "images")
    if max(images.shape[1:]) > MAX_IMAGE_SIDE:
        raise BundleError(f"images larger than {MAX_IMAGE_SIDE} pixels a side: {images.shape[1:]}")


def _check_embeddings(embeddings: np.ndarray, labels: np.ndarray) -> None:
    # float32 exactly (native little-endian): anything else would be silently cast, and the
    # bundle id and the safetensors bytes would then describe different numbers.
    if (
        not isinstance(embeddings, np.ndarray)
        or embeddings.dtype != np.dtype("<f4")
        or embeddings.ndim != 2
        or embeddings.shape[1] == 0
    ):
        raise BundleError(
            f"embeddings must be float32 [N,D] with D >= 1, got "
            f"{getattr(embeddings, 'dtype', type(embeddings))} shape {getattr(embeddings, 'shape', None)}"
        )
    _check_labels(labels, len(embeddings), "embeddings")
    finite = np.isfinite(embeddings)
    if not finite.all():
        r, c = (int(i) for i in np.argwhere(~finite)[0])
        raise BundleError(
            f"embeddings must be finite: [{r},{c}] is {embeddings[r, c]} ({int((~finite).sum())} non-finite values)"
        )


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def write_tagmanifest(bag_dir: Path) -> str:
    """Rewrite the sha256 tag manifest over every tag file; returns its own sha256.

    Done here rather than with bagit's Bag.save(), which os.chdir()s the whole process.
    """
    lines = []
    for name in sorted(TAG_FILES):
        if name != TAGMANIFEST and (bag_dir / name).is_file():
            lines.append(f"{sha256_file(bag_dir / name)} {name}\n")
    (bag_dir / TAGMANIFEST).write_text("".join(lines))
    return sha256_file(bag_dir / TAGMANIFEST)


def _canonical_json(obj, what: str = "value") -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise BundleError(f"{what}: not plain JSON without NaN/Infinity ({e})") from None


def _write_image_payload(bag_dir: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """images/<class>/<i>.png and labels.csv (`file,label`) straight into `bag_dir`."""
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        rel = f"images/{int(y)}/{i}.png"
        (bag_dir / "images" / str(int(y))).mkdir(parents=True, exist_ok=True)
        (bag_dir / rel).write_bytes(_png(img))
        rows.append((rel, int(y)))
    with open(bag_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "label"])
        w.writerows(rows)


def _write_embedding_payload(bag_dir: Path, embeddings: np.ndarray, labels: np.ndarray) -> None:
    """embeddings.safetensors (one F32 [N,D] tensor) and labels.csv (`index,label`) into `bag_dir`."""
    path = bag_dir / EMBEDDINGS
    save_safetensors({EMBEDDINGS_TENSOR: np.ascontiguousarray(embeddings, dtype="<f4")}, str(path))
    # Read back what the library wrote with the verifier's own parser: a build that could not
    # verify fails here, not at every receiver.
    _read_safetensors_header(path, f"data/{EMBEDDINGS}")
    with open(bag_dir / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["index", "label"])
        w.writerows((i, int(y)) for i, y in enumerate(labels))


def build_bundle(
    out_dir: Path,
    *,
    images: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    labels: np.ndarray,
    audit: dict,
    datacard: dict,
    site: str,
    sequence: int,
    signing_key,
    config_digest: str,
    policy: dict | None = None,
    dp_epsilon: float | None = None,
    predicate_type: str = PREDICATE_TYPE,
) -> str:
    """Write the signed bundle `out_dir/<bundle_id>/` and return bundle_id.

    Exactly one payload: images, uint8 [N,H,W] grey (the PLAN route), or embeddings, float32
    [N,D] finite (the CVAE route); labels: int [N] class indices 0..99. `audit` is the audit
    result dict (it must say passed: true to be accepted anywhere); `policy` defaults to
    audit["policy"]. `datacard` is completed with site, bundle_id, sequence, counts, route (the
    payload's; a datacard naming another route is refused), data_format, image_shape or
    embedding_dim, created_at, code_version and config_digest; the route also goes into the
    signed predicate. Everything is checked before anything is written. The bundle is assembled
    in a temporary folder and renamed into place, so `out_dir/<bundle_id>` is complete or absent.
    Refuses if it already exists.
    """
    if (images is None) == (embeddings is None):
        raise BundleError(
            "give exactly one payload: images (PLAN route) or embeddings (CVAE route), got "
            + ("both" if images is not None else "neither")
        )
    if images is not None:
        _check_arrays(images, labels)
        route, data = "plan", images
    else:
        _check_embeddings(embeddings, labels)
        route, data = "cvae", embeddings
    if not isinstance(datacard, Mapping):
        raise BundleError(f"datacard must be a mapping, got {type(datacard).__name__}")
    if datacard.get("route") is not None and datacard["route"] != route:
        raise BundleError(
            f"datacard route {datacard['route']!r} contradicts the payload: "
            f"{'images' if route == 'plan' else 'embeddings'} are the {route!r} route's"
        )
    if not isinstance(sequence, int) or sequence < 1:
        raise BundleError(f"sequence must be a positive integer, got {sequence!r}")
    labels = labels.astype(np.int64)
    out_dir = Path(out_dir)
    bundle_id = bundle_id_for(site, data, labels)
    final = out_dir / bundle_id
    if final.exists():
        raise BundleError(f"{final}: bundle already exists")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{bundle_id}."))
    try:
        bag_dir = work / BAG
        bag_dir.mkdir()
        # The payload goes straight into bag/; bagit.make_bag moves it under data/.
        if route == "plan":
            _write_image_payload(bag_dir, images, labels)
        else:
            _write_embedding_payload(bag_dir, embeddings, labels)
        version = datacard.get("code_version") or code_version()
        bagit.make_bag(
            str(bag_dir),
            bag_info={
                "Source-Organization": site,
                "External-Identifier": bundle_id,
                "Bag-Software-Agent": f"plan-node {version} (bagit.py {bagit.VERSION})",
            },
            checksums=["sha256"],
        )
        classes, counts = np.unique(labels, return_counts=True)
        card = dict(datacard)
        card.update(
            site=site,
            bundle_id=bundle_id,
            sequence=sequence,
            n_samples=int(len(labels)),
            class_counts={str(int(c)): int(n) for c, n in zip(classes, counts)},
            route=route,
            data_format=DATA_FORMATS[route],
            created_at=card.get("created_at") or dt.datetime.now(dt.timezone.utc).isoformat(),
            code_version=version,
            config_digest=config_digest,
        )
        if route == "plan":
            card.update(image_shape=[int(images.shape[1]), int(images.shape[2])], image_format="png-grey8")
            card.pop("embedding_dim", None)
        else:  # a caller's image fields would describe a payload this bundle does not hold
            card.update(embedding_dim=int(embeddings.shape[1]))
            card.pop("image_shape", None)
            card.pop("image_format", None)
        (bag_dir / "audit.json").write_text(_canonical_json(audit, "audit"))
        (bag_dir / "datacard.json").write_text(_canonical_json(card, "datacard"))
        tag_digest = write_tagmanifest(bag_dir)

        statement = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": TAGMANIFEST, "digest": {"sha256": tag_digest}}],
            "predicateType": predicate_type,
            "predicate": {
                "site": site,
                "bundle_id": bundle_id,
                "sequence": sequence,
                "route": route,
                "n_samples": int(len(labels)),
                "audit": audit,
                "policy": policy if policy is not None else audit.get("policy"),
                "config_digest": config_digest,
                "code_version": version,
                "dp_epsilon": dp_epsilon,
            },
        }
        payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        env = sign_envelope(payload, PAYLOAD_TYPE, signing_key, key_id(signing_key.public_key()))
        (work / ATTESTATION).write_text(_canonical_json(env))
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return bundle_id
