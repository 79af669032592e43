"""The node's ML stages end to end on a tiny phantom workspace."""

import io
import json

import numpy as np
from rich.console import Console

from node.plan.train import load_models
from node.site.status import control_message, print_audit
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
    assert ("control" in report) is not report["passed"]  # real unseen images are audited only on a failure
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

    # a gate nothing can pass: the control (real test images through the same audit) fails too, and says so
    ws.config_path.write_text(
        ws.config_path.read_text().replace("policy: {min_accepted: 2}", "policy: {min_accepted: 2, max_mia_auc: 0.0}")
    )
    run_pipeline(ws, upto="audit")
    report = json.loads((run / "audit.json").read_text())
    control = report["control"]
    assert not report["passed"] and not control["passed"] and "mia_auc_upper" in control["failed"]
    n_test = len(json.loads((ws.data / "splits.json").read_text())["test"])
    assert control["n"] == min(n_test, n_candidates) and 0 <= control["kept_share"] <= 1
    assert "fail the same gate too (mia_auc_upper" in control_message(report)
    assert "the synthetic set is what failed" in control_message({"control": {**control, "passed": True}})
    assert control_message({"passed": True}) is None
    out = Console(file=io.StringIO(), width=400)
    assert print_audit(ws, out) is False  # what `plan-node audit` prints before it exits with the gate's code
    shown = out.file.getvalue()
    assert "gate: " in shown and "real unseen records fail the same gate too" in shown
    page = (ws.reports / f"audit-{ws.latest_run()}.html").read_text()
    assert "<p class=warn>control: " in page  # the data-protection officer's report says it too
