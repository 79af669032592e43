"""verify_bundle_stream: verify_bundle's checks without extracting (issue 6), and the store using it.

Every refusal must name the file at fault, be the same as verify_bundle's for the same tar (one
set of checks serves both), and leave nothing behind: no extraction, no spill file, and in the
store nothing in objects/, incoming/ or the index.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile

import numpy as np
import pytest

from common.bundle import ATTESTATION, BundleError, verify_bundle, verify_bundle_stream, write_tagmanifest
from common.bundle import members as bundle_members
from server.store import BundleStore, StoreRefused
from tests.helpers_bundle import emb_file, make_embedding_bundle, repack, resigned
from tests.helpers_exchange import make_bundle

MAX = 16 * 1024 * 1024


def _first_png(d):
    return sorted((d / "bag" / "data" / "images").rglob("*.png"))[0]


def _set_oxum(d):
    """Payload-Oxum and the tag manifest made to agree with data/ again, manifest-sha256.txt left
    as it is: the bag check must then name the payload file the manifest does not account for."""
    bag = d / "bag"
    files = [p for p in (bag / "data").rglob("*") if p.is_file()]
    info = bag / "bag-info.txt"
    oxum = f"{sum(p.stat().st_size for p in files)}.{len(files)}"
    info.write_text(re.sub(r"(?m)^Payload-Oxum: .*$", f"Payload-Oxum: {oxum}", info.read_text()))
    write_tagmanifest(bag)


def _flip_png_byte(d):
    png = _first_png(d)
    raw = bytearray(png.read_bytes())
    raw[-20] ^= 0x01
    png.write_bytes(bytes(raw))


def _unlisted_png(d):
    (d / "bag" / "data" / "images" / "0" / "999.png").write_bytes(_first_png(d).read_bytes())
    _set_oxum(d)


def _missing_png(d):
    _first_png(d).unlink()
    _set_oxum(d)


def _not_a_png(d):
    _first_png(d).write_bytes(b"GIF89a" + b"\0" * 40)


def _nan_embedding(d):
    raw = bytearray(emb_file(d).read_bytes())
    raw[-4:] = np.array([np.nan], "<f4").tobytes()  # the last value, [11,15]
    emb_file(d).write_bytes(bytes(raw))


def _manifest_edit(edit):
    def apply(d):
        p = d / "bag" / "manifest-sha256.txt"
        p.write_text(edit(p.read_text()))
        write_tagmanifest(d / "bag")

    return apply


def _bagit_txt(text):
    def apply(d):
        (d / "bag" / "bagit.txt").write_bytes(text)
        write_tagmanifest(d / "bag")

    return apply


# (bundle kind, edit, resign after the edit, the error expected of both paths)
CASES = {
    "tampered payload byte": ("images", _flip_png_byte, False, r"data/images/\d+/\d+\.png: sha256 mismatch"),
    "unlisted payload member": ("images", _unlisted_png, False, r"data/images/0/999\.png: not listed in the manifest"),
    "listed but missing": (
        "images",
        _missing_png,
        False,
        r"data/images/\d+/\d+\.png: listed in the manifest but missing",
    ),
    "bad PNG header": ("images", _not_a_png, True, r"data/images/\d+/\d+\.png: not a PNG file"),
    "non-finite embedding": (
        "embeddings",
        _nan_embedding,
        True,
        r"data/embeddings\.safetensors: embedding \[11,15\] is nan, expected a finite value",
    ),
    "manifest line without a path": (
        "images",
        _manifest_edit(lambda t: t + "abc\n"),
        False,
        r"manifest-sha256\.txt line \d+: 'abc' is not '<sha256> <path>'",
    ),
    "manifest path twice": (
        "images",
        _manifest_edit(lambda t: t + t.splitlines()[0] + "\n"),
        False,
        r"manifest-sha256\.txt line \d+: data/.* is listed twice",
    ),
    "manifest path outside the bag": (
        "images",
        _manifest_edit(lambda t: t + "0" * 64 + "  ../x\n"),
        False,
        r"manifest-sha256\.txt line \d+: path '\.\./x' is unsafe",
    ),
    "manifest lists a tag file": (
        "images",
        _manifest_edit(lambda t: t + "0" * 64 + "  bagit.txt\n"),
        False,
        r"manifest-sha256\.txt: lists bagit\.txt, which is not a payload file",
    ),
    "bagit.txt byte-order mark": (
        "images",
        _bagit_txt(b"\xef\xbb\xbfBagIt-Version: 0.97\nTag-File-Character-Encoding: UTF-8\n"),
        False,
        r"bag/bagit\.txt: must not start with a byte-order mark",
    ),
    "bagit.txt old version": (
        "images",
        _bagit_txt(b"BagIt-Version: 0.96\nTag-File-Character-Encoding: UTF-8\n"),
        False,
        r"bag/bagit\.txt: BagIt-Version 0\.96 is not supported",
    ),
    "bagit.txt other encoding": (
        "images",
        _bagit_txt(b"BagIt-Version: 1.0\nTag-File-Character-Encoding: latin-1\n"),
        False,
        r"Tag-File-Character-Encoding is 'latin-1', expected 'UTF-8'",
    ),
    "Payload-Oxum": (
        "images",
        lambda d: (_first_png(d).unlink(), write_tagmanifest(d / "bag")),
        False,
        r"bag/bag-info\.txt: Payload-Oxum validation failed: it declares \d+ bytes in 13 files, "
        r"the payload holds \d+ bytes in 12 files",
    ),
}


def _case_tar(tmp_path, priv, case):
    kind, edit, resign, _ = CASES[case]
    tar = (make_bundle if kind == "images" else make_embedding_bundle)(tmp_path / "b", priv)
    return resigned(tar, priv, edit) if resign else repack(tar, edit)


@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_refuse_the_same_naming_the_file(tmp_path, key_a, case):
    priv, pem = key_a
    tar = _case_tar(tmp_path, priv, case)
    with pytest.raises(BundleError, match=CASES[case][3]) as streamed:
        verify_bundle_stream(tar, {"a": [pem]}, max_bytes=MAX, spill_dir=tmp_path / "spill")
    with pytest.raises(BundleError) as extracted:
        verify_bundle(tar, {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "x")
    assert (str(extracted.value), extracted.value.reason) == (str(streamed.value), streamed.value.reason)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "case",
    [
        "tampered payload byte",
        "unlisted payload member",
        "listed but missing",
        "bad PNG header",
        "non-finite embedding",
    ],
)
def test_store_refuses_naming_the_file_and_keeps_nothing(tmp_path, key_a, case):
    priv, pem = key_a
    tar = _case_tar(tmp_path, priv, case)
    store = BundleStore(tmp_path / "store", max_bundle_bytes=MAX)
    with pytest.raises(StoreRefused, match=CASES[case][3]) as e:
        store.put(tar, verify={"a": [pem]})
    assert e.value.reason == "invalid"
    assert store.list() == [] and list(store.objects.iterdir()) == [] and list(store.incoming.iterdir()) == []


def test_store_accepts_both_routes_and_checks_the_extractor_from_the_card(tmp_path, key_a):
    priv, pem = key_a
    store = BundleStore(tmp_path / "store", max_bundle_bytes=MAX)
    assert store.put(make_bundle(tmp_path / "i", priv), verify={"a": [pem]}).n_samples == 12
    emb = make_embedding_bundle(tmp_path / "e", priv, sequence=2)
    pinned = BundleStore(tmp_path / "pinned", max_bundle_bytes=MAX, extractor={"name": "dinov2"})
    with pytest.raises(StoreRefused, match=r"embeddings made by extractor None; this federation pins") as e:
        pinned.put(emb, verify={"a": [pem]})
    assert e.value.reason == "policy"
    assert store.put(emb, verify={"a": [pem]}).n_samples == 12
    assert list(store.incoming.iterdir()) == []


def test_stream_path_extracts_nothing_and_returns_the_card(tmp_path, key_a, monkeypatch):
    priv, pem = key_a
    tar = make_embedding_bundle(tmp_path / "e", priv)
    # every kept file past the in-memory bound: they go to spill files, removed afterwards
    monkeypatch.setattr(bundle_members, "KEEP_IN_MEMORY", 10)
    (tmp_path / "spill").mkdir()
    vb = verify_bundle_stream(tar, {"a": [pem]}, max_bytes=MAX, spill_dir=tmp_path / "spill")
    assert vb.dir is None and (vb.route, vb.n_samples) == ("cvae", 12)
    assert vb.datacard["route"] == "cvae" and vb.datacard["embedding_dim"] == 16
    assert list((tmp_path / "spill").iterdir()) == []
    with pytest.raises(BundleError, match=r"embedding \[11,15\] is nan"):
        verify_bundle_stream(
            resigned(make_embedding_bundle(tmp_path / "f", priv), priv, _nan_embedding),
            {"a": [pem]},
            max_bytes=MAX,
            spill_dir=tmp_path / "spill",
        )
    assert list((tmp_path / "spill").iterdir()) == []


def _tar(tmp_path, *members):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        for name, type, data in members:
            info = tarfile.TarInfo(name)
            info.type = type
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(
    "members, message",
    [
        ([("a", tarfile.REGTYPE, b"1"), ("./a", tarfile.REGTYPE, b"2")], r"'a': appears twice"),
        ([("a", tarfile.DIRTYPE, None), ("a", tarfile.REGTYPE, b"2")], r"'a': appears twice"),
        (
            [("a", tarfile.REGTYPE, b"1"), ("a/b", tarfile.REGTYPE, b"2")],
            r"'a/b': its folder a is a file of the archive",
        ),
        ([("a", tarfile.REGTYPE, b"1"), ("a/b/c", tarfile.DIRTYPE, None)], r"'a/b/c': its folder a is a file"),
        ([("a", tarfile.REGTYPE, b"1"), ("a", tarfile.DIRTYPE, None)], r"'a': its folder a is a file"),
        ([("../x", tarfile.REGTYPE, b"1")], r"'\.\.' in path"),
        ([("l", tarfile.SYMTYPE, None)], r"links are not allowed"),
    ],
)
def test_unsafe_members_refused_without_extracting(tmp_path, key_a, members, message):
    # After a genuine signed statement (it comes first and is verified first), the hostile members.
    priv, pem = key_a
    with tarfile.open(make_bundle(tmp_path / "b", priv)) as tf:
        statement = tf.extractfile(ATTESTATION).read()
    members = [(ATTESTATION, tarfile.REGTYPE, statement), *members]
    with pytest.raises(BundleError, match=message) as e:
        verify_bundle_stream(_tar(tmp_path, *members), {"a": [pem]}, max_bytes=MAX)
    assert e.value.reason == "unsafe"
    with pytest.raises(BundleError, match=message):  # the extracting walk: the same rules
        verify_bundle(_tar(tmp_path, *members), {"a": [pem]}, max_bytes=MAX, dest=tmp_path / "x")


@pytest.mark.parametrize(
    "members, message",
    [
        ([("bag/bagit.txt", tarfile.REGTYPE, b"x")], r"first archive member is 'bag/bagit.txt', not attestation"),
        ([], r"attestation.dsse.json: missing from bundle"),
    ],
)
def test_the_signed_statement_comes_first(tmp_path, key_a, members, message):
    priv, pem = key_a
    tar = make_bundle(tmp_path / "b", priv)
    if members:  # a good bundle with a member put before its attestation
        with tarfile.open(tar) as tf:
            members = [*members, *((m.name, m.type, tf.extractfile(m).read()) for m in tf)]
        tar = _tar(tmp_path, *members)
    else:  # an empty archive
        tar = _tar(tmp_path)
    with pytest.raises(BundleError, match=message):
        verify_bundle_stream(tar, {"a": [pem]}, max_bytes=MAX)


def test_arriving_upload_reads_from_memory_and_back_from_the_file(tmp_path):
    from server.upload import Arriving

    data = bytes(range(256)) * 40  # 10240 bytes in chunks of 1000
    path = tmp_path / "upload"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        a = Arriving(
            iter([data[i : i + 1000] for i in range(0, len(data), 1000)]),
            fd,
            name="u",
            limit=1 << 20,
            declared=len(data),
        )
        assert a.read(10) == data[:10]
        assert a.read(2500) == data[10:2510]  # across chunks
        a.seek(5000)
        assert a.read(3) == data[5000:5003]
        a.seek(20)  # before what is kept in memory: read back from the written file
        assert a.read(30) == data[20:50]
        assert a.read() == data[50:]
        assert a.finish() == (len(data), hashlib.sha256(data).hexdigest())
        a.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == data
