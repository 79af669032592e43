"""Settings of the site's config judged on the validation table, by one rule fixed in advance (issue 14).

Each arm is a name and dotted overrides of the site's config (`synth.k=3`,
`synth.walk.class_shift=0.0625`; values read as YAML). Every arm runs bench.evaluation's validation
table (`--score-on holdout --rows central_real linear plan anchors`: three sites per panel, iid
and Dirichlet(0.5), every site's published sets pooled and federated, each site scored on its own
holdout split, 3 downstream seeds; centralised real data as the yardstick on the same split), never
the test split. The first arm is the baseline and runs on the sites in --work as they stand
(bench.evaluation's own run leaves the defaults' sites there); every other arm runs on a copy
`<work>-<arm>` with its overrides merged into every site's config.
A copy keeps the trained models, and the node's stages redo only what the overrides invalidate:
an arm on the walk retrains nothing, one on the GAN retrains the GAN.

Why this shape: twice (session 16's k, session 18's class balance) gains measured per site, one
site's set on its own holdout, did not carry to the table, which federates three sites' pooled sets.

The rule, the same for every experiment (name the arms in BENCHMARKS.md and commit before the
run): an arm beats the baseline when, over the panels, the PLAN row's mean accuracy is at least
0.01 above the baseline's, its mean balanced accuracy is not below the baseline's, its sets pass
the gate at at least as many sites, and neither its mean MIA AUC upper bound nor its mean
re-identification upper bound is more than 0.01 above the baseline's. Of the arms that beat the
baseline the most accurate is chosen; when none does, the baseline stays.

    python -m bench.arms --work bench/work/s19 --arm k8 --arm k3 synth.k=3
    python -m bench.arms --work w --arm base --arm wide models.gan.w_dim=128 --npz my.npz --quick

Arguments it does not know go to bench.evaluation (--datasets, --npz, --quick, --seeds, --threads ...).
Writes <out stem>_<arm>.json (each arm's table) and <out> ({"_chosen", "_meta"}).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import yaml

from bench import evaluation
from bench._site import ROOT, WORK, run_meta
from common.config.base import deep_merge
from common.fileio import atomic_write_json, atomic_write_text

ROW = "plan"  # the row the rule reads: the PLAN route's published sets
ROWS = ("central_real", *evaluation.SYNTHETIC)  # what each arm's table holds: the yardstick and the sets


def overrides(pairs: list[str]) -> dict:
    """{"synth": {"k": 3}} from ["synth.k=3"]: dotted keys, values read as YAML."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise SystemExit(f"--arm: {pair!r} is not KEY=VALUE with a dotted KEY (e.g. synth.k=3)")
        nested: object = yaml.safe_load(value)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        out = deep_merge(out, nested)
    return out


def figures(table: dict) -> dict:
    """The rule's figures of one arm's bench.evaluation table, over its panels: the PLAN row's mean
    accuracy and balanced accuracy (a panel where no site's filter kept an image, so the row was
    skipped, counts 0), the sites whose PLAN set passed the gate (a count), and the mean MIA AUC
    upper bound and re-identification rate of the panels that ran (None when none did)."""
    rows = [panel[ROW] for name, d in table.items() if not name.startswith("_") for panel in d.values()]
    ran = [r for r in rows if "skipped" not in r]

    def mean_all(key: str) -> float:
        return float(np.mean([0.0 if "skipped" in r else r[key]["mean"] for r in rows]))

    def mean_ran(key: str) -> float | None:
        return float(np.mean([r[key] for r in ran])) if ran else None

    return {
        "accuracy": mean_all("accuracy"),
        "balanced_accuracy": mean_all("balanced_accuracy"),
        "sites_passed": int(sum(sum(r["passed"]) for r in ran)),
        "mia_auc_upper": mean_ran("mia_auc_upper"),
        "reid_rate": mean_ran("reid_rate"),
    }


def beats(new: dict, base: dict) -> bool:
    """The module docstring's rule: does the arm with figures `new` beat the baseline's `base`? An
    arm none of whose panels ran beats nothing; any arm that runs beats a baseline none of whose did."""
    if new["mia_auc_upper"] is None:
        return False
    if base["mia_auc_upper"] is None:
        return True
    return (
        new["accuracy"] >= base["accuracy"] + 0.01
        and new["balanced_accuracy"] >= base["balanced_accuracy"]
        and new["sites_passed"] >= base["sites_passed"]
        and new["mia_auc_upper"] <= base["mia_auc_upper"] + 0.01
        and new["reid_rate"] <= base["reid_rate"] + 0.01
    )


def choose(tables: dict[str, dict]) -> dict:
    """{"figures": {arm: figures}, "beats_baseline": {arm: bool}, "chosen": arm} over {arm: table},
    the first arm the baseline."""
    figs = {arm: figures(t) for arm, t in tables.items()}
    base, *others = figs
    wins = {arm: beats(figs[arm], figs[base]) for arm in others}
    winners = [arm for arm in others if wins[arm]]
    chosen = max(winners, key=lambda arm: figs[arm]["accuracy"]) if winners else base
    return {"figures": figs, "beats_baseline": wins, "chosen": chosen}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--arm",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "KEY=VALUE"),
        help="an arm: its name, then its overrides; the first --arm is the baseline (its overrides, if any, "
        "are merged into --work's sites)",
    )
    ap.add_argument("--work", type=Path, default=WORK, help="the baseline's sites (bench.evaluation's --work)")
    ap.add_argument("--site-yaml", type=Path, help="YAML merged into every arm's sites before the arm's overrides")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "arms.json")
    args, passed_on = ap.parse_known_args(argv)
    if len(args.arm) < 2:
        raise SystemExit("--arm: give the baseline and at least one arm to judge against it")
    names = [name for name, *_ in args.arm]
    if len(set(names)) != len(names):
        raise SystemExit(f"--arm: names must differ, got {names}")
    common = yaml.safe_load(args.site_yaml.read_text()) if args.site_yaml else {}
    work = args.work.resolve()
    tables = {}
    for i, (name, *pairs) in enumerate(args.arm):
        folder = work if i == 0 else work.parent / f"{work.name}-{name}"
        if i and not folder.exists() and work.exists():
            shutil.copytree(work, folder)  # trained models reused: the stages redo what the overrides invalidate
        folder.mkdir(parents=True, exist_ok=True)
        site_yaml = folder / f"arm-{name}.yaml"
        atomic_write_text(site_yaml, yaml.safe_dump(deep_merge(common, overrides(pairs))))
        table_out = args.out.with_name(f"{args.out.stem}_{name}.json")
        tables[name] = evaluation.main(
            [
                *["--score-on", "holdout", "--rows", *ROWS],
                *passed_on,
                *["--work", str(folder), "--site-yaml", str(site_yaml), "--out", str(table_out)],
            ]
        )
    res = {"_chosen": choose(tables), "_meta": run_meta("bench.arms", argv)}
    atomic_write_json(args.out, res)
    print(f"chosen: {res['_chosen']['chosen']}  {res['_chosen']}")
    return res


if __name__ == "__main__":
    main()
