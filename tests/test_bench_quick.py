"""The quick variants of the speed benchmarks, run for correctness only (no timing is asserted):
each writes its result file, and what it compares agrees where it must."""

import json

import pytest

from bench import lpips_nn, walk_speed

TINY_SITE = """\
data: {image_size: 16, phantom: {n_patients: 40}}
models:
  gan: {z_dim: 16, w_dim: 16, channels: 32, steps: 6, batch_size: 8, checkpoint_every: 3}
  classifier: {width: 4, attacker_width: 4, epochs: 2, id_epochs: 2}
synth: {k: 2, invert_steps: 5}
"""


def test_lpips_benchmark_is_exact_and_reports_both_baselines_and_the_limit(tmp_path):
    out = tmp_path / "lpips_nn.json"
    res = lpips_nn.main(
        ["--n-query", "12", "--n-ref", "20", "--pairs", "6", "--batched-pairs", "16", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == res
    assert res["max_abs_err"] < 1e-4  # the matrix form is the package's LPIPS
    assert set(res["seconds_per_pair_batched"]) == {str(b) for b in lpips_nn.BATCHES}
    assert res["seconds_per_pair_batched"][str(res["best_batch"])] == min(res["seconds_per_pair_batched"].values())
    assert res["seconds_features_alone"] > 0 and res["ratio_to_limit"] > 0
    assert res["speedup_vs_batched"] > 0
    assert res["screened_agrees_with_float32"]  # the bfloat16 screen changes no neighbour


@pytest.mark.slow
def test_walk_benchmark_runs_both_methods_on_a_trained_site(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SITE)
    out = tmp_path / "walk_speed.json"
    args = ["--paths", "3", "--points", "6", "--iters", "4", "--threads", "1"]
    args += ["--site-yaml", str(tmp_path / "tiny.yaml")]
    res = walk_speed.main([*args, "--work", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["paths"] == 3 and res["iters"] == 4
    assert res["seconds_reference"] > 0 and res["seconds_batched"] > 0
    # 6 points: the 4 interior images are one chunk of the authors' 4, so (unclamped) both walks optimise the
    # same objective from the same start and must end at the same loss
    ref, node = res["final_loss_reference_node_objective"], res["final_loss_batched_own_objective"]
    assert abs(ref - node) <= 0.02 * abs(node)
    assert res["final_loss_reference_own_objective"] > 0


def test_pool_real_rule_takes_the_best_weakest_site_and_the_smallest_share_within_the_tie():
    from bench.pool_real import choose

    # {panel: {share: [[accuracy per site] per seed]}}: the rule looks only at each run's weakest site
    panels = {
        "a": {"0.0": [[0.9, 0.70, 0.9]], "0.5": [[0.6, 0.80, 0.9]], "0.75": [[0.9, 0.803, 0.9]]},
        "b": {"0.0": [[0.50, 0.9, 0.9]], "0.5": [[0.60, 0.9, 0.9]], "0.75": [[0.60, 0.9, 0.9]]},
    }
    verdict = choose(panels, [0.0, 0.5, 0.75])
    assert verdict["weakest_site_accuracy"] == pytest.approx({0.0: 0.6, 0.5: 0.6, 0.75: 0.7015})
    assert verdict["real_share"] == 0.75
    panels["a"]["0.5"] = [[0.9, 0.80, 0.9]]  # now 0.5 is within 0.005 of 0.75's figure: the fewer repeats win
    assert choose(panels, [0.0, 0.5, 0.75])["real_share"] == 0.5


def test_pool_real_runs_extend_the_grid_and_the_rule_sees_every_share_measured_in_every_panel():
    from bench.pool_real import merge_panels, shares_in

    earlier = {"a": {"real": [[0.8]], "0.0": [[0.7]], "0.5": [[0.75]]}, "b": {"real": [[0.6]], "0.0": [[0.5]]}}
    new = {"a": {"real": [[0.8]], "0.5": [[0.76]], "0.75": [[0.78]]}}
    merged = merge_panels(earlier, new)
    assert merged == {"a": {"real": [[0.8]], "0.0": [[0.7]], "0.5": [[0.76]], "0.75": [[0.78]]}}  # b not run now
    assert shares_in(merged) == [0.0, 0.5, 0.75]
    assert shares_in({**merged, "c": {"real": [[0.5]], "0.5": [[0.6]]}}) == [0.5]


def test_evaluation_rows_rerun_replace_their_rows_and_keep_the_rest():
    from bench.evaluation import merge_tables

    earlier = {
        "d": {"iid": {"a": 1, "b": 2, "setup": {"rows": ["a", "b"]}}, "dir": {"a": 5, "setup": {}}},
        "_meta": {"command": "first"},
    }
    new = {"d": {"iid": {"b": 3, "setup": {"rows": ["b"]}}}, "_meta": {"command": "second"}}
    merged = merge_tables(earlier, new)
    assert merged["d"]["iid"] == {"a": 1, "b": 3, "setup": {"rows": ["b"], "earlier": {"rows": ["a", "b"]}}}
    assert merged["d"]["dir"] == earlier["d"]["dir"]
    assert merged["_meta"] == {"command": "second", "earlier": {"command": "first"}}
    assert earlier["d"]["iid"]["b"] == 2  # the earlier table is not modified
    assert merge_tables({}, new)["d"]["iid"] == new["d"]["iid"]


def test_ksame_rule_keeps_the_k_that_publish_on_most_sites_and_prefers_the_larger_k_within_the_tie():
    from bench.ksame import choose

    def row(bal, passed=True, kept=0.9):
        return {"utility": {"balanced-accuracy": {"mean": bal}}, "privacy": {"passed": passed, "kept_share": kept}}

    res = {
        "a": {"plan_k3": row(0.90), "plan_k5": row(0.80), "plan_k8": row(0.95, kept=0.7)},
        "b": {"plan_k3": row(0.70), "plan_k5": row(0.795), "plan_k8": row(0.90)},
    }
    verdict = choose(res, ["a", "b"], [3, 5, 8])
    assert verdict["eligible"] == pytest.approx({"3": 0.80, "5": 0.7975})  # k 8 kept too little on "a"
    assert verdict["publishing"] == {"3": 2, "5": 2, "8": 1}
    assert verdict["k"] == 5  # within 0.01 of k 3's 0.80: the larger k
    res["b"]["plan_k3"] = row(0.75)
    assert choose(res, ["a", "b"], [3, 5, 8])["k"] == 3
    # where no k publishes everywhere, those publishing on the most sites compete (small sites)
    res["a"]["plan_k3"]["privacy"]["passed"] = False
    verdict = choose(res, ["a", "b"], [3, 5, 8])
    assert verdict["eligible"] == pytest.approx({"5": 0.7975}) and verdict["k"] == 5
    res["a"]["plan_k5"]["privacy"]["passed"] = False
    assert choose(res, ["a", "b"], [3, 5, 8])["k"] == 8  # 1 site each: the best of the three, 0.925
    for k in (3, 5, 8):
        res["b"][f"plan_k{k}"]["privacy"]["passed"] = False
    assert choose(res, ["a", "b"], [3, 5, 8])["k"] is None  # nothing publishes: no evidence for any k
