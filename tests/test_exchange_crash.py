"""The exchange under a crash and under load, as in issue 6's attack matrix: a server killed with
SIGKILL in the middle of an upload restarts with a consistent store, and eight sites uploading at
once all land. Real mutual-TLS exchanges on 127.0.0.1 in processes of their own."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.fileio import sha256_bytes, sha256_file
from common.tls import issue_client_cert
from node.release.exchange_client import ExchangeClient, ExchangeError
from server.store import BundleStore
from tests.helpers_exchange import coordinator_dir, free_port, live_exchange, make_bundle, site_key

MAX = 4 * 1024 * 1024


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
