"""The exchange's per-site quota, its deadline and idle limit per call and its per-site call slots, over a real
TLS exchange."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.tls import issue_client_cert
from node.release.exchange_client import ExchangeClient, ExchangeError
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
        stub = pb_grpc.ExchangeStub(
            grpc.secure_channel(ex.address, grpc.ssl_channel_credentials(ex.ca_cert.read_bytes()))
        )

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


def _stalling(data: bytes, stop: threading.Event):
    """An upload that sends its header and 100 bytes, then nothing until `stop`."""
    yield pb.UploadChunk(header=pb.UploadHeader(site="a", size=len(data)))
    yield pb.UploadChunk(data=data[:100])
    stop.wait(30)


@pytest.fixture
def mtls(tmp_path, keys):
    """A mutual-TLS exchange (1 call per site, 1 s without progress ends a call) and clients of sites a and b."""
    with live_exchange(tmp_path / "coord", client_ca=True, idle_timeout_s=1.0, calls_per_site=1) as ex:
        certs = {}
        for s in ("a", "b"):
            ex.trust.add(s, keys[s][1])
            certs[s] = issue_client_cert(ex.cd.ca_dir, tmp_path / "tls", s)
        yield ex, certs


def _channel(ex, cert):
    creds = grpc.ssl_channel_credentials(
        ex.ca_cert.read_bytes(), private_key=cert[1].read_bytes(), certificate_chain=cert[0].read_bytes()
    )
    return grpc.secure_channel(ex.address, creds)


def test_a_site_busy_with_an_upload_gets_no_second_call_and_others_do(mtls, tmp_path, keys):
    ex, certs = mtls
    data = make_bundle(tmp_path / "a1", keys["a"][0], sequence=1).read_bytes()
    stop, errors = threading.Event(), []

    def hold():
        with _channel(ex, certs["a"]) as ch:
            try:
                pb_grpc.ExchangeStub(ch).Upload(_stalling(data, stop), timeout=30)
            except grpc.RpcError as e:
                errors.append(e.code())

    t = threading.Thread(target=hold)
    t.start()
    try:
        time.sleep(0.3)  # the stalled upload holds site a's one slot (but not past the 1 s idle limit)
        with ExchangeClient(
            ex.address, ex.ca_cert, timeout=10, client_cert=certs["a"][0], client_key=certs["a"][1]
        ) as c:
            with pytest.raises(ExchangeError, match="site 'a' already has (an upload|1 calls) in progress") as e:
                c.list()
            assert e.value.code == "RESOURCE_EXHAUSTED"
        with ExchangeClient(
            ex.address, ex.ca_cert, timeout=10, client_cert=certs["b"][0], client_key=certs["b"][1]
        ) as c:
            assert c.upload(make_bundle(tmp_path / "b1", keys["b"][0], site="b", sequence=1), site="b")["site"] == "b"
        t.join(30)  # the stalled one is ended by the idle limit, well before its own 30 s deadline
    finally:
        stop.set()
    assert errors == [grpc.StatusCode.CANCELLED]


def test_a_stream_idle_past_the_limit_is_cancelled_and_the_slot_freed(mtls, tmp_path, keys):
    ex, certs = mtls
    data = make_bundle(tmp_path / "a1", keys["a"][0], sequence=1).read_bytes()
    stop = threading.Event()
    t0 = time.monotonic()
    with _channel(ex, certs["a"]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExchangeStub(ch).Upload(_stalling(data, stop), timeout=30)
    stop.set()
    assert e.value.code() == grpc.StatusCode.CANCELLED and time.monotonic() - t0 < 10
    for _ in range(50):
        if not any(ex.store.incoming.iterdir()):
            break
        time.sleep(0.1)
    assert not any(ex.store.incoming.iterdir())
    with ExchangeClient(ex.address, ex.ca_cert, timeout=10, client_cert=certs["a"][0], client_key=certs["a"][1]) as c:
        assert c.upload(make_bundle(tmp_path / "a2", keys["a"][0], sequence=1, seed=5), site="a")["sequence"] == 1
