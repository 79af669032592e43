"""Federation assets end to end over real mutual-TLS gRPC on 127.0.0.1: `plan-server asset add` puts a
weight file into the coordinator's assets/, the exchange serves it by sha256, and a site fetches it
into its model store (node/release/assets.py), checked against the pin before it is kept.

The "weights" are random bytes (no model is loaded): what is tested is the transport and the checks."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from common import errors
from common import exchange_pb2 as pb
from common import exchange_pb2_grpc as pb_grpc
from common.config import ExtractorConfig, SiteConfig, commented_yaml, load_federation_config
from common.fileio import sha256_bytes
from common.modelstore import STORE_ENV, ModelStoreError, default_store_dir, resolve
from common.tls import issue_client_cert
from node.cli import app as node_app
from node.release.assets import fetch_extractor_weights
from node.release.exchange_client import ExchangeClient, ExchangeError
from node.site.workspace import Workspace
from server.assets import add_asset
from server.cli import app as server_app
from tests.helpers_exchange import live_exchange

# more than two 1 MiB chunks, so the stream has several data messages
WEIGHTS = np.random.default_rng(7).integers(0, 256, 2 * 1024 * 1024 + 12345, dtype=np.uint8).tobytes()
PIN = sha256_bytes(WEIGHTS)


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)  # every site's store is <site>/modelstore here


@pytest.fixture
def ex(tmp_path):
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:  # mutual TLS, as the coordinator runs it
        yield ex


def _site(tmp_path, ex, extractor: dict | None = None, route: str = "cvae") -> Workspace:
    """A site workspace with a client certificate of the federation CA and site.yaml pointing at `ex`."""
    root = tmp_path / "site"
    crt, key = issue_client_cert(ex.cd.ca_dir, root / "keys", "a")
    cfg = SiteConfig(
        name="a",
        synth={"route": route, "extractor": extractor or {}},
        coordinator={
            "exchange": ex.address,
            "ca_cert": ex.ca_cert,
            "client_cert": crt,
            "client_key": key,
            "timeout_s": 20,
        },
    )
    (root / "site.yaml").write_text(commented_yaml(cfg, title="test site"))
    return Workspace(root)


def _client(ws: Workspace) -> ExchangeClient:
    c = ws.config().coordinator
    return ExchangeClient(c.exchange, c.ca_cert, timeout=20, client_cert=c.client_cert, client_key=c.client_key)


def _weights_file(tmp_path, data: bytes = WEIGHTS, name: str = "resnet18-test.pth"):
    path = tmp_path / "from-vendor" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def _pinned(name: str = "resnet18-test.pth", sha256: str = PIN) -> dict:
    return {"arch": "resnet18", "weights": name, "sha256": sha256}


def test_served_asset_lands_in_the_model_store(tmp_path, ex):
    src = _weights_file(tmp_path)
    r = CliRunner().invoke(server_app, ["asset", "add", str(src), "--dir", str(ex.cd.root), "--arch", "resnet18"])
    assert r.exit_code == 0, r.output
    # the printed lines pin exactly this file: appended to federation.yaml they load as its extractor
    with open(ex.cd.config_path, "a") as f:
        f.write(r.stdout)
    fed = load_federation_config(ex.cd.config_path)
    assert fed.route == "cvae" and fed.extractor == ExtractorConfig(**_pinned())

    ws = _site(tmp_path, ex, _pinned())
    store = default_store_dir(ws.root)
    with pytest.raises(ModelStoreError, match="is not in the local model store"):
        resolve(PIN, store_dir=store, name="resnet18-test.pth")

    r = CliRunner().invoke(node_app, ["fetch-assets", "--site-dir", str(ws.root)])  # the site's own client
    assert r.exit_code == 0, r.output
    assert "extractor weights ready" in _flat(r.output)
    path = store / "resnet18-test.pth"
    assert path.read_bytes() == WEIGHTS
    assert resolve(PIN, store_dir=store, name="resnet18-test.pth") == path
    assert sorted(os.listdir(store)) == ["resnet18-test.pth"]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644

    # present and matching: used as it is, the coordinator is not asked (no client would work here)
    before = path.stat()
    assert fetch_extractor_weights(ws, ExtractorConfig(**_pinned()), client=object()) == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # present but not matching: refused and left for the operator, not overwritten by a fetch
    path.write_bytes(b"something else")
    with pytest.raises(
        ModelStoreError, match=f"sha256 is {sha256_bytes(b'something else')}, expected {PIN}.*fetch-assets"
    ):
        fetch_extractor_weights(ws, ExtractorConfig(**_pinned()), client=object())
    assert path.read_bytes() == b"something else"


def test_asset_altered_on_the_coordinator_is_refused_at_the_site(tmp_path, ex):
    digest, _ = add_asset(ex.cd.assets, _weights_file(tmp_path))
    tampered = bytearray(WEIGHTS)
    tampered[1_500_000] ^= 1  # one bit, in the second chunk
    (ex.cd.assets / digest).write_bytes(bytes(tampered))
    ws = _site(tmp_path, ex, _pinned())
    store = default_store_dir(ws.root)
    with _client(ws) as c, pytest.raises(ExchangeError) as e:
        fetch_extractor_weights(ws, ExtractorConfig(**_pinned()), client=c)
    assert e.value.code == "DATA_LOSS"
    msg = str(e.value)
    assert str(store / "resnet18-test.pth") in msg and PIN in msg and sha256_bytes(bytes(tampered)) in msg
    assert not store.exists() or os.listdir(store) == []  # nothing kept, not even the temporary file

    # a truncated copy too
    (ex.cd.assets / digest).write_bytes(WEIGHTS[:1000])
    with _client(ws) as c, pytest.raises(ExchangeError, match="refused the file") as e:
        c.fetch_asset(PIN, store / "x.pth")
    assert e.value.code == "DATA_LOSS" and os.listdir(store) == []


def test_unknown_asset_is_a_clear_error(tmp_path, ex):
    unknown = "f" * 64
    ws = _site(tmp_path, ex, _pinned(sha256=unknown))
    r = CliRunner().invoke(node_app, ["fetch-assets", "--site-dir", str(ws.root)])
    out = _flat(r.output)
    assert r.exit_code == errors.NETWORK  # the coordinator refused
    assert "NOT_FOUND" in out and f"no asset {unknown} at the coordinator" in out and "plan-server asset add" in out
    store = default_store_dir(ws.root)
    assert not store.exists() or os.listdir(store) == []


def test_malformed_or_path_like_requests_are_refused(tmp_path, ex):
    add_asset(ex.cd.assets, _weights_file(tmp_path))
    ws = _site(tmp_path, ex)
    c = ws.config().coordinator
    creds = grpc.ssl_channel_credentials(c.ca_cert.read_bytes(), c.client_key.read_bytes(), c.client_cert.read_bytes())
    stub = pb_grpc.ExchangeStub(grpc.secure_channel(ex.address, creds))
    for bad in ("../x", "../trust.db", "../" + PIN, PIN.upper(), PIN[:63], PIN + "0", ""):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.DownloadAsset(pb.AssetRequest(sha256=bad), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "not 64 lower-case hex digits" in e.value.details()
    with _client(ws) as client, pytest.raises(ExchangeError, match="INVALID_ARGUMENT") as e:
        client.fetch_asset("../x", tmp_path / "dl" / "x")
    assert not (tmp_path / "dl").exists() or os.listdir(tmp_path / "dl") == []

    # a well-formed name that is a link out of assets/ is not served
    secret = ex.cd.coordinator_key
    link = ex.cd.assets / sha256_bytes(secret.read_bytes())
    link.symlink_to(secret)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.DownloadAsset(pb.AssetRequest(sha256=link.name), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # a site's weights name must stay inside its model store
    with pytest.raises(ValueError, match="plain file name"):
        fetch_extractor_weights(ws, ExtractorConfig(**_pinned(name="../escape.pth")), client=object())


def test_asset_needs_a_client_certificate(tmp_path, ex):
    add_asset(ex.cd.assets, _weights_file(tmp_path))
    with ExchangeClient(ex.address, ex.ca_cert, timeout=5) as c:  # TLS, but no certificate of the CA
        with pytest.raises(ExchangeError, match="UNAVAILABLE"):
            c.fetch_asset(PIN, tmp_path / "dl" / "x.pth")
    assert os.listdir(tmp_path / "dl") == []
    ws = _site(tmp_path, ex)
    with _client(ws) as c:
        assert c.fetch_asset(PIN, tmp_path / "dl" / "x.pth") == {"sha256": PIN, "size": len(WEIGHTS)}
    assert (tmp_path / "dl" / "x.pth").read_bytes() == WEIGHTS


def test_asset_add_names_the_file_by_its_sha256_and_is_idempotent(tmp_path):
    from tests.helpers_exchange import coordinator_dir

    cd = coordinator_dir(tmp_path / "coord")
    src = _weights_file(tmp_path)
    r = CliRunner().invoke(server_app, ["asset", "add", str(src), "--dir", str(cd.root)])
    assert r.exit_code == 0, r.output
    assert "added as" in _flat(r.output) and f"sha256 {PIN}" in r.stdout and f"sha256: {PIN}" in r.stdout
    assert "arch: ARCH" in r.stdout  # no --arch: a placeholder federation.yaml refuses until replaced
    stored = cd.assets / PIN
    assert os.listdir(cd.assets) == [PIN] and stored.read_bytes() == WEIGHTS
    assert stored.stat().st_mode & 0o777 == 0o644
    before = stored.stat()

    r = CliRunner().invoke(server_app, ["asset", "add", str(src), "--dir", str(cd.root)])
    assert r.exit_code == 0, r.output
    assert "already present as" in _flat(r.output)
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert os.listdir(cd.assets) == [PIN]  # no temporary file left

    # a copy altered after it was added is replaced by a new add of the original
    stored.write_bytes(b"altered")
    assert add_asset(cd.assets, src) == (PIN, True) and stored.read_bytes() == WEIGHTS

    r = CliRunner().invoke(server_app, ["asset", "add", str(tmp_path / "missing.pth"), "--dir", str(cd.root)])
    assert r.exit_code == 2 and "not a file" in _flat(r.output)
    other = _weights_file(tmp_path, b"other weights", name="other.pth")
    r = CliRunner().invoke(server_app, ["asset", "add", str(other), "--dir", str(cd.root), "--arch", "vgg"])
    assert r.exit_code == 2 and "expected one of dinov2_vits14" in _flat(r.output)
    assert os.listdir(cd.assets) == [PIN]  # refused before anything was copied


def test_tiny_extractor_fetches_nothing(tmp_path, ex):
    class NoCalls:
        def __getattr__(self, name):
            raise AssertionError(f"the coordinator was contacted ({name})")

    ws = _site(tmp_path, ex)  # synth.extractor: tiny
    assert fetch_extractor_weights(ws, ExtractorConfig(), client=NoCalls()) is None
    r = CliRunner().invoke(node_app, ["fetch-assets", "--site-dir", str(ws.root)])
    assert r.exit_code == 0 and "no weight file" in _flat(r.output)
    assert not default_store_dir(ws.root).exists()


def test_start_fetches_the_weights_on_the_cvae_route_only(tmp_path, ex, monkeypatch):
    import node.start

    class Stop(Exception):
        pass

    def stop_here(ws, **kw):
        raise Stop

    monkeypatch.setattr(node.start, "run_pipeline", stop_here)  # only what start does before the stages
    monkeypatch.setattr(node.start, "preflight", lambda ws, say: 0)  # this site has no signing keys
    add_asset(ex.cd.assets, _weights_file(tmp_path))
    ws = _site(tmp_path, ex, _pinned(), route="plan")
    with pytest.raises(Stop):
        node.start.start_node(ws, say=lambda m: None)
    assert not default_store_dir(ws.root).exists()  # the PLAN route does not use the extractor

    cfg = ws.config()
    cfg.synth.route = "cvae"
    ws.config_path.write_text(commented_yaml(cfg, title="test site"))
    said = []
    with pytest.raises(Stop):
        node.start.start_node(ws, say=said.append)
    assert (default_store_dir(ws.root) / "resnet18-test.pth").read_bytes() == WEIGHTS
    assert any("fetched from the coordinator" in m for m in said)
