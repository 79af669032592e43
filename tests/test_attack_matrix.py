"""The attack matrix of issue 6, against a real mutual-TLS exchange on 127.0.0.1.

Every attack must be refused with an error naming its cause, leave the store's objects, index and
incoming/ exactly as they were, and leave the server serving other sites (each test ends by
uploading a fresh valid bundle from another site). Real certificates, keys and signatures only.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.bundle import ATTESTATION, pack_bundle, write_tagmanifest
from common.bundle import build as bundle_build
from common.fileio import sha256_bytes, sha256_file
from common.tls import issue_client_cert, make_ca
from node.release.exchange_client import ExchangeClient, ExchangeError
from server.store import BundleStore
from tests.helpers_exchange import PASSED_AUDIT, coordinator_dir, free_port, live_exchange, make_bundle, site_key

MAX = 4 * 1024 * 1024
SITES = ("a", "b", "c")


class Federation:
    """A live exchange with sites a, b, c registered (keys and client certificates)."""

    def __init__(self, ex, root: Path):
        self.ex, self.root = ex, root
        self.keys = {s: site_key(root / "keys", s) for s in SITES}
        self.certs = {s: issue_client_cert(ex.cd.ca_dir, root / "tls", s) for s in SITES}
        for s in SITES:
            ex.trust.add(s, self.keys[s][1])
        self.sequence = {s: 0 for s in SITES}
        self.n = 0

    def client(self, site: str) -> ExchangeClient:
        crt, key = self.certs[site]
        return ExchangeClient(self.ex.address, self.ex.ca_cert, timeout=20, client_cert=crt, client_key=key)

    def bundle(self, site: str, *, signer: str | None = None, **kw) -> Path:
        """A new valid bundle of `site` with its next sequence (signed by `signer`'s key if given)."""
        self.sequence[site] += 1
        self.n += 1
        kw.setdefault("sequence", self.sequence[site])
        return make_bundle(
            self.root / "bundles" / str(self.n), self.keys[signer or site][0], site=site, seed=1000 + self.n, **kw
        )

    def snapshot(self):
        """Everything a refused upload must leave unchanged (incoming/ is emptied after each upload)."""
        store = self.ex.store
        with sqlite3.connect(store.index_path) as db:
            rows = db.execute("SELECT * FROM bundles ORDER BY bundle_id").fetchall()
            removed = db.execute("SELECT * FROM removed ORDER BY bundle_id").fetchall()
        objects = {p.name: sha256_file(p) for p in store.objects.iterdir()}
        return objects, rows, removed, sorted(p.name for p in store.incoming.iterdir())

    def assert_unchanged(self, before) -> None:
        deadline = time.time() + 10  # a cancelled upload's server thread may still be cleaning up
        while self.snapshot() != before and time.time() < deadline:
            time.sleep(0.05)
        assert self.snapshot() == before

    def assert_still_serving(self) -> None:
        with self.client("b") as c:
            assert c.health()["status"] == "ok"
            rec = c.upload(self.bundle("b"))
            assert rec["bundle_id"] in {r["bundle_id"] for r in c.list("b")}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack")
    with live_exchange(root / "coord", max_bundle_bytes=MAX, client_ca=True) as ex:
        yield Federation(ex, root)


def _refused(fed, site: str, tar: Path, code: str, match: str, *, as_site: str | None = None) -> None:
    before = fed.snapshot()
    with fed.client(site) as c:
        with pytest.raises(ExchangeError, match=match) as e:
            c.upload(tar, site=as_site or site)
    assert e.value.code == code, str(e.value)
    fed.assert_unchanged(before)
    fed.assert_still_serving()


def _repack(bundle_dir: Path) -> Path:
    bundle_dir.with_name(bundle_dir.name + ".tar").unlink(missing_ok=True)
    return pack_bundle(bundle_dir)


def _tar_with(good_tar: Path, out: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """`good_tar`'s members followed by `extra` (TarInfo, data) members, written raw."""
    with tarfile.open(good_tar) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        for info, data in extra:
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


# ---------------------------------------------------------------- content and signatures


def test_changed_data_byte(fed):
    tar = fed.bundle("a")
    png = sorted((tar.with_suffix("") / "bag" / "data" / "images").rglob("*.png"))[0]
    data = bytearray(png.read_bytes())
    data[-20] ^= 0x01
    png.write_bytes(bytes(data))
    _refused(fed, "a", _repack(tar.with_suffix("")), "INVALID_ARGUMENT", r"data/images/.*\.png: sha256 mismatch")


def test_changed_audit_result(fed):
    # A failed audit turned into a pass, with the bag's manifests recomputed to match: only the
    # signature over the tag manifest digest can catch it.
    tar = fed.bundle("a", audit={**PASSED_AUDIT, "passed": False, "mia_auc": 0.93})
    bag = tar.with_suffix("") / "bag"
    (bag / "audit.json").write_text((bag / "audit.json").read_text().replace('"passed": false', '"passed": true'))
    write_tagmanifest(bag)
    _refused(
        fed,
        "a",
        _repack(tar.with_suffix("")),
        "INVALID_ARGUMENT",
        r"tagmanifest-sha256.txt: sha256 \w+ does not match the signed subject digest",
    )


def test_resigned_with_another_registered_sites_key(fed):
    _refused(
        fed,
        "a",
        fed.bundle("a", signer="b"),
        "PERMISSION_DENIED",
        r"signature does not verify against any registered key of site 'a'",
    )


def test_upload_as_another_site_than_the_client_certificate(fed):
    # b's own valid bundle, sent over a's connection: the certificate decides who is talking.
    _refused(
        fed,
        "a",
        fed.bundle("b"),
        "PERMISSION_DENIED",
        r"client certificate is for site 'a' but the upload claims site 'b'",
        as_site="b",
    )


def test_failed_audit(fed):
    _refused(
        fed, "a", fed.bundle("a", audit={**PASSED_AUDIT, "passed": False}), "PERMISSION_DENIED", r"audit did not pass"
    )


def test_replayed_bundle(fed):
    tar = fed.bundle("a")
    with fed.client("a") as c:
        c.upload(tar)
    _refused(fed, "a", tar, "ALREADY_EXISTS", r"bundle [0-9a-f]{32} is already stored \(replay\)")
    _refused(fed, "a", fed.bundle("a", sequence=1), "ALREADY_EXISTS", r"sequence 1 of site 'a' is not above")


def test_revoked_key(fed):
    tar = fed.bundle("c")
    with fed.client("c") as c:
        rec = c.upload(tar)
    revoked = fed.ex.trust.revoke("c")
    gone = fed.ex.store.remove_signed_by("c", revoked, reason="key revoked")
    assert [g.bundle_id for g in gone] == [rec["bundle_id"]]  # the key's bundles leave the pool
    assert fed.ex.store.list("c") == [] and not (fed.ex.store.objects / f"{rec['sha256']}.tar").exists()
    # Refused as a revoked site before its upload is read (server/exchange.py, _admit).
    _refused(fed, "c", fed.bundle("c"), "PERMISSION_DENIED", r"site 'c' was revoked")
    _refused(fed, "c", tar, "PERMISSION_DENIED", r"site 'c' was revoked")


# ---------------------------------------------------------------- TLS identity


def _raw_health(fed, cert: Path | None, key: Path | None):
    creds = grpc.ssl_channel_credentials(
        fed.ex.ca_cert.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    with grpc.secure_channel(fed.ex.address, creds) as ch:
        return pb_grpc.ExchangeStub(ch).Health(pb.Empty(), timeout=5)


@pytest.mark.parametrize("case", ["other CA", "expired", "none"])
def test_client_certificate_refused(fed, tmp_path, case):
    before = fed.snapshot()
    if case == "other CA":
        make_ca(tmp_path / "evil-ca", "evil")
        cert, key = issue_client_cert(tmp_path / "evil-ca", tmp_path, "a")
    elif case == "expired":
        cert, key = issue_client_cert(fed.ex.cd.ca_dir, tmp_path, "a", days=0)  # ended 5 minutes ago
    else:
        cert = key = None
    with pytest.raises(grpc.RpcError) as e:
        _raw_health(fed, cert, key)
    # The handshake fails before any gRPC status exists: the client sees UNAVAILABLE.
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    if case == "expired":
        # Our own client names the cause before trying.
        with pytest.raises(ExchangeError, match=r"client certificate expired on"):
            ExchangeClient(fed.ex.address, fed.ex.ca_cert, client_cert=cert, client_key=key)
    fed.assert_unchanged(before)
    fed.assert_still_serving()


# ---------------------------------------------------------------- archive attacks


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
    tar = _tar_with(fed.bundle("a"), fed.root / f"evil-{fed.n}.tar", [member])
    _refused(fed, "a", tar, "INVALID_ARGUMENT", match)


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
    _refused(fed, "a", _repack(d), "INVALID_ARGUMENT", r"5001 signatures; a bundle carries at most 4")


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
    _refused(fed, "a", evil, "INVALID_ARGUMENT", match)


def test_stream_larger_than_declared(fed):
    before = fed.snapshot()
    tar = fed.bundle("a")
    data = tar.read_bytes()
    with grpc.secure_channel(fed.ex.address, _creds(fed, "a")) as ch:
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


def _creds(fed, site: str) -> grpc.ChannelCredentials:
    crt, key = fed.certs[site]
    return grpc.ssl_channel_credentials(
        fed.ex.ca_cert.read_bytes(), private_key=key.read_bytes(), certificate_chain=crt.read_bytes()
    )


def test_bundle_over_the_size_limit(fed):
    before = fed.snapshot()
    with grpc.secure_channel(fed.ex.address, _creds(fed, "a")) as ch:
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
    _refused(fed, "a", gz, "INVALID_ARGUMENT", r"not an uncompressed tar archive")


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
    _refused(fed, "a", tar, "RESOURCE_EXHAUSTED", r"PNG declares 6000x6000 pixels, over the limit of 4096")


def test_grpc_message_bomb(fed):
    # One gzip-compressed gRPC message that inflates to 64 MiB: refused by the message size cap.
    before = fed.snapshot()
    opts = [("grpc.max_send_message_length", 128 << 20)]
    with grpc.secure_channel(fed.ex.address, _creds(fed, "a"), options=opts, compression=grpc.Compression.Gzip) as ch:
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


# ---------------------------------------------------------------- broken streams and messages


def test_upload_cut_off_mid_stream(fed):
    before = fed.snapshot()
    tar = fed.bundle("a")
    data = tar.read_bytes()

    def cut():
        yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=len(data)))
        yield pb.UploadChunk(data=data[: len(data) // 2])
        raise ConnectionError("link lost")  # grpc cancels the call: the server sees the stream end early

    with grpc.secure_channel(fed.ex.address, _creds(fed, "a")) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExchangeStub(ch).Upload(cut(), timeout=10)
    assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT)
    fed.assert_unchanged(before)
    # the same bundle, sent whole, is then accepted: the cut-off upload left nothing behind
    with fed.client("a") as c:
        assert c.upload(tar)["sha256"] == sha256_bytes(data)
    fed.assert_still_serving()


@pytest.mark.parametrize(
    "method,kind",
    [
        ("/plannode.exchange.v1.Exchange/Upload", "stream_unary"),
        ("/plannode.exchange.v1.Exchange/List", "unary_unary"),
        ("/plannode.exchange.v1.Exchange/Download", "unary_stream"),
    ],
)
def test_malformed_protobuf(fed, method, kind):
    before = fed.snapshot()
    garbage = b"\x0a\xff\xff\xff\xff\x0f" + os.urandom(32)  # a length-delimited field longer than the message
    with grpc.secure_channel(fed.ex.address, _creds(fed, "a")) as ch:
        call = getattr(ch, kind)(method)  # no serializers: raw bytes on the wire
        with pytest.raises(grpc.RpcError) as e:
            if kind == "stream_unary":
                call(iter([garbage]), timeout=10)
            elif kind == "unary_stream":
                list(call(garbage, timeout=10))
            else:
                call(garbage, timeout=10)
    assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), e.value
    assert "deserializ" in e.value.details().lower()
    fed.assert_unchanged(before)
    fed.assert_still_serving()


# ---------------------------------------------------------------- crash and concurrency


def _wait_healthy(address: str, ca: Path, cert, key, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with ExchangeClient(address, ca, timeout=2, client_cert=cert, client_key=key) as c:
                c.health()
                return
        except ExchangeError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def _consistent(store_root: Path) -> list[str]:
    """Check index and objects agree exactly (after the serving process's recovery)."""
    store = BundleStore(store_root, max_bundle_bytes=MAX)
    recs = store.list()
    objects = {p.name for p in store.objects.iterdir()}
    assert objects == {f"{r.sha256}.tar" for r in recs}
    for r in recs:
        assert sha256_file(store.objects / f"{r.sha256}.tar") == r.sha256
    assert not any(store.incoming.iterdir())
    return [r.bundle_id for r in recs]


def test_kill_9_during_upload_then_restart(tmp_path):
    cd = coordinator_dir(tmp_path / "coord", port=free_port(), max_bundle_bytes=MAX)
    priv, pub = site_key(tmp_path / "keys", "a")
    cd.trust().add("a", pub)
    cert, key = issue_client_cert(cd.ca_dir, tmp_path / "tls", "a")
    address = f"127.0.0.1:{cd.config().exchange_port}"
    first = make_bundle(tmp_path / "b1", priv, sequence=1, seed=1)
    second = make_bundle(tmp_path / "b2", priv, sequence=2, seed=2, n=60)
    log = open(tmp_path / "exchange.log", "ab")
    cmd = [sys.executable, "-m", "server.exchange_main", "--dir", str(cd.root)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=Path(__file__).parent.parent)
    try:
        _wait_healthy(address, cd.ca_cert, cert, key)
        with ExchangeClient(address, cd.ca_cert, timeout=10, client_cert=cert, client_key=key) as c:
            stored = c.upload(first)
        data = second.read_bytes()
        sent = threading.Event()

        def slow():
            yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=len(data)))
            for i in range(0, len(data), 4096):
                yield pb.UploadChunk(data=data[i : i + 4096])
                if i >= 8192:
                    sent.set()
                time.sleep(0.05)
            yield pb.UploadChunk(trailer=pb.UploadTrailer(sha256=sha256_bytes(data)))

        creds = grpc.ssl_channel_credentials(
            cd.ca_cert.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
        )
        errors = []

        def upload():
            with grpc.secure_channel(address, creds) as ch:
                try:
                    pb_grpc.ExchangeStub(ch).Upload(slow(), timeout=30)
                except grpc.RpcError as e:
                    errors.append(e.code())

        t = threading.Thread(target=upload)
        t.start()
        assert sent.wait(20)
        time.sleep(0.2)
        assert any((cd.store / "incoming").iterdir())  # the upload really is half-way on disk
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t.join(30)
        assert errors and errors[0] == grpc.StatusCode.UNAVAILABLE
        # restart: leftovers are cleared, the first bundle is intact, the second never half-exists
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=Path(__file__).parent.parent)
        _wait_healthy(address, cd.ca_cert, cert, key)
        assert _consistent(cd.store) == [stored["bundle_id"]]
        with ExchangeClient(address, cd.ca_cert, timeout=10, client_cert=cert, client_key=key) as c:
            again = c.upload(second)  # not a replay: nothing of it was kept
            assert sorted(r["bundle_id"] for r in c.list()) == sorted([stored["bundle_id"], again["bundle_id"]])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log.close()
    assert _consistent(cd.store) == [stored["bundle_id"], again["bundle_id"]]


