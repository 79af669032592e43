"""The README's first command (`make demo`): three phantom-clinic sites, the whole path, one table.

python -m deploy.local.demo --out out/demo [--sites 3] [--route plan|cvae]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.fileio import atomic_write_json
from deploy.local import launcher
from node.site.status import latest_audit, read_json
from node.site.workspace import Workspace


def site_summary(site: Path, results: dict) -> dict:
    """One site's row of results.json, read from its workspace and the coordinator's run results."""
    name = site.name
    splits = read_json(site / "data" / "splits.json") or {}
    audit = latest_audit(Workspace(site))
    published = read_json(site / "bundles" / "published.json") or {}
    federated = results.get("per_site_final", {}).get(name, {})
    baselines = results.get("baselines", {})
    fedavg_real = baselines.get("fedavg_real", {}).get("per_site", {}).get(name, {})
    # as the site reported it to the federation; before a run, the site's own local-only stage
    local = baselines.get("local_only", {}).get("per_site", {}).get(name) or {
        "accuracy": (read_json(site / "reports" / "local_only.json") or {}).get("test_accuracy")
    }
    return {
        "name": name,
        "n_real_train": len(splits.get("train", [])),
        "n_published": sum(int(b["n_samples"]) for b in published.get("bundles", []) if b.get("status") == "uploaded"),
        "audit": {
            "passed": bool(audit and audit.get("passed")),
            "mia_auc": audit.get("mia_auc") if audit else None,
            "reid_rate": audit.get("reid_rate") if audit else None,
        },
        "test_accuracy_federated": federated.get("accuracy"),
        "test_accuracy_fedavg_real": fedavg_real.get("accuracy"),
        "test_accuracy_local_only": local.get("accuracy"),
        "test_auroc_federated": federated.get("auroc"),
        "test_auroc_fedavg_real": fedavg_real.get("auroc"),
        "test_auroc_local_only": local.get("auroc"),
    }


def summarize(sites: list[Path], results: dict, *, seconds: float) -> dict:
    return {
        "sites": [site_summary(s, results) for s in sites],
        "federation": {
            "rounds": results.get("rounds"),
            "rounds_completed": results.get("rounds_completed"),
            "completed": bool(results.get("completed")),
            "status": results.get("status"),
            "run_id": results.get("run_id"),
            "baseline_fedavg_real": {
                k: results.get("baselines", {}).get("fedavg_real", {}).get(k) for k in ("status", "completed", "run_id")
            },
        },
        "wall_seconds": round(seconds, 1),
    }


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def print_table(summary: dict) -> None:
    table = Table(title=f"plan-node local federation ({summary['wall_seconds']:.0f} s)")
    for col in (
        "site",
        "real train",
        "published",
        "gate",
        "MIA AUC",
        "re-id rate",
        "acc. federated\n(synthetic)",
        "acc. FedAvg\n(real data)",
        "acc. local\nonly",
    ):
        table.add_column(col, justify="right")
    for s in summary["sites"]:
        a = s["audit"]
        table.add_row(
            s["name"], str(s["n_real_train"]), str(s["n_published"]), "pass" if a["passed"] else "FAIL",
            _fmt(a["mia_auc"]), _fmt(a["reid_rate"]), _fmt(s["test_accuracy_federated"]),
            _fmt(s["test_accuracy_fedavg_real"]), _fmt(s["test_accuracy_local_only"]),
        )  # fmt: skip
    # A fixed width: under make or CI stdout is no terminal, and rich would squeeze the table to 80.
    out = Console(width=110)
    out.print(table)
    f = summary["federation"]
    out.print(
        f"federation: {f['rounds_completed']}/{f['rounds']} rounds, status {f['status']}; "
        f"baseline FedAvg on real data: status {f['baseline_fedavg_real']['status']}"
    )
    out.print(
        "Each site evaluates on its own real test split. The federated model never saw a real image; "
        "FedAvg on real data is what sharing no data but the model would give; local only is a site alone."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (replaced)")
    parser.add_argument("--sites", type=int, default=3, help="number of sites")
    parser.add_argument("--quorum", type=int, default=2, help="sites that must pass their audit gate (all sites train)")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds before the demo gives up")
    parser.add_argument(
        "--route",
        choices=("plan", "cvae"),
        default="plan",
        help="what the sites share: PLAN images, or CVAE embeddings of the federation's pinned extractor",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=8050,
        help="serve the coordinator's dashboard on 127.0.0.1 at this port once the run ended (0: any free "
        "port; -1: do not); only when run from a terminal",
    )
    args = parser.parse_args(argv)

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    coord, sites = launcher.setup(
        out, n_sites=args.sites, quorum=args.quorum, federation_overrides={"route": args.route}
    )
    results = launcher.run(coord, sites, timeout=args.timeout, say=lambda m: Console(stderr=True).print(m))
    summary = summarize(sites, results, seconds=time.time() - t0)
    atomic_write_json(out / "results.json", summary)
    print_table(summary)
    print(f"results: {out / 'results.json'}")
    ok = summary["federation"]["completed"]
    if args.dashboard_port < 0 or not sys.stdin.isatty():  # a script waits for no one: say how to look
        print(f"dashboard: plan-server dashboard --dir {coord} (then open http://127.0.0.1:8050/)")
        return 0 if ok else 1
    from server.coordinator import CoordinatorDir
    from server.dashboard import serve_dashboard

    page = serve_dashboard(CoordinatorDir(coord), port=args.dashboard_port)
    print(f"dashboard: {page.url} (the finished run; Ctrl-C stops it)")
    try:
        page.wait()
    except KeyboardInterrupt:
        pass
    finally:
        page.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
