"""The exchange's per-site quota and its own deadline per call, over a real TLS exchange."""

from __future__ import annotations

import time

import grpc
import pytest

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from node.exchange_client import ExchangeClient, ExchangeError
from tests.helpers_exchange import live_exchange, make_bundle, site_key


@pytest.fixture
def keys(tmp_path):
    return {s: site_key(tmp_path / "keys", s) for s in ("a", "b")}


def test_a_site_over_its_quota_is_refused_and_others_are_not(tmp_path, keys):
    first = make_bundle(tmp_path / "a1", keys["a"][0], sequence=1, seed=1)
    quota = first.stat().st_size + 1000  # room for one bundle of site a, not two
    with live_exchange(tmp_path / "coord", site_quota_bytes=quota) as ex:
        for s in ("a", "b"):
            ex.trust.add(s, keys[s][1])
        with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:
            c.upload(first, site="a")
            with pytest.raises(ExchangeError, match=f"RESOURCE_EXHAUSTED: .*site 'a' stores .* quota of {quota} bytes"):
                c.upload(make_bundle(tmp_path / "a2", keys["a"][0], sequence=2, seed=2), site="a")
            assert [r.site for r in ex.store.list()] == ["a"] and not any(ex.store.incoming.iterdir())
            c.upload(make_bundle(tmp_path / "b1", keys["b"][0], site="b", sequence=1, seed=3), site="b")
            assert sorted(r.site for r in ex.store.list()) == ["a", "b"]


def test_a_stalled_upload_is_cancelled_by_the_server_and_it_keeps_serving(tmp_path, keys):
    tar = make_bundle(tmp_path / "a1", keys["a"][0], sequence=1)
    data = tar.read_bytes()
    with live_exchange(tmp_path / "coord", call_timeout_s=1.0) as ex:
        ex.trust.add("a", keys["a"][1])
        stub = pb_grpc.ExchangeStub(grpc.secure_channel(ex.address, grpc.ssl_channel_credentials(ex.ca_cert.read_bytes())))

        def stalling():
            import hashlib

            yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=len(data)))
            yield pb.UploadChunk(data=data[:100])
            time.sleep(4)  # the client's own deadline (30 s) is far away; the server's (1 s) is not
            yield pb.UploadChunk(data=data[100:])
            yield pb.UploadChunk(trailer=pb.UploadTrailer(sha256=hashlib.sha256(data).hexdigest()))

        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Upload(stalling(), timeout=30)
        assert e.value.code() == grpc.StatusCode.CANCELLED and time.monotonic() - t0 < 10
        for _ in range(50):  # the handler's clean-up runs as its stream ends
            if not any(ex.store.incoming.iterdir()):
                break
            time.sleep(0.1)
        assert ex.store.list() == [] and not any(ex.store.incoming.iterdir())
        with ExchangeClient(ex.address, ex.ca_cert, timeout=10) as c:  # a well-behaved client still gets in
            assert c.upload(tar, site="a")["sequence"] == 1
