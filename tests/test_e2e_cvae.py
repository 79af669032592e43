"""End to end on the CVAE route: a coordinator and two sites on loopback, real processes, real
TLS, real Flower; the federation's route is "cvae", so the site kits switch both sites to it.

Each site embeds its phantom images with the federation's pinned (tiny, deterministic)
extractor, trains a CVAE on the embeddings, audits the sampled embeddings in embedding space,
and publishes a signed embedding bundle; the federation trains a head on the pooled embeddings
and every site evaluates it on the embeddings of its own real test split. Slow (a few minutes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.local.demo import summarize
from tests.helpers_federation import run_federation

pytestmark = pytest.mark.slow

FEDERATION = {"route": "cvae", "downstream": {"rounds": 2, "local_epochs": 5}}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    # a quorum of one: the gate judges upper bounds at 60 evaluation patients, and a site's CVAE set
    # may fail it (a site that fails still trains on the pool)
    return run_federation(tmp_path_factory.mktemp("fed-cvae"), n_sites=2, quorum=1, federation_overrides=FEDERATION)


def test_kits_put_every_site_on_the_federations_route(federation):
    _, sites, _ = federation
    from common.config import load_site_config

    for site in sites:
        assert load_site_config(site / "site.yaml").synth.route == "cvae"


def test_sites_publish_audited_embedding_bundles(federation):
    coord, sites, _ = federation
    from common.bundle import load_bundle_data
    from server.store import BundleStore

    passed = []
    for site in sites:
        run = json.loads((site / "synth" / "latest.json").read_text())["run_id"]
        audit = json.loads((site / "synth" / run / "audit.json").read_text())
        assert audit["route"] == "cvae" and set(audit["membership"]) == {"embedding"}
        assert audit["passed"] == all(c["passed"] for c in audit["checks"]), audit["checks"]
        if audit["passed"]:
            passed.append(site.name)
            assert audit["min_embedding_distance_ratio"] >= audit["policy"]["min_embedding_distance_ratio"]
    stored = BundleStore(coord / "store").list()
    assert passed and sorted(b.site for b in stored) == passed
    for site in sites:
        index = json.loads((site / "pool" / "index.json").read_text())
        assert sorted(e["site"] for e in index.values()) == passed
        for bid, entry in index.items():
            route, data, labels = load_bundle_data(site / "pool" / bid)
            assert route == entry["route"] == "cvae"
            assert data.dtype == np.float32 and data.shape == (entry["n_samples"], 128) and np.isfinite(data).all()
            assert set(np.unique(labels)) <= {0, 1}


def test_federated_head_on_embeddings_beats_chance_at_every_site(federation):
    _, sites, results = federation
    assert results["completed"] and results["rounds_completed"] == FEDERATION["downstream"]["rounds"]
    for s in summarize(sites, results, seconds=0)["sites"]:
        # two balanced phantom classes: chance is 0.5
        assert s["test_accuracy_federated"] > 0.6, s
        assert s["test_accuracy_local_only"] is not None
