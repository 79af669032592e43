"""Unsafe archives: what safe_extract refuses, and that nothing escapes the destination."""

import io
import tarfile

import pytest

from common.bundle import (
    BundleError,
    safe_extract,
)
from tests.helpers_bundle import MAX

# ---------------------------------------------------------------- unsafe archives


def _tar(tmp_path, *members):
    """A tar of (TarInfo, bytes | None) members."""
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name, type=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = type
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "member, data, message",
    [
        (_member("../escape.txt"), b"x", r"'\.\.' in path"),
        (_member("a/../../escape.txt"), b"x", r"'\.\.' in path"),
        (_member("/etc/evil"), b"x", "absolute path"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), None, "links are not allowed"),
        (_member("hard", tarfile.LNKTYPE, "attestation.dsse.json"), None, "links are not allowed"),
        (_member("dev", tarfile.CHRTYPE), None, "only regular files and folders"),
        (_member("fifo", tarfile.FIFOTYPE), None, "only regular files and folders"),
    ],
)
def test_unsafe_members_are_refused(tmp_path, member, data, message):
    tar = _tar(tmp_path, (_member("ok.txt"), b"fine"), (member, data))
    with pytest.raises(BundleError, match=message) as e:
        safe_extract(tar, tmp_path / "out", max_bytes=MAX)
    assert not (tmp_path / "escape.txt").exists()
    assert e.value.reason == "unsafe"


def test_size_budget_is_enforced(tmp_path):
    tar = _tar(tmp_path, (_member("a"), b"x" * 3000), (_member("b"), b"y" * 3000))
    with pytest.raises(BundleError, match="'b': 3000 bytes would exceed the limit of 5000") as e:
        safe_extract(tar, tmp_path / "out", max_bytes=5000)
    assert e.value.reason == "too_large"
    assert safe_extract(tar, tmp_path / "ok", max_bytes=6000) == ["a", "b"]


def test_duplicate_member_refused(tmp_path):
    tar = _tar(tmp_path, (_member("a"), b"1"), (_member("./a"), b"2"))
    with pytest.raises(BundleError, match="appears twice"):
        safe_extract(tar, tmp_path / "out", max_bytes=MAX)


def test_member_under_a_file_refused(tmp_path):
    tar = _tar(tmp_path, (_member("a"), b"1"), (_member("a/b"), b"2"))
    with pytest.raises(BundleError, match="'a/b': its folder a is a file of the archive") as e:
        safe_extract(tar, tmp_path / "out", max_bytes=MAX)
    assert e.value.reason == "unsafe"


def test_extract_from_a_file_read_front_to_back(tmp_path):
    tar = _tar(tmp_path, (_member("a"), b"x" * 3000), (_member("d/b"), b"y" * 3))
    with open(tar, "rb") as f:
        assert safe_extract(f, tmp_path / "out", max_bytes=MAX) == ["a", "d/b"]
    assert (tmp_path / "out" / "d" / "b").read_bytes() == b"yyy"


def test_compressed_archive_refused(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = _member("a")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(BundleError, match="not an uncompressed tar"):
        safe_extract(path, tmp_path / "out", max_bytes=MAX)
