"""The paper's table for any data set (issue 14, item 5): what each kind of shared data teaches a
federation of three sites, and what it gives away.

Per data set (the MedMNIST files in ../shared/data, or any .npz given with --npz: MedMNIST
train_/val_/test_ arrays or plain images/labels[/patient_ids]) and per partition (iid, or label
skew with class shares per site drawn from Dirichlet(0.5)):
- three sites, each a default-config node workspace on its part (bench/work/eval-.../site<k>,
  reused when its data and config are unchanged): ingest (its own 50/25/25 patient split), train
  (G, phi_id, phi_class, the two attackers), synthesize (PLAN candidates);
- per site three synthetic sets: the PLAN candidates, the straight lines between the same
  number of k-same anchor pairs, and the anchors alone, each through the site's full audit
  (node.audit.images.audit_images with its own networks and default policy): the images its per-sample
  filter accepts are what the federation trains on, whether or not the set passed the gate (a
  site whose set fails publishes nothing: `passed` per site and `published_images` say so, and
  with every set refused a row would have nothing to measure);
- the downstream rows, each trained for --rounds rounds of FedAvg (each site its own seed and order, as
  node.federation.task.site_round_seed gives the ClientApp; local epochs sized by node.federation.task.epochs_for; the
  mean of the sites' weights by record count, as Flower's FedAvg takes it) and evaluated at every
  site on its own real test split:
    real_local      each site alone on its real train split, for as many epochs as all rounds
    fedavg_real     FedAvg on the sites' real train splits (classic federated learning)
    fedprox_real    the same with FedProx's proximal term (downstream.proximal_mu) in each site's training
    central_real    one model on the union of the real train splits (the yardstick), for as many
                    optimiser steps as the whole federation takes (bench.fedsim.central)
    linear, plan, anchors   FedAvg, every site on the pool of all sites' published sets of that kind
    plan_pool_real  FedAvg, every site on the PLAN pool plus its own real train split, repeated to
                    downstream.real_share of the records (node.federation.task.with_real_share)
    plan_pool_real_fedprox   the same with FedProx (the pool makes the sites' data differ least)
    cvae_real       the CVAE route's yardstick: FedAvg of the embedding head on the sites' real
                    train embeddings (the federation's pinned extractor, default "tiny")
    cvae            FedAvg, every site on the pool of all sites' audited CVAE samples; both CVAE
                    rows are tested on the same test splits, as embeddings
- columns: accuracy, balanced accuracy, macro one-vs-rest AUROC (the mean over sites; mean and
  sd over --seeds downstream seeds), the synthetic sets' audit figures (the worst attack's MIA
  AUC upper bound, the attacker's re-identification rate upper bound; mean over sites), FD,
  precision and recall in the features of a judge network trained on each site's real train
  split (bench.generator; mean over sites), mmL (the audit's, where LPIPS weights are in the
  model store), and the distinct images published.

The CVAE route's sites are CVAE-route workspaces beside the PLAN ones, on the same records and
the same patient split, trained, synthesized and audited by the node's stages (site<k>-cvae).
The generative models are trained once per site and partition; the seeds vary the downstream
training only. Writes
bench/results/evaluation.json ({DATASET: {PARTITION: {ROW: {...}}}}) and evaluation.png.

    python -m bench.evaluation --threads 2
    python -m bench.evaluation --quick          # one data set, label skew only, 1 seed: < 15 min
    python -m bench.evaluation --npz my.npz --site-yaml tiny.yaml --partitions iid --seeds 1
    python -m bench.evaluation --rows plan_pool_real   # rerun rows, merged into the table
    python -m bench.evaluation --score-on holdout --site-yaml change.yaml --work bench/work/change

--score-on holdout scores every row on each site's holdout split instead of its test split (and
writes evaluation_validation.json): the table's own shape, federation and pooled sets included, on
the split the node's audit and the validation benches already use, so that a default can be chosen
on a measure shaped like the table without looking at its test figures.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from bench._site import ROOT, SHARED_DATA, WORK, run_meta, site, site_audit, walk_both
from bench.fedsim import alone, central, fedavg, partition
from bench.generator import K, features, judge, precision_recall
from common.config import DataConfig, DownstreamConfig, SiteConfig, deep_merge
from common.fileio import atomic_write_bytes, atomic_write_json, nan_to_none
from node.federation.task import evaluate_classifier, with_real_share
from node.plan.quality import frechet_distance
from node.release.publish import load_accepted
from node.routes import route as route_named
from node.site.data import ImageSet, load_dataset
from node.site.ingest import load_split
from node.site.workspace import Workspace
from node.stages import run_one

ROWS = (
    "real_local",
    "fedavg_real",
    "fedprox_real",
    "central_real",
    "linear",
    "plan",
    "anchors",
    "plan_pool_real",
    "plan_pool_real_fedprox",
    "cvae_real",
    "cvae",
)
SYNTHETIC = ("linear", "plan", "anchors")  # the PLAN route's image sets
PARTITIONS = {"iid": None, "dirichlet0.5": 0.5}
METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced-accuracy", "auroc": "auroc"}


def build_sites(
    data: ImageSet, parts: list[np.ndarray], *, work: Path, overrides: dict, stage: str = "synthesize"
) -> list[Workspace]:
    """One node workspace per part, ingested and run up to `stage` (node stages, reused when up to
    date). Each site's records are written as its own .npz beside its workspace."""
    out = []
    for k, idx in enumerate(parts):
        name = f"site{k}"
        npz = work / f"{name}.npz"
        buf = io.BytesIO()
        np.savez(buf, images=data.images[idx], labels=data.labels[idx], patient_ids=data.patient_ids[idx])
        if not npz.exists() or npz.read_bytes() != buf.getvalue():
            npz.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(npz, buf.getvalue())
        raw = deep_merge({"name": name, "data": {"source": "npz", "path": str(npz)}}, overrides)
        ws, _ = site(name, SiteConfig.model_validate(raw), root=work)
        run_one(ws, stage)
        out.append(ws)
    return out


