"""Private key files: created 0600 from the first byte, never overwritten, refused when too open.

Private keys are written with `os.open(..., 0o600)` under a temporary name and hard-linked into
place, so the final name never exists with wider permissions or half-written contents, and an
existing key is never silently replaced.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common import errors


class KeyFileError(ValueError):
    """A private key file is missing, too open, or would be overwritten; the message names it."""

    exit_code = errors.CONFIG


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` (mode 0600) holding `data`; refuse if it already exists.

    The parent folder is created with mode 0700 when missing.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a private key")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() fails if `path` appeared meanwhile: no overwrite, even racing.
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyFileError(f"{path}: already exists; refusing to overwrite a private key") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_private_file(path: Path) -> bytes:
    """The bytes of a private key file, refused if group or others may read or write it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: private key not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open for a private key "
            f"(group/others have access); run: chmod 600 {path}"
        )
    with open(path, "rb") as f:
        return f.read()
