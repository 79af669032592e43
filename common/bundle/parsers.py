"""Bounded parsers of the files inside a bundle: labels.csv (both layouts), the safetensors header
and its values, PNG headers. Each names the file and value at fault.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from common.bundle.format import (
    _LABEL,
    _PAYLOAD_FILE,
    EMBEDDINGS,
    EMBEDDINGS_TENSOR,
    MAX_IMAGE_SIDE,
    MAX_SAFETENSORS_HEADER,
    BundleError,
)


def _read_labels(data_dir: Path) -> list[tuple[str, int]]:
    """labels.csv rows of the image bundle at `data_dir` (see _parse_labels)."""
    with open(data_dir / "labels.csv", newline="", encoding="utf-8") as f:
        return _parse_labels(f)


def _parse_labels(f: TextIO) -> list[tuple[str, int]]:
    """labels.csv rows, each checked: a payload path of the expected form matching its label."""
    rows = []
    try:
        reader = csv.reader(f)
        if next(reader, None) != ["file", "label"]:
            raise BundleError("data/labels.csv: header must be 'file,label'")
        for i, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise BundleError(f"data/labels.csv line {i}: expected 2 fields, got {len(row)}")
            m = _PAYLOAD_FILE.match(row[0])
            if not m or not _LABEL.fullmatch(row[1]) or int(row[1]) != int(m.group(1)):
                raise BundleError(f"data/labels.csv line {i}: bad row {row!r}")
            rows.append((row[0], int(row[1])))
    except (UnicodeDecodeError, csv.Error) as e:
        raise BundleError(f"data/labels.csv: not a readable CSV file ({type(e).__name__}: {e})") from None
    if not rows:
        raise BundleError("data/labels.csv: no samples")
    return rows


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: refuse duplicate keys, which parsers resolve differently (the
    safetensors library and we must see the same header)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _is_count(v) -> bool:
    return type(v) is int and v >= 0  # not bool, not float: JSON 24.0 == 24 in Python


def _read_safetensors_header(path: Path, what: str) -> tuple[int, int, int]:
    """(N, D, byte offset of the data) of the embeddings file at `path` (see _parse_safetensors_header)."""
    with open(path, "rb") as f:
        return _parse_safetensors_header(f, path.stat().st_size, what)


def _parse_safetensors_header(f: BinaryIO, size: int, what: str) -> tuple[int, int, int]:
    """(N, D, byte offset of the data) of an embeddings file of `size` bytes, from its header
    alone, read from `f` (at the file's start; left just past the header).

    The header is parsed here, bounded, before any library touches the file: the first 8 bytes
    are its length (little-endian u64), then that many bytes of JSON. Only exactly one tensor
    "embeddings" of dtype F32 and shape [N,D] (N, D >= 1), whose data_offsets are [0, 4*N*D] and
    which ends the file, is accepted; an optional "__metadata__" must be a str -> str object.
    `what` names the file in errors.
    """
    head = f.read(8)
    if len(head) < 8:
        raise BundleError(f"{what}: {size} bytes, too short for a safetensors file (an 8-byte header length first)")
    (hlen,) = struct.unpack("<Q", head)
    if hlen > MAX_SAFETENSORS_HEADER:
        raise BundleError(
            f"{what}: declares a {hlen}-byte header, over the limit of {MAX_SAFETENSORS_HEADER} bytes", "too_large"
        )
    if hlen < 2 or 8 + hlen > size:
        raise BundleError(f"{what}: declares a {hlen}-byte header but the file has {size} bytes")
    raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{what}: header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise BundleError(f"{what}: header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise BundleError(f"{what}: __metadata__ must be an object of strings")
    if list(header) != [EMBEDDINGS_TENSOR]:
        raise BundleError(f"{what}: must hold exactly one tensor {EMBEDDINGS_TENSOR!r}, holds {sorted(header)}")
    t = header[EMBEDDINGS_TENSOR]
    if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
        raise BundleError(
            f"{what}: tensor {EMBEDDINGS_TENSOR!r} must have exactly dtype, shape and data_offsets, "
            f"has {sorted(t) if isinstance(t, dict) else type(t).__name__}"
        )
    if t["dtype"] != "F32":
        raise BundleError(f"{what}: tensor {EMBEDDINGS_TENSOR!r} has dtype {t['dtype']!r}, expected 'F32'")
    shape = t["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_count(v) and v >= 1 for v in shape)):
        raise BundleError(f"{what}: tensor {EMBEDDINGS_TENSOR!r} has shape {shape!r}, expected [N, D] with N, D >= 1")
    n, d = shape
    nbytes = 4 * n * d
    offsets = t["data_offsets"]
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(v) for v in offsets)
        and offsets == [0, nbytes]
    ):
        raise BundleError(
            f"{what}: tensor {EMBEDDINGS_TENSOR!r} has data_offsets {offsets!r}, expected [0, {nbytes}] for F32 {shape}"
        )
    if 8 + hlen + nbytes != size:
        raise BundleError(
            f"{what}: {size} bytes, but its {hlen}-byte header and F32 {shape} data make {8 + hlen + nbytes}"
        )
    return n, d, 8 + hlen


def _check_finite(f: BinaryIO, what: str, n: int, d: int) -> None:
    """Every one of the N*D little-endian float32 values read from `f` (at the data's start) is
    finite; read in blocks, so checking costs no more memory than a block."""
    block = 1 << 18  # values: 1 MiB, as the member is read
    done, total = 0, n * d
    while done < total:
        k = min(block, total - done)
        buf = f.read(4 * k)
        if len(buf) != 4 * k:
            raise BundleError(f"{what}: truncated data ({done + len(buf) // 4} of {total} values)")
        x = np.frombuffer(buf, dtype="<f4")
        bad = ~np.isfinite(x)
        if bad.any():
            i = done + int(np.argmax(bad))
            raise BundleError(f"{what}: embedding [{i // d},{i % d}] is {x[i - done]}, expected a finite value")
        done += k


def _read_index_labels(path: Path, n: int, what: str) -> np.ndarray:
    """int64 [n] labels from the embedding bundle's labels.csv at `path` (see _parse_index_labels)."""
    with open(path, newline="", encoding="utf-8") as f:
        return _parse_index_labels(f, n, what)


def _parse_index_labels(f: TextIO, n: int, what: str = "data/labels.csv") -> np.ndarray:
    """int64 [n] labels from an embedding bundle's labels.csv: header `index,label`, then exactly
    n rows whose index is 0..n-1 in order (canonical decimal) and whose label is 0..99."""
    labels = np.empty(n, np.int64)
    count = 0
    try:
        reader = csv.reader(f)
        if next(reader, None) != ["index", "label"]:
            raise BundleError(f"{what}: header must be 'index,label'")
        for line, row in enumerate(reader, start=2):
            if count >= n:
                raise BundleError(f"{what} line {line}: more rows than the {n} embeddings")
            if len(row) != 2 or not _LABEL.fullmatch(row[1]):
                raise BundleError(f"{what} line {line}: bad row {row!r}, expected 'index,label' with a label 0..99")
            if row[0] != str(count):
                raise BundleError(
                    f"{what} line {line}: index {row[0]!r}, expected {count} "
                    f"(one row per embedding, indices 0..N-1 in order)"
                )
            labels[count] = int(row[1])
            count += 1
    except (UnicodeDecodeError, csv.Error) as e:
        raise BundleError(f"{what}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if count != n:
        raise BundleError(f"{what}: {count} rows but {EMBEDDINGS} holds {n} embeddings")
    return labels


def _check_png_header(head: bytes, rel: str) -> None:
    """Refuse payload file `rel` (in data/) if its first bytes `head` are not a PNG's or its header
    declares more than MAX_IMAGE_SIDE pixels a side: a few compressed bytes can decode to
    gigabytes (decompression bomb), so this is checked from the 24-byte header, before anyone
    decodes it."""
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise BundleError(f"data/{rel}: not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise BundleError(
            f"data/{rel}: PNG declares {width}x{height} pixels, over the limit of {MAX_IMAGE_SIDE} a side "
            f"(decompression bomb?)",
            "too_large",
        )
