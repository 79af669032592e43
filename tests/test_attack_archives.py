"""The attack matrix of issue 6, archive attacks: unsafe members, hostile headers, sizes that lie,
compression and decompression bombs, each refused by a real mutual-TLS exchange before it is
unpacked, with the store unchanged and the server still serving."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import grpc
import pytest
from PIL import Image

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.bundle import ATTESTATION
from common.bundle import build as bundle_build
from node.release.exchange_client import ExchangeError
from tests.helpers_attack import MAX, creds, refused, repack, tar_with


def _info(name: str, size: int = 0, type=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, type, linkname
    return info


@pytest.mark.parametrize(
    "member,match",
    [
        ((_info("../escape.txt", 3), b"abc"), r"archive member '../escape.txt': '..' in path"),
        ((_info("bag/data/../../../x", 3), b"abc"), r"'..' in path"),
        ((_info("/etc/cron.d/x", 3), b"abc"), r"archive member '/etc/cron.d/x': absolute path"),
        (
            (_info("bag/data/link", 0, tarfile.SYMTYPE, "/etc/passwd"), None),
            r"archive member 'bag/data/link': links are not allowed",
        ),
        (
            (_info("bag/data/hard", 0, tarfile.LNKTYPE, "attestation.dsse.json"), None),
            r"'bag/data/hard': links are not allowed",
        ),
        ((_info("bag/data/fifo", 0, tarfile.FIFOTYPE), None), r"only regular files and folders are allowed"),
    ],
)
def test_unsafe_archive_members(fed, member, match):
    tar = tar_with(fed.bundle("a"), fed.root / f"evil-{fed.n}.tar", [member])
    refused(fed, "a", tar, "INVALID_ARGUMENT", match)


def _raw_tar(good_tar: Path, out: Path, *, before: bytes = b"", after: bytes = b"") -> Path:
    """`good_tar`'s members with raw header bytes `before` the first and `after` the last (and
    the data they announce), written byte by byte: headers tarfile would not write, or would
    write only in another format."""
    with tarfile.open(good_tar) as src:
        body = b"".join(m.tobuf(tarfile.PAX_FORMAT) + _padded(src.extractfile(m).read()) for m in src)
    out.write_bytes(before + body + after + b"\0" * 1024)
    return out


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _header(name: str, *, size: int = 0, type: bytes = tarfile.REGTYPE, fmt=tarfile.PAX_FORMAT, pax=None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, type
    if pax:
        info.pax_headers = pax
    return info.tobuf(fmt)


# Verify before you parse (issue 15): headers that would cost tarfile seconds or memory, or that
# a bundle never needs, are refused from their raw bytes; the statement comes first and is checked first.
@pytest.mark.parametrize("where,extra,match", [
    # CVE-2024-6232: tarfile's PAX parser is quadratic in a header of many digits
    ("after", _header("bag/data/x.png", size=1, pax={"comment": "9" * 40_000}) + _padded(b"x"),
     r"PAX header of \d+ bytes, over the limit"),
    ("before", _header("attestation.dsse.json", pax={"comment": "9" * 40_000}),
     r"PAX header of \d+ bytes, over the limit"),
    ("after", _header("bag/data/" + "x" * 20_000, size=1, fmt=tarfile.GNU_FORMAT) + _padded(b"x"),
     r"GNU long names are not allowed"),
    ("after",
     _header("bag/data/sparse.png", size=1, type=tarfile.GNUTYPE_SPARSE, fmt=tarfile.GNU_FORMAT) + _padded(b"x"),
     r"sparse archive members are not allowed"),
    ("after", _header("bag/data/s.png", size=1, pax={"GNU.sparse.map": "0,1"}) + _padded(b"x"),
     r"sparse archive members are not allowed"),
    ("after", _header("pax_global_header", size=0, type=tarfile.XGLTYPE), r"global PAX headers are not allowed"),
    ("before", _header("bag/data/early.png", size=1) + _padded(b"x"),
     r"first archive member is 'bag/data/early.png', not attestation"),
])  # fmt: skip
def test_hostile_headers_are_refused_before_parsing(fed, where, extra, match):
    good = fed.bundle("a")
    tar = _raw_tar(good, fed.root / f"hostile-{fed.n}.tar", **{where: extra})
    with fed.client("a") as c:
        with pytest.raises(ExchangeError, match=match) as e:
            c.upload(tar, site="a")
    assert e.value.code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
    assert len(str(e.value)) < 1000  # a 20 000-character name is cut, not echoed
    fed.assert_still_serving()


def test_an_attestation_with_many_signatures_is_refused_unverified(fed):
    tar = fed.bundle("a")
    d = tar.with_suffix("")
    env = json.loads((d / ATTESTATION).read_text())
    env["signatures"] = env["signatures"] + [{"keyid": "x", "sig": env["signatures"][0]["sig"]}] * 5000
    (d / ATTESTATION).write_text(json.dumps(env))
    refused(fed, "a", repack(d), "INVALID_ARGUMENT", r"5001 signatures; a bundle carries at most 4")


@pytest.mark.parametrize(
    "factor,match",
    [
        # declared half its size: the member's real bytes run past its header's size
        (0.5, r"Payload-Oxum validation failed|corrupt tar archive|sha256 mismatch"),
        # declared far beyond the archive: reading it runs off the end
        (1000, r"corrupt tar archive|truncated|more bytes than declared"),
    ],
)
def test_member_size_differs_from_declared(fed, factor, match):
    tar = fed.bundle("a")
    raw = bytearray(tar.read_bytes())
    with tarfile.open(tar) as tf:
        m = next(m for m in tf if m.name.endswith("labels.csv"))
    # The member's own ustar header (after its PAX header): its name field starts with the name.
    pos = raw.find(m.name.encode().ljust(100, b"\0"))
    assert pos >= 0
    raw[pos + 124 : pos + 136] = b"%011o\0" % int(m.size * factor)
    checksum = sum(raw[pos : pos + 148]) + 8 * 32 + sum(raw[pos + 156 : pos + 512])
    raw[pos + 148 : pos + 156] = b"%06o\0 " % checksum
    evil = fed.root / f"resized-{factor}.tar"
    evil.write_bytes(bytes(raw))
    refused(fed, "a", evil, "INVALID_ARGUMENT", match)


def test_stream_larger_than_declared(fed):
    before = fed.snapshot()
    tar = fed.bundle("a")
    data = tar.read_bytes()
    with grpc.secure_channel(fed.ex.address, creds(fed, "a")) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExchangeStub(ch).Upload(
                iter(
                    [
                        pb.UploadChunk(header=pb.UploadHeader(site="a", size=len(data) - 100)),
                        pb.UploadChunk(data=data),
                    ]
                ),
                timeout=10,
            )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than the declared {len(data) - 100} bytes" in e.value.details()
    fed.assert_unchanged(before)
    fed.assert_still_serving()


def test_bundle_over_the_size_limit(fed):
    before = fed.snapshot()
    with grpc.secure_channel(fed.ex.address, creds(fed, "a")) as ch:
        stub = pb_grpc.ExchangeStub(ch)
        with pytest.raises(grpc.RpcError) as e:  # honest header
            stub.Upload(iter([pb.UploadChunk(header=pb.UploadHeader(site="a", size=MAX + 1))]), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"declared size {MAX + 1} bytes exceeds the limit of {MAX} bytes" in e.value.details()

        with tarfile.open(fed.bundle("a")) as tf:
            statement = tf.getmember(ATTESTATION)
            statement_data = tf.extractfile(statement).read()

        def lying():  # a header within the limit, then more than the limit: stopped while streaming
            yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=MAX))
            # a well-formed tar of a genuine signed statement, then 1 MiB members: the tar is
            # checked as it arrives, and zeros would be refused as no tar before they reached the limit
            yield pb.UploadChunk(
                data=statement.tobuf(tarfile.PAX_FORMAT) + statement_data + b"\0" * (-len(statement_data) % 512)
            )
            for i in range(MAX // (1 << 20) + 2):
                info = tarfile.TarInfo(f"bag/data/{i}.bin")
                info.size = 1 << 20
                yield pb.UploadChunk(data=info.tobuf(tarfile.USTAR_FORMAT))
                yield pb.UploadChunk(data=b"\0" * (1 << 20))

        with pytest.raises(grpc.RpcError) as e:
            stub.Upload(lying(), timeout=20)
        assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
        assert re.search(r"exceeds? the limit|more than the declared", e.value.details())
    fed.assert_unchanged(before)
    fed.assert_still_serving()


def test_compressed_archive_refused(fed):
    tar = fed.bundle("a")
    gz = fed.root / "bundle.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    refused(fed, "a", gz, "INVALID_ARGUMENT", r"not an uncompressed tar archive")


def test_png_decompression_bomb(fed, monkeypatch):
    # A validly signed bundle whose first image is a 6000x6000 PNG of zeros: ~36 MB decoded from a
    # few kilobytes. Refused from its header, before anything decodes it.
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG", optimize=True)
    bomb, calls = buf.getvalue(), []
    real = bundle_build._png

    def png(img):
        calls.append(1)
        return bomb if len(calls) == 1 else real(img)

    monkeypatch.setattr(bundle_build, "_png", png)
    tar = fed.bundle("a")
    monkeypatch.setattr(bundle_build, "_png", real)
    assert tar.stat().st_size < MAX
    refused(fed, "a", tar, "RESOURCE_EXHAUSTED", r"PNG declares 6000x6000 pixels, over the limit of 4096")


def test_grpc_message_bomb(fed):
    # One gzip-compressed gRPC message that inflates to 64 MiB: refused by the message size cap.
    before = fed.snapshot()
    opts = [("grpc.max_send_message_length", 128 << 20)]
    with grpc.secure_channel(fed.ex.address, creds(fed, "a"), options=opts, compression=grpc.Compression.Gzip) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExchangeStub(ch).Upload(
                iter(
                    [
                        pb.UploadChunk(header=pb.UploadHeader(site="a", size=MAX)),
                        pb.UploadChunk(data=b"\0" * (64 << 20)),
                    ]
                ),
                timeout=20,
            )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "larger than max" in e.value.details() or "exceeds" in e.value.details()
    fed.assert_unchanged(before)
    fed.assert_still_serving()
