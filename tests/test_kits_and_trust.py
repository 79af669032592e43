"""Site kits, key rotation and revocation, and the coordinator-signed trust store, through the CLIs."""

from __future__ import annotations

import io
import json
import stat
import tarfile

import pytest
import yaml
from typer.testing import CliRunner

from common.bundle import BundleError, verify_bundle
from common.signing import generate_signing_key, load_private_key
from common.sitekit import KitError, read_kit
from common.tls import make_ca
from common.trustdoc import TrustDocumentError, open_trust_document, sign_trust_document
from node.cli import app as node_app
from node.release.exchange_client import site_client
from node.release.kit import install_kit
from node.release.pull import pull
from node.site.workspace import Workspace
from server.cli import app as server_app
from server.coordinator import CoordinatorDir
from server.store import BundleStore
from tests.helpers_exchange import live_exchange, make_bundle, site_key

runner = CliRunner()


def _ok(app, args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_kit_through_the_clis(tmp_path):
    coord, site = tmp_path / "coord", tmp_path / "site"
    _ok(server_app, ["init", "--dir", coord, "--name", "fed", "--host", "coord.example", "--bind", "0.0.0.0"])
    cd = CoordinatorDir(coord)
    assert (cd.config().exchange_host, cd.config().superlink_host, cd.config().public_host) == (
        "0.0.0.0",
        "0.0.0.0",
        "coord.example",
    )
    assert _mode(cd.coordinator_key) == 0o600 and cd.coordinator_pub.exists()
    assert "nothing to do" in _ok(server_app, ["ca", "init", "--dir", coord])  # idempotent, never replaces
    _ok(node_app, ["init", "--site-dir", site, "--name", "st-marys"])
    ws = Workspace(site)
    # the federation's floor is stricter on the AUC, the site already stricter on re-identification
    fed_yaml = yaml.safe_load(cd.config_path.read_text())
    fed_yaml["policy"] = {"max_mia_auc": 0.6}
    fed_yaml["downstream"] = {"rounds": 5, "lr": 0.004, "strategy": "fedprox"}
    cd.config_path.write_text(yaml.safe_dump(fed_yaml))
    site_yaml = yaml.safe_load(ws.config_path.read_text())
    site_yaml["policy"] = {"max_reid_rate": 0.05}
    ws.config_path.write_text(yaml.safe_dump(site_yaml))
    out = _ok(server_app, ["kit", "st-marys", "--key", ws.signing_pub, "--node-key", ws.node_pub, "--dir", coord])
    kit = coord / "kits" / "st-marys.kit.tar"
    assert _mode(kit) == 0o600 and "BEGIN" not in out  # no key material printed
    meta, files = read_kit(kit)
    assert (
        meta["site"] == "st-marys" and meta["exchange"] == "coord.example:50051" and meta["flower_node_key_registered"]
    )
    assert meta["superlink"] == "coord.example:9092" and "coord.example" in meta["server_names"]
    assert (coord / "flower_nodes" / "st-marys.pub").exists()  # issue 7's node key registration
    assert cd.trust().keys("st-marys") == [ws.signing_pub.read_text()]
    # a second kit for another key of the same site is refused: that is a rotation
    generate_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    r = runner.invoke(
        server_app,
        ["kit", "st-marys", "--key", str(tmp_path / "other.pub"), "--out", str(tmp_path / "k2"), "--dir", str(coord)],
    )
    assert r.exit_code == 2 and "sites rotate" in r.output

    out = _ok(node_app, ["init", "--site-dir", site, "--kit", kit])
    assert "BEGIN" not in out
    assert _mode(ws.keys) == 0o700 and _mode(ws.keys / "client.key") == 0o600
    assert (ws.keys / "client.key").read_bytes() == files["client.key"]
    assert (ws.keys / "coordinator.pub").read_bytes() == cd.coordinator_pub.read_bytes()
    cfg = ws.config()
    assert cfg.coordinator.exchange == "coord.example:50051" and cfg.name == "st-marys"
    assert cfg.policy.max_mia_auc == 0.6 and cfg.policy.max_reid_rate == 0.05  # floor applied, site's stricter kept
    # the federation's downstream settings: the site's local-only yardstick trains with them before it joins
    assert meta["downstream"] == cd.config().downstream.model_dump(mode="json")
    assert (cfg.downstream.rounds, cfg.downstream.lr, cfg.downstream.strategy) == (5, 0.004, "fedprox")
    _ok(node_app, ["init", "--site-dir", site, "--kit", kit])  # installing again is harmless


def test_kit_refused_when_it_does_not_fit(tmp_path):
    coord = tmp_path / "coord"
    _ok(server_app, ["init", "--dir", coord])
    for name in ("a", "b"):
        _ok(node_app, ["init", "--site-dir", tmp_path / name, "--name", name])
    a, b = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    _ok(server_app, ["kit", "a", "--key", a.signing_pub, "--dir", coord])
    kit = coord / "kits" / "a.kit.tar"
    with pytest.raises(KitError, match="kit is for site 'a', this workspace is site 'b'"):
        install_kit(b, kit)
    # a kit whose member list was tampered with
    evil = tmp_path / "evil.tar"
    with tarfile.open(kit) as src, tarfile.open(evil, "w") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo("../../.bashrc")
        info.size = 4
        dst.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(KitError, match=r"unexpected member '../../.bashrc'"):
        install_kit(a, evil)
    # a client certificate from another CA
    make_ca(tmp_path / "evil-ca", "evil")
    forged = tmp_path / "forged.tar"
    with tarfile.open(kit) as src, tarfile.open(forged, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "ca.crt":
                data = (tmp_path / "evil-ca" / "ca.crt").read_bytes()
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(KitError, match="client.crt was not issued by the kit's ca.crt"):
        install_kit(a, forged)
    # the kit registered another signing key than this workspace's
    a.signing_pub.rename(tmp_path / "a-old.pub")
    generate_signing_key(tmp_path / "x.key", a.signing_pub)
    with pytest.raises(KitError, match="kit registers signing key .* but .*signing.pub is key"):
        install_kit(a, kit)
    assert not (a.keys / "client.key").exists()  # nothing installed by a refused kit
    r = runner.invoke(node_app, ["init", "--site-dir", str(tmp_path / "fresh"), "--kit", str(kit)])
    assert r.exit_code == 2 and "run `plan-node init" in r.output


def test_rotation_keeps_old_bundles_valid_and_revocation_purges(tmp_path):
    coord = tmp_path / "coord"
    _ok(server_app, ["init", "--dir", coord])
    cd = CoordinatorDir(coord)
    old, old_pub = site_key(tmp_path / "k", "old")
    new, new_pub = site_key(tmp_path / "k", "new")
    _ok(server_app, ["sites", "add", "a", "--key", tmp_path / "k" / "old.pub", "--dir", coord])
    store = BundleStore(cd.store)
    b1 = store.put(make_bundle(tmp_path / "1", old, sequence=1, seed=1), verify=cd.trust())
    b2 = store.put(make_bundle(tmp_path / "2", old, sequence=2, seed=2), verify=cd.trust())
    assert b1.key_id and b1.key_id == b2.key_id

    out = _ok(server_app, ["sites", "rotate", "a", "--key", tmp_path / "k" / "new.pub", "--dir", coord])
    assert "sequences above 2" in out
    windows = cd.trust().windows()["a"]
    assert [(w["valid_after"], w["valid_until"]) for w in windows] == [(0, 2), (2, None)]
    # receivers still accept the old key's bundles signed before the rotation...
    verify_bundle(store.objects / f"{b1.sha256}.tar", cd.trust().windows(), max_bytes=1 << 24)
    # ...but not a new bundle signed with the old key, even one the store never saw
    with pytest.raises(
        BundleError, match=r"valid for sequence 3 \(keys and their sequence windows: .*: 1..2, .*: 3..\)"
    ):
        verify_bundle(make_bundle(tmp_path / "3", old, sequence=3, seed=3), cd.trust().windows(), max_bytes=1 << 24)
    b3 = store.put(make_bundle(tmp_path / "4", new, sequence=3, seed=4), verify=cd.trust())

    listing = json.loads(_ok(server_app, ["sites", "list", "--json", "--dir", coord]))
    assert [e["status"] for e in listing] == ["retired", "current"] and all("pem" not in e for e in listing)

    # revoking asks first: declined, or with no terminal to ask on, nothing is revoked
    for answer in ("n\n", ""):
        r = runner.invoke(server_app, ["sites", "revoke", "a", "--dir", str(coord)], input=answer)
        assert r.exit_code == 2 and "nothing revoked" in r.output and "--yes" in r.output, r.output
    assert len(store.list()) == 3 and [
        e["status"] for e in json.loads(_ok(server_app, ["sites", "list", "--json", "--dir", coord]))
    ] == ["retired", "current"]
    # revoke only the old key: its two bundles leave the pool, the new key's stays
    out = _ok(server_app, ["sites", "revoke", "a", "--key-id", b1.key_id[:12], "--dir", coord, "--yes"])
    assert "2 bundle(s) removed" in out
    assert [r.bundle_id for r in store.list()] == [b3.bundle_id]
    assert {p.name for p in store.objects.iterdir()} == {f"{b3.sha256}.tar"}
    # revoked bundles stay replays, and the sequence never goes back
    from server.store import StoreRefused

    with pytest.raises(StoreRefused, match="not registered|does not verify"):
        store.put(tmp_path / "1" / f"{b1.bundle_id}.tar", verify=cd.trust())
    _ok(server_app, ["sites", "revoke", "a", "--dir", coord, "--yes"])
    assert store.list() == [] and cd.trust().windows() == {}
    # a fresh key after revoking everything: the purged sequences 1..3 are still spent
    fresh, _ = site_key(tmp_path / "k", "fresh")
    _ok(server_app, ["sites", "add", "a", "--key", tmp_path / "k" / "fresh.pub", "--dir", coord])
    with pytest.raises(StoreRefused, match=r"sequence 3 of site 'a' is not above its last stored sequence 3"):
        store.put(make_bundle(tmp_path / "5", fresh, sequence=3, seed=5), verify=cd.trust())
    assert store.put(make_bundle(tmp_path / "6", fresh, sequence=4, seed=6), verify=cd.trust()).sequence == 4


def test_pull_verifies_the_signed_trust_store(tmp_path):
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        from server.kit import make_kit

        ws = Workspace(tmp_path / "a")
        ws.root.mkdir()
        ws.config_path.write_text(yaml.safe_dump({"name": "a", "coordinator": {"timeout_s": 10}}))
        generate_signing_key(ws.signing_key, ws.signing_pub)
        make_kit(ex.cd, "a", ws.signing_pub.read_text(), tmp_path / "a.kit", exchange=ex.address)
        install_kit(ws, tmp_path / "a.kit")
        with site_client(ws) as c:
            doc = open_trust_document(
                c.trust_document(), load_private_key(ex.cd.coordinator_key).public_key(), federation="test"
            )
        assert list(doc["sites"]) == ["a"] and doc["federation"] == "test" and doc["version"] >= 2
        # a document signed by anyone else is refused
        intruder, _ = site_key(tmp_path / "k", "intruder")
        forged = sign_trust_document({"a": [], "evil": []}, intruder, federation="test", version=99, ttl_s=60)
        with pytest.raises(TrustDocumentError, match="not signed by the coordinator's key"):
            open_trust_document(forged, load_private_key(ex.cd.coordinator_key).public_key(), federation="test")
        # a site whose coordinator.pub is not the coordinator's key pulls nothing
        ws.resolve(ws.config().coordinator.coordinator_pub).write_text((tmp_path / "k" / "intruder.pub").read_text())
        from node.release.exchange_client import ExchangeError

        with pytest.raises(ExchangeError, match="not signed by the coordinator's key"):
            pull(ws)


def test_a_site_named_like_the_federation_connects(tmp_path):
    from common.tls import issue_client_cert
    from node.release.exchange_client import ExchangeClient

    with live_exchange(tmp_path / "coord", client_ca=True) as ex:  # federation "test"
        crt, key = issue_client_cert(ex.cd.ca_dir, tmp_path / "tls", "test")
        with ExchangeClient(ex.address, ex.ca_cert, timeout=5, client_cert=crt, client_key=key) as c:
            assert c.health()["status"] == "ok"


def test_kits_only_name_addresses_the_server_certificate_covers(tmp_path):
    coord = tmp_path / "coord"
    _ok(server_app, ["init", "--dir", coord, "--name", "fed", "--host", "coord.example"])
    cd = CoordinatorDir(coord)
    ca_before, key_before = cd.ca_cert.read_bytes(), cd.coordinator_key.read_bytes()
    generate_signing_key(tmp_path / "a.key", tmp_path / "a.pub")
    r = runner.invoke(
        server_app,
        [
            "kit",
            "a",
            "--key",
            str(tmp_path / "a.pub"),
            "--exchange",
            "198.18.0.7:50051",
            "--out",
            str(tmp_path / "a.kit"),
            "--dir",
            str(coord),
        ],
    )
    said = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "plan-server ca init" in said and "--host 198.18.0.7" in said
    assert not (tmp_path / "a.kit").exists() and cd.trust().keys("a") == []  # nothing registered
    out = _ok(server_app, ["ca", "init", "--dir", coord, "--host", "198.18.0.7"])
    assert "198.18.0.7" in out and "restart" in " ".join(out.split())
    assert cd.ca_cert.read_bytes() == ca_before and cd.coordinator_key.read_bytes() == key_before  # kept
    _ok(
        server_app,
        [
            "kit",
            "a",
            "--key",
            tmp_path / "a.pub",
            "--exchange",
            "198.18.0.7:50051",
            "--superlink",
            "coord.example:9092",
            "--out",
            tmp_path / "a.kit",
            "--dir",
            coord,
        ],
    )
    # a kit whose addresses its own certificate list does not cover (edited) is refused by the site
    from common.sitekit import write_kit

    meta, files = read_kit(tmp_path / "a.kit")
    meta["exchange"] = "elsewhere.example:50051"
    write_kit(tmp_path / "edited.kit", {**files, "kit.json": json.dumps(meta).encode()})
    site = tmp_path / "site"
    _ok(node_app, ["init", "--site-dir", site, "--name", "a"])
    (site / "keys" / "signing.key").write_bytes((tmp_path / "a.key").read_bytes())
    (site / "keys" / "signing.pub").write_bytes((tmp_path / "a.pub").read_bytes())
    r = runner.invoke(node_app, ["init", "--site-dir", str(site), "--kit", str(tmp_path / "edited.kit")])
    assert r.exit_code != 0 and "not covered by the coordinator's server certificate" in " ".join(r.output.split())


def test_the_kit_carries_the_federations_schema_and_ingest_refuses_labels_outside(tmp_path):
    import numpy as np

    from common.config import ConfigError
    from node.site.data import DataError
    from node.site.ingest import ingest, read_splits

    coord, site = tmp_path / "coord", tmp_path / "site"
    _ok(server_app, ["init", "--dir", coord])
    cd = CoordinatorDir(coord)
    fed_yaml = yaml.safe_load(cd.config_path.read_text())
    fed_yaml.update(n_classes=3, class_names=["normal", "benign", "malignant"], image_size=16)
    cd.config_path.write_text(yaml.safe_dump(fed_yaml))
    # two labels present of three, one a mistake
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 30)
    np.savez(tmp_path / "scans.npz", images=rng.integers(0, 256, (60, 20, 20), dtype=np.uint8), labels=labels)
    _ok(
        node_app,
        ["init", "--site-dir", site, "--name", "st-marys", "--source", "npz", "--data-path", tmp_path / "scans.npz"],
    )
    ws = Workspace(site)
    _ok(server_app, ["kit", "st-marys", "--key", ws.signing_pub, "--dir", coord])
    meta, _ = read_kit(coord / "kits" / "st-marys.kit.tar")
    assert meta["schema"] == {"n_classes": 3, "class_names": ["normal", "benign", "malignant"], "image_size": 16}
    _ok(node_app, ["init", "--site-dir", site, "--kit", coord / "kits" / "st-marys.kit.tar"])
    data = ws.config().data
    assert (data.n_classes, data.class_names, data.image_size) == (3, ["normal", "benign", "malignant"], 16)

    ingest(ws)  # labels 0 and 1 only: the site's models still get the federation's three classes
    assert read_splits(ws)["n_classes"] == 3
    labels[7] = 4
    np.savez(tmp_path / "scans.npz", images=rng.integers(0, 256, (60, 20, 20), dtype=np.uint8), labels=labels)
    with pytest.raises(
        DataError,
        match=r"scans.npz: 1 image\(s\) have labels outside this federation's 3 classes "
        r"\(0..2: 0 normal, 1 benign, 2 malignant\), the first at image 7 with label 4",
    ):
        ingest(ws)
    # a federation.yaml whose names do not match its count is refused where it is read
    fed_yaml["class_names"] = ["normal", "benign"]
    cd.config_path.write_text(yaml.safe_dump(fed_yaml))
    with pytest.raises(ConfigError, match="class_names has 2 names but federation.n_classes is 3"):
        cd.config()
