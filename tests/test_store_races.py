"""The store under concurrency (issue 15): a revocation or rotation that lands while a bundle is
arriving, a revocation interrupted between the two databases, and recovery only by the serving
process."""

from __future__ import annotations

import pytest

from server.coordinator import CoordinatorDir, fed_store
from server.store import BundleStore, StoreRefused
from tests.helpers_exchange import coordinator_dir, make_bundle, site_key


@pytest.fixture
def setup(tmp_path):
    cd = coordinator_dir(tmp_path / "coord")
    priv, pem = site_key(tmp_path / "k", "a")
    cd.trust().add("a", pem)
    return cd, priv


def _arriving(tar, during):
    """The tar's bytes in two halves, calling `during()` between them: a change that lands mid-upload."""
    data = tar.read_bytes()
    yield data[: len(data) // 2]
    during()
    yield data[len(data) // 2 :]


@pytest.mark.parametrize("change", ["revoke", "rotate"])
def test_a_key_change_while_a_bundle_arrives_refuses_it(setup, tmp_path, change):
    cd, priv = setup
    trust, store = cd.trust(), BundleStore(cd.store)
    _, new_pem = site_key(tmp_path / "k", "a-new")
    during = {"revoke": lambda: trust.revoke("a"), "rotate": lambda: trust.rotate("a", new_pem, last_sequence=0)}[
        change
    ]
    with pytest.raises(
        StoreRefused, match="no longer vouches for sequence 1: revoked or rotated while the bundle was arriving"
    ):
        store.put(_arriving(make_bundle(tmp_path / "b", priv), during), verify=trust)
    assert store.list() == []


def test_a_revocation_cut_off_between_the_databases_is_finished_at_the_next_start(setup, tmp_path):
    cd, priv = setup
    store = BundleStore(cd.store)
    rec = store.put(make_bundle(tmp_path / "b", priv), verify=cd.trust())
    cd.trust().revoke("a")  # ... and the process died before removing the key's bundles
    assert [r.bundle_id for r in store.list()] == [rec.bundle_id]
    serving = fed_store(CoordinatorDir(cd.root), cd.config())
    try:
        assert serving.list() == [] and not (serving.objects / f"{rec.sha256}.tar").exists()
    finally:
        serving.close()
