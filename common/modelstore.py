"""The local model store (docs/DESIGN.md 3.4): pretrained weights are files in a folder, each
pinned by its sha256. Nothing here downloads; a missing or wrong file is a clear error that says
which file, which digest and where to put it.

The store folder is chosen by the caller (a site uses `<site>/modelstore` unless the
environment variable PLAN_MODEL_STORE names another; see `default_store_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

from common import errors
from common.fileio import sha256_file

STORE_ENV = "PLAN_MODEL_STORE"


class ModelStoreError(FileNotFoundError):
    """A pinned weight file is absent from the store or does not match its sha256."""

    exit_code = errors.DATA


def default_store_dir(site_root: Path) -> Path:
    """$PLAN_MODEL_STORE when set (one store shared by several sites), else <site_root>/modelstore."""
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else Path(site_root) / "modelstore"


def resolve(sha256: str, *, store_dir: Path, name: str, source: str | None = None) -> Path:
    """The path of weight file `name` in `store_dir`, after checking its sha256.

    `sha256` is the pinned digest in hex: the full 64 digits, or a prefix of at least 8 where
    only a prefix is published (torchvision names its files by the first 8). `source` (e.g. the
    URL the file is published at) goes into the error message, for whoever fetches it on a
    connected machine. Raises ModelStoreError naming the file, the digest and the folder.
    """
    sha256 = sha256.lower()
    if len(sha256) < 8 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 pin {sha256!r} must be at least 8 hex digits")
    path = Path(store_dir) / name
    where = f" (published at {source})" if source else ""
    if not path.is_file():
        raise ModelStoreError(
            f"model weight {name!r} (sha256 {sha256}{'...' if len(sha256) < 64 else ''}) "
            "is not in the local model store: "
            f"copy the file{where} to {path} (set {STORE_ENV} to use another store folder); nothing is downloaded"
        )
    got = sha256_file(path)
    if not got.startswith(sha256):
        raise ModelStoreError(
            f"{path}: sha256 is {got}, expected {sha256}{'...' if len(sha256) < 64 else ''}; replace the file{where}"
        )
    return path
