"""End to end with the federated CVAE (FederationConfig.cvae_federated): a coordinator and two
sites on loopback, real processes, real TLS, real Flower. Each site trains its CVAE locally and
joins; the coordinator runs FedAvg over the CVAE decoders (encoders stay at the sites); in the
last round every site samples from the federation's decoder, audits and publishes what passes
its gate; then the downstream head is trained on the pool as on the local route. Slow (a few
minutes).

The quorum is both sites: each samples from the federation's decoder with its own min-max
scaler and its own noise scale, and both sets pass their gates (before the CVAE sampled from its
decoder's likelihood, site-a's set sat too near its train records, closer_to_train ~0.78 > 0.75,
and this test ran with a quorum of one)."""

from __future__ import annotations

import json

import pytest

from deploy.local.demo import summarize
from tests.helpers_federation import run_federation

pytestmark = pytest.mark.slow

FEDERATION = {
    "route": "cvae",
    "cvae_federated": True,
    "cvae_rounds": 2,
    "cvae_local_epochs": 5,
    "downstream": {"rounds": 2, "local_epochs": 5},
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    return run_federation(
        tmp_path_factory.mktemp("fed-cvae-federated"), n_sites=2, quorum=2, federation_overrides=FEDERATION
    )


def test_kits_switch_the_sites_to_the_federated_cvae(federation):
    from common.config import load_site_config

    _, sites, _ = federation
    for site in sites:
        synth = load_site_config(site / "site.yaml").synth
        assert synth.route == "cvae" and synth.cvae.federated


def test_cvae_run_completed_with_both_sites_in_every_round(federation):
    coord, sites, results = federation
    cvae = results["cvae_federated"]
    assert cvae["completed"] and cvae["rounds_completed"] == FEDERATION["cvae_rounds"] and not cvae["degraded"], cvae
    full = json.loads((coord / "runs" / cvae["results"]).read_text())
    names = sorted(s.name for s in sites)
    for rnd in range(1, FEDERATION["cvae_rounds"] + 1):
        for phase in ("train", "evaluate"):
            per_site = full["per_site"][str(rnd)][phase]
            assert sorted(per_site) == names, (rnd, phase, per_site)
            assert all("error" not in m for m in per_site.values()), per_site
        assert all(m["train-loss"] > 0 for m in full["per_site"][str(rnd)]["train"].values())
    # after the final round every site answered query.release: it synthesized, audited and published
    released = {s: m.get("released", m.get("error")) for s, m in full["release"].items()}
    assert released == {name: 1.0 for name in names}, released
    assert cvae["release"] == full["release"]  # the coordinator's results carry it too


def test_sites_sample_from_the_same_global_decoder_and_publish_what_passes(federation):
    coord, sites, results = federation
    from server.store import BundleStore

    shas, passed = set(), []
    for site in sites:
        run = json.loads((site / "synth" / "latest.json").read_text())["run_id"]
        synth = json.loads((site / "synth" / run / "synth.json").read_text())
        assert synth["decoder"]["source"] == "federation"
        shas.add(synth["decoder"]["global_decoder_sha256"])
        audit = json.loads((site / "synth" / run / "audit.json").read_text())
        assert audit["route"] == "cvae"
        if audit["passed"]:
            passed.append(site.name)
    assert shas == {results["cvae_federated"]["global_decoder_sha256"]}
    assert passed == sorted(s.name for s in sites)  # both sets pass their gates
    assert sorted(b.site for b in BundleStore(coord / "store").list()) == passed
    assert results["pool"] == passed


def test_downstream_run_on_the_pool_beats_chance_at_every_site(federation):
    _, sites, results = federation
    assert results["completed"] and results["rounds_completed"] == FEDERATION["downstream"]["rounds"]
    for s in summarize(sites, results, seconds=0)["sites"]:
        assert s["test_accuracy_federated"] > 0.6, s
