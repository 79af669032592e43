"""publish and pull stages on two site workspaces against a live TLS exchange."""

import json

import numpy as np
import pytest
import yaml

from common.fileio import atomic_write_json
from common.signing import generate_signing_key
from node.release.exchange_client import ExchangeError, site_client
from node.release.kit import install_kit
from node.release.publish import publish
from node.release.pull import load_pool, pull
from node.site.workspace import Workspace
from server.kit import make_kit
from tests.helpers_exchange import PASSED_AUDIT, live_exchange, sample_set


def _site(root, name, ex, *, seed, passed=True, run="run-1"):
    """A site workspace that joined through a real site kit (registration, client certificate, mTLS)."""
    ws = Workspace(root / name)
    ws.root.mkdir(parents=True)
    (ws.config_path).write_text(yaml.safe_dump({"name": name, "coordinator": {"timeout_s": 10}}))
    generate_signing_key(ws.signing_key, ws.signing_pub)
    make_kit(ex.cd, name, ws.signing_pub.read_text(), root / f"{name}.kit.tar", exchange=ex.address)
    install_kit(ws, root / f"{name}.kit.tar")
    _synth(ws, run=run, seed=seed, passed=passed)
    return ws


def _synth(ws, *, run, seed, passed=True, n=10):
    images, labels = sample_set(n=n, seed=seed)
    (ws.synth / run).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ws.synth / run / "accepted.npz", images=images, labels=labels)
    atomic_write_json(ws.synth / run / "audit.json", {**PASSED_AUDIT, "passed": passed})
    atomic_write_json(ws.synth / "latest.json", {"run_id": run})
    return images, labels


@pytest.fixture
def fed(tmp_path):
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        a = _site(tmp_path, "a", ex, seed=1)
        b = _site(tmp_path, "b", ex, seed=2)
        yield ex, a, b


def test_publish_then_pull_on_two_sites(fed):
    ex, a, b = fed
    id_a, id_b = publish(a), publish(b)
    assert id_a and id_b and id_a != id_b
    rec = json.loads((a.bundles / "published.json").read_text())
    assert rec["last_sequence"] == 1 and rec["bundles"][0]["status"] == "uploaded"
    assert (a.bundles / id_a).is_dir() and (a.bundles / f"{id_a}.tar").is_file()

    # idempotent: the same accepted set is not uploaded again
    assert publish(a) == id_a
    assert len(ex.store.list()) == 2

    for ws in (a, b):
        assert sorted(pull(ws)) == sorted([id_a, id_b])
        assert pull(ws) == []  # nothing new
        index = json.loads((ws.pool / "index.json").read_text())
        assert set(index) == {id_a, id_b} and index[id_a]["site"] == "a" and index[id_b]["n_samples"] == 10
        assert not (ws.pool / ".incoming").exists()
        images, labels = load_pool(ws)
        assert images.shape == (20, 8, 8) and images.dtype == np.uint8 and labels.dtype == np.int64
        want = {id_a: sample_set(n=10, seed=1), id_b: sample_set(n=10, seed=2)}
        order = sorted(want)
        np.testing.assert_array_equal(images, np.concatenate([want[i][0] for i in order]))
        np.testing.assert_array_equal(labels, np.concatenate([want[i][1] for i in order]))

    # a new accepted set gets the next sequence number
    _synth(a, run="run-2", seed=3)
    id_a2 = publish(a)
    assert id_a2 not in (id_a, id_b)
    assert json.loads((a.bundles / "published.json").read_text())["last_sequence"] == 2
    assert pull(b) == [id_a2]


def test_failed_audit_is_not_published(fed, tmp_path):
    ex, a, b = fed
    _synth(a, run="run-x", seed=4, passed=False)
    assert publish(a) is None
    assert not (a.bundles / "published.json").exists()
    assert ex.store.list() == []


def test_retry_after_lost_reply(fed):
    ex, a, b = fed
    bid = publish(a)
    # the reply was "lost": the record still says built, the server has it
    path = a.bundles / "published.json"
    rec = json.loads(path.read_text())
    rec["bundles"][0]["status"] = "built"
    atomic_write_json(path, rec)
    assert publish(a) == bid
    assert json.loads(path.read_text())["bundles"][0]["status"] == "uploaded"
    assert len(ex.store.list()) == 1


def test_failed_upload_is_retried_and_crash_leftovers_rebuilt(fed):
    ex, a, b = fed

    class Down:
        def upload(self, *args, **kw):
            raise ExchangeError("upload at x: UNAVAILABLE: down", "UNAVAILABLE")

    with pytest.raises(ExchangeError, match="UNAVAILABLE"):
        publish(a, client=Down())
    rec = json.loads((a.bundles / "published.json").read_text())
    assert rec["last_sequence"] == 1 and rec["bundles"][0]["status"] == "built"
    bid = rec["bundles"][0]["bundle_id"]
    (a.bundles / f"{bid}.tar").unlink()  # a crash lost the tar: rebuilt under a fresh sequence
    assert publish(a) == bid
    rec = json.loads((a.bundles / "published.json").read_text())
    assert rec["last_sequence"] == 2 and rec["bundles"] == [rec["bundles"][0]]
    assert [r.sequence for r in ex.store.list()] == [2]


