"""The exchange end to end over real TLS gRPC on 127.0.0.1: store, trust, server, client."""

import hashlib
import sqlite3
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.bundle import load_bundle_images, verify_bundle
from common.fileio import sha256_file
from common.keyfile import read_private_file
from common.tls import issue_client_cert
from common.wire import encode_data
from node.release.exchange_client import ExchangeClient, ExchangeError
from server.store import BundleStore, StoreRefused
from server.trust import TrustError, TrustStore
from tests.helpers_exchange import PASSED_AUDIT, coordinator_dir, live_exchange, make_bundle, sample_set, site_key

MAX = 16 * 1024 * 1024


def _snapshot(store: BundleStore):
    """Everything a refused upload must leave unchanged."""
    with sqlite3.connect(store.index_path) as db:
        rows = db.execute("SELECT * FROM bundles ORDER BY bundle_id").fetchall()
    return sorted(p.name for p in store.objects.iterdir()), rows, sorted(p.name for p in store.incoming.iterdir())


@pytest.fixture
def keys(tmp_path):
    return {s: site_key(tmp_path / "keys", s) for s in ("a", "b")}


@pytest.fixture
def ex(tmp_path, keys):
    with live_exchange(tmp_path / "coord") as ex:
        ex.trust.add("a", keys["a"][1])
        ex.trust.add("b", keys["b"][1])
        yield ex


def test_trust_store(tmp_path, keys):
    t = TrustStore(tmp_path / "trust.db")
    t.add("a", keys["a"][1])
    t.add("a", keys["a"][1])  # same key again: no-op
    with pytest.raises(TrustError, match="already registered with key .*; use `plan-server sites rotate`"):
        t.add("a", keys["b"][1])
    with pytest.raises(TrustError, match="must match"):
        t.add("Bad Name", keys["b"][1])
    with pytest.raises(TrustError, match="not a PEM public key"):
        t.add("c", "garbage")
    assert TrustStore(tmp_path / "trust.db").all() == {"a": [keys["a"][1]]}  # persisted
    t.revoke("a")
    assert t.sites() == [] and t.keys("a") == [] and t.windows() == {}
    with pytest.raises(TrustError, match="not registered"):
        t.revoke("a")
    with pytest.raises(TrustError, match="was revoked; a site needs a new key"):
        t.add("a", keys["a"][1])
    t.add("a", keys["b"][1])  # after revocation, a new key may be registered


def test_upload_list_download_verify(tmp_path, ex, keys):
    tar = make_bundle(tmp_path / "out", keys["a"][0])
    with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:
        assert c.health()["status"] == "ok"
        rec = c.upload(tar)
        assert rec["site"] == "a" and rec["sequence"] == 1 and rec["n_samples"] == 12
        assert rec["sha256"] == sha256_file(tar) and rec["size"] == tar.stat().st_size
        assert (ex.store.objects / f"{rec['sha256']}.tar").exists()
        listed = c.list()
        assert [r["bundle_id"] for r in listed] == [rec["bundle_id"]]
        assert c.list("b") == []
        keys_reply = c.trusted_keys()
        assert keys_reply == {"a": [keys["a"][1]], "b": [keys["b"][1]]}
        c.download(rec["bundle_id"], tmp_path / "dl" / "x.tar")
        vb = verify_bundle(tmp_path / "dl" / "x.tar", keys_reply, max_bytes=MAX, dest=tmp_path / "v")
        assert vb.bundle_id == rec["bundle_id"]
        images, labels = load_bundle_images(vb.dir)
        assert (images == sample_set()[0]).all() and (labels == sample_set()[1]).all()
        with pytest.raises(ExchangeError, match="NOT_FOUND") as e:
            c.download("0" * 32, tmp_path / "dl" / "y.tar")
        assert e.value.code == "NOT_FOUND" and not (tmp_path / "dl" / "y.tar").exists()
        assert [p.name for p in (tmp_path / "dl").iterdir()] == ["x.tar"]  # no partial files
        assert ex.store.sites_with_bundles() == {"a"}


def test_tampered_bundle_refused_and_store_unchanged(tmp_path, ex, keys):
    with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:
        c.upload(make_bundle(tmp_path / "ok", keys["a"][0]))
        before = _snapshot(ex.store)
        tar = make_bundle(tmp_path / "out", keys["a"][0], seed=5, sequence=2)
        d = tar.with_suffix("")
        png = sorted((d / "bag" / "data" / "images").rglob("*.png"))[-1]
        png.write_bytes(png.read_bytes()[:-1] + b"\x00")
        tar.unlink()
        from common.bundle import pack_bundle

        tar = pack_bundle(d)
        with pytest.raises(ExchangeError, match=r"INVALID_ARGUMENT: .*\.png: sha256 mismatch") as e:
            c.upload(tar)
        assert e.value.code == "INVALID_ARGUMENT"
        assert _snapshot(ex.store) == before


