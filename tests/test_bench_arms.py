"""bench.arms's rule and its arm syntax (the end-to-end run is in tests/test_evaluation.py)."""

import pytest

from bench import arms


def table(*panels: dict) -> dict:
    """A bench.evaluation table with one data set whose panels' PLAN rows are `panels`."""
    return {"ds": {f"part{i}": {"plan": p, "linear": {}} for i, p in enumerate(panels)}, "_meta": {"partial": False}}


def plan_row(acc=0.80, bal=0.75, passed=(True, False, False), mia=0.64, reid=0.05) -> dict:
    return {
        "accuracy": {"mean": acc, "sd": 0.01},
        "balanced_accuracy": {"mean": bal, "sd": 0.01},
        "passed": list(passed),
        "mia_auc_upper": mia,
        "reid_rate": reid,
    }


def test_overrides_nest_dotted_keys_and_read_values_as_yaml():
    got = arms.overrides(["synth.k=3", "synth.walk.class_shift=0.0625", "models.gan.sampling=uniform"])
    assert got == {"synth": {"k": 3, "walk": {"class_shift": 0.0625}}, "models": {"gan": {"sampling": "uniform"}}}
    assert arms.overrides([]) == {}
    for bad in ("synth.k", "=3", "synth..k=3"):
        with pytest.raises(SystemExit, match="KEY=VALUE"):
            arms.overrides([bad])


def test_figures_average_the_plan_row_over_panels_and_count_a_skipped_panel_as_nothing_learnt():
    f = arms.figures(table(plan_row(acc=0.9, passed=(True, True, False)), {"skipped": "nothing passed the audit"}))
    assert f["accuracy"] == pytest.approx(0.45) and f["sites_passed"] == 2
    assert f["mia_auc_upper"] == pytest.approx(0.64)  # the privacy means are over the panels that ran
    assert arms.figures(table({"skipped": "x"}))["mia_auc_upper"] is None


def test_an_arm_is_chosen_only_when_it_clears_every_part_of_the_rule():
    base = table(plan_row(), plan_row(acc=0.70))
    better = table(plan_row(acc=0.84), plan_row(acc=0.70))  # +0.02 mean accuracy, the rest level
    cases = {
        "better": better,
        "too_little": table(plan_row(acc=0.81), plan_row(acc=0.70)),  # +0.005
        "less_balanced": table(plan_row(acc=0.85, bal=0.74), plan_row(acc=0.70)),
        "fewer_passed": table(plan_row(acc=0.85, passed=(False,) * 3), plan_row(acc=0.70)),
        "leakier_mia": table(plan_row(acc=0.85, mia=0.67), plan_row(acc=0.70, mia=0.67)),
        "leakier_reid": table(plan_row(acc=0.85, reid=0.07), plan_row(acc=0.70, reid=0.07)),
        "nothing_ran": table({"skipped": "x"}, {"skipped": "x"}),
    }
    got = arms.choose({"base": base, **cases})
    assert got["beats_baseline"] == {name: name == "better" for name in cases}
    assert got["chosen"] == "better"
    assert arms.choose({"base": base, "too_little": cases["too_little"]})["chosen"] == "base"
    # of two winners the more accurate is chosen
    best = table(plan_row(acc=0.88), plan_row(acc=0.70))
    assert arms.choose({"base": base, "better": better, "best": best})["chosen"] == "best"


def test_the_command_line_needs_a_baseline_and_an_arm_with_distinct_names(tmp_path):
    with pytest.raises(SystemExit, match="at least one arm"):
        arms.main(["--work", str(tmp_path), "--arm", "base"])
    with pytest.raises(SystemExit, match="names must differ"):
        arms.main(["--work", str(tmp_path), "--arm", "a", "--arm", "a", "synth.k=3"])
