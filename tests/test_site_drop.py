"""A site that drops out mid-run: the run completes with the others and the report names it.

Three default-config sites on loopback (real processes, TLS, node authentication); site-c is
stopped (its SuperNode with it) once round 1 has trained. Rounds need two sites
(`min_round_nodes`: the quorum). Slow (about five minutes on 2 cores); run by `make test` and CI.
"""

from __future__ import annotations

import pytest

from tests.helpers_federation import run_federation

pytestmark = pytest.mark.slow

ROUNDS = 3


def test_a_site_that_drops_out_is_named_and_the_run_completes(tmp_path):
    coord, sites, results = run_federation(
        tmp_path,
        n_sites=3,
        quorum=2,
        drop=("site-c", 1),
        federation_overrides={"downstream": {"rounds": ROUNDS, "baselines": False}},
    )

    assert results["completed"] and results["rounds_completed"] == ROUNDS, results
    assert results["degraded"] is True
    assert set(results["missed"]) == {"site-c"}, results["missed"]
    missed_rounds = {m["round"] for m in results["missed"]["site-c"]}
    assert set(range(2, ROUNDS + 1)) <= missed_rounds <= set(range(1, ROUNDS + 1))
    assert all(e["site"] == "site-c" for e in results["errors"]), results["errors"]
    for rnd in range(2, ROUNDS + 1):
        for phase in ("train", "evaluate"):
            replied = sorted(s for s, m in results["per_site"][str(rnd)][phase].items() if "error" not in m)
            assert replied == ["site-a", "site-b"], (rnd, phase, results["per_site"][str(rnd)][phase])
    # the two remaining sites still get a trained model: it ranks their own test images better
    # than chance (accuracy on ~24 phantom test images is too coarse to carry a threshold)
    for site in ("site-a", "site-b"):
        assert results["per_site_final"][site]["auroc"] > 0.5, results["per_site_final"]
