"""The node's ML stages end to end on a tiny phantom workspace."""

import json

import numpy as np

from node.plan.train import load_models
from node.stages import STAGES, run_pipeline


def test_tiny_pipeline_writes_outputs_and_skips_on_rerun(tiny_workspace):
    ws = tiny_workspace
    ran = run_pipeline(ws)
    assert ran == {s: True for s in STAGES}

    with np.load(ws.data / "dataset.npz", allow_pickle=False) as z:
        assert z["images"].shape == (48, 16, 16) and z["patient_ids"].dtype.kind == "U"
    splits = json.loads((ws.data / "splits.json").read_text())
    assert splits["n_classes"] == 2 and set(splits) >= {"seed", "train", "holdout", "test"}
    for name in ("G_ema", "G", "D", "phi_id", "phi_class", "phi_attack", "phi_attack_wide"):
        side = json.loads((ws.models / f"{name}.json").read_text())
        assert (ws.models / f"{name}.safetensors").exists() and side["config_sha256"] and "metrics" in side
    assert json.loads((ws.models / "G_ema.json").read_text())["steps"] == 6

    run = ws.synth / ws.latest_run()
    with np.load(run / "candidates.npz", allow_pickle=False) as z:
        assert z["images"].dtype == np.uint8 and len(z["images"]) >= 24
        assert len(z["labels"]) == len(z["images"]) == len(z["path"])
        n_candidates = len(z["images"])
    synth = json.loads((run / "synth.json").read_text())
    assert synth["counts"]["n_candidates"] == n_candidates and synth["inversion"]["mean_mse"] > 0
    report = json.loads((run / "audit.json").read_text())
    assert report["n_candidates"] == synth["counts"]["n_candidates"]
    # the verdict is the checks' verdict, and a set that passed holds at least min_accepted images
    assert report["passed"] is all(c["passed"] for c in report["checks"]) and report["checks"]
    assert not report["passed"] or report["n_accepted"] >= report["policy"]["min_accepted"]
    with np.load(run / "accepted.npz", allow_pickle=False) as z:
        assert len(z["images"]) == report["n_accepted"]
    assert json.loads((ws.reports / "local_only.json").read_text())["n_test"] > 0

    G, phi_id, phi_class = load_models(ws)
    assert G.synthesis(G.w_avg[None]).shape == (1, 1, 16, 16)

    lines = len(ws.ledger.read_text().splitlines())
    assert run_pipeline(ws) == {s: False for s in STAGES}
    assert len(ws.ledger.read_text().splitlines()) == lines

    # a policy edit reruns the chain through the ledger, but the models are not retrained
    weights = (ws.models / "G_ema.safetensors").read_bytes()
    ws.config_path.write_text(
        ws.config_path.read_text().replace("policy: {min_accepted: 1}", "policy: {min_accepted: 2}")
    )
    assert run_pipeline(ws, upto="audit")["audit"] is True
    assert (ws.models / "G_ema.safetensors").read_bytes() == weights
    assert json.loads((run / "audit.json").read_text())["policy"]["min_accepted"] == 2
