"""Revocation reaches everything (issue 15): a revoked site is refused by the exchange for every
call, whatever certificate CN or key it tries, and its bundles leave the other sites' pools."""

from __future__ import annotations

import pytest

from common.signing import load_private_key
from node.release.exchange_client import ExchangeError, site_client
from node.release.publish import publish
from node.release.pull import load_pool, pull
from server.cli import app as server_app
from tests.helpers_exchange import live_exchange, make_bundle, site_key
from tests.test_kits_and_trust import _ok
from tests.test_publish_pull import _site


@pytest.fixture
def revoked(tmp_path):
    """Sites a and b, both published and pulled; then `plan-server sites revoke a`."""
    with live_exchange(tmp_path / "coord", client_ca=True) as ex:
        a, b = _site(tmp_path, "a", ex, seed=1), _site(tmp_path, "b", ex, seed=2)
        bid_a, bid_b = publish(a), publish(b)
        assert sorted(pull(b)) == sorted([bid_a, bid_b])
        out = _ok(server_app, ["sites", "revoke", "a", "--dir", ex.cd.root, "--yes"])
        assert "1 client certificate(s) revoked" in out
        yield ex, a, b, bid_a, bid_b


@pytest.mark.parametrize("call", ["list", "download", "trust_document", "upload", "health"])
def test_every_call_of_a_revoked_site_is_refused(revoked, tmp_path, call):
    ex, a, b, bid_a, bid_b = revoked
    with site_client(a) as c:
        with pytest.raises(ExchangeError) as e:
            {
                "list": lambda: c.list(),
                "download": lambda: c.download(bid_b, tmp_path / "x.tar"),
                "trust_document": lambda: c.trust_document(),
                "upload": lambda: c.upload(
                    make_bundle(tmp_path / "n", load_private_key(a.signing_key), site="a", sequence=5), site="a"
                ),
                "health": lambda: c.health(),
            }[call]()
    assert e.value.code == "PERMISSION_DENIED", e.value
    assert "revoked" in str(e.value)
    assert not (tmp_path / "x.tar").exists()


def test_the_others_carry_on_and_drop_the_revoked_sites_bundles(revoked):
    ex, a, b, bid_a, bid_b = revoked
    assert pull(b) == []
    assert load_pool(b)[0].shape[0] == 10  # only b's own bundle is left to train on
    assert (b.pool / "quarantine" / bid_a).is_dir()


def test_the_old_certificate_stays_refused_after_the_site_is_added_again(revoked, tmp_path):
    ex, a, b, bid_a, bid_b = revoked
    _, pem = site_key(tmp_path / "k", "a2")
    _ok(server_app, ["sites", "add", "a", "--key", tmp_path / "k" / "a2.pub", "--dir", ex.cd.root])
    with site_client(a) as c:  # a has a valid key again, but this is its revoked certificate
        with pytest.raises(ExchangeError, match="client certificate of site 'a' was revoked") as e:
            c.list()
    assert e.value.code == "PERMISSION_DENIED"