def table_sites(
    dataset: str,
    partition_name: str,
    *,
    max_images: int = 1200,
    work: Path = WORK,
    overrides: dict | None = None,
    stage: str = "synthesize",
) -> list[Workspace]:
    """The three PLAN-route sites of the table's panel (`dataset` in ../shared/data, `partition_name`
    one of PARTITIONS), built or reused exactly as run_partition builds them: the default config,
    or that config with `overrides` (then give them a `work` of their own)."""
    path = SHARED_DATA / f"{dataset}.npz"
    if not path.exists():
        raise SystemExit(f"{path}: not found (the MedMNIST benchmarks need ../shared/data; see its README)")
    data = load_dataset(DataConfig(source="npz", path=path, max_images=max_images))
    parts = partition(data.labels, n_sites=3, alpha=PARTITIONS[partition_name], seed=0)
    return build_sites(
        data, parts, work=work / f"eval-{dataset}-{partition_name}-{max_images}", overrides=overrides or {}, stage=stage
    )


def cvae_sites(n_sites: int, *, work: Path, overrides: dict, score_on: str = "test") -> list[dict]:
    """Beside each PLAN site, a CVAE-route workspace on the same .npz (so the same patient split):
    trained (the pinned extractor's embeddings, the CVAE, the re-identification heads), synthesized
    and audited by the node's own stages. Per site {"train", score_on: (embeddings, labels), "cvae":
    {"images": the accepted embeddings [M,D], "labels", "report": the audit}}."""
    out = []
    for k in range(n_sites):
        name = f"site{k}-cvae"
        raw = deep_merge({"name": name, "data": {"source": "npz", "path": str(work / f"site{k}.npz")}}, overrides)
        ws, _ = site(name, SiteConfig.model_validate(deep_merge(raw, {"synth": {"route": "cvae"}})), root=work)
        run_one(ws, "synthesize")
        run_one(ws, "audit")
        run = ws.synth / ws.latest_run()
        emb, labels = load_accepted(run / "accepted.npz")
        report = json.loads((run / "audit.json").read_text())
        out.append(
            {
                **{s: route_named("cvae").split_records(ws, s, device="cpu") for s in ("train", score_on)},
                "cvae": {"images": emb, "labels": labels, "report": report},
            }
        )
    return out