def test_unregistered_key_and_site_refused(tmp_path, ex, keys):
    other, _ = site_key(tmp_path / "keys", "mallory")
    before = _snapshot(ex.store)
    with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:
        with pytest.raises(
            ExchangeError, match="PERMISSION_DENIED: signature does not verify against any registered key of site 'a'"
        ):
            c.upload(make_bundle(tmp_path / "m1", other, site="a"))
        with pytest.raises(ExchangeError, match="PERMISSION_DENIED: site 'mallory' is not registered"):
            c.upload(make_bundle(tmp_path / "m2", other, site="mallory"))
        # a registered site may not upload a bundle signed for another site
        with pytest.raises(ExchangeError, match="signed for site 'a' but was uploaded as site 'b'"):
            c.upload(make_bundle(tmp_path / "m3", keys["a"][0]), site="b")
        with pytest.raises(ExchangeError, match="PERMISSION_DENIED: audit did not pass"):
            c.upload(make_bundle(tmp_path / "m4", keys["a"][0], audit={**PASSED_AUDIT, "passed": False}))
    assert _snapshot(ex.store) == before


def test_replay_refused(tmp_path, ex, keys):
    priv = keys["a"][0]
    with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:
        first = make_bundle(tmp_path / "1", priv, sequence=5)
        c.upload(first)
        before = _snapshot(ex.store)
        with pytest.raises(ExchangeError, match="ALREADY_EXISTS: bundle .* is already stored") as e:
            c.upload(first)
        assert e.value.code == "ALREADY_EXISTS"
        with pytest.raises(ExchangeError, match="sequence 5 of site 'a' is not above its last stored sequence 5"):
            c.upload(make_bundle(tmp_path / "2", priv, seed=7, sequence=5))
        with pytest.raises(ExchangeError, match="sequence 3 .* not above"):
            c.upload(make_bundle(tmp_path / "3", priv, seed=8, sequence=3))
        assert _snapshot(ex.store) == before
        c.upload(make_bundle(tmp_path / "4", priv, seed=9, sequence=6))
        assert sorted(r["sequence"] for r in c.list("a")) == [5, 6]


