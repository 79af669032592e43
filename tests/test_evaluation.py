"""bench/evaluation.py's quick variant end to end on a three-class data set: three node sites on a
label-skewed split, every synthetic set through the sites' audits, every federated row through
all its rounds, and the table's numbers where they belong. Small models (the tiny site config)
and few downstream steps: the point is that a multi-class data set goes all the way through."""

import json

import numpy as np
import pytest

from bench import arms, evaluation
from node.site.ingest import load_split
from node.site.phantom import make_phantom
from node.site.workspace import Workspace

pytestmark = pytest.mark.slow

# The GAN trains 6 steps, so which images survive the audit's per-sample filters is chance: with the
# class-balanced defaults (models.gan.sampling, classifier.class_weighting) none did on this phantom,
# and the federated rows had nothing to train on. The test is about the federation's rounds on three
# classes, not the gate, so it keeps the sampling its sets were accepted with.
SMALL_SITE = """\
device: cpu
data: {image_size: 16}
models:
  gan: {z_dim: 16, w_dim: 16, channels: 32, steps: 6, batch_size: 8, checkpoint_every: 3, sampling: uniform}
  classifier: {width: 4, attacker_width: 4, epochs: 2, id_epochs: 2, class_weighting: none}
synth: {k: 2, target_size: 24, invert_steps: 5, walk: {points: 5, iters: 3}}
policy: {min_accepted: 1}
"""


def test_the_quick_evaluation_runs_every_round_on_a_three_class_data_set(tmp_path):
    images, labels, patients = make_phantom(n_patients=150, images_per_patient=2, n_classes=3, size=16, seed=3)
    np.savez(tmp_path / "three.npz", images=images, labels=labels, patient_ids=patients)
    (tmp_path / "site.yaml").write_text(SMALL_SITE)
    out = tmp_path / "evaluation.json"
    args = ["--npz", str(tmp_path / "three.npz"), "--site-yaml", str(tmp_path / "site.yaml"), "--quick"]
    args += ["--rounds", "2", "--min-local-steps", "10", "--judge-steps", "20", "--work", str(tmp_path / "work")]
    evaluation.main([*args, "--out", str(out)])

    res = json.loads(out.read_text())["three"]
    assert list(res) == ["dirichlet0.5"]  # --quick: label skew only
    table = res["dirichlet0.5"]
    setup = table["setup"]
    assert len(setup["site_sizes"]) == 3 and sum(setup["site_sizes"]) == 300
    counts = np.array(setup["site_class_counts"])
    assert counts.shape == (3, 3) and (counts.sum(0) == 100).all()
    assert counts.max(0).min() > counts.sum(0).max() / 3, "Dirichlet(0.5) should skew every class"
    for row in evaluation.ROWS:
        v = table[row]
        assert "skipped" not in v, (row, v)
        assert 0 <= v["accuracy"]["mean"] <= 1 and len(v["per_site_accuracy"]) == 3
        federated = row not in ("real_local", "central_real")
        assert v["rounds_completed"] == ([2] if federated else [0]), (row, v["rounds_completed"])
    for row in ("linear", "plan", "anchors", "cvae"):
        assert table[row]["distinct_images"] >= 1 and len(table[row]["passed"]) == 3
    # the site alone learns its own skewed classes: far above chance (1/3) at its own test split
    assert table["real_local"]["accuracy"]["mean"] > 0.5
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rerunning one row merges it into the table: the same figures (deterministic), every other row kept
    evaluation.main([*args, "--out", str(out), "--rows", "plan_pool_real"])
    again = json.loads(out.read_text())
    table2 = again["three"]["dirichlet0.5"]
    assert {k: v for k, v in table2.items() if k != "setup"} == {k: v for k, v in table.items() if k != "setup"}
    assert table2["setup"]["rows"] == ["plan_pool_real"] and table2["setup"]["earlier"] == setup
    assert "cvae_sites" not in table2["setup"]["seconds"]  # the CVAE sites are not needed for that row
    assert again["_meta"]["earlier"]["command"].endswith(" ".join([*args, "--out", str(out)]))

    # the validation table: the same rows, scored on each site's holdout split, in a file of its own
    val_out = tmp_path / "evaluation_validation.json"
    evaluation.main([*args, "--out", str(val_out), "--rows", "real_local", "fedavg_real", "--score-on", "holdout"])
    val = json.loads(val_out.read_text())["three"]["dirichlet0.5"]
    assert val["setup"]["scored_on"] == "holdout" and table["setup"]["scored_on"] == "test"
    sites = [Workspace(tmp_path / "work" / "eval-three-dirichlet0.5-600" / f"site{k}") for k in range(3)]
    assert val["setup"]["n_scored"] == [len(load_split(ws, "holdout")) for ws in sites]
    assert table["setup"]["n_scored"] == setup["n_test"] == [len(load_split(ws, "test")) for ws in sites]
    assert set(val) == {"real_local", "fedavg_real", "setup"} and val["fedavg_real"]["rounds_completed"] == [2]

    # bench.arms on the same sites: the baseline scores them as they stand, the arm a copy whose walk
    # differs; the copy keeps the trained models and only the arm's site config carries its override
    arms_out = tmp_path / "arms.json"
    arm_args = ["--npz", str(tmp_path / "three.npz"), "--quick", "--rounds", "2", "--min-local-steps", "10"]
    arm_args += ["--judge-steps", "20", "--site-yaml", str(tmp_path / "site.yaml"), "--work", str(tmp_path / "work")]
    g_before = (sites[0].models / "G_ema.safetensors").read_bytes()
    arm_args += ["--arm", "base", "--arm", "shift", "synth.walk.class_shift=0.25", "--out", str(arms_out)]
    chosen = arms.main(arm_args)
    assert chosen["_chosen"]["chosen"] in ("base", "shift") and set(chosen["_chosen"]["beats_baseline"]) == {"shift"}
    copy = Workspace(tmp_path / "work-shift" / "eval-three-dirichlet0.5-600" / "site0")
    assert copy.config().synth.walk.class_shift == 0.25 and sites[0].config().synth.walk.class_shift == 0
    assert (copy.models / "G_ema.safetensors").read_bytes() == g_before  # the walk changed, not the GAN
    for arm in ("base", "shift"):
        t = json.loads((tmp_path / f"arms_{arm}.json").read_text())["three"]["dirichlet0.5"]
        assert t["setup"]["scored_on"] == "holdout" and set(t) == {*arms.ROWS, "setup"}
        assert chosen["_chosen"]["figures"][arm]["accuracy"] == pytest.approx(t["plan"]["accuracy"]["mean"])