def test_eight_sites_five_bundles_each_concurrently(tmp_path):
    sites = [f"s{i}" for i in range(8)]
    with live_exchange(tmp_path / "coord", max_bundle_bytes=MAX, client_ca=True) as ex:
        tars, tls = {}, {}
        for i, s in enumerate(sites):
            priv, pub = site_key(tmp_path / "keys", s)
            ex.trust.add(s, pub)
            tls[s] = issue_client_cert(ex.cd.ca_dir, tmp_path / "tls", s)
            tars[s] = [
                make_bundle(tmp_path / "b" / s / str(q), priv, site=s, sequence=q, seed=100 * i + q, n=6)
                for q in range(1, 6)
            ]
        outcomes: dict[str, list] = {s: [] for s in sites}
        start = threading.Barrier(2 * len(sites))

        def publisher(s: str) -> None:
            # Two uploaders per site send the same five bundles at once (a retry racing the
            # original): each bundle must be stored once, the duplicate refused as a replay. A site
            # has one upload in progress at a time; the other is told to come back (RESOURCE_EXHAUSTED).
            with ExchangeClient(ex.address, ex.ca_cert, timeout=60, client_cert=tls[s][0], client_key=tls[s][1]) as c:
                start.wait()
                for tar in tars[s]:
                    while True:
                        try:
                            outcomes[s].append(c.upload(tar)["bundle_id"])
                        except ExchangeError as e:
                            if e.code == "RESOURCE_EXHAUSTED":
                                time.sleep(0.05)
                                continue
                            outcomes[s].append(e.code)
                        break

        threads = [threading.Thread(target=publisher, args=(s,)) for s in sites for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        recs = ex.store.list()
        assert len(recs) == 40 and len({r.bundle_id for r in recs}) == 40
        for s in sites:
            assert sorted(r.sequence for r in recs if r.site == s) == [1, 2, 3, 4, 5]
            stored = [o for o in outcomes[s] if o != "ALREADY_EXISTS"]
            assert len(stored) == 5 and len(outcomes[s]) == 10, outcomes[s]
        _ = _consistent(ex.store.root)