def published_sets(ws: Workspace) -> dict[str, dict]:
    """{set: {"images", "labels", "report"}} for the PLAN candidates, the straight lines and the
    k-same anchors of this site, each through the site's full audit; images and labels are the
    accepted (publishable) ones."""
    cfg = ws.config()
    with np.load(ws.synth / ws.latest_run() / "candidates.npz", allow_pickle=False) as z:
        plan = (z["images"], z["labels"], z["path"])
    per_path = cfg.synth.walk.points - 2
    wk = walk_both(ws, n_pairs=max(1, int(np.ceil(len(plan[0]) / per_path))))
    line_y = wk.anchors.labels.numpy().repeat(per_path)
    sets = {
        "plan": plan,
        "linear": (wk.linear.reshape(-1, *wk.linear.shape[2:]), line_y, np.arange(len(line_y)) // per_path),
        "anchors": (wk.anchor_images, wk.anchors.anchor_labels.numpy(), None),
    }
    out = {}
    for name, (images, labels, paths) in sets.items():
        report, accepted = site_audit(ws, images, labels, paths)
        out[name] = {"images": images[accepted], "labels": labels[accepted], "report": report}
    return out


def downstream_rows(
    sites: list[Workspace],
    sets: list[dict],
    cvae: list[dict],
    *,
    n_classes: int,
    ds: DownstreamConfig,
    seed: int,
    rows: tuple[str, ...] = ROWS,
    score_on: str = "test",
) -> dict:
    """{row: {"sites": [metrics per site], "rounds": n}} for each of `rows`, one downstream seed,
    scored on each site's `score_on` split ("test" or "holdout")."""
    real_xy = [route_named("plan").split_records(ws, "train", device="cpu") for ws in sites]
    scored = [route_named("plan").split_records(ws, score_on, device="cpu") for ws in sites]
    emb_scored = [c[score_on] for c in cvae]  # the CVAE route: the same sites' records as embeddings
    kw = dict(n_classes=n_classes, ds=ds, seed=seed)

    def pool(kind: str, of: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([s[kind]["images"] for s in of]), np.concatenate([s[kind]["labels"] for s in of])

    def pooled(kind: str, of: list[dict], on: list) -> dict:
        x, y = pool(kind, of)
        return fedavg([(x, y)] * len(sites), on, **kw) if len(y) else {"skipped": "nothing passed the audit"}

    def pool_real() -> list[tuple[np.ndarray, np.ndarray]]:
        return [with_real_share(pool("plan", sets), xy, real_share=ds.real_share) for xy in real_xy]

    def evaluated(models: list[torch.nn.Module]) -> dict:
        return {"sites": [evaluate_classifier(m, x, y, device="cpu") for m, (x, y) in zip(models, scored)], "rounds": 0}

    run = {
        "real_local": lambda: evaluated([alone(x, y, **kw) for x, y in real_xy]),
        "fedavg_real": lambda: fedavg(real_xy, scored, **kw),
        "fedprox_real": lambda: fedavg(real_xy, scored, **kw, proximal_mu=ds.proximal_mu),
        "central_real": lambda: evaluated([central(real_xy, **kw)] * len(sites)),
        **{kind: (lambda kind=kind: pooled(kind, sets, scored)) for kind in SYNTHETIC},
        "plan_pool_real": lambda: fedavg(pool_real(), scored, **kw),
        "plan_pool_real_fedprox": lambda: fedavg(pool_real(), scored, **kw, proximal_mu=ds.proximal_mu),
        "cvae_real": lambda: fedavg([c["train"] for c in cvae], emb_scored, **kw),
        "cvae": lambda: pooled("cvae", cvae, emb_scored),
    }
    return {row: run[row]() for row in rows}


def mean_sd(xs) -> dict:
    xs = np.asarray(list(xs), dtype=float)
    return {"mean": float(xs.mean()), "sd": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, "n": int(len(xs))}


def quality(sites: list[Workspace], sets: list[dict], *, n_classes: int, steps: int, seed: int) -> dict:
    """{set: {"fd", "precision", "recall"}}, each the mean over sites, in the features of a judge
    trained on that site's real train split (bench.generator.judge), against that split."""
    per: dict[str, list] = {k: [] for k in SYNTHETIC}
    for ws, s in zip(sites, sets):
        train = load_split(ws, "train")
        net = judge(train, n_classes=n_classes, steps=steps, seed=seed)
        ref = features(net, train.images)
        for kind in SYNTHETIC:
            images = s[kind]["images"]
            if len(images) <= K:  # too few published images for k-NN balls or a covariance
                per[kind].append((float("nan"),) * 3)
                continue
            f = features(net, images)
            per[kind].append((frechet_distance(ref, f), *precision_recall(ref, f)))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a set no site published stays nan
        means = {k: np.nanmean(np.array(v), 0).tolist() for k, v in per.items()}
    return {k: dict(zip(("fd", "precision", "recall"), m)) for k, m in means.items()}


def run_partition(
    data: ImageSet,
    alpha: float | None,
    *,
    work: Path,
    overrides: dict,
    seeds: int,
    ds: DownstreamConfig,
    judge_steps: int,
    rows: tuple[str, ...] = ROWS,
    score_on: str = "test",
) -> dict:
    """The panel's table (each of `rows`, scored on the sites' `score_on` splits) and its setup; the
    synthetic sets, their quality and the CVAE sites are made only when a row needs them."""
    seconds = {}
    t0 = time.time()
    parts = partition(data.labels, n_sites=3, alpha=alpha, seed=0)
    sites = build_sites(data, parts, work=work, overrides=overrides)
    n_classes = int(data.labels.max()) + 1
    seconds["sites"], t0 = round(time.time() - t0, 1), time.time()
    sets, q, cvae = [], {}, []
    if set(rows) & {*SYNTHETIC, "plan_pool_real", "plan_pool_real_fedprox"}:
        sets = [published_sets(ws) for ws in sites]
        seconds["audits"], t0 = round(time.time() - t0, 1), time.time()
        q = quality(sites, sets, n_classes=n_classes, steps=judge_steps, seed=7)
        seconds["quality"], t0 = round(time.time() - t0, 1), time.time()
    if set(rows) & {"cvae", "cvae_real"}:
        cvae = cvae_sites(len(sites), work=work, overrides=overrides, score_on=score_on)
        seconds["cvae_sites"], t0 = round(time.time() - t0, 1), time.time()
    runs = [
        downstream_rows(sites, sets, cvae, n_classes=n_classes, ds=ds, seed=s, rows=rows, score_on=score_on)
        for s in range(seeds)
    ]
    seconds["downstream"] = round(time.time() - t0, 1)
    out = {}
    for row in rows:
        if "skipped" in runs[0][row]:
            out[row] = {"skipped": runs[0][row]["skipped"]}
            continue
        # nanmean: a site whose test split lacks classes has no AUROC (label skew can leave it one class)
        r = {col: mean_sd(np.nanmean([m[k] for m in run[row]["sites"]]) for run in runs) for col, k in METRICS.items()}
        r["per_site_accuracy"] = [float(np.mean([run[row]["sites"][k]["accuracy"] for run in runs])) for k in range(3)]
        r["rounds_completed"] = [run[row]["rounds"] for run in runs]
        kind = "plan" if row.startswith("plan_pool_real") else row
        if kind in (*SYNTHETIC, "cvae"):
            of = cvae if kind == "cvae" else sets
            reports = [s[kind]["report"] for s in of]
            r |= {
                "mia_auc_upper": _site_mean(rep.get("mia_auc_upper") for rep in reports),
                "reid_rate": _site_mean(rep.get("reid_rate_upper") for rep in reports),
                # the PLAN paper's mmL (mean over candidates of the LPIPS distance to the nearest
                # train image); nan where the model store holds no LPIPS backbone weights
                "mml": _site_mean(rep.get("mmL") for rep in reports),
                "passed": [bool(rep["passed"]) for rep in reports],
                "distinct_images": int(sum(len(s[kind]["images"]) for s in of)),
                # what a site really publishes: nothing when its set fails the gate
                "published_images": int(sum(len(s[kind]["images"]) for s in of if s[kind]["report"]["passed"])),
                **q.get(kind, {}),  # FD, precision and recall are measured on images only
            }
        out[row] = r
    out["setup"] = {
        "site_sizes": [int(len(p)) for p in parts],
        "site_class_counts": [np.bincount(data.labels[p], minlength=n_classes).tolist() for p in parts],
        "n_test": [int(len(load_split(ws, "test"))) for ws in sites],
        "scored_on": score_on,
        "n_scored": [int(len(load_split(ws, score_on))) for ws in sites],
        "seeds": seeds,
        "rows": list(rows),
        "downstream": ds.model_dump(mode="json"),
        "seconds": seconds,
    }
    return out


def merge_tables(earlier: dict, new: dict) -> dict:
    """A run of some rows merged into the earlier table: in each panel it ran, its rows and setup
    replace the earlier ones (the earlier setup kept under "earlier"), every other row stays; the
    earlier run's _meta is kept under the new one's "earlier"."""
    out = copy.deepcopy(earlier)
    for name, panels in new.items():
        if name == "_meta":
            out["_meta"] = panels | ({"earlier": earlier["_meta"]} if "_meta" in earlier else {})
            continue
        for part, table in panels.items():
            before = out.setdefault(name, {}).get(part, {})
            setup = table["setup"] | ({"earlier": before["setup"]} if "setup" in before else {})
            out[name][part] = before | table | {"setup": setup}
    return out


def _site_mean(values) -> float:
    """The mean over sites of a figure a site's audit may not have (None or nan: too few images)."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def plot(res: dict, path: Path) -> None:
    """Accuracy (mean and sd over seeds) per row, one panel per data set and partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, p) for d, v in res.items() if not d.startswith("_") for p in v]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (d, p) in zip(axes[0], panels):
        rows = [r for r in ROWS if "accuracy" in res[d][p].get(r, {})]  # a --rows run may hold only some
        acc = [res[d][p][r]["accuracy"] for r in rows]
        ax.bar(range(len(rows)), [a["mean"] for a in acc], yerr=[a["sd"] for a in acc], color="#4a7ab5")
        ax.set_xticks(range(len(rows)), rows, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{d}, {p}", fontsize=9)
        ax.set_ylabel("accuracy (mean over sites)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"], help="names in ../shared/data")
    ap.add_argument("--npz", nargs="+", type=Path, default=[], help="any MedMNIST-style .npz instead of --datasets")
    ap.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    ap.add_argument("--max-images", type=int, default=1200, help="cap per data set before partitioning")
    ap.add_argument("--seeds", type=int, default=3, help="downstream seeds")
    ap.add_argument("--rounds", type=int, default=DownstreamConfig().rounds)
    ap.add_argument(
        "--min-local-steps", type=int, default=DownstreamConfig().min_local_steps, help="per site per round"
    )
    ap.add_argument("--judge-steps", type=int, default=300)
    ap.add_argument("--site-yaml", type=Path, help="YAML merged into every site's config (e.g. smaller models)")
    ap.add_argument("--work", type=Path, default=WORK, help="where the site workspaces live")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the first data set, label skew only, 600 images, 1 seed")
    ap.add_argument(
        "--score-on",
        choices=("test", "holdout"),
        default="test",
        help="each site's split the rows are scored on; holdout: the validation table (see above)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="default: bench/results/evaluation.json (--quick: evaluation_quick.json; --score-on holdout: "
        "evaluation_validation.json, evaluation_quick_validation.json)",
    )
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="rerun only these (merged into --out)")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()  # a site's config names its .npz by this path, read from the site's own folder
    if args.quick:
        args.datasets, args.partitions, args.max_images, args.seeds = args.datasets[:1], ["dirichlet0.5"], 600, 1
    if args.out is None:  # a quick or validation run never overwrites the full table
        stem = "evaluation_quick" if args.quick else "evaluation"
        stem += "_validation" if args.score_on == "holdout" else ""
        args.out = ROOT / "bench" / "results" / f"{stem}.json"
    torch.set_num_threads(args.threads)
    overrides = yaml.safe_load(args.site_yaml.read_text()) if args.site_yaml else {}
    sources = {p.stem: p for p in args.npz} or {d: SHARED_DATA / f"{d}.npz" for d in args.datasets}
    rows = tuple(r for r in ROWS if r in args.rows)
    earlier = json.loads(args.out.read_text()) if rows != ROWS and args.out.exists() else {}
    res: dict = {}
    for name, path in sources.items():
        if not path.exists():
            raise SystemExit(f"{path}: not found (the MedMNIST benchmarks need ../shared/data; see its README)")
        data = load_dataset(
            DataConfig(source="npz", path=path, max_images=args.max_images, **overrides.get("data", {}))
        )
        for part in args.partitions:
            res.setdefault(name, {})[part] = run_partition(
                data,
                PARTITIONS[part],
                work=args.work / f"eval-{name}-{part}-{args.max_images}",
                overrides=overrides,
                seeds=args.seeds,
                ds=DownstreamConfig(rounds=args.rounds, min_local_steps=args.min_local_steps),
                judge_steps=args.judge_steps,
                rows=rows,
                score_on=args.score_on,
            )
            # each finished panel is written at once: a run cut off after an hour keeps that hour
            meta = run_meta("bench.evaluation", argv) | {"partial": True}
            atomic_write_json(args.out, nan_to_none(merge_tables(earlier, res | {"_meta": meta})))
    res = merge_tables(earlier, res | {"_meta": run_meta("bench.evaluation", argv)})
    atomic_write_json(args.out, nan_to_none(res))
    plot(res, args.out.with_suffix(".png"))
    head = f"{'accuracy':>15}{'bal. acc.':>15}{'AUROC':>15}{'MIA up':>8}{'images':>8}"
    print(f"{'data set':<16}{'partition':<14}{'row':<24}{head}")
    for name in sources:
        for part in args.partitions:
            for row in rows:
                v = res[name][part][row]
                if "skipped" in v:
                    print(f"{name:<16}{part:<14}{row:<24}skipped: {v['skipped']}")
                    continue
                cells = "".join(f"{v[c]['mean']:>8.3f} ±{v[c]['sd']:.3f}" for c in METRICS)
                extra = f"{v['mia_auc_upper']:>8.3f}{v['distinct_images']:>8d}" if "mia_auc_upper" in v else ""
                print(f"{name:<16}{part:<14}{row:<24}{cells}{extra}")
    return res


if __name__ == "__main__":
    main()
