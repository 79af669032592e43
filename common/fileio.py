"""Atomic writes and digests: a crash never leaves a half-written file under its final name. And
nan_to_none, because JSON has no nan."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode(), mode=mode)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Reloaded:
    """`load(path)`, computed again only when `path`'s modification time changes (a folder's
    changes when a file in it is added, removed or renamed into place); `empty` while `path` does
    not exist. Call it for the current value; safe from several threads."""

    def __init__(self, path: Path, load, *, empty):
        self.path, self._load, self._empty = Path(path), load, empty
        self._stamp: int | None = None
        self._value = empty
        self._lock = threading.Lock()

    def __call__(self):
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return self._empty
        with self._lock:
            if stamp != self._stamp:
                self._value, self._stamp = self._load(self.path), stamp
            return self._value


def nan_to_none(x):
    """x with every float nan in its dicts and lists replaced by None (JSON has no nan)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x
