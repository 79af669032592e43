"""bench/audit_scale.py: the shape and sanity of its result, not its timings."""

import json

import pytest

from bench import audit_scale


@pytest.mark.slow  # two audits in their own processes: about 40 s on 2 CPU cores
def test_quick_run_writes_sane_figures(tmp_path):
    out = tmp_path / "audit_scale.json"
    audit_scale.main(["--quick", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res) >= {"runs", "growth", "command", "machine", "load_average_at_end", "settings"}
    assert [(r["n"], r["image_size"]) for r in res["runs"]] == [(60, 32), (120, 32)]
    for r in res["runs"]:
        assert "error" not in r and "timed_out_after" not in r and "skipped" not in r, r
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["rss_before_audit_mb"] > 0
        assert 0 < r["seconds_copy_detector"] <= r["seconds"]
        assert sum(v for k, v in r["seconds_parts"].items() if k != "other") <= r["seconds"] + 0.01
        assert r["accepted_mask_length"] == r["n_candidates"] == r["n"] and 0 <= r["n_accepted"] <= r["n"]
        assert (r["n_train"], r["n_holdout"]) == (r["n"], r["n"] // 2) and r["lpips"] and r["torch_threads"] == 1
    (step,) = res["growth"]["32"]
    assert (step["from"], step["to"]) == (60, 120) and step["exponent"] > 0


def test_a_run_past_the_limit_is_recorded_and_larger_ones_skipped(tmp_path):
    out = tmp_path / "audit_scale.json"
    res = audit_scale.main(["--quick", "--max-seconds", "0.5", "--out", str(out)])
    first, second = res["runs"]
    assert first["seconds"] is None and first["timed_out_after"] == 0.5
    assert second["seconds"] is None and "did not finish" in second["skipped"]
    assert res["growth"] == {} and json.loads(out.read_text())["runs"] == res["runs"]


def test_projection_from_the_growth_so_far():
    assert audit_scale.projected([], 1000) is None
    assert audit_scale.projected([(100, 2.0)], 200) == pytest.approx(8.0)  # n^2 from one point
    assert audit_scale.projected([(100, 2.0), (200, 4.0)], 800) == pytest.approx(16.0)  # n^1 measured


def test_a_run_replaces_its_own_size_and_keeps_the_others():
    earlier = [{"n": 1000, "image_size": 32, "seconds": 9.0}, {"n": 2000, "image_size": 32, "seconds": 30.0}]
    new = [{"n": 1000, "image_size": 32, "seconds": 7.0}, {"n": 1000, "image_size": 64, "seconds": 20.0}]
    merged = audit_scale.merge_runs(earlier, new)
    assert [(r["n"], r["image_size"], r["seconds"]) for r in merged] == [
        (1000, 32, 7.0),
        (2000, 32, 30.0),
        (1000, 64, 20.0),
    ]
