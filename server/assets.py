"""Federation assets on the coordinator (docs/DESIGN.md 3.4): files every site must share, such as
the CVAE route's pinned feature-extractor weights, served by the exchange to sites that have no
internet (`DownloadAsset` in common/exchange.proto).

Layout: `<coordinator dir>/assets/<sha256>`, content-addressed: a file is named by the sha256 of
its bytes, and only names of 64 lower-case hex digits are ever served. The exchange streams the
file as it is; the site checks the bytes against the sha256 it pinned (node/release/assets.py), so a
file altered on the coordinator after it was added is refused there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import get_args

from common import errors
from common.config import ExtractorConfig
from common.fileio import sha256_file

SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
EXTRACTOR_ARCHS = tuple(
    a for a in get_args(ExtractorConfig.model_fields["arch"].annotation) if a != "tiny"
)  # with weights
ASSETS_DIRNAME = "assets"  # beside store/ in the coordinator directory (CoordinatorDir.assets)


class AssetError(ValueError):
    """An asset cannot be added or looked up (unreadable file, malformed digest)."""

    exit_code = errors.DATA


def asset_path(assets_dir: Path, sha256: str) -> Path:
    """Where the asset with this sha256 lives; AssetError unless it is 64 lower-case hex digits."""
    if not isinstance(sha256, str) or not SHA256_NAME.match(sha256):
        raise AssetError(f"asset sha256 {sha256!r} is not 64 lower-case hex digits")
    return Path(assets_dir) / sha256


def add_asset(assets_dir: Path, src: Path) -> tuple[str, bool]:
    """Copy `src` into `assets_dir` under its sha256, atomically (temporary name, fsync, rename; mode
    0644). Returns (sha256, added): added is False when an intact copy was already there (nothing
    is written); a copy whose bytes no longer match its name is replaced."""
    assets_dir, src = Path(assets_dir), Path(src)
    if not src.is_file():
        raise AssetError(f"{src}: not a file")
    assets_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=assets_dir, prefix=".add.", suffix=".tmp")
    try:
        h = hashlib.sha256()
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            try:
                with open(src, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
            except OSError as e:
                raise AssetError(f"{src}: cannot read ({e.strerror})") from None
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        dest = asset_path(assets_dir, digest)
        if dest.is_file() and not dest.is_symlink() and sha256_file(dest) == digest:
            Path(tmp).unlink()
            return digest, False
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest, True


def extractor_yaml(sha256: str, weights: str, arch: str | None = None) -> str:
    """The federation.yaml lines that pin this file as the CVAE route's feature extractor. Without
    `arch`, an ARCH placeholder (which federation.yaml refuses until it is replaced)."""
    if arch is not None:
        if arch not in EXTRACTOR_ARCHS:
            raise AssetError(f"--arch {arch!r}: expected one of {', '.join(EXTRACTOR_ARCHS)}")
        ExtractorConfig(arch=arch, weights=weights, sha256=sha256)  # the lines printed must load
    name = weights if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", weights) else json.dumps(weights)  # YAML-safe
    archs = ", ".join(EXTRACTOR_ARCHS)
    return (
        "route: cvae\n"
        "extractor:\n"
        f"  arch: {arch or 'ARCH'}" + ("" if arch else f"  # one of {archs}") + "\n"
        f"  weights: {name}\n"
        f"  sha256: {sha256}\n"
    )
