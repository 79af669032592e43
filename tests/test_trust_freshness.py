"""Trust freshness (issue 15): the trust document's version, expiry and federation; a site's
record of the last version it accepted; pooled bundles whose key is revoked leave training."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import yaml

from common.signing import generate_signing_key, load_private_key
from common.trustdoc import TrustDocumentError, sign_trust_document
from node.release.exchange_client import ExchangeError, site_client
from node.release.kit import install_kit
from node.release.pull import load_pool, pull
from node.release.trust import accept_trust_document, trust_state
from node.site.workspace import Workspace
from server.kit import make_kit
from server.trust import TrustStore
from tests.helpers_exchange import live_exchange, make_bundle, site_key
from tests.test_publish_pull import _site

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def coordinator(tmp_path):
    key, _ = site_key(tmp_path, "coordinator")
    return key


@pytest.fixture
def ws(tmp_path):
    w = Workspace(tmp_path / "site")
    w.root.mkdir()
    w.config_path.write_text(yaml.safe_dump({"name": "site", "coordinator": {"federation": "fed"}}))
    return w


def _doc(key, *, version=2, federation="fed", sites=None, now=NOW, ttl_s=3600):
    return sign_trust_document(sites if sites is not None else {"a": []}, key, federation=federation,
                               version=version, ttl_s=ttl_s, now=now)  # fmt: skip


def test_the_version_grows_with_every_change_of_the_key_set(tmp_path):
    trust = TrustStore(tmp_path / "trust.db")
    _, pem_a = site_key(tmp_path, "a")
    _, pem_b = site_key(tmp_path, "b")
    versions = [trust.snapshot()[0]]
    trust.add("a", pem_a)
    versions.append(trust.snapshot()[0])
    trust.add("a", pem_a)  # no change: no new version
    versions.append(trust.snapshot()[0])
    trust.rotate("a", pem_b, last_sequence=3)
    versions.append(trust.snapshot()[0])
    trust.revoke("a")
    versions.append(trust.snapshot()[0])
    assert versions == [1, 2, 2, 3, 4]
    assert TrustStore(tmp_path / "trust.db").snapshot() == (4, {})  # persisted


def test_accepts_newer_and_records_it(ws, coordinator):
    accept_trust_document(ws, _doc(coordinator, version=2), coordinator.public_key(), now=NOW)
    doc = accept_trust_document(ws, _doc(coordinator, version=5, sites={}), coordinator.public_key(), now=NOW)
    assert doc["version"] == 5 and trust_state(ws)["version"] == 5
    # The same version re-signed later (the exchange signs on every request) is accepted.
    accept_trust_document(ws, _doc(coordinator, version=5, sites={}, now=NOW + dt.timedelta(minutes=5)),
                          coordinator.public_key(), now=NOW + dt.timedelta(minutes=5))  # fmt: skip


@pytest.mark.parametrize("case,match", [
    ("rollback", r"older than version 5.*a rollback"),
    ("equivocation", r"version 5 lists other keys"),
    ("other federation", r"for federation 'other', this site joined 'fed'"),
    ("expired", r"expired 60 s ago"),
    ("future", r"issued 3600 s in the future"),
    ("no version", r"'version' must be a positive integer"),
])  # fmt: skip
def test_refuses(ws, coordinator, case, match):
    accept_trust_document(ws, _doc(coordinator, version=5), coordinator.public_key(), now=NOW)
    before = (ws.pool / "trust.json").read_bytes()
    envelope = {
        "rollback": _doc(coordinator, version=4),
        "equivocation": _doc(coordinator, version=5, sites={"a": [], "evil": []}),
        "other federation": _doc(coordinator, version=9, federation="other"),
        "expired": _doc(coordinator, version=6, now=NOW - dt.timedelta(seconds=3660)),
        "future": _doc(coordinator, version=6, now=NOW + dt.timedelta(hours=1)),
        "no version": _no_version(coordinator),
    }[case]
    with pytest.raises(TrustDocumentError, match=match):
        accept_trust_document(ws, envelope, coordinator.public_key(), now=NOW)
    assert (ws.pool / "trust.json").read_bytes() == before  # a refused document changes nothing


def _no_version(key) -> bytes:
    """A document as the coordinator signed it before versions existed."""
    from common.dsse import sign_envelope
    from common.signing import key_id
    from common.trustdoc import TRUST_PAYLOAD_TYPE

    payload = json.dumps({"federation": "fed", "issued_at": NOW.isoformat(), "sites": {}}).encode()
    return json.dumps(sign_envelope(payload, TRUST_PAYLOAD_TYPE, key, key_id(key.public_key()))).encode()


class Replaying:
    """The real client, except that the trust document is one captured earlier: a replay by
    whoever sits between the site and the coordinator's key (a compromised exchange host)."""

    def __init__(self, client, envelope: bytes):
        self._client, self._envelope = client, envelope

    def trust_document(self) -> bytes:
        return self._envelope

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_replayed_old_document_cannot_bring_back_a_revoked_key(tmp_path):
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        a = _site(tmp_path, "a", ex, seed=1)
        b = _site(tmp_path, "b", ex, seed=2)
        with site_client(b) as c:
            old = c.trust_document()  # site a's key is in it
        assert pull(b) == []
        windows_before = ex.trust.windows()
        ex.trust.revoke("a")
        assert pull(b) == []  # b sees the newer version
        # A bundle signed by a's revoked key, far ahead in sequence, put in the pool by the exchange host.
        a_key = load_private_key(a.signing_key)
        ex.store.put(make_bundle(tmp_path / "evil", a_key, site="a", sequence=999), verify=windows_before)
        with site_client(b) as c:
            with pytest.raises(ExchangeError, match="a rollback, refused"):
                pull(b, client=Replaying(c, old))
        assert load_pool(b)[0].shape[0] == 0 and trust_state(b)["version"] == ex.trust.snapshot()[0]


def test_bundles_of_a_revoked_key_leave_the_pool_at_the_next_pull(tmp_path):
    from node.release.publish import publish

    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        a = _site(tmp_path, "a", ex, seed=1)
        b = _site(tmp_path, "b", ex, seed=2)
        bid_a, bid_b = publish(a), publish(b)
        assert sorted(pull(b)) == sorted([bid_a, bid_b])
        assert load_pool(b)[0].shape[0] == 20
        ex.trust.revoke("a")
        assert pull(b) == []
        assert sorted(json.loads((b.pool / "index.json").read_text())) == [bid_b]
        assert (b.pool / "quarantine" / bid_a).is_dir() and not (b.pool / bid_a).exists()
        assert "site 'a' is not registered" in json.loads((b.pool / "quarantine.json").read_text())[bid_a]["reason"]
        assert load_pool(b)[0].shape[0] == 10  # only b's own bundle trains


def test_a_kit_pins_the_federation(tmp_path):
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        ws = Workspace(tmp_path / "a")
        ws.root.mkdir()
        ws.config_path.write_text(yaml.safe_dump({"name": "a"}))
        generate_signing_key(ws.signing_key, ws.signing_pub)
        make_kit(ex.cd, "a", ws.signing_pub.read_text(), tmp_path / "a.kit", exchange=ex.address)
        install_kit(ws, tmp_path / "a.kit")
        assert ws.config().coordinator.federation == "test"