def test_pull_rejects_bundles_that_fail_verification(fed):
    ex, a, b = fed
    bid = publish(a)
    ex.trust.revoke("a")  # the coordinator no longer vouches for site a
    assert pull(b) == []
    assert not (b.pool / bid).exists()
    rejected = json.loads((b.pool / "rejected.json").read_text())
    assert "site 'a' is not registered" in rejected[bid]["reason"]
    images, labels = load_pool(b)
    assert images.shape[0] == 0 and labels.shape == (0,)


def test_publish_with_a_given_client(fed):
    ex, a, b = fed
    with site_client(a) as c:
        bid = publish(a, client=c)
        assert [r["bundle_id"] for r in c.list()] == [bid]


def test_a_round_trains_on_pool_real_or_both(fed):
    from node.federation.rounds import training_records

    ex, a, b = fed
    publish(a), publish(b)
    real = np.full((6, 8, 8), 7, np.uint8)
    a.data.mkdir(parents=True, exist_ok=True)
    np.savez(
        a.data / "dataset.npz", images=real, labels=np.array([0, 1, 0, 1, 1, 0]), patient_ids=np.array(list("pqrstu"))
    )
    atomic_write_json(
        a.data / "splits.json", {"seed": 0, "n_classes": 2, "train": [0, 1, 2, 3], "holdout": [4], "test": [5]}
    )

    with pytest.raises(RuntimeError, match="pool is empty"):  # a round never pulls: `plan-node start` does
        training_records(a, "pool", wait_s=0)
    pull(a)
    pool_x, pool_y = training_records(a, "pool")
    assert len(pool_y) == 20
    real_x, real_y = training_records(a, "real")
    assert real_x.shape == (4, 8, 8) and real_y.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="needs real_share"):
        training_records(a, "pool+real")
    both_x, both_y = training_records(a, "pool+real", real_share=0.0)
    np.testing.assert_array_equal(both_x, np.concatenate([pool_x, real_x]))
    assert both_y.tolist() == pool_y.tolist() + [0, 1, 0, 1]
    # 20 pool images against 4 real ones: a share of a half repeats the real ones 5 times
    half_x, half_y = training_records(a, "pool+real", real_share=0.5)
    np.testing.assert_array_equal(half_x, np.concatenate([pool_x, *[real_x] * 5]))
    assert half_y.tolist() == pool_y.tolist() + [0, 1, 0, 1] * 5
    with pytest.raises(ValueError, match="'everything'"):
        training_records(a, "everything")


def test_a_round_trains_on_exactly_the_bundles_its_run_names(fed):
    from node.federation.rounds import training_records
    from node.release.pull import PoolIncomplete

    ex, a, b = fed
    id_a = publish(a)
    pull(a)
    id_b = publish(b)  # pooled after a's last pull
    only_a = training_records(a, "pool", bundles=[id_a])[1]
    assert len(only_a) == 10
    # a bundle the run names but this site has not verified: refused after the wait, named
    with pytest.raises(PoolIncomplete, match=f"{id_b}: not pulled yet") as e:
        training_records(a, "pool", bundles=[id_a, id_b], wait_s=0.5)
    assert e.value.missing == [id_b]
    pull(a)
    assert len(training_records(a, "pool", bundles=[id_a, id_b])[1]) == 20
    assert len(training_records(a, "pool", bundles=[id_b])[1]) == 10  # and nothing it does not name


def test_the_node_pulls_beside_its_supernode(fed, tmp_path):
    """`plan-node start` keeps the pool in step while the SuperNode runs (the rounds only read it);
    the SuperNode here is a plain process that lives for a few seconds: the loop is under test."""
    import subprocess
    import sys

    from node.start import _serve

    ex, a, b = fed
    cfg = yaml.safe_load(a.config_path.read_text())
    cfg["coordinator"]["pull_every_s"] = 0.5
    a.config_path.write_text(yaml.safe_dump(cfg))
    id_b = publish(b)
    said = []
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4); raise SystemExit(3)"])
    assert _serve(a, stand_in, say=said.append) == 3  # the SuperNode's exit code
    assert id_b in json.loads((a.pool / "index.json").read_text())
    assert any("1 new verified bundle" in m for m in said), said


def test_a_listed_bundle_id_is_never_a_path(fed, tmp_path):
    """Even a signed listing is not a path: a bundle id like '../x' must not name a folder, a
    temporary one included, outside the pool."""
    ex, a, b = fed
    bid = publish(a)

    class Hostile:
        def __init__(self, client):
            self._client = client

        def signed_list(self, *args, **kw):  # as if the coordinator's own key signed it
            return [dict(r, bundle_id="../../escape" + "0" * 20) for r in self._client.signed_list(*args, **kw)]

        def __getattr__(self, name):
            return getattr(self._client, name)

    with site_client(b) as c:
        assert pull(b, client=Hostile(c)) == []
    assert not any(p.name.startswith("escape") for p in tmp_path.rglob("*"))
    assert pull(b) == [bid]  # the real listing still pulls