def test_oversized_refused(tmp_path, keys):
    with live_exchange(tmp_path / "coord", max_bundle_bytes=20_000) as ex:
        ex.trust.add("a", keys["a"][1])
        tar = make_bundle(tmp_path / "big", keys["a"][0], n=40)
        assert tar.stat().st_size > 20_000
        with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:
            with pytest.raises(
                ExchangeError, match="RESOURCE_EXHAUSTED: declared size .* exceeds the limit of 20000 bytes"
            ):
                c.upload(tar)
        # a client that lies about the size is stopped while streaming, before more is written
        stub = pb_grpc.ExchangeStub(
            grpc.secure_channel(ex.address, grpc.ssl_channel_credentials(ex.ca_cert.read_bytes()))
        )

        # (the bundle's own bytes: the tar is checked as it arrives, and junk would be refused
        # as no tar before it reached any limit)
        data = tar.read_bytes()

        def lying():
            yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=1000))
            for i in range(30):
                yield pb.UploadChunk(data=data[i * 1000 : (i + 1) * 1000])

        with pytest.raises(grpc.RpcError) as e:
            stub.Upload(lying(), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than the declared 1000 bytes" in e.value.details()

        def huge():
            yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=19_000))
            for i in range(30):
                yield pb.UploadChunk(data=data[i * 1000 : (i + 1) * 1000])

        with pytest.raises(grpc.RpcError) as e:
            stub.Upload(huge(), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not any(ex.store.objects.iterdir()) and not any(ex.store.incoming.iterdir())


def _upload(stub, header: pb.UploadHeader, data: bytes, *after: pb.UploadChunk) -> str:
    """Send `header`, `data` in 1000-byte chunks, then `after`; the refusal's details (INVALID_ARGUMENT)."""
    msgs = [
        pb.UploadChunk(header=header),
        *(pb.UploadChunk(data=data[i : i + 1000]) for i in range(0, len(data), 1000)),
        *after,
    ]
    with pytest.raises(grpc.RpcError) as e:
        stub.Upload(iter(msgs), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    return e.value.details()


def test_malformed_stream_refused(ex, tmp_path, keys):
    stub = pb_grpc.ExchangeStub(grpc.secure_channel(ex.address, grpc.ssl_channel_credentials(ex.ca_cert.read_bytes())))
    with pytest.raises(grpc.RpcError) as e:
        stub.Upload(iter([pb.UploadChunk(data=b"x")]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in e.value.details()
    before = _snapshot(ex.store)
    tar = make_bundle(tmp_path / "b", keys["a"][0])
    data = tar.read_bytes()
    header, digest = pb.UploadHeader(site="a", size=len(data)), hashlib.sha256(data).hexdigest()
    trailer = pb.UploadChunk(trailer=pb.UploadTrailer(sha256=digest))
    # the bytes are not the ones the trailer names
    details = _upload(stub, header, data, pb.UploadChunk(trailer=pb.UploadTrailer(sha256="0" * 64)))
    assert f"sha256 of the received bytes is {digest}, declared {'0' * 64}" in details
    assert "without its trailer" in _upload(stub, header, data)
    assert "is not 64 lower-case hex digits" in _upload(
        stub, header, data, pb.UploadChunk(trailer=pb.UploadTrailer(sha256="x"))
    )
    assert "after the upload trailer" in _upload(stub, header, data, trailer, pb.UploadChunk(data=b"x"))
    assert "unexpected header message after the upload header" in _upload(
        stub, header, data, pb.UploadChunk(header=header)
    )
    # a client of upload protocol 1 (the digest in the header) is told what this exchange expects
    details = _upload(stub, pb.UploadHeader(site="a", size=len(data), sha256=digest), data)
    assert "(upload protocol 1); this exchange speaks protocol 2" in details and "trailer" in details
    assert _snapshot(ex.store) == before
    with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:  # nothing was left behind: the bundle goes in
        assert c.upload(tar)["sha256"] == digest


def test_data_messages_encoded_as_protobuf_does():
    for n in (0, 1, 127, 128, 300, 16383, 16384, 1 << 20):
        block = bytes(range(256)) * (n // 256) + bytes(n % 256)
        assert encode_data(block) == pb.UploadChunk(data=block).SerializeToString()
        assert encode_data(block) == pb.DownloadChunk(data=block).SerializeToString()
        assert pb.DownloadChunk.FromString(encode_data(block)).data == block


def test_client_explains_an_exchange_of_upload_protocol_1(tmp_path, keys):
    def upload(request_iterator, context):  # how such an exchange refuses a protocol-2 header
        h = next(request_iterator).header
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"header sha256 {h.sha256!r} is not 64 lower-case hex digits")

    cd = coordinator_dir(tmp_path / "coord")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "plannode.exchange.v1.Exchange",
                {
                    "Upload": grpc.stream_unary_rpc_method_handler(
                        upload, request_deserializer=pb.UploadChunk.FromString
                    ),
                },
            ),
        )
    )
    creds = grpc.ssl_server_credentials(
        [(read_private_file(cd.tls_dir / "server.key"), (cd.tls_dir / "server.crt").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        with ExchangeClient(f"127.0.0.1:{port}", cd.ca_cert, timeout=10) as c:
            with pytest.raises(
                ExchangeError,
                match=r"INVALID_ARGUMENT: header sha256 '' .*speaks upload protocol 1.*"
                r"update plan-node on the coordinator",
            ):
                c.upload(make_bundle(tmp_path / "b", keys["a"][0]))
    finally:
        server.stop(None)


def test_client_refuses_an_untrusted_server(tmp_path, ex):
    from common.tls import make_ca

    make_ca(tmp_path / "other-ca", "someone-else")
    with ExchangeClient(ex.address, tmp_path / "other-ca" / "ca.crt", timeout=5) as c:
        with pytest.raises(ExchangeError, match="UNAVAILABLE") as e:
            c.health()
    assert "the TLS handshake failed" in str(e.value) and "plan-node doctor" in str(e.value), e.value
    # nobody listening: the other hint
    from tests.helpers_exchange import free_port

    with ExchangeClient(f"127.0.0.1:{free_port()}", ex.ca_cert, timeout=5) as c:
        with pytest.raises(ExchangeError, match=r"UNAVAILABLE.*is the coordinator up"):
            c.health()


def test_mutual_tls(tmp_path):
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        with ExchangeClient(ex.address, ex.ca_cert, timeout=5) as c:
            with pytest.raises(ExchangeError, match="UNAVAILABLE"):
                c.health()
        crt, key = issue_client_cert(tmp_path / "coord" / "ca", tmp_path / "site", "a")
        with ExchangeClient(ex.address, ex.ca_cert, timeout=5, client_cert=crt, client_key=key) as c:
            assert c.health()["status"] == "ok"


def test_store_put_directly_and_recovery(tmp_path, keys):
    store = BundleStore(tmp_path / "store")
    tar = make_bundle(tmp_path / "b", keys["a"][0])
    with pytest.raises(StoreRefused, match="site 'a' is not registered") as e:
        store.put(tar, verify={})
    assert e.value.reason == "untrusted"
    rec = store.put(tar, verify={"a": [keys["a"][1]]})
    with store.open(rec.bundle_id) as f:
        assert f.read() == tar.read_bytes()
    # a crash's leftovers are cleared when a serving process opens the store: a stray upload and an unindexed object
    (store.incoming / "upload-x.tar").write_bytes(b"partial")
    (store.objects / ("f" * 64 + ".tar")).write_bytes(b"orphan")
    BundleStore(tmp_path / "store")  # `plan-server status` beside a running exchange: touches nothing
    assert (store.incoming / "upload-x.tar").exists() and (store.objects / ("f" * 64 + ".tar")).exists()
    store = BundleStore(tmp_path / "store", serving=True)
    with pytest.raises(OSError, match="another process serves this bundle store"):
        _other_process_serves(tmp_path / "store")
    assert not any(store.incoming.iterdir())
    assert [p.name for p in store.objects.iterdir()] == [f"{rec.sha256}.tar"]
    assert [r.bundle_id for r in store.list()] == [rec.bundle_id]


def _other_process_serves(root):
    """Open the store as a serving process in a child process (flock is per open file description)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", f"from server.store import BundleStore; BundleStore({str(root)!r}, serving=True)"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip().splitlines()[-1])
