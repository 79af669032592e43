"""Bundle archives: packing a bundle folder as one ustar tar, and reading one back front to back
under the safety rules (no path outside the destination, no links, bounded sizes and member counts),
by common.tarscan, never by tarfile.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence

from common.bundle.format import _BLOCK, ATTESTATION, MAX_ATTESTATION_BYTES, MAX_MEMBERS, BundleError
from common.bundle.members import _Members
from common.tarscan import TarEntry, TarFormatError, iter_tar, short


def pack_bundle(bundle_dir: Path) -> Path:
    """Pack `bundle_dir` into `<bundle_dir>.tar` beside it and return that path.

    One uncompressed tar of the regular files only, sorted by path, with owner, group and
    times zeroed, so the same bundle always packs to the same bytes. Written atomically.
    """
    bundle_dir = Path(bundle_dir)
    files = []
    for p in sorted(bundle_dir.rglob("*")):
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{p}: not a regular file; bundles hold regular files only", "unsafe")
        files.append(p)
    out = bundle_dir.with_name(bundle_dir.name + ".tar")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for p in files:
                info = tarfile.TarInfo(p.relative_to(bundle_dir).as_posix())
                info.size = p.stat().st_size
                info.mode = 0o644
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(p, "rb") as f:
                    tf.addfile(info, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _safe_member_path(name: str) -> tuple[str, ...]:
    if not name or "\x00" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise BundleError(f"archive member {short(name)!r}: name has control characters or backslashes", "unsafe")
    if name.startswith("/"):
        raise BundleError(f"archive member {short(name)!r}: absolute path", "unsafe")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise BundleError(f"archive member {short(name)!r}: empty path", "unsafe")
    if ".." in parts:
        raise BundleError(f"archive member {short(name)!r}: '..' in path", "unsafe")
    return parts


def safe_extract(tar: Path | BinaryIO, dest: Path, *, max_bytes: int, max_members: int = MAX_MEMBERS) -> list[str]:
    """Extract the uncompressed tar `tar` into `dest` (new or empty); return the file paths.

    `tar`: a path, or a binary file read front to back (tarfile seeks in it, forward and within
    the member it reads), e.g. an upload still arriving; its size is then the caller's to bound.
    Only regular files and directories are extracted, each with fresh permissions (0644/0755).
    Refuses (BundleError) absolute paths, '..', symlinks, hard links, devices, FIFOs, duplicate
    names, more than `max_members` members, and more than `max_bytes` bytes of content in total,
    counted while copying: a member never yields more bytes than its header declares.
    On refusal, whatever was extracted stays in `dest` for the caller to remove.
    """
    with _Members(spill_dir=None) as members:
        _read_members(tar, members, max_bytes=max_bytes, max_members=max_members, dest=Path(dest), trusted_keys=None)
        return list(members.digests)


def _tar_name(tar: Path | BinaryIO) -> str:
    return Path(tar).name if isinstance(tar, (str, Path)) else Path(getattr(tar, "name", "bundle.tar")).name


def _read_members(
    tar: Path | BinaryIO,
    members: _Members,
    *,
    max_bytes: int,
    max_members: int,
    dest: Path | None,
    trusted_keys: Mapping[str, Sequence] | None,
) -> None:
    """Walk the tar's members once, front to back, under the safety rules of safe_extract, and
    gather into `members` what the checks need (each file's sha256, see _Members); with a `dest`
    (new or empty), also extract them there. Without one nothing is written but `members`' spill
    files: the same walk and the same refusals, so a bundle the store verifies in flight is held
    to exactly the rules of one a node extracts.

    The archive is read by common.tarscan, never by tarfile. With `trusted_keys` (a bundle, not
    any archive) the first member must be the attestation, and its signature is verified
    (members.open_statement) before the next member is read: nothing unsigned is parsed beyond
    the tar headers."""
    if isinstance(tar, (str, Path)):
        size = os.path.getsize(tar)
        if size > max_bytes + 1024 * 1024:  # tar headers and padding on top of the content budget
            raise BundleError(f"{_tar_name(tar)}: archive is {size} bytes, over the limit of {max_bytes}", "too_large")
    root = None
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise BundleError(f"{dest}: extraction folder is not empty")
        root = str(dest.resolve())
    budget = max_bytes
    files: set[str] = set()
    folders: set[str] = set()
    made: set[str] = set()  # folders made under root
    with open(tar, "rb") if isinstance(tar, (str, Path)) else contextlib.nullcontext(tar) as src:
        try:
            for n, (m, body) in enumerate(iter_tar(src)):
                if n >= max_members:
                    raise BundleError(f"{_tar_name(tar)}: more than {max_members} archive members", "too_large")
                rel = _claim_member(m, files, folders)
                if n == 0 and trusted_keys is not None:
                    _check_first_member(rel, m, tar)
                if m.isdir():
                    if root is not None:
                        _make_folders(root, rel, m.name, made)
                    continue
                if m.size > budget:
                    raise BundleError(
                        f"archive member {rel!r}: {m.size} bytes would exceed the limit of {max_bytes} bytes",
                        "too_large",
                    )
                out = None if root is None else _create_file(root, rel, m.name, made)
                with out or contextlib.nullcontext():
                    members.take(_MemberReader(body, m.size, rel, out))
                budget -= m.size
                if n == 0 and trusted_keys is not None:
                    members.open_statement(trusted_keys)  # before one byte of the payload is read
        except TarFormatError as e:
            if e.unsafe:
                raise BundleError(str(e), "unsafe") from None
            raise BundleError(f"{_tar_name(tar)}: corrupt tar archive ({e})") from None


def _check_first_member(rel: str, m: TarEntry, tar: Path | BinaryIO) -> None:
    """The signed statement comes first, small, so it is verified before the payload is parsed."""
    if rel != ATTESTATION or not m.isreg():
        raise BundleError(
            f"{_tar_name(tar)}: the first archive member is {short(rel)!r}, not {ATTESTATION} "
            f"(the signed statement comes first and is checked before anything else)",
            "unsafe",
        )
    if m.size > MAX_ATTESTATION_BYTES:
        raise BundleError(f"{ATTESTATION}: {m.size} bytes, over the limit of {MAX_ATTESTATION_BYTES}", "too_large")


def _claim_member(m: TarEntry, files: set[str], folders: set[str]) -> str:
    """The normalised path of member `m` ("a/b"), recorded in `files` or `folders` (the paths
    claimed so far, folders with every folder above them); refused unless `m` is a regular file
    or a folder, its path is safe (_safe_member_path), no folder above it is a file of the
    archive, and a file's path was not claimed before. Checked on paths, not on disk, so that
    the walk that extracts nothing refuses exactly what extraction would."""
    parts = _safe_member_path(m.name)  # links, devices and FIFOs never get here: common.tarscan refuses them
    rel = "/".join(parts)
    above = parts if m.isdir() else parts[:-1]
    # A folder already in `folders` had every folder above it checked when it was added, and
    # no file can take a folder's path afterwards: only new folders need checking.
    if above and "/".join(above) not in folders:
        for i in range(1, len(above) + 1):
            folder = "/".join(above[:i])
            if folder in files:
                raise BundleError(f"archive member {m.name!r}: its folder {folder} is a file of the archive", "unsafe")
            folders.add(folder)
    if m.isreg():
        if rel in files or rel in folders:
            raise BundleError(f"archive member {rel!r}: appears twice", "unsafe")
        files.add(rel)
    return rel


def _make_folders(root: str, rel: str, name: str, made: set[str]) -> None:
    """Make the folder `rel` (0755, with its parents) under the extraction folder `root`, unless
    it is in `made` (the folders made so far), then add it there; `name` (the member's) names it
    in errors.

    No path resolution: `rel` passed _claim_member (relative, no '..', no folder of it is a
    file), the extraction folder was empty, every folder in it is made here and only regular
    files and folders are ever created in it (links are refused), so no path under `root` can
    lead outside it. Resolving each folder (realpath) cost more than the rest of extraction."""
    if rel in made:
        return
    try:
        os.makedirs(f"{root}/{rel}", mode=0o755, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # _claim_member refuses this first; kept as a guard
        raise BundleError(f"archive member {name!r}: a folder of {rel} is a file of the archive", "unsafe") from None
    made.add(rel)


def _create_file(root: str, rel: str, name: str, made: set[str]) -> BinaryIO:
    """The new file `rel` under the extraction folder `root`, open for writing (0644), its
    folder made first; O_EXCL and O_NOFOLLOW guard the file itself (see _make_folders)."""
    folder = rel.rpartition("/")[0]
    if folder:
        _make_folders(root, folder, name, made)
    try:
        fd = os.open(f"{root}/{rel}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:  # _claim_member refuses this first; kept as a guard
        raise BundleError(f"archive member {rel!r}: appears twice", "unsafe") from None
    return os.fdopen(fd, "wb")


class _MemberReader:
    """One archive member of `size` bytes (declared by its header) read from `src`, each byte
    hashed (sha256) and, with an `out` file, copied there as it is read: whoever inspects the
    member reads it through this, so that it is read once. `rel` names it in errors."""

    def __init__(self, src: BinaryIO, size: int, rel: str, out: BinaryIO | None):
        self._src, self._out = src, out
        self.size, self.rel = size, rel
        self._hash = hashlib.sha256()
        self._done = 0  # bytes read

    def read(self, n: int = _BLOCK) -> bytes:
        """Up to `n` bytes (n >= 0); b"" at the member's end. More bytes than declared are refused."""
        if self._done > self.size:  # refused before: say so again to whoever reads on
            raise BundleError(f"archive member {self.rel!r}: more bytes than declared", "unsafe")
        block = self._src.read(min(n, self.size - self._done + 1))  # +1: a longer member shows
        self._done += len(block)
        if self._done > self.size:
            raise BundleError(f"archive member {self.rel!r}: more bytes than declared", "unsafe")
        self._hash.update(block)
        if self._out is not None:
            self._out.write(block)
        return block

    def finish(self) -> str:
        """Read the rest; the sha256 (hex) of all the member's bytes. Refuses a truncated one."""
        while self.read():
            pass
        if self._done != self.size:
            raise BundleError(f"archive member {self.rel!r}: truncated ({self._done} of {self.size} bytes)")
        return self._hash.hexdigest()


def read_predicate(tar: Path | BinaryIO) -> dict:
    """The attestation predicate of a bundle tar (a path or an open binary file), NOT verified:
    for addressing an upload, or for showing figures of bundles that were verified when stored.
    Only the first member, the attestation, is read (common.tarscan)."""
    name = _tar_name(tar)
    try:
        with open(tar, "rb") if isinstance(tar, (str, Path)) else contextlib.nullcontext(tar) as src:
            m, body = next(iter_tar(src))
            _check_first_member("/".join(_safe_member_path(m.name)), m, tar)
            env = json.loads(body.read())
        return json.loads(base64.b64decode(env["payload"]))["predicate"]
    except BundleError:
        raise
    except (StopIteration, KeyError, ValueError, TypeError, OSError) as e:  # TarFormatError is a ValueError
        raise BundleError(f"{name}: cannot read the predicate of {ATTESTATION} ({e})") from None


def read_bundle_site(tar_path: Path) -> str:
    """The site a bundle tar's attestation claims, NOT verified: for addressing an upload only."""
    predicate = read_predicate(Path(tar_path))
    if not isinstance(predicate, dict) or not isinstance(predicate.get("site"), str):
        raise BundleError(f"{tar_path}: cannot read the site from {ATTESTATION} (no site in the predicate)")
    return predicate["site"]
