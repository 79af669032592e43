"""What the checks read of a bundle: its members as they streamed past once (digests, sizes,
PNG heads, the embeddings scan, and the few small files the checks parse).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence, TextIO

from common.bundle.format import (
    _DATA,
    _KEPT,
    _PNG_HEAD,
    ATTESTATION,
    EMBEDDINGS,
    KEEP_IN_MEMORY,
    MAX_JSON_BYTES,
    BundleError,
)
from common.bundle.parsers import _check_finite, _parse_safetensors_header
from common.bundle.trust import _open_statement

if TYPE_CHECKING:  # archive reads members into _Members, which only names its reader type
    from common.bundle.archive import _MemberReader


class _Members:
    """What the checks need of a bundle tar, gathered while its members stream past once
    (_read_members). The checks read only this, never extracted files, so one set of checks
    serves a bundle extracted to disk (verify_bundle) and one that is only streamed through
    (verify_bundle_stream).

    digests: sha256 (hex) of every regular file by its normalised path ("bag/data/labels.csv");
    sizes: their sizes in bytes; heads: the first _PNG_HEAD bytes of each other payload file, by
    its path in data/ (for the PNG header check); embeddings: the scan of
    data/embeddings.safetensors, if there is one. The files the checks parse (_KEPT) are kept
    whole: in memory up to KEEP_IN_MEMORY bytes each, beyond that (a manifest or labels.csv of
    many samples) in a temporary file under `spill_dir`, removed by close().
    """

    def __init__(self, spill_dir: Path | None):
        self.digests: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.heads: dict[str, bytes] = {}
        self.embeddings: _EmbeddingScan | None = None
        self._kept: dict[str, bytes | Path] = {}
        self._spill_dir = spill_dir
        self.statement: tuple[dict, str] | None = None  # (statement, signer key id) once verified

    def open_statement(self, trusted_keys: Mapping[str, Sequence]) -> tuple[dict, str]:
        """Verify the attestation read so far (_open_statement); remember and return (statement, signer)."""
        self.statement = _open_statement(_read_json(self, ATTESTATION, ATTESTATION), trusted_keys)
        return self.statement

    def __enter__(self) -> "_Members":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spill files."""
        for kept in self._kept.values():
            if isinstance(kept, Path):
                kept.unlink(missing_ok=True)

    def take(self, member: _MemberReader) -> None:
        """Read `member` to its end, keeping what the checks need of it."""
        rel = member.rel
        if rel in _KEPT:
            self._keep(member)
        elif rel == f"{_DATA}{EMBEDDINGS}":
            self.embeddings = _EmbeddingScan.of(member, f"data/{EMBEDDINGS}")
        elif rel.startswith(_DATA):
            self.heads[rel[len(_DATA) :]] = member.read(_PNG_HEAD)
        self.digests[rel] = member.finish()
        self.sizes[rel] = member.size

    def _keep(self, member: _MemberReader) -> None:
        if member.size <= KEEP_IN_MEMORY:
            self._kept[member.rel] = b"".join(iter(member.read, b""))
            return
        fd, name = tempfile.mkstemp(dir=self._spill_dir, prefix="member-")
        self._kept[member.rel] = Path(name)
        with os.fdopen(fd, "wb") as f:
            for block in iter(member.read, b""):
                f.write(block)

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of kept file `rel` (KeyError if it was not in the archive)."""
        kept = self._kept[rel]
        return kept if isinstance(kept, bytes) else kept.read_bytes()

    def open_text(self, rel: str) -> TextIO:
        """Kept file `rel` open as UTF-8 text (newlines untranslated, for csv)."""
        kept = self._kept[rel]
        if isinstance(kept, bytes):
            return io.TextIOWrapper(io.BytesIO(kept), encoding="utf-8", newline="")
        return open(kept, encoding="utf-8", newline="")


@dataclass(frozen=True)
class _EmbeddingScan:
    """data/embeddings.safetensors as checked while it streamed: `shape` (N, D), or the first
    `fault` found (header, then values). A fault is kept, not raised, so that the checks report
    it in its usual place: after the signature and the bag, like every other payload check."""

    shape: tuple[int, int] | None
    fault: BundleError | None

    @classmethod
    def of(cls, member: _MemberReader, what: str) -> "_EmbeddingScan":
        """Scan `member` from its start: the header parsed and bounded (_parse_safetensors_header),
        then every value checked finite (_check_finite); leaves the rest for the caller to read."""
        try:
            n, d, _ = _parse_safetensors_header(member, member.size, what)
            _check_finite(member, what, n, d)
        except BundleError as e:
            return cls(None, e)
        return cls((n, d), None)

    def result(self) -> tuple[int, int]:
        """(N, D), or raise the fault."""
        if self.fault is not None:
            raise self.fault
        return self.shape


def _read_json(members: _Members, rel: str, what: str):
    """The JSON content of kept file `rel`; `what` names it in errors."""
    if members.sizes[rel] > MAX_JSON_BYTES:
        raise BundleError(f"{what}: larger than {MAX_JSON_BYTES} bytes", "too_large")
    try:
        return json.loads(members.read_bytes(rel).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...
        raise BundleError(f"{what}: not valid JSON ({type(e).__name__}: {e})") from None
